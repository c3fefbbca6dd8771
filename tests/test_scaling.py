"""Scaling laws: parameter and FLOP accounting (against the initialised state and XLA's
cost_analysis), compute-optimal planning, power-law fits, the context table and a short sweep."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx
from scipy.optimize import minimize_scalar

from cli import scaling
from eval.scaling_fit import fit_power_law, read_results
from eval.scaling_plan import CHINCHILLA, plan
from eval.scaling_runs import SWEEP_BASE, compiled_flops, fit_params, ladder, parse_sizes
from model.config import ModelConfig
from model.flops import (
    attention_flops_per_token,
    inference_flops_per_token,
    kv_cache_bytes_per_token,
    param_counts,
    train_flops_per_token,
)
from model.transformer import Transformer
from train.config import CONFIG_DIR, load_config

EXPERT_WEIGHTS = ("w_up_edf", "w_down_efd", "w_gate_edf")  # [..., E, ...] routed-expert weights
EMBEDDING = ("embed", "positions")


def preset(name: str, **changes) -> ModelConfig:
    return dataclasses.replace(load_config(CONFIG_DIR / f"{name}.yaml", []).model, **changes)


MODELS = {
    "tiny": preset("tiny"),
    "default": preset("default"),
    "tiny_untied_learned_gelu": preset("tiny", tie_embeddings=False, position="learned", activation="gelu"),
    "moe_tiny": preset("moe_tiny"),
    "moe_untied_shared_every2": preset("moe_tiny", num_layers=5, first_dense_layers=1, moe_every=2,
                                       num_shared_experts=1, tie_embeddings=False, experts_per_token=1),
    "moe_gelu_learned": preset("moe_tiny", activation="gelu", position="learned", expert_mlp_dim=0),
}


def _state_counts(cfg: ModelConfig) -> dict[str, int]:
    """total, embedding and active counted from the initialised state's shapes (no allocation)."""
    _, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    total = embedding = inactive = 0
    for path, var in nnx.to_flat_state(params):
        size = math.prod(var.shape)
        total += size
        embedding += size if path[0] in EMBEDDING else 0
        if path[-1] in EXPERT_WEIGHTS:  # E experts of which a token uses k
            inactive += size * (cfg.num_experts - cfg.experts_per_token) // cfg.num_experts
    return {"total": total, "embedding": embedding, "active": total - inactive}


@pytest.mark.parametrize("name", list(MODELS))
def test_param_counts_equal_elements_of_initialised_state(name):
    cfg = MODELS[name]
    counts, state = param_counts(cfg), _state_counts(cfg)
    assert {k: counts[k] for k in state} == state
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]
    assert (counts["active"] < counts["total"]) == cfg.is_moe


@pytest.mark.parametrize("name", ["tiny", "default", "moe_tiny"])
def test_flop_formula_within_10_percent_of_xla_cost_analysis(name):
    """Dense presets: the formula as written; MoE: counting the capacity path's padded slots."""
    cfg = MODELS[name]
    seq_len = load_config(CONFIG_DIR / f"{name}.yaml", []).train.seq_len
    got = compiled_flops(cfg, 16, seq_len)  # rows enough that per-parameter optimizer work stays small
    suffix = "_executed" if cfg.is_moe else ""
    for step in ("train", "eval"):
        ratio = got[f"formula_{step}_flops{suffix}"] / got[f"xla_{step}_flops"]
        assert abs(ratio - 1) < 0.10, (name, step, ratio, got)


def test_attention_term_grows_with_context_and_inference_is_a_forward():
    cfg = MODELS["default"]
    l, n, h = cfg.num_layers, cfg.num_heads, cfg.resolved_head_dim
    assert train_flops_per_token(cfg, 2048) - train_flops_per_token(cfg, 1024) == 12 * l * 1024 * n * h
    assert attention_flops_per_token(cfg, 4096, backward=False) == 4 * l * 4096 * n * h
    for t in (1, 128, 100_000):
        forward, train = inference_flops_per_token(cfg, t), train_flops_per_token(cfg, t)
        assert 3 * forward == pytest.approx(train, rel=1e-12)
    assert kv_cache_bytes_per_token(cfg) == 2 * l * cfg.num_kv_heads * h * 4  # float32 K and V
    assert kv_cache_bytes_per_token(dataclasses.replace(cfg, dtype="bfloat16")) == 2 * l * 4 * 32 * 2
    moe = MODELS["moe_tiny"]  # capacity path: E * C / T expert slots per token instead of k
    assert train_flops_per_token(moe, 32, executed=True) > train_flops_per_token(moe, 32)
    dropless = dataclasses.replace(moe, moe_impl="dropless")
    assert train_flops_per_token(dropless, 32, executed=True) == train_flops_per_token(dropless, 32)


# ------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize("budget", [1e18, 5.76e23, 3e25])
def test_plan_rule_is_20_tokens_per_param_exactly(budget):
    rule = plan(flops=budget)["rule"]
    assert rule["params"] == math.sqrt(budget / 120)
    assert rule["tokens"] == 20 * rule["params"]
    assert 6 * rule["params"] * rule["tokens"] == pytest.approx(budget, rel=1e-12)
    by_params = plan(params=7e10)["rule"]
    assert (by_params["tokens"], by_params["flops"]) == (1.4e12, 6 * 7e10 * 1.4e12)
    assert plan(tokens=1.4e12)["rule"]["params"] == 7e10


@pytest.mark.parametrize("budget", [1e19, 1e21, 5.76e23, 1e26])
def test_plan_fitted_optimum_matches_numerical_minimisation(budget):
    law = CHINCHILLA

    def loss_at(log_n: float) -> float:
        n = math.exp(log_n)
        return law.loss(n, budget / (6 * n))

    best = minimize_scalar(loss_at, bounds=(math.log(1e3), math.log(1e16)), method="bounded",
                           options={"xatol": 1e-9})
    fitted = plan(flops=budget)["fitted"]
    assert fitted["params"] == pytest.approx(math.exp(best.x), rel=0.01)
    assert fitted["loss"] == pytest.approx(best.fun, rel=1e-6)
    # Given that N (or those tokens), the plan finds the same budget back.
    assert plan(params=fitted["params"])["fitted"]["flops"] == pytest.approx(budget, rel=1e-9)
    assert plan(tokens=fitted["tokens"])["fitted"]["flops"] == pytest.approx(budget, rel=1e-9)


def test_plan_cli_text_json_and_one_line_errors(capsys):
    assert scaling.main(["plan", "--flops", "5.76e23"]) == 0
    text = capsys.readouterr().out
    assert "Chinchilla rule (20 tokens/param)" in text and "Kaplan" in text and "100" in text
    assert scaling.main(["plan", "--params", "70B", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rule"]["tokens"] == 1.4e12
    assert [m["multiple"] for m in out["kaplan"]["multiples"]] == [2, 10, 100]
    assert all(m["kaplan_delta"] < 0 for m in out["kaplan"]["multiples"])
    for bad in (["--flops", "0"], ["--flops", "-3e20"], ["--flops", "lots"], ["--flops", "nan"],
                ["--flops", "10"], ["--tokens", "1e400"], ["--params", "0.5"], ["--params", "1e300"],
                ["--flops", "1e21", "--tokens", "1e9"], []):
        assert scaling.main(["plan", *bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1, (bad, err)


# -------------------------------------------------------------------------------------- fit


def test_fit_recovers_known_exponents_from_noisy_power_law():
    rng = np.random.default_rng(0)
    n = np.geomspace(1e4, 1e9, 12)
    loss = 1.8 + 60.0 * n ** -0.34
    law = fit_power_law(n, loss)  # exact points: exact parameters
    assert (law.E, law.A, law.alpha) == pytest.approx((1.8, 60.0, 0.34), rel=1e-5)
    noisy = loss * (1 + 0.002 * rng.standard_normal(len(n)))
    law = fit_power_law(n, noisy)
    assert law.alpha == pytest.approx(0.34, abs=0.03)
    assert law.E == pytest.approx(1.8, abs=0.05)
    c = np.geomspace(1e15, 1e22, 9)  # a pure power law (E = 0) in FLOPs
    law = fit_power_law(c, 2e3 * c ** -0.15 * (1 + 0.002 * rng.standard_normal(len(c))))
    assert law.alpha == pytest.approx(0.15, abs=0.02)
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_power_law([1.0, 2.0], [3.0, 2.0])


# ---------------------------------------------------------------------------------- context


def test_context_table_is_quadratic_per_sequence(capsys):
    assert scaling.main(["context", "--config", "tiny", "--lengths", "1k,8k,32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["length"]: r for r in out["lengths"]}
    assert set(rows) == {1024, 8192, 32}
    per_sequence = {n: r["train_attention_flops_per_sequence"] for n, r in rows.items()}
    assert per_sequence[8192] == 64 * per_sequence[1024]  # O(n^2)
    share = {n: r["train_attention_share"] for n, r in rows.items()}
    assert share[32] < share[1024] < share[8192]
    assert rows[8192]["kv_cache_bytes"] == 8192 * kv_cache_bytes_per_token(MODELS["tiny"])
    assert scaling.main(["context", "--config", "moe_tiny", "--lengths", "1k,1m"]) == 0
    text = capsys.readouterr().out
    assert "1m" in text and "KV cache" in text
    for bad in (["--lengths", "0"], ["--lengths", "8q"], ["--config", "no_such_preset"],
                ["model.num_heads=3"], ["--batch", "0"]):
        assert scaling.main(["context", *bad]) == 2, bad
        assert capsys.readouterr().err.startswith("error:")


def test_account_reports_the_formulas(capsys):
    assert scaling.main(["account", "--config", "moe_tiny", "--seq-len", "48", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = MODELS["moe_tiny"]
    assert out["params_active"] == param_counts(cfg)["active"]
    assert out["train_flops_per_token"] == train_flops_per_token(cfg, 48)
    assert out["kv_cache_bytes_per_token"] == kv_cache_bytes_per_token(cfg)
    assert scaling.main(["account", "--config", "tiny", "--kv-dtype", "int3"]) == 2
    assert capsys.readouterr().err.startswith("error: --kv-dtype")


# ------------------------------------------------------------------------------------ sweep


def test_moe_twins_match_the_dense_active_size(tmp_path):
    rungs = ladder(parse_sizes("32x1,48x2"), moe=True, experts=4, tokens_per_param=20,
                   count="non_embedding", base=SWEEP_BASE, overrides=[], out_dir=tmp_path)
    assert [r.name for r in rungs] == ["d32x1", "moe32x1", "d48x2", "moe48x2"]
    for dense, moe in (rungs[0:2], rungs[2:4]):
        router = dense.cfg.model.num_layers * dense.cfg.model.d_model * 4
        n_dense, n_moe = (fit_params(r.cfg.model, "non_embedding") for r in (dense, moe))
        assert n_moe - n_dense == router
        per_step = dense.cfg.train.batch_size * dense.cfg.train.seq_len
        assert dense.cfg.train.steps == math.ceil(20 * n_dense / per_step)


@pytest.mark.slow  # ~30 s of training; the fit and plan arithmetic are tested fast above
def test_short_sweep_writes_table_and_plot_and_refits(tmp_path, capsys, eight_devices):
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "--sizes", "16x1,24x1,32x1", "--tokens-per-param", "4",
            "--no-progress", "--set", "train.eval_batches=2"]
    assert scaling.main(args) == 0
    printed = capsys.readouterr().out
    assert "L(N) =" in printed and "scaling.png" in printed
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["d16x1", "d24x1", "d32x1"]
    assert all(math.isfinite(float(r["eval_loss"])) and int(r["tokens"]) > 0 for r in rows)
    assert float(rows[-1]["eval_loss"]) < float(rows[0]["eval_loss"])  # bigger and longer: better
    assert (out / "scaling.png").stat().st_size > 10_000
    fit = json.loads((out / "fit.json").read_text())["fits"]["dense"]
    assert fit["L(N)"]["alpha"] > 0 and fit["L(N)"]["points"] == 3
    assert (out / "runs" / "d16x1" / "metrics.jsonl").is_file()  # the normal loop's run directory

    (out / "scaling.png").unlink()
    assert scaling.main(["fit", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dense"]["L(N)"] == fit["L(N)"]
    assert (out / "scaling.png").is_file()
    assert len(read_results(out)) == 3
    assert scaling.main(args) == 0  # finished runs are read back, not retrained
    assert "L(N) =" in capsys.readouterr().out
    assert scaling.main(["fit", str(tmp_path / "empty")]) == 2
    assert "no results.json" in capsys.readouterr().err


@pytest.mark.slow
def test_default_ladder_finishes_within_15_minutes(tmp_path):
    """As a user runs it: its own process, one CPU device (the suite's 8 would slow it down)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "eval", "scaling", "sweep", "--out", str(tmp_path),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=20 * 60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.perf_counter() - start < 15 * 60
    fit = json.loads((tmp_path / "fit.json").read_text())["fits"]["dense"]
    assert 0 < fit["L(N)"]["alpha"] < 3


def test_lora_flops_count_no_weight_gradients_of_frozen_matrices():
    from model.flops import frozen_train_flops_per_token, matmul_params, train_flops_per_token

    cfg = preset("default")
    full = train_flops_per_token(cfg, 128)
    assert frozen_train_flops_per_token(cfg, 128, 0) == full - 2 * matmul_params(cfg)
    assert frozen_train_flops_per_token(cfg, 128, 1000) == full - 2 * matmul_params(cfg) + 6000
