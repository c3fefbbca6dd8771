"""Tokenizers behind one interface (encode, decode, vocab_size, bos_id, eos_id, pad_id), and their
persistence in a run directory so that evaluation uses exactly the tokenizer training used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then pad=256, bos=257, eos=258. Any text round-trips exactly."""

    kind = "byte"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, raw: bytes) -> list[int]:
        return list(raw)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


KINDS = {"byte": ByteTokenizer}


def vocab_size_of(kind: str) -> int:
    return KINDS[kind].vocab_size


def make_tokenizer(kind: str) -> Tokenizer:
    return KINDS[kind]()


def save_tokenizer(tokenizer: Tokenizer, run_dir: str | Path) -> None:
    path = Path(run_dir) / TOKENIZER_FILE
    path.write_text(json.dumps({"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}) + "\n")


def load_tokenizer(run_dir: str | Path) -> Tokenizer:
    """The tokenizer a run directory was trained with; ValueError if it is missing or unknown."""
    path = Path(run_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: not a meshlm run directory")
    try:
        spec = json.loads(path.read_text())
        return make_tokenizer(spec["kind"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid tokenizer file ({e})") from None
