"""Weighted mixtures of sources: ``data.mix=SPEC:WEIGHT,SPEC:WEIGHT,...`` parsed into (spec, weight)
pairs, and the `Mixture` the pipeline draws documents from (see `data.pipeline.train_dataset`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Documents drawn from ``sources`` in proportion to ``weights`` (normalised: they sum to 1).

    Training mixes at the document level inside each stream; evaluation takes every source's
    documents in turn, one of each, until all are used (weights do not apply: every token counts once).
    """

    sources: tuple[Any, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sources or len(self.sources) != len(self.weights):
            raise ValueError("a mixture needs one weight per source, and at least one source")
        if not all(w > 0 and math.isfinite(w) for w in self.weights):
            raise ValueError(f"mixture weights must be positive numbers, got {list(self.weights)}")
        total = sum(self.weights)
        object.__setattr__(self, "weights", tuple(w / total for w in self.weights))


def parse_mix(text: str) -> list[tuple[str, float]]:
    """``SPEC:WEIGHT,SPEC:WEIGHT,...`` -> [(spec, weight)], weights normalised to sum to 1 (the weight
    is after each item's last colon). ValueError with a one-line message for an empty item, a
    missing or non-positive weight, or a spec given twice."""
    pairs = []
    for item in text.split(","):
        spec, sep, weight = item.strip().rpartition(":")
        if not sep or not spec:
            raise ValueError(f"{item.strip()!r} is not SPEC:WEIGHT")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"{item.strip()!r}: weight {weight!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{item.strip()!r}: the weight must be a positive number")
        pairs.append((spec, value))
    specs = [s for s, _ in pairs]
    if len(set(specs)) != len(specs):
        raise ValueError(f"a source is given twice in {text!r}")
    total = sum(w for _, w in pairs)
    return [(s, w / total) for s, w in pairs]

