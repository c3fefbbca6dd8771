"""Tokenizers behind one interface (encode, decode, token_bytes, vocab_size, bos_id, eos_id, pad_id,
stop_ids, kind), their specs (``"byte"``, ``"sentencepiece:PATH.model"``, ``"hf:PATH"``,
``"run:RUN_DIR"``), their files in a run directory, and training a SentencePiece model
(``python -m data train-tokenizer``).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol

import sentencepiece as spm

from data.hf_tokenizer import HF_FILE, HFTokenizer, read_text

TOKENIZER_FILE = "tokenizer.json"  # meshlm's metadata: kind, vocabulary size, the files below
MODEL_FILE = "tokenizer.model"
TOKENIZER_FILES = (TOKENIZER_FILE, MODEL_FILE, HF_FILE)  # every file a run's tokenizer may have
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
MIN_VOCAB_SIZE = len(SPECIAL_IDS) + 256  # the special pieces and the 256 byte-fallback pieces
MAX_SENTENCE_BYTES = 4096  # training lines longer than this are cut into pieces (never skipped)
SPACE_SYMBOL = "\u2581"  # "▁": how SentencePiece writes a space inside its pieces


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]  # generation stops at these: EOS first, then end-of-turn ids; () if none

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then pad=256, bos=257, eos=258. Any text round-trips exactly."""

    kind = "byte"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258
    stop_ids = (258,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, raw: bytes) -> list[int]:
        return list(raw)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """The bytes id ``token`` stands for in the text (b"" for pad, bos, eos)."""
        return bytes([token]) if 0 <= token < 256 else b""


class SentencePieceTokenizer:
    """A SentencePiece model (any ``.model`` file: Llama, Gemma, or one from `train_sentencepiece`).

    ``bos_id`` and ``eos_id`` are the model's own (-1 when the model defines none). ``pad_id`` is the
    model's pad id when it has one (>= 0), else its eos id (else its unk id): padding positions carry
    weight 0 in the loss, so any valid id serves.

    Round trips: with a model from `train_sentencepiece` (identity normalisation, byte fallback, no
    dummy prefix, no whitespace folding) ``decode(encode(s)) == s`` for every string UTF-8 can encode
    (no lone surrogates). SentencePiece itself writes spaces as "▁" (U+2581) and so decodes a literal
    "▁" in the text as a space; `encode` therefore spells any piece whose text contains a literal "▁"
    as its UTF-8 byte pieces, which decode to exactly that text (models without byte pieces keep
    SentencePiece's behaviour).
    """

    kind = "sentencepiece"

    def __init__(self, model: str | os.PathLike | bytes) -> None:
        if isinstance(model, bytes):
            proto, where = model, "serialized model"
        else:
            path = Path(model)
            if not path.is_file():
                raise ValueError(f"SentencePiece model {path} does not exist")
            proto, where = path.read_bytes(), str(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except RuntimeError:
            raise ValueError(f"{where} is not a SentencePiece model") from None
        self.model_proto = proto
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.stop_ids = (self.eos_id,) if self.eos_id >= 0 else ()
        self.pad_id = next(i for i in (self._sp.pad_id(), self.eos_id, self._sp.unk_id()) if i >= 0)
        byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        self._byte_ids = byte_ids if all(self._sp.is_byte(i) for i in byte_ids) else None

    def encode(self, text: str) -> list[int]:
        if self._byte_ids is None or SPACE_SYMBOL not in text:
            return self._sp.encode(text)
        pieces = self._sp.encode(text, return_type="offset_mapping")
        ids: list[int] = []
        for i, (begin, end) in zip(pieces["ids"], pieces["offsets"], strict=True):
            surface = text[begin:end]
            if SPACE_SYMBOL in surface and not self._sp.is_byte(i):
                ids.extend(self._byte_ids[b] for b in surface.encode("utf-8"))
            else:
                ids.append(i)
        return ids

    def decode(self, ids) -> str:
        """Text of ``ids``; ids outside the vocabulary (e.g. a padded model vocabulary) are dropped."""
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def token_bytes(self, token: int) -> bytes:
        """The bytes id ``token`` stands for in the text: a byte piece's byte, a normal piece's text
        ("▁" as a space); b"" for control and unknown pieces and ids outside the vocabulary."""
        if not 0 <= token < self.vocab_size or self._sp.is_control(token) or self._sp.is_unknown(token):
            return b""
        piece = self._sp.id_to_piece(token)
        if self._sp.is_byte(token):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SPACE_SYMBOL, " ").encode("utf-8")

    def __getstate__(self) -> dict:
        return {"model_proto": self.model_proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"])


SPEC_HELP = ("expected 'byte', 'sentencepiece:PATH.model', 'hf:PATH' (a Hugging Face tokenizer.json or "
             "its directory) or 'run:RUN_DIR' (the tokenizer of a meshlm run)")


def make_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by ``spec``: ``"byte"``, ``"sentencepiece:PATH.model"``, ``"hf:PATH"`` (a
    tokenizer.json, or a directory with tokenizer.json [+ tokenizer_config.json]) or ``"run:RUN_DIR"``
    (the tokenizer saved in a run directory, e.g. of an imported model). ValueError if the spec is
    unknown or its file is missing or invalid."""
    if spec == "byte":
        return ByteTokenizer()
    kind, _, path = spec.partition(":")
    if kind == "sentencepiece" and path:
        return SentencePieceTokenizer(path)
    if kind == "hf" and path:
        return HFTokenizer.from_path(path)
    if kind == "run" and path:
        return load_tokenizer(path)
    raise ValueError(f"unknown tokenizer {spec!r}: {SPEC_HELP}")


def vocab_size_of(spec: str) -> int:
    """Number of ids of the tokenizer named by ``spec``; ValueError as `make_tokenizer`."""
    return ByteTokenizer.vocab_size if spec == "byte" else make_tokenizer(spec).vocab_size


def save_tokenizer(tokenizer: Tokenizer, run_dir: str | Path) -> None:
    """Write ``tokenizer.json`` (meshlm's metadata) and, for SentencePiece, ``tokenizer.model``, for
    Hugging Face, ``hf_tokenizer.json`` (its tokenizer.json; special ids and chat template go in the
    metadata) into ``run_dir``."""
    meta = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}
    if isinstance(tokenizer, SentencePieceTokenizer):
        (Path(run_dir) / MODEL_FILE).write_bytes(tokenizer.model_proto)
        meta["file"] = MODEL_FILE
        meta["sha256"] = hashlib.sha256(tokenizer.model_proto).hexdigest()
    elif isinstance(tokenizer, HFTokenizer):
        blob = tokenizer.backend.to_str().encode("utf-8")
        (Path(run_dir) / HF_FILE).write_bytes(blob)
        meta.update(file=HF_FILE, sha256=hashlib.sha256(blob).hexdigest(), **tokenizer.settings())
    (Path(run_dir) / TOKENIZER_FILE).write_text(json.dumps(meta) + "\n")


def _verified_file(run_dir: Path, meta: dict) -> bytes:
    """The bytes of the file the metadata names: a plain file name inside ``run_dir`` (resolved:
    no link out of it either) whose sha256 is the recorded one -- a run written by meshlm always
    records it. ValueError otherwise."""
    name = meta["file"]
    root = run_dir.resolve()
    path = (run_dir / str(name)).resolve()
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") \
            or path.parent != root:
        raise ValueError(f"file {name!r} is not a file name inside {run_dir}")
    if not isinstance(meta.get("sha256"), str):
        raise ValueError(f"it records no sha256 for {name} (a run written by meshlm always does)")
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ValueError(f"{path} is not the file this run was trained with (its sha256 differs)")
    return blob


def load_tokenizer(run_dir: str | Path) -> Tokenizer:
    """The tokenizer a run directory was trained with; ValueError if it is missing or invalid."""
    path = Path(run_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: not a meshlm run directory")
    try:
        meta = json.loads(read_text(path))
        kind = meta["kind"]
        if kind == "byte":
            tokenizer: Tokenizer = ByteTokenizer()
        elif kind == "sentencepiece":
            tokenizer = SentencePieceTokenizer(_verified_file(Path(run_dir), meta))
        elif kind == "hf":
            tokenizer = HFTokenizer.from_saved(_verified_file(Path(run_dir), meta).decode("utf-8"), meta)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        if meta.get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
            raise ValueError(f"vocab_size {meta['vocab_size']} but the model has {tokenizer.vocab_size}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError, RecursionError) as e:
        raise ValueError(f"{path} is not a valid tokenizer file ({e})") from None
    return tokenizer


# ----------------------------------------------------------------------------------------- training


def check_utf8(path: Path) -> None:
    """ValueError naming ``path`` unless it is a readable UTF-8 text file (read in 1 MiB blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                decoder.decode(block)
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (invalid byte near offset {offset + e.start})") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


def training_lines(paths: Sequence[Path], max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """The non-empty lines of ``paths``, lines over ``max_bytes`` UTF-8 bytes cut into pieces that fit
    (SentencePiece would silently drop them)."""
    width = max_bytes // 4  # characters: at most 4 bytes each
    for path in paths:
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if len(line) <= width or len(line.encode("utf-8")) <= max_bytes:
                    if line:
                        yield line
                else:
                    yield from (line[i:i + width] for i in range(0, len(line), width))


def _spm_message(e: RuntimeError) -> str:
    """SentencePiece's error text without its source location, on one line."""
    text = re.sub(r"^\w+: (\S+\(\d+\) \[.*?\] )?", "", str(e).strip())
    return " ".join(text.split()) or str(e)


def train_sentencepiece(inputs: Sequence[str | Path], vocab_size: int,
                        model_type: Literal["bpe", "unigram"], output_prefix: str | Path, *,
                        input_sentence_size: int = 2_000_000) -> Path:
    """Train a SentencePiece model on UTF-8 text files and write ``PREFIX.model``; return its path.

    The model round-trips any text exactly (see `SentencePieceTokenizer`): identity normalisation,
    whitespace kept as is, no dummy prefix, byte fallback for characters outside the vocabulary; digits
    are split. Ids: unk 0, bos 1, eos 2, pad 3, then the 256 byte pieces. Lines are the training
    sentences (over 4096 bytes they are cut; newlines themselves are left to byte pieces); beyond
    ``input_sentence_size`` lines (0: no limit) a uniform sample is kept (SentencePiece's reservoir
    sampling, with its fixed seed: deterministic), so large inputs are streamed, not loaded.
    ValueError, with a one-line message, for a missing or non-UTF-8 input, a vocabulary size the text
    cannot fill, or an output that cannot be written.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"unknown model type {model_type!r}: expected 'bpe' or 'unigram'")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab size {vocab_size} is too small: at least {MIN_VOCAB_SIZE} "
                         f"(4 special ids + 256 byte pieces) plus the text's characters")
    if not (input_sentence_size == 0 or input_sentence_size > 100):
        raise ValueError(f"input sentence size must be 0 (all lines) or above 100, got {input_sentence_size}")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files given")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"input file {path} does not exist")
        check_utf8(path)
    if not any(path.stat().st_size for path in paths):
        raise ValueError("the input files hold no text")
    output = Path(f"{output_prefix}.model")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output directory {output.parent}: {e.strerror}") from None
    if not os.access(output.parent, os.W_OK):
        raise ValueError(f"output directory {output.parent} is not writable")

    model = _train(training_lines(paths), vocab_size, model_type, input_sentence_size)
    try:
        output.write_bytes(model)
    except OSError as e:
        raise ValueError(f"cannot write {output}: {e.strerror}") from None
    return output


def _train(lines: Iterator[str], vocab_size: int, model_type: str, input_sentence_size: int) -> bytes:
    model = _ModelBytes()
    try:
        with open(os.devnull, "w") as quiet:
            spm.SentencePieceTrainer.Train(
                sentence_iterator=lines, model_writer=model, logstream=quiet,
                model_type=model_type, vocab_size=vocab_size, **SPECIAL_IDS,
                byte_fallback=True, character_coverage=0.9995,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
                max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True, num_threads=min(os.cpu_count() or 1, 16))
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {_spm_message(e)}") from None
    return model.data


class _ModelBytes:
    """Receives the serialized model from the trainer (instead of it writing files itself)."""

    data = b""

    def write(self, data: bytes) -> None:
        self.data = data
