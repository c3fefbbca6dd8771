"""KV-cache generation speed: prefill and decode tokens/s of a ~20M-parameter model with 256-token
prompts and 128 new tokens, at batch 1 and 8, on one device and on the 8-device mesh (rows over
data, kv heads over tensor). Weights are random: speed does not depend on them.

Prefill time is one ``generate(..., max_new_tokens=1)`` call; decode time is the extra time of a
129-token call over it, so decode tokens/s = batch * 128 / (t129 - t1). Each figure is the median
of ``--repeats`` runs after a warm-up that compiles every step.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from bench.common import print_table, write_result
from cli.args import Parser, run
from cli.host import quiet_tpu_probe, use_cpu_devices
from inference.generate import Generator
from inference.sampling import SamplingConfig
from model.config import ModelConfig
from model.flops import param_counts
from model.transformer import Transformer
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules, tree_shardings

MODEL = ModelConfig(vocab_size=384, d_model=512, num_layers=6, num_heads=8, num_kv_heads=4,
                    mlp_dim=1536, max_seq_len=512)
PROMPT, NEW = 256, 128


def _timed(gen: Generator, prompts: list[list[int]], new: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gen.generate(prompts, new)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(mesh_axes: dict[str, int], devices: list, batch: int, repeats: int) -> dict[str, float]:
    mesh = make_mesh(MeshConfig(**mesh_axes), devices)
    params = nnx.split(Transformer(MODEL, nnx.Rngs(0)))[1]
    params = jax.device_put(params, tree_shardings(params, mesh, default_rules()))
    gen = Generator(MODEL, params, mesh, default_rules(), MODEL.max_seq_len, SamplingConfig(0.0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 256, (batch, PROMPT)).tolist()
    start = time.perf_counter()
    gen.generate(prompts, NEW + 1)  # compiles prefill and decode
    compile_s = time.perf_counter() - start
    prefill_s = _timed(gen, prompts, 1, repeats)
    total_s = _timed(gen, prompts, NEW + 1, repeats)
    return {"prefill_tokens_per_s": batch * PROMPT / prefill_s,
            "decode_tokens_per_s": batch * NEW / (total_s - prefill_s),
            "decode_ms_per_step": 1e3 * (total_s - prefill_s) / NEW,
            "first_call_s": compile_s}


def decode_command(argv: Sequence[str]) -> int:
    parser = Parser(prog="python -m bench.decode", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)
    quiet_tpu_probe()
    use_cpu_devices(8)
    figures: dict[str, float] = {}
    where = {"1device": ({"data": 1}, jax.devices()[:1]),
             "mesh": ({"data": -1, "tensor": 2}, jax.devices())}
    for name, (axes, devices) in where.items():
        for batch in (int(b) for b in args.batches.split(",")):
            for key, value in measure(axes, devices, batch, args.repeats).items():
                figures[f"{name}_b{batch}_{key}"] = value
    rows = [(k, f"{v:,.0f}" if "tokens" in k else f"{v:.2f}") for k, v in figures.items()]
    counts = param_counts(MODEL)
    print_table(f"Decode: {counts['total'] / 1e6:.1f}M params, prompt {PROMPT}, {NEW} new tokens "
                "(tokens/s; ms per decode step; first call incl. compile in s)", rows)
    path = write_result("decode", {"model": vars(MODEL), "prompt_tokens": PROMPT, "new_tokens": NEW,
                                   "param_counts": counts, "mesh": {"1device": {"data": 1},
                                                                    "mesh": {"data": 4, "tensor": 2}}},
                        figures)
    print(f"  wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(decode_command, argv)


if __name__ == "__main__":
    sys.exit(main())
