"""Every command's code, the top layer: each parses its arguments with ``cli/args.py``, prepares the
host (``cli/host.py``) and calls the library below. ``python -m train``, ``python -m eval`` and the
other module commands are three-line entry points (``train/__main__.py`` ...) that run these modules
by name."""
