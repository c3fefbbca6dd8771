"""``python -m eval scaling {plan,context,account,sweep,fit} ...``: scaling laws and context cost.

plan     compute-optimal N and D for a FLOP budget (or N, or D): Chinchilla's rule and fitted law,
         Kaplan's L(N) beside them
context  attention FLOPs and KV-cache memory against context length for one config
account  parameter, FLOP and KV-cache accounting for one config; ``--check`` compares it with
         XLA's cost_analysis() of the compiled train and eval steps
sweep    trains a ladder of model sizes with the normal loop, fits L(N) and L(C), writes
         results.csv/json, fit.json and scaling.png into --out
fit      refits a sweep directory's saved results
Mistakes print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cli.args import Parser, add_json_argument, run, subcommands
from cli.config_args import add_config_arguments, config_arguments
from cli.host import use_cpu_devices
from core.errors import ConfigError, UsageError
from eval import scaling_fit, scaling_runs
from eval.scaling_plan import TOKENS_PER_PARAM, format_count, format_plan, plan
from model.config import ModelConfig
from model.flops import (
    DTYPE_BYTES,
    accounting,
    context_table,
    kv_cache_bytes_per_token,
    matmul_params,
    mha_twin,
    param_counts,
)
from train.config import Config, load_config, preset_path

DEFAULT_LENGTHS = "1k,8k,128k,1m"
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*([kmbgtp]?)\s*$", re.IGNORECASE)


def parse_quantity(text: str, flag: str) -> float:
    """'1e21', '70B', '1.4T', '400M', '12k' -> float (decimal suffixes); UsageError otherwise."""
    match = _NUMBER.match(text)
    if not match:
        raise UsageError(f"{flag}: expected a number such as 1e21, 70B or 1.4T, got {text!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2).lower()]


def parse_lengths(text: str) -> list[int]:
    """'1k,8k,128k,1m' -> [1024, 8192, 131072, 1048576] (binary suffixes, as context lengths are
    quoted); UsageError for anything not a positive whole number of tokens."""
    out = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*([km]?)\s*", item, re.IGNORECASE)
        if not match or int(match.group(1)) < 1:
            raise UsageError(f"--lengths: expected positive token counts such as 1k,8k,128k,1m, "
                             f"got {item.strip()!r}")
        out.append(int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[match.group(2).lower()])
    return out


def add_config_or_flag(parser: argparse.ArgumentParser, default: str) -> None:
    """``CONFIG [overrides]``, with ``--config NAME`` kept as the older spelling of CONFIG."""
    add_config_arguments(parser, default=default)
    parser.add_argument("--config", dest="config_flag", metavar="CONFIG", help=argparse.SUPPRESS)


def config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    path, overrides = config_arguments(args)
    return args.config_flag or path, overrides


def build_parser() -> Parser:
    parser = Parser(prog="python -m eval scaling", description="Scaling laws and context cost.")
    sub = subcommands(parser)

    p = sub.add_parser("plan", help="compute-optimal model size and tokens for a budget")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--flops", help="training budget C in FLOPs, e.g. 1e21")
    given.add_argument("--params", help="model size N, e.g. 7B")
    given.add_argument("--tokens", help="training tokens D, e.g. 1.4T")
    p.add_argument("--tokens-per-param", type=float, default=TOKENS_PER_PARAM)
    add_json_argument(p)

    for name, helptext in (("context", "attention FLOPs and KV cache against context length"),
                           ("account", "parameter, FLOP and KV-cache accounting of a config")):
        p = sub.add_parser(name, help=helptext)
        add_config_or_flag(p, "configs/default.yaml")
        p.add_argument("--kv-dtype", default="", help="KV-cache dtype (default: model.dtype)")
        add_json_argument(p)
        if name == "context":
            p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated, k = 1024")
            p.add_argument("--batch-size", "--batch", type=int, default=1,
                           help="sequences held in the KV cache")
        else:
            p.add_argument("--seq-len", type=int, default=0, help="context (default: train.seq_len)")
            p.add_argument("--check", action="store_true",
                           help="compile the steps and compare with XLA's cost_analysis()")
            p.add_argument("--batch-size", "--batch", type=int, default=8,
                           help="rows of the compiled step (--check)")

    p = sub.add_parser("sweep", help="train a ladder of sizes and fit scaling laws")
    add_config_or_flag(p, "configs/scaling/base.yaml")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value",
                   help=argparse.SUPPRESS)  # the older spelling of the overrides
    p.add_argument("--out", default="runs/scaling", help="output directory")
    p.add_argument("--sizes", default=None, help="D_MODELxLAYERS list (default: the ladder in "
                   "eval/scaling_runs.py)")
    p.add_argument("--moe", action="store_true", help="also an MoE twin of each size, same active N")
    p.add_argument("--experts", type=int, default=4, help="experts of the MoE twins (top-1)")
    p.add_argument("--tokens-per-param", type=float, default=TOKENS_PER_PARAM)
    p.add_argument("--count", choices=("non_embedding", "total"), default="non_embedding",
                   help="which active parameters N the token rule and the fits use")
    p.add_argument("--devices", type=int, default=1, help="emulated CPU devices (default 1: "
                   "fastest for tiny models on a small host)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("fit", help="refit a sweep directory's saved results")
    p.add_argument("out", nargs="?", default="runs/scaling", help="sweep output directory")
    add_json_argument(p, "the fits as one JSON object")
    return parser


# ------------------------------------------------------------------------------- plan

def run_plan(args: argparse.Namespace) -> None:
    kind = next(k for k in ("flops", "params", "tokens") if getattr(args, k) is not None)
    value = parse_quantity(getattr(args, kind), f"--{kind}")
    result = plan(**{kind: value}, tokens_per_param=args.tokens_per_param)
    print(json.dumps(result) if args.json else format_plan(result))


# ------------------------------------------------------------------------ context, account

def load_model_config(args: argparse.Namespace) -> tuple[Config, Path]:
    """(Config, the path it came from) for CONFIG and the overrides; the model checked."""
    path, overrides = config_and_overrides(args)
    path = preset_path(path)
    cfg = load_config(path, overrides)
    for key, message in cfg.model.problems():
        raise ConfigError(f"model.{key}", message)
    if args.kv_dtype and args.kv_dtype not in DTYPE_BYTES:
        raise UsageError(f"--kv-dtype: expected one of {', '.join(DTYPE_BYTES)}, got {args.kv_dtype!r}")
    return cfg, path


def format_bytes(x: float) -> str:
    for scale, suffix in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if x >= scale:
            return f"{x / scale:.3g} {suffix}"
    return f"{x:.0f} B"


def format_length(n: int) -> str:
    for scale, suffix in ((1024 ** 2, "m"), (1024, "k")):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def run_context(args: argparse.Namespace) -> None:
    cfg, path = load_model_config(args)
    lengths = parse_lengths(args.lengths)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    m = cfg.model
    rows = context_table(m, lengths, args.batch_size, args.kv_dtype)
    kv_dtype = args.kv_dtype or m.dtype
    if args.json:
        print(json.dumps({"config": str(path), "params": param_counts(m),
                          "matmul_params": matmul_params(m), "kv_dtype": kv_dtype,
                          "kv_cache_bytes_per_token": kv_cache_bytes_per_token(m, kv_dtype),
                          "batch": args.batch_size, "lengths": rows}))
        return
    print(f"{path}: {format_count(param_counts(m)['total'])} parameters, {m.num_layers} layers, "
          f"{m.num_heads} heads ({m.num_kv_heads} KV) of {m.resolved_head_dim}; matmul weights per "
          f"token {format_count(matmul_params(m))}; trained at {cfg.train.seq_len}, max_seq_len "
          f"{m.max_seq_len}")
    print(f"attention (QK^T + PV, full n x n scores) per token = 12 L n N H training, 4 L n N H "
          f"decoding; KV cache {kv_cache_bytes_per_token(m, kv_dtype)} B/token ({kv_dtype}), "
          f"batch {args.batch_size}")
    print(f"{'length':>8s}{'train FLOPs/tok':>17s}{'attention':>11s}{'train FLOPs/seq':>17s}"
          f"{'decode FLOPs/tok':>18s}{'attention':>11s}{'KV cache':>12s}")
    for r in rows:
        print(f"{format_length(r['length']):>8s}{r['train_flops_per_token']:>17.3g}"
              f"{r['train_attention_share']:>11.1%}{r['train_flops_per_sequence']:>17.3g}"
              f"{r['decode_flops_per_token']:>18.3g}{r['decode_attention_share']:>11.1%}"
              f"{format_bytes(r['kv_cache_bytes']):>12s}")
    if any(n > m.max_seq_len for n in lengths):
        print(f"note: lengths past max_seq_len={m.max_seq_len} are what the arithmetic says; the model "
              "was not trained on them")


def run_account(args: argparse.Namespace) -> None:
    cfg, path = load_model_config(args)
    seq_len = args.seq_len or cfg.train.seq_len
    if seq_len < 1 or args.batch_size < 1:
        raise UsageError("--seq-len and --batch-size must be >= 1")
    m = cfg.model
    result = {"config": str(path), **accounting(m, seq_len)}
    if args.kv_dtype:
        result["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(m, args.kv_dtype)
        if m.attention_type == "mla":
            result["kv_cache_bytes_per_token_gqa"] = kv_cache_bytes_per_token(mha_twin(m), args.kv_dtype)
    if args.check:
        if seq_len > m.max_seq_len:
            raise UsageError(f"--seq-len {seq_len} is longer than model.max_seq_len={m.max_seq_len}")
        use_cpu_devices(1, unless_started=True)
        check = scaling_runs.compiled_flops(m, args.batch_size, seq_len)
        check["train_ratio"] = check["formula_train_flops"] / check["xla_train_flops"]
        check["train_ratio_executed"] = check["formula_train_flops_executed"] / check["xla_train_flops"]
        check["eval_ratio"] = check["formula_eval_flops"] / check["xla_eval_flops"]
        check["eval_ratio_executed"] = check["formula_eval_flops_executed"] / check["xla_eval_flops"]
        result["xla_check"] = check
    if args.json:
        print(json.dumps(result))
        return
    r = result
    kind = f"MoE, {m.num_experts} experts top-{m.experts_per_token}" if m.is_moe else "dense"
    print(f"{path} ({kind}), context {seq_len}")
    print(f"parameters: total {r['params_total']:,}  embedding {r['params_embedding']:,}  "
          f"non-embedding {r['params_non_embedding']:,}  active {r['params_active']:,}")
    print(f"matmul weights per token N_matmul: {r['matmul_params']:,}")
    mla = m.attention_type == "mla"  # heads of two widths: P + R (query/key) and V (value)
    print(f"training FLOPs/token: 6 N_matmul + {'6 L T N (P + R + V)' if mla else '12 L T N H'} = "
          f"{r['train_flops_per_token']:.4g} "
          f"(attention {r['train_attention_share']:.1%})"
          + (f"; with capacity padding {r['train_flops_per_token_executed']:.4g}" if m.is_moe else ""))
    print(f"inference FLOPs/token at context {seq_len}: 2 N_matmul + "
          f"{'2 L S N (P + R + V)' if mla else '4 L S N H'} = "
          f"{r['inference_flops_per_token']:.4g}")
    print(f"KV cache: {r['kv_cache_bytes_per_token']:,} bytes/token" + _mla_cache_note(m, r))
    if "xla_check" in r:
        c = r["xla_check"]
        print(f"XLA cost_analysis, 1 device, batch {c['batch_size']} x {c['seq_len']}, layers unrolled:")
        print(f"  train step: XLA {c['xla_train_flops']:.4g}  formula {c['formula_train_flops']:.4g}  "
              f"formula/XLA {c['train_ratio']:.3f}"
              + (f" (with capacity padding {c['train_ratio_executed']:.3f})" if m.is_moe else ""))
        print(f"  eval step:  XLA {c['xla_eval_flops']:.4g}  formula {c['formula_eval_flops']:.4g}  "
              f"formula/XLA {c['eval_ratio']:.3f}"
              + (f" (with capacity padding {c['eval_ratio_executed']:.3f})" if m.is_moe else ""))


def _mla_cache_note(m: ModelConfig, r: dict) -> str:
    """For an MLA config: what its cache holds, and the GQA cache it replaces."""
    if m.attention_type != "mla":
        return ""
    gqa, qk = r["kv_cache_bytes_per_token_gqa"], m.qk_nope_head_dim + m.qk_rope_head_dim
    return (f" (MLA: latent {m.kv_lora_rank} + rope key {m.qk_rope_head_dim} per layer); the GQA "
            f"cache it replaces (K = N = {m.num_heads} heads of {qk}): {gqa:,} bytes/token, "
            f"{gqa / r['kv_cache_bytes_per_token']:.1f}x as large")


# ---------------------------------------------------------------------------- sweep, fit

def run_sweep(args: argparse.Namespace) -> None:
    if args.devices < 1:
        raise UsageError(f"--devices must be >= 1, got {args.devices}")
    if args.experts < 2:
        raise UsageError(f"--experts must be >= 2, got {args.experts}")
    if not (math.isfinite(args.tokens_per_param) and args.tokens_per_param > 0):
        raise UsageError(f"--tokens-per-param must be a positive number, got {args.tokens_per_param}")
    sizes = scaling_runs.parse_sizes(args.sizes or scaling_runs.DEFAULT_SIZES)
    out = Path(args.out)
    path, overrides = config_and_overrides(args)
    base = preset_path(path, scaling_runs.SWEEP_BASE)
    rungs = scaling_runs.ladder(sizes, moe=args.moe, experts=args.experts,
                                tokens_per_param=args.tokens_per_param, count=args.count, base=base,
                                overrides=[*overrides, *args.set], out_dir=out)
    use_cpu_devices(args.devices, unless_started=True)
    rows = scaling_runs.run_ladder(rungs, args.count, progress=not args.no_progress)
    scaling_fit.write_results(out, rows)
    meta = {"tokens_per_param": args.tokens_per_param, "count": args.count, "base": str(base)}
    fits = scaling_fit.write_fit(out, rows, meta)
    print(scaling_fit.format_table(rows))
    print(scaling_fit.format_fits(fits))
    print(f"wrote {out / scaling_fit.RESULTS_CSV}, {out / scaling_fit.RESULTS_JSON}, "
          f"{out / scaling_fit.FIT_JSON}, {out / scaling_fit.PLOT_PNG}")


def run_fit(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows = scaling_fit.read_results(out)
    old_meta = {}
    try:
        old_meta = {k: v for k, v in json.loads((out / scaling_fit.FIT_JSON).read_text()).items()
                    if k != "fits"}
    except (OSError, ValueError, AttributeError):
        pass
    fits = scaling_fit.write_fit(out, rows, old_meta)
    if args.json:
        print(json.dumps(fits))
        return
    print(scaling_fit.format_table(rows))
    print(scaling_fit.format_fits(fits))
    print(f"wrote {out / scaling_fit.FIT_JSON}, {out / scaling_fit.PLOT_PNG}")


COMMANDS = {"plan": run_plan, "context": run_context, "account": run_account, "sweep": run_sweep,
            "fit": run_fit}


def scaling_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except BrokenPipeError:  # e.g. piped into head
        return 0
    except OSError as e:
        raise UsageError(f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")) from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(scaling_command, argv)


if __name__ == "__main__":
    sys.exit(main())
