"""Tokenizers, text sources and batch assembly."""
