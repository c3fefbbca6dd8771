"""``python -m data``: runs the command module ``cli.data`` (the command-line layer, above every
library package) exactly as ``python -m cli.data`` would. ``python -m`` needs a module inside this
package; running the command by its name keeps the package from importing the layer above it."""

import runpy

if __name__ == "__main__":
    runpy.run_module("cli.data", run_name="__main__")
