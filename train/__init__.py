"""Training: the config and its validation, the run directory, checkpoints, the sharded program
(state, shardings, jitted steps), the loop, fine-tuning and merging, and AOT compiles for TPUs."""
