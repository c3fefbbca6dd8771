"""Conversations for supervised fine-tuning: ``chat:GLOB[:FIELD]`` (JSON-lines files or parquet tables,
by extension, whose FIELD, default ``messages``, is an OpenAI-style list of ``{"role", "content"}``
messages), each rendered with the run's chat template into token ids and a mask of the assistant's
tokens (`render_conversation`, also for preference data). The pipeline trains on masked tokens only.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer as Backend

from core.errors import first_line
from data.chat import check_messages, render_chat_spans
from data.hf_sources import glob_and_field, held_out_names, matching_files

CHAT = "chat:"  # the spec prefix
CHAT_CACHE_ERROR = ("data.token_cache does not apply to chat: sources (their conversations are "
                    "rendered and tokenized in memory when opened): set data.token_cache=false")
FIELD = "messages"
ROLES = ("system", "user", "assistant", "tool")
JSONL_SUFFIXES, PARQUET_SUFFIXES = (".jsonl", ".json"), (".parquet",)
# Offsets without the post-processor (a ByteLevel post-processor trims whitespace out of offsets),
# one per tokenizer: rebuilding a large tokenizer.json takes a fraction of a second.
_OFFSET_BACKENDS: weakref.WeakKeyDictionary[Any, Backend] = weakref.WeakKeyDictionary()


class MaskedIds(NamedTuple):
    """A rendered conversation: its token ids (int32) and which of them the assistant wrote (bool)."""

    ids: np.ndarray
    mask: np.ndarray


# ------------------------------------------------------------------------ one conversation


def check_conversation(messages: Any) -> list[dict[str, Any]]:
    """``messages`` as a list of message dicts: each with a known ``role`` and a string ``content``,
    at least one assistant turn, none empty. ValueError (one line, no location) otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("is not a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} is not an object")
        message = {k: v for k, v in message.items() if v is not None or k in ("role", "content")}
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise ValueError(f"message {i} has no 'role'")
        if role not in ROLES:
            raise ValueError(f"message {i} has an unknown role {role!r} (expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) has no string 'content'")
        if role == "assistant" and not content.strip():
            raise ValueError(f"message {i} is an empty assistant turn")
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("has no assistant turn")
    return out


def render_conversation(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray,
                                                                                         np.ndarray]:
    """(ids int32, assistant_mask bool) of ``messages`` rendered by ``tokenizer``'s chat template.

    ids are ``tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))``,
    what ``eval generate --chat`` feeds. The mask holds the tokens whose characters lie inside an
    assistant span: what the template's ``{% generation %}`` blocks write, or, without them, for each
    assistant message i, what rendering ``messages[:i + 1]`` adds after ``messages[:i]`` with the
    generation prompt (its end-of-turn token included). ValueError (one line) for a tokenizer without
    a chat template, a template that rejects the conversation, or renderings that do not extend
    each other."""
    text, spans = render_chat_spans(chat_template(tokenizer), check_messages(messages),
                                    special_tokens=tokenizer.special_tokens)
    if not spans:
        spans = turn_spans(tokenizer, messages, text)
    ids = np.asarray(tokenizer.encode(text), np.int32)
    encoding = _offset_backend(tokenizer).encode(text, add_special_tokens=False)
    if encoding.ids != ids.tolist():
        raise ValueError("the tokenizer's offsets do not follow its ids")
    offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), bool)
    for start, end in spans:
        mask |= (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
    return ids, mask


def chat_template(tokenizer: Any) -> str:
    """``tokenizer``'s chat template; ValueError (one line) when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(f"the {getattr(tokenizer, 'kind', '?')} tokenizer has no chat template "
                         "(chat: sources need one: an hf: tokenizer or an imported run's)")
    return template


def turn_spans(tokenizer: Any, messages: Sequence[Mapping[str, Any]], text: str) -> list[tuple[int, int]]:
    """The character spans of ``text`` (the whole conversation) each assistant turn adds after its
    generation prompt, found by rendering the conversation turn by turn."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise ValueError(f"the chat template's rendering of the first {i} messages (with the "
                             f"generation prompt) does not begin the rendering of message {i}: the "
                             "assistant's tokens cannot be found turn by turn")
        spans.append((len(prompt), len(turn)))
    return spans


def _offset_backend(tokenizer: Any) -> Backend:
    """``tokenizer``'s backend without its post-processor (same ids without special tokens added)."""
    backend = tokenizer.backend
    if backend.post_processor is None:
        return backend
    if tokenizer not in _OFFSET_BACKENDS:
        bare = Backend.from_str(backend.to_str())
        bare.post_processor = None
        _OFFSET_BACKENDS[tokenizer] = bare
    return _OFFSET_BACKENDS[tokenizer]


def training_row(doc: MaskedIds, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(inputs, targets, target weights float32) of one conversation in one training row: cut on the
    right to ``seq_len + 1`` tokens (never continued into another row without its prompt); None
    when no assistant token is left among the targets (the conversation is dropped)."""
    ids, mask = doc.ids[:seq_len + 1], doc.mask[:seq_len + 1]
    weights = mask[1:].astype(np.float32)
    if not weights.any():
        return None
    return ids[:-1], ids[1:], weights


# ------------------------------------------------------------------------------ chat: sources


class ChatDocuments:
    """One split's conversations, rendered and tokenized when the source was opened (SFT sets are
    small: this reads every record once, so bad data fails before anything compiles)."""

    def __init__(self, docs: Sequence[MaskedIds], name: str) -> None:
        self.docs, self.name = list(docs), name

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> MaskedIds:
        return self.docs[index]

    def __repr__(self) -> str:
        return f"ChatDocuments({self.name!r}, {len(self)} conversations)"


def jsonl_records(path: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(``path:line``, the line number, its JSON object) of every non-blank line of a JSON-lines
    file; ValueError naming the line for bytes that are not UTF-8, invalid JSON or a non-object."""
    with open(path, "rb") as f:
        raw = f.read()
    for number, line in enumerate(raw.splitlines(), 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} is not UTF-8 (invalid byte at column {e.start + 1})") from None
        except ValueError:
            raise ValueError(f"{where} is not a JSON object (invalid JSON)") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where} is not a JSON object")
        yield where, number, record


def _jsonl_records(path: str, field: str) -> Iterator[tuple[str, Any]]:
    """(``path:line``, the line's FIELD) of every non-blank line; ValueError naming the line."""
    for where, _, record in jsonl_records(path):
        if field not in record:
            raise ValueError(f"{where} has no field {field!r}")
        yield where, record[field]


def _parquet_records(path: str, field: str) -> Iterator[tuple[str, Any]]:
    """(``path: row N`` (from 0), the row's FIELD) of every row; ValueError naming the file."""
    try:
        table = pq.read_table(path, columns=[field])
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read column {field!r}: {first_line(e)}") from None
    for row, value in enumerate(table.column(0).to_pylist()):
        yield f"{path}: row {row}", value


def _records(path: str, field: str) -> Iterator[tuple[str, Any]]:
    if path.endswith(PARQUET_SUFFIXES):
        return _parquet_records(path, field)
    if path.endswith(JSONL_SUFFIXES):
        return _jsonl_records(path, field)
    raise ValueError(f"{path}: chat: reads {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} files")


def chat_source(rest: str, split: str, tokenizer: Any, eval_fraction: float,
                seq_len: int = 0) -> ChatDocuments:
    """The conversations of ``chat:GLOB[:FIELD]`` for ``split``, held out by the crc32 of each
    record's file key and line number (JSON lines) or row (parquet), as every source is. Every
    record is checked; the split's are rendered (`render_conversation`). ``seq_len`` > 0: ValueError
    when no conversation keeps an assistant token within a training row (`training_row`). ValueError
    (one line naming the file and line or row) for bad data."""
    chat_template(tokenizer)  # a tokenizer without a template fails before any file is read
    pattern, field = glob_and_field(rest, FIELD)
    spec = f"chat:{rest}"
    records, names = [], []
    for path, key in matching_files(pattern, spec):
        for index, (where, messages) in enumerate(_records(path, field)):
            try:
                records.append((where, check_conversation(messages)))
            except ValueError as e:
                raise ValueError(f"{where}: the conversation {e}") from None
            number = where.rsplit(":", 1)[1] if path.endswith(JSONL_SUFFIXES) else index
            names.append(f"{key}#{number}")
    held = held_out_names(names, len(names), eval_fraction)
    docs = []
    for (where, messages), is_held in zip(records, held, strict=True):
        if is_held == (split == "eval"):
            try:
                docs.append(MaskedIds(*render_conversation(tokenizer, messages)))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    if seq_len and docs and not any(training_row(d, seq_len) for d in docs):
        raise ValueError(f"{spec}: no {split} conversation has an assistant token within a training "
                         f"row of {seq_len + 1} tokens (train.seq_len + 1)")
    return ChatDocuments(docs, f"{spec}:{split}")
