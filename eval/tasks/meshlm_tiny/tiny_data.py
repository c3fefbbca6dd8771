"""Datasets of the meshlm_tiny tasks, read from the JSONL files beside this module (no network, no
Hugging Face cache): each row names its split ("train": the few-shot pool, "test": the scored docs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in (HERE / name).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault(row.pop("split"), []).append(row)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})


# lm_eval calls a task's custom_dataset with the task metadata and the model arguments as keywords.
def multiple_choice(**_: Any) -> datasets.DatasetDict:
    return _load("mc.jsonl")


def perplexity(**_: Any) -> datasets.DatasetDict:
    return _load("ppl.jsonl")


def generation(**_: Any) -> datasets.DatasetDict:
    return _load("gen.jsonl")
