"""The two sides of bench.serve on one workload: meshlm's serving engine driven by N closed-loop
client threads (each submits its next request when its previous one has finished), and Hugging Face
transformers' ``generate`` on the same weights, one request at a time or in static groups.

Every request is greedy with no stop id, so it generates exactly its ``max_tokens``: both sides do
the same, fixed work. Times are ``time.perf_counter`` stamps taken as each token is handed to its
request (the engine thread's ``on_event``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

from inference.engine import Engine
from inference.requests import Handle, Request


@dataclasses.dataclass(frozen=True)
class Work:
    """One request of the workload: prompt token ids and the exact number of new tokens."""

    prompt: tuple[int, ...]
    max_tokens: int


def make_workload(count: int, vocab: int, seed: int, prompt_lens: tuple[int, int],
                  output_lens: tuple[int, int]) -> list[Work]:
    """``count`` requests with uniformly random prompt lengths, output lengths (both inclusive
    ranges) and token ids below ``vocab``; the first k of a longer list are the list of k."""
    rng = np.random.default_rng(seed)
    works = []
    for _ in range(count):
        prompt_len = int(rng.integers(prompt_lens[0], prompt_lens[1] + 1))
        max_tokens = int(rng.integers(output_lens[0], output_lens[1] + 1))
        works.append(Work(tuple(int(t) for t in rng.integers(0, vocab, prompt_len)), max_tokens))
    return works


def p50_p99_ms(seconds: Sequence[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(seconds, np.float64) * 1e3, [50, 99])
    return float(p50), float(p99)


def closed_loop(engine: Engine, works: Sequence[Work], clients: int) -> dict[str, Any]:
    """Serves ``works`` with ``clients`` closed-loop client threads on a started engine: output
    tokens/s (all new tokens over the wall time from the first submit to the last token), time to
    first token and inter-token latency percentiles, and the programs compiled meanwhile."""
    next_index = iter(range(len(works)))
    lock = threading.Lock()
    submitted = [0.0] * len(works)
    stamps: list[list[float]] = [[] for _ in works]
    tokens: list[list[int]] = [[] for _ in works]
    failures: list[str] = []

    def serve(i: int) -> Handle:
        def on_event(event: Any) -> None:
            if event.token is not None:
                stamps[i].append(time.perf_counter())

        submitted[i] = time.perf_counter()
        return engine.submit(Request(works[i].prompt, works[i].max_tokens, stop_ids=(),
                                     on_event=on_event))

    def client() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            done = serve(i).result()
            tokens[i] = done.tokens
            if done.finish_reason != "length":
                failures.append(f"request {i} ended with {done.finish_reason!r}: {engine.error}")

    compiles = engine.compiles
    start = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - start
    if failures:
        raise RuntimeError(failures[0])
    ttft = [s[0] - t for s, t in zip(stamps, submitted, strict=True)]
    itl = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False)]
    output = sum(len(t) for t in tokens)
    (ttft50, ttft99), (itl50, itl99) = p50_p99_ms(ttft), p50_p99_ms(itl)
    return {"clients": clients, "requests": len(works), "output_tokens": output,
            "wall_s": wall_s, "tokens_per_s": output / wall_s, "ttft_p50_ms": ttft50,
            "ttft_p99_ms": ttft99, "itl_p50_ms": itl50, "itl_p99_ms": itl99,
            "recompiles_after_warm_up": engine.compiles - compiles, "tokens": tokens}


def decode_step_ms(engine: Engine, works: Sequence[Work], rows: int, steps: int) -> float:
    """Mean wall time of an engine step that only decodes ``rows`` sequences (their prompts
    prefilled first), stepped by hand on a stopped engine; the requests are cancelled after."""
    handles = [engine.submit(Request(w.prompt, steps + 2, stop_ids=())) for w in works[:rows]]
    while engine.stats().prefilling or engine.stats().waiting:
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for handle in handles:
        handle.cancel()
    while engine.step():
        pass
    return 1e3 * float(np.mean(times))


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask of prompts padded on the left to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


class HFGenerate:
    """transformers' ``generate`` on an exported Hugging Face directory: float32, greedy, no EOS
    (so every row generates exactly ``max_new_tokens``, as the engine's requests with no stop id;
    ``min_new_tokens`` would instead mask the EOS logit and change the greedy tokens)."""

    def __init__(self, hf_dir: Path, threads: int):
        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None
        self.pad_id = 0

    def generate(self, prompts: Sequence[Sequence[int]], new: int) -> list[list[int]]:
        ids, mask = left_padded(prompts, self.pad_id)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                      pad_token_id=self.pad_id)
        return out[:, ids.shape[1]:].tolist()

    def run(self, works: Sequence[Work], batch: int) -> dict[str, Any]:
        """Static batching: groups of ``batch`` consecutive requests, each group generating its
        longest output; only each request's own ``max_tokens`` count as output."""
        self.generate([works[0].prompt], 2)  # warm-up, not timed
        tokens, generated = [], 0
        start = time.perf_counter()
        for first in range(0, len(works), batch):
            group = works[first:first + batch]
            new = max(w.max_tokens for w in group)
            out = self.generate([w.prompt for w in group], new)
            generated += new * len(group)
            tokens += [row[:w.max_tokens] for row, w in zip(out, group, strict=True)]
        wall_s = time.perf_counter() - start
        output = sum(w.max_tokens for w in works)
        return {"batch": batch, "requests": len(works), "output_tokens": output,
                "generated_tokens": generated, "wall_s": wall_s, "tokens_per_s": output / wall_s,
                "tokens": tokens}
