"""Text sources as one token stream: the embedded default corpus (this Python installation's standard
library sources, which every machine has) or local text files, split into train and eval tokens.
"""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path

import numpy as np

from data.tokenizer import Tokenizer


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a fixed order (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def source_files(source: str) -> list[Path]:
    """Files named by a data.source spec; ValueError when none match."""
    if source == "stdlib":
        files = stdlib_files()
    elif source.startswith("text:"):
        pattern = source[len("text:"):]
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    else:
        raise ValueError(f"data.source: expected 'stdlib' or 'text:GLOB', got {source!r}")
    if not files:
        raise ValueError(f"data.source: no files match {source!r}")
    return files


def load_tokens(source: str, tokenizer: Tokenizer, max_bytes: int,
                eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train_tokens, eval_tokens) as int32 arrays; documents separated by EOS.

    Documents are read in a fixed shuffled order until ``max_bytes``; the last ``eval_fraction`` of
    the tokens is held out for evaluation. The result depends only on the files and the arguments.
    """
    files = source_files(source)
    order = np.random.default_rng(0).permutation(len(files))
    pieces: list[np.ndarray] = []
    total = 0
    for i in order:
        raw = files[i].read_bytes()[: max_bytes - total]
        if not raw:
            continue
        ids = tokenizer.encode(raw.decode("utf-8", errors="replace"))
        pieces.append(np.asarray(ids + [tokenizer.eos_id], dtype=np.int32))
        total += len(raw)
        if total >= max_bytes:
            break
    tokens = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    split = int(len(tokens) * (1 - eval_fraction))
    return tokens[:split], tokens[split:]
