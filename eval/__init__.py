"""Evaluations of trained runs: perplexity, the lm-evaluation-harness model and its local tasks,
inspection of a checkpoint's insides, and scaling-law planning, sweeps and fits."""
