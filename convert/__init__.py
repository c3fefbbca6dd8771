"""Checkpoints in the formats users arrive and leave with: Hugging Face safetensors directories and
llama.cpp GGUF files, into meshlm run directories and back."""
