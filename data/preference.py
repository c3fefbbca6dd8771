"""Preference pairs for DPO-style fine-tuning: ``data.source=pref:GLOB`` JSON lines
``{"prompt": str | "messages": [...], "chosen": str | [assistant message], "rejected": ...}``
rendered with the run's chat template, validated at open time, and served as batches of pairs.

A pair becomes two rows, (prompt + chosen, prompt + rejected), each padded to ``seq_len``
(inputs, targets, weights, segment ids, positions) with weight 1 on the response's trained tokens
only: chat SFT's rule (``data.chat_data.render_conversation``), the tokens inside the reply's span.
Rows are never packed: the loss needs each response's summed log-probability, and one sequence per
row keeps that a plain row sum with both rows of a pair side by side (row 2k chosen, 2k+1 rejected);
the price is the padding. Truncation: a row holds ``seq_len + 1`` tokens; the prompt is cut from the
left (never below half of them, and by the same amount in both rows of a pair), then each response
from the right; a pair left without a trained response token in either row is dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from data.chat_data import jsonl_records, render_conversation
from data.hf_sources import held_out_names, matching_files
from data.pipeline import READ_OPTIONS, Row, Shard
from data.tokenizer import Tokenizer

PREFIX = "pref:"
ONE_PROCESS = Shard()


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference example as token ids: the rendered prompt and the two responses after it,
    each with the mask of its trained tokens (bool)."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    chosen_mask: np.ndarray
    rejected_mask: np.ndarray


def _messages(value: Any, where: str, what: str) -> list[dict[str, Any]]:
    if not (isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
        raise ValueError(f"{where}: {what} must be a non-empty list of messages")
    for m in value:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: every message of {what} needs a string role and content")
    return value


def _response(value: Any, where: str, name: str) -> str:
    """The text of ``chosen`` / ``rejected``: a string, or a list of one assistant message."""
    if isinstance(value, list):
        value = _messages(value, where, name)
        if len(value) != 1 or value[0]["role"] != "assistant":
            raise ValueError(f"{where}: {name} must be one assistant message")
        value = value[0]["content"]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} must be a string or [assistant message]")
    if not value.strip():
        raise ValueError(f"{where}: {name} is an empty response")
    return value


def parse_record(record: dict[str, Any], where: str) -> tuple[list[dict[str, Any]], str, str]:
    """(prompt messages, chosen text, rejected text) of one JSON line's object; ValueError naming
    ``where``."""
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise ValueError(f"{where} has no prompt (a non-empty string 'prompt' or 'messages')")
    for name in ("chosen", "rejected"):
        if name not in record:
            raise ValueError(f"{where} has no field {name!r}")
    chosen, rejected = (_response(record[n], where, n) for n in ("chosen", "rejected"))
    if chosen == rejected:
        raise ValueError(f"{where}: chosen equals rejected")
    return messages, chosen, rejected


def _last_turn_start(mask: np.ndarray) -> int:
    """Where the last run of True in ``mask`` (the final assistant turn's tokens) begins."""
    before = np.flatnonzero(~mask[:np.flatnonzero(mask)[-1]])
    return int(before[-1]) + 1 if len(before) else 0


def encode_pair(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], chosen: str,
                rejected: str, where: str) -> Pair:
    """The pair's ids by the chat template, with chat SFT's rule (``data.chat_data``): each
    conversation (the messages, then the response as the assistant's reply) is rendered whole and
    only the tokens lying inside the reply's span are trained. The prompt is the tokens both
    renderings share before their replies begin; a token that straddles the generation prompt and
    the reply (a template whose generation prompt ends in a space) stays in its response, untrained."""
    rendered = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        ids, mask = render_conversation(tokenizer, [*messages, {"role": "assistant", "content": text}])
        if not mask.any():
            raise ValueError(f"{where}: {name} renders to no tokens")
        rendered.append((ids, mask))
    (ids_c, mask_c), (ids_r, mask_r) = rendered
    shared = min(len(ids_c), len(ids_r))
    differ = np.flatnonzero(ids_c[:shared] != ids_r[:shared])
    prompt_len = min(int(differ[0]) if len(differ) else shared,
                     _last_turn_start(mask_c), _last_turn_start(mask_r))
    return Pair(ids_c[:prompt_len], ids_c[prompt_len:], ids_r[prompt_len:],
                mask_c[prompt_len:], mask_r[prompt_len:])


def read_pairs(pattern: str, tokenizer: Tokenizer, spec: str) -> tuple[list[Pair], list[str]]:
    """(every pair of the files matching ``pattern``, each one's name ``relpath#line``): each line
    is validated and rendered now, so bad data stops the run before anything compiles."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{spec} needs a tokenizer with a chat template; the run's tokenizer "
                         f"({getattr(tokenizer, 'kind', type(tokenizer).__name__)}) has none")
    pairs, names = [], []
    for path, key in matching_files(pattern, spec):
        for where, number, record in jsonl_records(path):
            try:
                pairs.append(encode_pair(tokenizer, *parse_record(record, where), where))
            except ValueError as e:  # the template rejected the conversation
                message = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(message if message.startswith(where) else
                                 f"{where}: {message}") from None
            names.append(f"{key}#{number}")
    if not pairs:
        raise ValueError(f"{spec} holds no preference pairs")
    return pairs, names


def pair_rows(pair: Pair, seq_len: int) -> Row | None:
    """The pair's two rows [2, seq_len] (chosen first), truncated as the module says; None when a
    response keeps no token."""
    budget = seq_len + 1
    longest = max(len(pair.chosen), len(pair.rejected))
    keep_prompt = min(len(pair.prompt), max(budget - longest, budget // 2))
    prompt = pair.prompt[len(pair.prompt) - keep_prompt:]
    rows: dict[str, list[np.ndarray]] = {k: [] for k in
                                         ("inputs", "targets", "weights", "segment_ids", "positions")}
    for response, mask in ((pair.chosen, pair.chosen_mask), (pair.rejected, pair.rejected_mask)):
        response, mask = response[:budget - keep_prompt], mask[:budget - keep_prompt]
        if keep_prompt == 0 or not mask.any():
            return None
        ids = np.concatenate([prompt, response])
        n = len(ids) - 1  # real (input, target) positions
        pad = seq_len - n
        rows["inputs"].append(np.pad(ids[:-1], (0, pad)))
        rows["targets"].append(np.pad(ids[1:], (0, pad)))
        weights = np.zeros(seq_len, np.float32)
        weights[keep_prompt - 1:n] = mask  # the targets that are trained response tokens
        rows["weights"].append(weights)
        rows["segment_ids"].append((np.arange(seq_len) < n).astype(np.int32))
        rows["positions"].append(np.arange(seq_len, dtype=np.int32))
    return {k: np.stack(v).astype(np.float32 if k == "weights" else np.int32)
            for k, v in rows.items()}


class PairRows:
    """A random-access source of the rows [2, seq_len] of the pairs that fit (grain reads it)."""

    def __init__(self, pairs: Sequence[Pair], seq_len: int, name: str):
        rows = (pair_rows(p, seq_len) for p in pairs)
        self.rows = [r for r in rows if r is not None]
        self.dropped = len(pairs) - len(self.rows)
        self.name = name

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return self.rows[index]

    def __repr__(self) -> str:
        return f"PairRows({self.name!r}, {len(self.rows)} pairs)"


def open_pairs(spec: str, split: str, tokenizer: Tokenizer, seq_len: int,
               eval_fraction: float) -> PairRows:
    """The ``split`` pairs of ``pref:GLOB`` as rows: a pair is held out for ``eval`` by the crc32
    rule of every source (``held_out_names`` of ``relpath#line``). ValueError (one line, naming the
    file and line) for bad data."""
    pairs, names = read_pairs(spec[len(PREFIX):], tokenizer, spec)
    held = held_out_names(names, len(names), eval_fraction)
    mine = [p for p, h in zip(pairs, held, strict=True) if h == (split == "eval")]
    return PairRows(mine, seq_len, f"{spec}:{split}")


def _flatten(pairs: Row) -> Row:
    """[pairs, 2, T] -> [2 * pairs, T]: chosen and rejected rows of a pair side by side."""
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in pairs.items()}


def pair_batches(rows: PairRows, *, batch_size: int, seed: int, shard: Shard = ONE_PROCESS,
                 prefetch: int = 2) -> grain.IterDataset:
    """Endless batches of this process's ``batch_size`` rows (``batch_size / 2`` pairs): its pairs
    ``shard.index::shard.count``, in a new seeded order every epoch."""
    if batch_size % 2:
        raise ValueError(f"a batch of pairs needs an even number of rows, got {batch_size}")
    if len(rows) == 0:
        raise ValueError(f"{rows.name} has no pair that fits the rows")
    pairs = grain.MapDataset.source(rows)
    if len(pairs) < shard.count:  # every process needs a pair: repeat the few there are
        pairs = pairs.repeat(-(-shard.count // len(pairs)))
    batches = (pairs[shard.index::shard.count].shuffle(seed=seed).repeat()
               .batch(batch_size // 2, drop_remainder=True).map(_flatten)
               .to_iter_dataset(READ_OPTIONS))
    if prefetch:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
    return batches


def pair_eval_batches(rows: PairRows, *, batch_size: int, max_batches: int = 0,
                      shard: Shard = ONE_PROCESS) -> list[Row]:
    """One ordered pass over this process's held-out pairs in batches of ``batch_size`` rows, the
    last padded with pairs of weight 0; ``max_batches`` > 0 stops early."""
    mine = [rows[i] for i in range(shard.index, len(rows), shard.count)]
    per_batch = batch_size // 2
    if max_batches:
        mine = mine[:max_batches * per_batch]
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()} if len(rows) else None
    out = []
    for start in range(0, len(mine), per_batch):
        chunk = mine[start:start + per_batch]
        chunk += [empty] * (per_batch - len(chunk))
        out.append(_flatten({k: np.stack([r[k] for r in chunk]) for k in chunk[0]}))
    return out


def regroup_pair_state(saved: list[dict[str, Any]], shard: Shard) -> dict[str, Any]:
    """This process's iterator state from the states every process saved; ValueError when the
    number of processes changed (each process's pairs are its ``index::count`` share)."""
    if len(saved) != shard.count:
        raise ValueError(f"the checkpoint's input position was saved by {len(saved)} processes; "
                         f"a pref: source resumes with the same number (not {shard.count})")
    return saved[shard.index]
