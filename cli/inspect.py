"""``python -m eval inspect {tokens,next,embeddings,attention,routing} --checkpoint PATH ...``: the
reports of ``eval/inspect.py``, as a table by default, one JSON object with ``--json`` and a figure
with ``--plot FILE.png``. Mistakes are one ``error:`` line and exit 2."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.args import Parser, add_checkpoint_argument, add_json_argument, run, subcommands
from cli.host import load_checkpoint
from core.errors import UsageError
from eval.inspect import (
    format_table,
    inspect_attention,
    inspect_embeddings,
    inspect_next,
    inspect_routing,
    inspect_tokens,
)
from eval.inspect_plots import plot
from train.run_dir import RunDir


def build_parser() -> Parser:
    parser = Parser(prog="python -m eval inspect",
                    description="Look inside a meshlm checkpoint: tokens, next-token probabilities, "
                                "embeddings, attention, expert routing.")
    sub = subcommands(parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        add_checkpoint_argument(p)
        add_json_argument(p, "one JSON object instead of a table")
        p.add_argument("--plot", metavar="FILE.png", help="also draw a figure into this PNG file")
        return p

    tok = command("tokens", "the pieces, ids and byte spans of a text")
    tok.add_argument("--text", required=True)
    nxt = command("next", "the most likely next tokens at several temperatures")
    nxt.add_argument("--prompt", required=True)
    nxt.add_argument("--temperatures", default="0.1,0.7,1,2",
                     help="comma-separated, >= 0; 0 = greedy (all mass on the argmax)")
    nxt.add_argument("--top", type=int, default=10)
    emb = command("embeddings", "nearest tokens by cosine similarity in the input embedding table")
    query = emb.add_mutually_exclusive_group(required=True)
    query.add_argument("--neighbors", metavar="WORD")
    query.add_argument("--analogy", nargs=3, metavar=("A", "B", "C"), help="A - B + C")
    emb.add_argument("--top", type=int, default=10)
    att = command("attention", "attention weights of one position over the prompt")
    att.add_argument("--prompt", required=True)
    att.add_argument("--layer", type=int, default=-1, help="0-based; default: the last layer")
    att.add_argument("--head", default="mean", help="0-based head, or 'mean' (all heads averaged)")
    att.add_argument("--position", type=int, default=-1,
                     help="the query position (0 = BOS when the tokenizer has one); default: the last")
    rte = command("routing", "each token's experts and router weights, per MoE layer")
    rte.add_argument("--prompt", required=True)
    return parser


def parse_temperatures(text: str) -> list[float]:
    try:
        temps = [float(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"--temperatures takes comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(t) and t >= 0 for t in temps):
        raise UsageError(f"--temperatures must be finite and >= 0, got {text!r}")
    return temps


def check_model_args(args: argparse.Namespace, cfg: Any) -> None:
    """Mistakes that the run's config alone reveals, found before the parameters are restored."""
    model = cfg.model
    if args.command == "attention":
        if not -model.num_layers <= args.layer < model.num_layers:
            raise UsageError(f"--layer {args.layer} does not exist: the model has {model.num_layers} "
                             f"layers (0..{model.num_layers - 1})")
        args.layer %= model.num_layers
        if args.head != "mean":
            try:
                args.head = int(args.head)
            except ValueError:
                raise UsageError(f"--head takes a head number or 'mean', got {args.head!r}") from None
            if not 0 <= args.head < model.num_heads:
                raise UsageError(f"--head {args.head} does not exist: the model has {model.num_heads} "
                                 f"heads (0..{model.num_heads - 1})")
    if args.command == "routing" and not model.num_moe_layers:
        raise UsageError("this checkpoint is a dense model (no MoE layers): routing needs an MoE "
                         "checkpoint (model.num_experts > 0)")
    if args.command in ("next", "embeddings") and not 1 <= args.top <= model.vocab_size:
        raise UsageError(f"--top must be in 1..{model.vocab_size}, got {args.top}")


def check_plot_path(path: str | None) -> None:
    if path is None:
        return
    if Path(path).suffix.lower() != ".png":
        raise UsageError(f"--plot writes a PNG file: give a name ending in .png, got {path!r}")
    if not Path(path).resolve().parent.is_dir():
        raise UsageError(f"--plot: directory {Path(path).parent} does not exist")


def run_inspection(args: argparse.Namespace) -> dict[str, Any]:
    run_dir, _ = RunDir.of_checkpoint(args.checkpoint)
    if args.command == "tokens":  # the tokenizer alone: no parameters
        if not args.text:
            raise UsageError("empty --text: give at least one character")
        return inspect_tokens(run_dir.load_tokenizer(), args.text)
    cfg = run_dir.read_config()
    if args.command == "next":
        args.temperatures = parse_temperatures(args.temperatures)
    check_model_args(args, cfg)
    loaded = load_checkpoint(args.checkpoint)
    if args.command == "next":
        return inspect_next(loaded, args.prompt, args.temperatures, args.top)
    if args.command == "embeddings":
        return inspect_embeddings(loaded, args.neighbors, args.analogy, args.top)
    if args.command == "attention":
        return inspect_attention(loaded, args.prompt, args.layer,
                                 None if args.head == "mean" else args.head, args.position)
    return inspect_routing(loaded, args.prompt)


def inspect_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    check_plot_path(args.plot)
    report = run_inspection(args)
    if args.plot:
        try:
            plot(args.command, report, args.plot)
        except OSError as e:
            raise UsageError(f"cannot write --plot {args.plot}: {e.strerror}") from None
    print(json.dumps(report) if args.json else format_table(args.command, report))
    if args.plot and not args.json:
        print(f"wrote {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(inspect_command, argv)


if __name__ == "__main__":
    sys.exit(main())
