"""Inference on a trained run: loading its parameters onto the current devices, sampling, KV-cache
generation and scoring token rows. Above ``train/`` (it reads run directories and checkpoints),
below the evaluations and commands that use it."""
