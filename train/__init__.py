"""Training: configuration, sharded state, pure train/eval steps, checkpoints and the loop."""
