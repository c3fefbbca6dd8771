"""The JAX side of ``scaling``: the accounting checked against XLA's ``cost_analysis()`` of the
compiled train and eval steps, and the sweep that trains a ladder of model sizes with the normal
training loop (train.loop.train) and records their final evaluation losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from model.config import ModelConfig
from model.flops import inference_flops_per_token, param_counts, peak_flops, train_flops_per_token
from sharding.mesh import MeshConfig, make_mesh
from train.aot import costs_of
from train.config import CONFIG_DIR, Config, TrainConfig, load_config
from train.loop import train
from train.program import Program
from train.validate import validate

SWEEP_BASE = CONFIG_DIR / "scaling" / "base.yaml"
DEFAULT_SIZES = "32x1,32x2,48x2,64x2,80x3"  # d_model x num_layers, smallest first
RESULT_FILE = "scaling_result.json"


# ------------------------------------------------------------------------ XLA's own FLOP count


def compiled_flops(model: ModelConfig, batch_size: int, seq_len: int) -> dict[str, float]:
    """FLOPs per step that XLA's ``cost_analysis()`` reports for the compiled train step and eval
    step of ``model`` on one device, beside the formulas' figures (``executed``: with capacity
    padding). The layers are unrolled for this: XLA counts a while loop's body once, not once per
    trip, so a scanned stack would show one layer."""
    model = dataclasses.replace(model, scan_layers=False)
    cfg = Config(model=model, train=TrainConfig(steps=100, batch_size=batch_size, seq_len=seq_len))
    program = Program(cfg, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    xla_train = costs_of(program.lower_train_step().compile())["flops"]
    xla_eval = costs_of(program.lower_eval_step().compile())["flops"]
    tokens = batch_size * seq_len
    return {"batch_size": batch_size, "seq_len": seq_len, "xla_train_flops": xla_train,
            "formula_train_flops": train_flops_per_token(model, seq_len) * tokens,
            "formula_train_flops_executed": train_flops_per_token(model, seq_len, executed=True) * tokens,
            "xla_eval_flops": xla_eval,
            "formula_eval_flops": inference_flops_per_token(model, seq_len) * tokens,
            "formula_eval_flops_executed": inference_flops_per_token(model, seq_len, executed=True) * tokens}


# --------------------------------------------------------------------------------- the ladder


@dataclasses.dataclass(frozen=True)
class Rung:
    """One model of the ladder: its name, kind (dense or moe) and full config."""

    name: str
    kind: str
    cfg: Config


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'32x1,64x2' -> [(32, 1), (64, 2)] (d_model x num_layers); ValueError for anything else."""
    sizes = []
    for item in text.split(","):
        d, sep, layers = item.strip().lower().partition("x")
        if not (sep and d.isdigit() and layers.isdigit()):
            raise ValueError(f"--sizes: expected D_MODELxLAYERS items like 32x2, got {item.strip()!r}")
        size = (int(d), int(layers))
        if size[0] < 8 or size[0] % 8 or size[1] < 1:
            raise ValueError(f"--sizes: d_model must be a multiple of 8 (>= 8) and layers >= 1, "
                             f"got {item.strip()!r}")
        sizes.append(size)
    if len(set(sizes)) != len(sizes):
        raise ValueError("--sizes: a size is listed twice")
    return sizes


def shape_overrides(d_model: int, num_layers: int) -> list[str]:
    """Four heads of d_model / 4 (two key/value heads), a SwiGLU MLP 3 x d_model wide."""
    return [f"model.d_model={d_model}", f"model.num_layers={num_layers}", "model.num_heads=4",
            "model.num_kv_heads=2", f"model.mlp_dim={3 * d_model}"]


def ladder(sizes: list[tuple[int, int]], *, moe: bool, experts: int, tokens_per_param: float,
           count: str, base: str | Path, overrides: list[str], out_dir: Path) -> list[Rung]:
    """The runs of a sweep: each size dense and, with ``moe``, an MoE twin of the same active size
    (``experts`` experts of the dense MLP's width, top-1, so a token uses as many weights as in
    the dense model, plus the router's). Steps = ceil(tokens_per_param * N / tokens per step),
    where N is the ``count`` (non_embedding or total) of active parameters."""
    rungs = []
    for d, layers in sizes:
        variants = [("dense", [])]
        if moe:
            variants.append(("moe", [f"model.num_experts={experts}", "model.experts_per_token=1",
                                     "model.expert_mlp_dim=0", "model.num_shared_experts=0"]))
        for kind, extra in variants:
            name = f"{'moe' if kind == 'moe' else 'd'}{d}x{layers}"
            cfg = load_config(base, [*shape_overrides(d, layers), *extra, *overrides])
            steps = steps_for(cfg, tokens_per_param, count)
            cfg = load_config(base, [*shape_overrides(d, layers), *extra, *overrides,
                                     f"train.steps={steps}",
                                     f"optim.warmup_steps={max(1, steps // 20)}",
                                     f"run.dir={out_dir / 'runs' / name}"])
            rungs.append(Rung(name, kind, cfg))
    return rungs


def fit_params(model: ModelConfig, count: str) -> int:
    """The N the rule and the fits use: active parameters, without the embedding unless ``total``."""
    counts = param_counts(model)
    return counts["active"] - (counts["embedding"] if count == "non_embedding" else 0)


def steps_for(cfg: Config, tokens_per_param: float, count: str) -> int:
    per_step = cfg.train.batch_size * cfg.train.seq_len
    return max(1, math.ceil(tokens_per_param * fit_params(cfg.model, count) / per_step))


def result_row(rung: Rung, count: str, summary: dict, seconds: float) -> dict[str, Any]:
    m, t = rung.cfg.model, rung.cfg.train
    counts = param_counts(m)
    tokens = t.steps * t.batch_size * t.seq_len
    return {"name": rung.name, "kind": rung.kind, "d_model": m.d_model, "num_layers": m.num_layers,
            "num_heads": m.num_heads, "mlp_dim": m.mlp_dim, "num_experts": m.num_experts,
            "experts_per_token": m.experts_per_token if m.is_moe else 0,
            **{f"params_{k}": v for k, v in counts.items()}, "params_fit": fit_params(m, count),
            "count": count, "tokens": tokens, "steps": t.steps,
            "flops": train_flops_per_token(m, t.seq_len) * tokens,
            "eval_loss": float(summary["eval_loss"]), "train_loss": float(summary.get("loss", math.nan)),
            "seconds": seconds, "run_dir": rung.cfg.run.dir, "config": _comparable(rung.cfg)}


def _comparable(cfg: Config) -> dict[str, Any]:
    """The config less its run section (where and how the run lives, not what it trains)."""
    return {k: v for k, v in cfg.to_dict().items() if k != "run"}


def run_ladder(rungs: list[Rung], count: str, progress: bool = True) -> list[dict[str, Any]]:
    """Trains every rung with train.loop.train (a finished one is read back from its run directory
    instead) and returns the results table's rows. A bar counts the ladder's training steps; each
    run shows its own bar below it; the loop's console lines go to the run's train.log."""
    peak = rungs[0].cfg.run.peak_flops or peak_flops(0.0)[0]  # measured once, not once per run
    rows = []
    bar = tqdm(total=sum(r.cfg.train.steps for r in rungs), unit="step", dynamic_ncols=True,
               disable=not progress, desc="sweep")
    try:
        for i, rung in enumerate(rungs):
            bar.set_description(f"sweep {i + 1}/{len(rungs)} {rung.name}")
            run_dir = Path(rung.cfg.run.dir)
            saved = _finished(run_dir, rung, count)
            if saved is None:
                cfg = dataclasses.replace(rung.cfg, run=dataclasses.replace(
                    rung.cfg.run, peak_flops=peak, progress=progress and rung.cfg.run.progress))
                validate(cfg, jax.device_count())
                run_dir.mkdir(parents=True, exist_ok=True)
                start = time.perf_counter()
                with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log):
                    summary = train(cfg)
                saved = result_row(rung, count, summary, time.perf_counter() - start)
                (run_dir / RESULT_FILE).write_text(json.dumps(saved, indent=1) + "\n")
            rows.append(saved)
            bar.update(rung.cfg.train.steps)
            bar.set_postfix(eval_loss=f"{saved['eval_loss']:.3f}")
    finally:
        bar.close()
    return rows


def _finished(run_dir: Path, rung: Rung, count: str) -> dict[str, Any] | None:
    """The saved result of this exact run (same config but the run section, same N convention)."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return None
    same = saved.get("config") == _comparable(rung.cfg) and saved.get("count") == count
    return saved if same else None
