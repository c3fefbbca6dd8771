"""``python -m eval {generate,perplexity} --checkpoint PATH ...`` (also ``meshlm-eval``).

Mistakes (bad arguments, missing or damaged checkpoints, unreadable prompt files) print one
``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Subcommands that live in their own module, each with ``main(argv) -> exit code``.
SUBPROGRAMS = {"scaling": "eval.scaling"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(message)


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m eval", description="Evaluate or sample a meshlm checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="sample text continuing a prompt")
    gen.add_argument("--checkpoint", required=True, help="run directory or checkpoints/<step>")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts-file", help="UTF-8 file, one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    ppl = sub.add_parser("perplexity", help="loss and perplexity over held-out text")
    ppl.add_argument("--checkpoint", required=True, help="run directory or checkpoints/<step>")
    ppl.add_argument("--data", help="data.source spec (default: the run's own held-out split)")
    ppl.add_argument("--batch-size", type=int, default=0)
    ppl.add_argument("--max-batches", type=int, default=0, help="0: one full pass")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.command == "generate":
        from eval.sampling import SamplingConfig

        if args.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be >= 1")
        for problem in SamplingConfig(args.temperature, args.top_k, args.top_p).problems():
            raise UsageError(problem)
    if args.command == "perplexity" and (args.batch_size < 0 or args.max_batches < 0):
        raise UsageError("--batch-size and --max-batches must be >= 0")


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        try:
            text = Path(args.prompts_file).read_bytes().decode("utf-8")
        except OSError as e:
            raise UsageError(f"cannot read --prompts-file: {e.strerror}: {args.prompts_file}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--prompts-file {args.prompts_file} is not UTF-8 text") from None
        prompts = [line for line in text.splitlines() if line]
    if not prompts or any(not p for p in prompts):
        raise UsageError("empty prompt: give at least one character")
    return prompts


def run_generate(args: argparse.Namespace, run) -> None:
    from eval.generate import generate

    tok = run.tokenizer
    prompts = read_prompts(args)
    window = run.cfg.train.seq_len  # the context the model was trained on
    for prompt in prompts:
        ids = ([tok.bos_id] if tok.bos_id >= 0 else []) + tok.encode(prompt)  # as in training
        if len(ids) >= window:
            print(f"warning: prompt of {len(ids)} tokens keeps only its last {window - 1}",
                  file=sys.stderr)
        stream = generate(run.params, run.graphdef, ids, args.max_new_tokens, window,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, stop_id=tok.eos_id)
        new: list[int] = []
        if args.json or len(prompts) > 1:
            new = list(stream)
            text = tok.decode(new)
            print(json.dumps({"prompt": prompt, "completion": text, "tokens": len(new)})
                  if args.json else prompt + text, flush=True)
            continue
        print(prompt, end="", flush=True)
        shown = ""
        for token in stream:  # stream: print what decodes so far
            new.append(token)
            text = tok.decode(new)
            print(text[len(shown):], end="", flush=True)
            shown = text
        print(flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBPROGRAMS:  # subcommands with their own parsers
        import importlib

        return importlib.import_module(SUBPROGRAMS[argv[0]]).main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_args(args)
        if args.command == "generate":
            read_prompts(args)  # fail on bad prompts before loading anything
        from eval.load import read_run_config, resolve_checkpoint

        run_dir, _ = resolve_checkpoint(args.checkpoint)
        cfg = read_run_config(run_dir)
        import jax

        jax.config.update("jax_num_cpu_devices", cfg.run.cpu_devices)
        from eval.load import load_run

        run = load_run(args.checkpoint)
        if args.command == "generate":
            run_generate(args, run)
        else:
            from eval.perplexity import perplexity

            print(json.dumps(perplexity(run, args.data, args.batch_size, args.max_batches)))
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
