"""The post-training demo's task and its measurements: seeded two-digit additions with one exact
answer, written as chat SFT and preference JSON lines, and, for one run, the held-out exact match of
its greedy chat replies and its preference accuracy on held-out pairs. ``bench/posttrain.py`` runs
the pipeline."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.preference import encode_pair
from inference.generate import Generator
from inference.load import load_run
from inference.sampling import SamplingConfig
from inference.score import Scorer

QUESTION = "What is {a} + {b}? Answer with the number only."
# the wrong answers a model plausibly gives: a dropped or doubled carry, an off-by-one
WRONG_OFFSETS = (-10, 10, -1, 1)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One question, its answer and a plausible wrong answer (for the rejected response)."""

    question: str
    answer: str
    wrong: str


def make_task(seed: int, n_train: int, n_held_out: int) -> tuple[list[Problem], list[Problem]]:
    """(train, held out): distinct (a, b) pairs of two-digit numbers drawn by ``seed``, so no
    question is in both sets; the same seed gives the same sets."""
    operands = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    if not 0 < n_train + n_held_out <= len(operands) or n_train < 0 or n_held_out < 1:
        raise ValueError(f"train and held-out sizes must be >= 0 and >= 1, together at most "
                         f"{len(operands)}; got {n_train} and {n_held_out}")
    rng = random.Random(seed)
    problems = [Problem(QUESTION.format(a=a, b=b), str(a + b), str(a + b + rng.choice(WRONG_OFFSETS)))
                for a, b in rng.sample(operands, n_train + n_held_out)]
    return problems[:n_train], problems[n_train:]


def _user(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "user", "content": problem.question}]


def write_task(root: Path, train: Sequence[Problem], held_out: Sequence[Problem]) -> dict[str, Path]:
    """Writes {train,held_out}_{chat,pref}.jsonl under ``root``; returns their paths by stem."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, problems in (("train", train), ("held_out", held_out)):
        chat = [{"messages": [*_user(p), {"role": "assistant", "content": p.answer}]} for p in problems]
        pref = [{"prompt": p.question, "chosen": p.answer, "rejected": p.wrong} for p in problems]
        for kind, records in (("chat", chat), ("pref", pref)):
            path = paths[f"{split}_{kind}"] = root / f"{split}_{kind}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def _replies(run, problems: Sequence[Problem], max_new_tokens: int) -> list[str]:
    """Greedy chat replies to every problem, all prompts in one batch."""
    tok = run.tokenizer
    generator = Generator(run.cfg.model, run.params, run.mesh, run.rules, run.window,
                          SamplingConfig(temperature=0.0))
    prompts = [tok.encode_chat(_user(p), add_generation_prompt=True) for p in problems]
    out = generator.generate(prompts, max_new_tokens, stop_ids=tok.stop_ids)
    return [tok.decode(tokens) for tokens in out.tokens]


def _preference_wins(run, problems: Sequence[Problem]) -> list[bool]:
    """Per pair: the summed log-probability of the chosen response's trained tokens exceeds the
    rejected one's (rendered as preference training renders them, ``data.preference.encode_pair``)."""
    pairs = [encode_pair(run.tokenizer, _user(p), p.answer, p.wrong, f"held-out pair {i}")
             for i, p in enumerate(problems)]
    rows = [np.concatenate([pair.prompt, response]) for pair in pairs
            for response in (pair.chosen, pair.rejected)]
    scorer = Scorer(run.cfg.model, run.params, run.mesh, run.rules, run.window, batch_size=len(rows))
    scores = scorer.score(rows)
    summed = []
    for k, pair in enumerate(pairs):
        start = len(pair.prompt) - 1  # logp[j] is the log-probability of token j + 1
        for (logp, _), mask in zip(scores[2 * k:2 * k + 2], (pair.chosen_mask, pair.rejected_mask),
                                   strict=True):
            summed.append(float(logp[start:start + len(mask)][mask].sum()))
    return [summed[2 * k] > summed[2 * k + 1] for k in range(len(pairs))]


def measure(run_dir: Path, problems: Sequence[Problem], max_new_tokens: int = 32) -> dict:
    """Held-out figures of one run: ``exact_match`` (the stripped greedy reply equals the answer),
    ``preference_accuracy`` and three sample replies."""
    run = load_run(run_dir)
    replies = _replies(run, problems, max_new_tokens)
    wins = _preference_wins(run, problems)
    hits = [r.strip() == p.answer for r, p in zip(replies, problems, strict=True)]
    return {"exact_match": float(np.mean(hits)), "preference_accuracy": float(np.mean(wins)),
            "samples": [{"question": p.question, "reply": r} for p, r in zip(problems[:3], replies,
                                                                              strict=False)]}
