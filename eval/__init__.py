"""Evaluation: loading trained runs, sampling text, and the ``python -m eval`` command line."""
