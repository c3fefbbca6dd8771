"""``python -m train.launch``: runs the command module ``cli.launch`` (the command-line layer, above
every library package) exactly as ``python -m cli.launch`` would. ``python -m`` needs a module
inside this package; running the command by its name keeps the package from importing the layer
above it."""

import runpy

if __name__ == "__main__":
    runpy.run_module("cli.launch", run_name="__main__")
