"""Hugging Face tokenizers (the ``tokenizers`` package, no ``transformers``) behind meshlm's tokenizer
interface: from a model directory's tokenizer.json (+ tokenizer_config.json), or rebuilt from the
metadata of a GGUF file (byte-level BPE, "gpt2", and SentencePiece-style BPE, "llama").

Ids follow ``transformers``: ``[bos_id] + encode(text)`` (no BOS when ``bos_id`` is -1) equals
``AutoTokenizer(...)(text)["input_ids"]``, which is how every meshlm consumer builds a sequence.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from core.errors import first_line
from data.chat import render_chat
from data.gguf_file import open_gguf

HF_FILE = "hf_tokenizer.json"  # its name in a run directory (meshlm's own tokenizer.json is metadata)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
SPACE_SYMBOL = "\u2581"  # "▁": a space inside SentencePiece-style pieces

MAX_JSON_BYTES = 128 << 20  # a JSON file read (four times Gemma's 33 MB tokenizer.json, the largest known)
HASH_BASE = 1_000_003  # odd: invertible mod 2**64 (merges rebuild)
HASH_INVERSE = pow(HASH_BASE, -1, 1 << 64)
MERGES_PER_TOKEN, MIN_MERGE_LIMIT = 16, 1 << 20  # real vocabularies: a few merges per token

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# How a GGUF's ``tokenizer.ggml.pre`` splits text before byte-level BPE (llama.cpp's names).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_PRE = {"default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion"}
DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
SPLIT_PRE = {**dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx",
                              "pixtral"), _LLAMA3_SPLIT),
             **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2_SPLIT)}


def byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of byte-level BPE (GPT-2): printable Latin-1 bytes stand for themselves,
    the other 68 bytes for U+0100 onwards in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, shifted = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[chr(b)] = b
        else:
            alphabet[chr(0x100 + shifted)] = b
            shifted += 1
    return alphabet


def _types_in(node: Any) -> set[str]:
    """Every component ``type`` in a tokenizer.json subtree (a Sequence's members included)."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        return found.union(*(_types_in(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_types_in(v) for v in node))
    return set()


def token_byte_table(backend: Tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each id stands for in the text: b"" for special tokens and unused ids; an added
    non-special token's text; byte-level pieces through the GPT-2 alphabet; SentencePiece-style
    pieces with "▁" as a space and ``<0xNN>`` as byte NN; other models' pieces as their text."""
    spec = json.loads(backend.to_str())
    parts = _types_in(spec.get("decoder")) | _types_in(spec.get("pre_tokenizer"))
    byte_level = "ByteLevel" in parts
    metaspace = bool(parts & {"Metaspace", "ByteFallback"})
    alphabet = byte_level_alphabet()
    added = backend.get_added_tokens_decoder()
    table = []
    for token in range(vocab_size):
        piece = backend.id_to_token(token)
        if piece is None or (token in added and added[token].special):
            table.append(b"")
        elif token in added:
            table.append(added[token].content.encode("utf-8"))
        elif byte_level and all(c in alphabet for c in piece):
            table.append(bytes(alphabet[c] for c in piece))
        elif metaspace and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            table.append((piece.replace(SPACE_SYMBOL, " ") if metaspace else piece).encode("utf-8"))
    return table


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with meshlm's interface.

    ``encode`` adds no special tokens (added tokens written in the text, e.g. "<|im_end|>", are
    matched whole, as in ``transformers``). ``bos_id`` is the id every sequence starts with: the BOS
    token when the tokenizer adds one by default (``add_bos_token``, or a post-processor that
    prepends it), else -1 -- so ``[bos_id] + encode(text)`` is ``transformers``' ``input_ids``. The
    named special tokens (``bos_token`` even when it is not prepended) are in ``special_tokens``,
    for chat templates. ``eos_id`` is the EOS token (-1 if none). ``stop_ids`` are the ids generation
    stops at: EOS first, then the model's end-of-turn ids (Gemma's ``<end_of_turn>``, Llama 3's
    ``<|eot_id|>`` and ``<|eom_id|>``...; empty when there is none). ``pad_id`` is the pad token,
    else ``eos_id``, else 0 (padding carries weight 0 in the loss). ``decode``
    keeps special tokens, like ``transformers``' ``decode(ids, skip_special_tokens=False)``, and
    drops ids outside the vocabulary (a padded model vocabulary).
    """

    kind = "hf"

    def __init__(self, backend: Tokenizer, *, bos_id: int = -1, eos_id: int = -1, pad_id: int = -1,
                 special_tokens: Mapping[str, str | None] | None = None,
                 chat_template: str | None = None, stop_ids: Iterable[int] = ()) -> None:
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        if self.vocab_size == 0:
            raise ValueError("the tokenizer has an empty vocabulary")
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if not -1 <= value < self.vocab_size:
                raise ValueError(f"{name} {value} is outside the vocabulary of {self.vocab_size} ids")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.stop_ids = _stop_ids(eos_id, stop_ids, self.vocab_size)
        _align_post_processor(backend, bos_id)
        self.pad_id = pad_id if pad_id >= 0 else eos_id if eos_id >= 0 else 0
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
        self.chat_template = chat_template or None
        self._bytes = token_byte_table(backend, self.vocab_size)

    # ------------------------------------------------------------------------------ the interface

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size],
                                   skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """The bytes id ``token`` stands for in the text (b"" for special tokens and ids outside the
        vocabulary). For byte-level BPE the bytes of a text's ids concatenate to the text; for a
        SentencePiece-style tokenizer that prepends "▁" the first piece carries that extra space."""
        return self._bytes[token] if 0 <= token < self.vocab_size else b""

    def token_id(self, piece: str) -> int:
        """The id of the token spelled ``piece`` (e.g. "<|im_end|>"); -1 if there is none."""
        found = self.backend.token_to_id(piece)
        return -1 if found is None else found

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    # -------------------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, continue_final_message: bool = False,
                            **extra: Any) -> str:
        """The conversation as the model's chat template writes it (as ``transformers``'
        ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...,
        continue_final_message=...)``); ValueError if there is no template or it rejects the
        conversation."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens,
                           continue_final_message=continue_final_message, **extra)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
        """The ids of the rendered conversation, complete: do not prepend ``bos_id`` (a template
        that wants BOS writes it), as ``transformers``' ``apply_chat_template(tokenize=True)``."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    # ------------------------------------------------------------------------------- persistence

    def settings(self) -> dict[str, Any]:
        """Everything besides the tokenizer.json text needed to rebuild this tokenizer."""
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "stop_ids": list(self.stop_ids), "special_tokens": dict(self.special_tokens),
                "chat_template": self.chat_template}

    @classmethod
    def from_saved(cls, tokenizer_json: str, settings: Mapping[str, Any]) -> HFTokenizer:
        """Inverse of (``backend.to_str()``, `settings`); ValueError for invalid input. Settings
        saved before ``stop_ids`` existed stop at EOS alone."""
        backend = _parse_tokenizer_json(tokenizer_json, "the saved tokenizer")
        return cls(backend, bos_id=int(settings["bos_id"]), eos_id=int(settings["eos_id"]),
                   pad_id=int(settings["pad_id"]), special_tokens=settings.get("special_tokens"),
                   chat_template=settings.get("chat_template"), stop_ids=settings.get("stop_ids", ()))

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_json": self.backend.to_str(), "settings": self.settings()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(HFTokenizer.from_saved(state["tokenizer_json"], state["settings"]).__dict__)

    # ------------------------------------------------------------------------- Hugging Face files

    @classmethod
    def from_files(cls, tokenizer_json: str | os.PathLike, tokenizer_config_json: str | os.PathLike | None
                   = None, *, chat_template: str | None = None) -> HFTokenizer:
        """A Hugging Face model directory's tokenizer: tokenizer.json, and from tokenizer_config.json
        the special tokens and ``chat_template`` (special_tokens_map.json beside it fills in missing
        tokens; chat_template.jinja beside it wins over the config's template), and from
        generation_config.json beside it (beside tokenizer.json without a config) the ids generation
        stops at, ``eos_token_id`` (an id or a list, as ``transformers``' ``generate``). Whether BOS is
        prepended is the tokenizer.json post-processor's business: ``transformers`` (5.x) ignores the
        config's ``add_bos_token`` when there is a tokenizer.json, and so does this. ValueError for a
        missing or invalid file."""
        path = Path(tokenizer_json)
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
        backend = _parse_tokenizer_json(read_text(path), str(path))
        config: dict[str, Any] = {}
        siblings = path.parent
        if tokenizer_config_json is not None:
            config_path = Path(tokenizer_config_json)
            config = read_json_object(config_path)
            siblings = config_path.parent
            special_map = siblings / "special_tokens_map.json"
            if special_map.is_file():
                config = {**read_json_object(special_map), **config}
            if chat_template is None and (siblings / "chat_template.jinja").is_file():
                chat_template = read_text(siblings / "chat_template.jinja")
        special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        for name, text in special.items():
            if text is not None and backend.token_to_id(text) is None:
                raise ValueError(f"{name} {text!r} of the tokenizer config is not in the vocabulary")
        ids = {name: backend.token_to_id(text) if text else -1 for name, text in special.items()}
        if chat_template is None:
            chat_template = _template_text(config.get("chat_template"))
        return cls(backend, bos_id=_prepended_id(backend), eos_id=ids["eos_token"], pad_id=ids["pad_token"],
                   special_tokens=special, chat_template=chat_template,
                   stop_ids=_generation_stop_ids(siblings / "generation_config.json", backend))

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> HFTokenizer:
        """A tokenizer.json file, or a directory holding tokenizer.json [+ tokenizer_config.json]."""
        path = Path(path)
        if path.is_dir():
            config = path / "tokenizer_config.json"
            return cls.from_files(path / "tokenizer.json", config if config.is_file() else None)
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
        config = path.parent / "tokenizer_config.json"
        return cls.from_files(path, config if config.is_file() else None)


def _stop_ids(eos_id: int, ids: Iterable[int], vocab_size: int) -> tuple[int, ...]:
    """EOS (when there is one) and then ``ids``, each once; ValueError for an id outside the vocabulary."""
    out = [eos_id] if eos_id >= 0 else []
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(f"stop id {token!r} is not an id of the vocabulary of {vocab_size} ids")
        out.append(token)
    return tuple(dict.fromkeys(out))


def _generation_stop_ids(path: Path, backend: Tokenizer) -> tuple[int, ...]:
    """generation_config.json's ``eos_token_id`` (an id or a list of ids; () without the file);
    ValueError for anything else or an id the vocabulary does not have."""
    if not path.is_file():
        return ()
    value = read_json_object(path).get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"{path}: eos_token_id {value!r} is not an id or a list of ids")
    for token in ids:
        if token < 0 or backend.id_to_token(token) is None:
            raise ValueError(f"{path}: eos_token_id {token} is not in the vocabulary")
    return tuple(ids)


def _parse_tokenizer_json(text: str, where: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises plain Exception for every parse error
        raise ValueError(f"{where} is not a Hugging Face tokenizer.json ({first_line(e)})") from None


def read_text(path: Path, max_bytes: int = MAX_JSON_BYTES) -> str:
    """A UTF-8 file of at most ``max_bytes`` (checked before it is read); ValueError otherwise."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{path} has {size} bytes (at most {max_bytes} are read)")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable text file ({e})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file (at most MAX_JSON_BYTES) holding an object; ValueError with one line otherwise."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a readable JSON file ({e})") from None
    except RecursionError:
        raise ValueError(f"{path} is not a readable JSON file (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template_text(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates ("default")."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def _align_post_processor(backend: Tokenizer, bos_id: int) -> None:
    """Make the tokenizer's own post-processor prepend ``bos_id`` (nothing when -1), so that its
    tokenizer.json, exported, gives ``transformers`` the same ``input_ids``."""
    if _prepended_id(backend) == bos_id:
        return
    if bos_id < 0:
        backend.post_processor = None
        return
    bos = backend.id_to_token(bos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=[bos, "$A"], pair=[bos, "$A", bos, "$B:1"], special_tokens=[(bos, bos_id)])


def _prepended_id(backend: Tokenizer) -> int:
    """The id the tokenizer's post-processor puts before a text's ids (-1 if none)."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    if len(full) > len(plain) and full[1:1 + len(plain)] == plain:
        return full[0]
    return -1


# -------------------------------------------------------------------------------------------- GGUF


def _gguf_tokenizer_fields(path: Path) -> dict[str, Any]:
    reader = open_gguf(path)
    return {name: field.contents() for name, field in reader.fields.items()
            if name.startswith("tokenizer.")}


def _split_candidates(pieces: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(piece index, cut) of every cut of a piece whose two halves hash like whole pieces of the
    list: every cut into two listed pieces, plus the rare hash collision (the caller checks). Each
    substring's polynomial hash (mod 2**64) comes from prefix sums, so the cost is linear in the
    pieces' total length, not quadratic in each piece's (slicing and hashing every cut)."""
    lengths = np.array([len(p) for p in pieces], np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    codes = np.frombuffer("".join(pieces).encode("utf-32-le"), np.uint32).astype(np.uint64)
    with np.errstate(over="ignore"):
        one = np.ones(1, np.uint64)
        power = np.concatenate([one, np.cumprod(np.full(len(codes), HASH_BASE, np.uint64))])
        inverse = np.concatenate([one, np.cumprod(np.full(len(codes), HASH_INVERSE, np.uint64))])
        prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(codes * power[:-1])])
        interior = np.ones(len(codes), bool)
        interior[starts[lengths > 0]] = False
        cut_at = np.flatnonzero(interior)  # every position strictly inside a piece
        piece = np.repeat(np.arange(len(pieces)), lengths)[cut_at]
        start, end = starts[piece], ends[piece]
        whole = (prefix[ends] - prefix[starts]) * inverse[starts]
        left = (prefix[cut_at] - prefix[start]) * inverse[start]
        right = (prefix[end] - prefix[cut_at]) * inverse[cut_at]
    hit = np.isin(left, whole) & np.isin(right, whole)
    return piece[hit], (cut_at - start)[hit]


def _merges_by_score(tokens: Sequence[str], scores: Sequence[float],
                     types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece-style vocabulary: every split of a normal piece into two
    pieces of the vocabulary, the merged piece's score deciding the order (best first)."""
    known = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    pieces = list(known)
    candidates = _split_candidates(pieces)
    if len(candidates[0]) > max(MIN_MERGE_LIMIT, MERGES_PER_TOKEN * len(tokens)):
        raise ValueError(f"the GGUF vocabulary splits into {len(candidates[0])} merges (at most "
                         f"{MERGES_PER_TOKEN} per token): not a SentencePiece vocabulary")
    ranked = []
    for index, cut in zip(*candidates, strict=True):
        piece = pieces[index]
        left, right = piece[:cut], piece[cut:]
        if left in known and right in known:
            token = known[piece]
            ranked.append((-scores[token], token, -len(left), left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _byte_level_pre(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PRE[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = ", ".join(sorted(GPT2_PRE | DIGITS_PRE | set(SPLIT_PRE)))
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {known})")


def tokenizer_from_gguf(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer described by a GGUF file's metadata: ``tokenizer.ggml.model`` "gpt2" (byte-level
    BPE; ``tokenizer.ggml.pre`` picks how text is split, as llama.cpp does) or "llama"
    (SentencePiece-style BPE with byte fallback; its merges from the file, else ranked by the merged
    pieces' scores). Control and unknown tokens become special tokens, user-defined ones plain added
    tokens; special ids, ``add_bos_token`` (default: on for "llama", off for "gpt2", as
    ``transformers``) and ``tokenizer.chat_template`` come from the metadata; generation stops at EOS
    and at the end-of-turn and end-of-message ids (``eot_token_id``, ``eom_token_id``). ValueError
    with one line for a missing file, a file that is not GGUF, or an unsupported model or
    pre-tokenizer."""
    path = Path(path)
    fields = _gguf_tokenizer_fields(path)
    model = fields.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        what = "has no tokenizer" if model is None else f"has tokenizer model {model!r}"
        raise ValueError(f"{path} {what}: only 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE) "
                         "are supported")
    tokens: list[str] = list(fields.get("tokenizer.ggml.tokens") or [])
    types: list[int] = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    scores = list(fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    if not tokens or not len(tokens) == len(types) == len(scores):
        raise ValueError(f"{path} has {len(tokens)} tokens, {len(types)} token types and {len(scores)} "
                         "scores: a GGUF tokenizer needs one of each per token")
    vocab = {token: i for i, token in enumerate(tokens)}
    ids = {name: int(fields.get(f"tokenizer.ggml.{key}", -1)) for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    ids = {name: i if 0 <= i < len(tokens) else -1 for name, i in ids.items()}
    ends = [int(fields.get(f"tokenizer.ggml.{key}", -1)) for key in ("eot_token_id", "eom_token_id")]
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    if model == "gpt2":
        backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = _byte_level_pre(str(fields.get("tokenizer.ggml.pre", "default")))
        backend.decoder = decoders.ByteLevel()
    else:
        unk = tokens[ids["unk_token"]] if ids["unk_token"] >= 0 else None
        backend = Tokenizer(BPE(vocab=vocab, merges=merges or _merges_by_score(tokens, scores, types),
                                unk_token=unk, byte_fallback=True, fuse_unk=True))
        prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPACE_SYMBOL, prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace(SPACE_SYMBOL, " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types, strict=True) if kind in (CONTROL, UNKNOWN)]
    backend.add_special_tokens(special)
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED])
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama"))
    return HFTokenizer(backend, bos_id=ids["bos_token"] if add_bos else -1, eos_id=ids["eos_token"],
                       pad_id=ids["pad_token"],
                       special_tokens={name: tokens[i] for name, i in ids.items() if i >= 0},
                       chat_template=fields.get("tokenizer.chat_template"),
                       stop_ids=[i for i in ends if 0 <= i < len(tokens)])
