"""``python -m train.finetune``: runs the command module ``cli.finetune`` (the command-line layer,
above every library package) exactly as ``python -m cli.finetune`` would. ``python -m`` needs a
module inside this package; running the command by its name keeps the package from importing the
layer above it."""

import runpy

if __name__ == "__main__":
    runpy.run_module("cli.finetune", run_name="__main__")
