"""``python -m eval {generate,perplexity,harness,scaling,inspect,serve} ...`` (also ``meshlm-eval``).

Mistakes (bad arguments, missing or damaged checkpoints, unreadable prompt files) print one
``error:`` line and exit 2. The context window is the model's own (``model.max_seq_len``), never
``train.seq_len``; a prompt longer than it keeps its last window tokens, with a warning on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cli import inspect, scaling, serve
from cli.args import Parser, add_checkpoint_argument, add_json_argument, run, subcommands
from cli.host import load_checkpoint, quiet_tpu_probe
from core.errors import UsageError
from data.tokenizer import check_utf8
from eval.perplexity import perplexity, perplexity_window
from inference.generate import Generator
from inference.load import LoadedRun, read_run_config
from inference.sampling import SamplingConfig
from inference.server import text_prompt_ids


def harness_main(argv: Sequence[str]) -> int:
    # lm_eval is optional (the `harness` extra) and takes seconds to import: only for this command.
    from cli import harness

    return harness.main(argv)


# Subcommands with parsers of their own, each ``main(argv) -> exit code``.
SUBPROGRAMS = {"scaling": scaling.main, "harness": harness_main, "inspect": inspect.main,
               "serve": serve.main}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m eval", description="Evaluate or sample a meshlm checkpoint.")
    sub = subcommands(parser)
    gen = sub.add_parser("generate", help="sample text continuing prompts (KV-cache decoding)")
    add_checkpoint_argument(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts-file", help="UTF-8 file, one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    add_json_argument(gen, "one JSON object per prompt")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the model's chat template")
    gen.add_argument("--system", help="with --chat: a system message before the user's")
    ppl = sub.add_parser("perplexity", help="loss, perplexity and bits per byte over held-out text")
    add_checkpoint_argument(ppl)
    data = ppl.add_mutually_exclusive_group()
    data.add_argument("--data", help="data.source spec, its eval split (default: the run's own)")
    data.add_argument("--text", help="a UTF-8 text file, all of it")
    ppl.add_argument("--batch-size", type=int, default=0,
                     help="rows per batch (default: as many tokens as a training batch)")
    ppl.add_argument("--max-batches", type=int, default=0, help="0: one full pass")
    ppl.add_argument("--window", type=int, default=0,
                     help="tokens per row, 2..model.max_seq_len (default: model.max_seq_len)")
    sub.add_parser("harness", help="lm-evaluation-harness tasks (see: harness --help)", add_help=False)
    sub.add_parser("scaling", help="FLOPs, compute-optimal plans, sweeps (see: scaling --help)",
                   add_help=False)
    sub.add_parser("inspect", help="tokens, next-token probabilities, embeddings, attention, routing "
                   "(see: inspect --help)", add_help=False)
    sub.add_parser("serve", help="an OpenAI-compatible HTTP server (see: serve --help)", add_help=False)
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.command == "generate":
        if args.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be >= 1")
        if args.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        for problem in SamplingConfig(args.temperature, args.top_k, args.top_p).problems():
            raise UsageError(problem)
        if args.system is not None and not args.chat:
            raise UsageError("--system needs --chat")
    if args.command == "perplexity" and min(args.batch_size, args.max_batches, args.window) < 0:
        raise UsageError("--batch-size, --max-batches and --window must be >= 0")


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


class _Stream:
    """Prints one row's text as its tokens arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if len(text) > len(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        print(text[len(self.shown):], flush=True)


def prompt_ids(tok, prompt: str, chat: bool, system: str | None) -> list[int]:
    """The ids generation starts from: BOS (if the tokenizer adds one) and the prompt, or with
    ``chat`` the conversation [system,] user as the tokenizer's chat template writes it, up to the
    assistant's turn."""
    if not chat:
        return text_prompt_ids(tok, prompt)  # as in training, and as the server reads a prompt
    if getattr(tok, "chat_template", None) is None:
        raise UsageError(f"--chat: the checkpoint's {tok.kind!r} tokenizer has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]
    try:
        return tok.encode_chat(messages, add_generation_prompt=True)
    except ValueError as e:
        raise UsageError(f"--chat: {e}") from None


def run_generate(args: argparse.Namespace, run: LoadedRun) -> None:
    tok = run.tokenizer
    prompts = read_prompts(args)
    window = run.window  # the model's own context (model.max_seq_len), not train.seq_len
    ids = []
    for i, prompt in enumerate(prompts):
        row = prompt_ids(tok, prompt, args.chat, args.system)
        if len(row) > window:
            name = "prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            print(f"warning: {name} has {len(row)} tokens, more than the model's window of {window}: "
                  f"keeping its last {window}", file=sys.stderr)
        ids.append(row)
    generator = Generator(run.cfg.model, run.params, run.mesh, run.rules, window,
                          SamplingConfig(args.temperature, args.top_k, args.top_p))
    kwargs = {"seed": args.seed, "stop_ids": tok.stop_ids}
    if len(prompts) == 1 and not args.json:  # stream the completion as it is produced
        if not args.chat:  # a chat answer is printed alone
            print(prompts[0], end="", flush=True)
        stream = _Stream(tok)
        generator.generate(ids, args.max_new_tokens, on_token=stream, **kwargs)
        stream.finish()
        return
    for start in range(0, len(prompts), args.batch_size):
        out = generator.generate(ids[start:start + args.batch_size], args.max_new_tokens, **kwargs)
        for prompt, new, stopped in zip(prompts[start:], out.tokens, out.stopped, strict=False):
            text = tok.decode(new)
            print(json.dumps({"prompt": prompt, "completion": text, "tokens": len(new),
                              "stopped": stopped}) if args.json
                  else text if args.chat else prompt + text, flush=True)


def run_perplexity(args: argparse.Namespace, run: LoadedRun) -> None:
    report = perplexity(run, args.data, args.batch_size, args.max_batches, text_file=args.text,
                        window=args.window)
    print(f"loss {report['loss']:.4f}  perplexity {report['perplexity']:.3f}  "
          f"tokens {report['tokens']}  bits/byte {report['bits_per_byte']:.4f}  "
          f"({report['source']}, window {report['window']}, step {report['step']})")
    print(json.dumps(report))


def eval_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.command == "generate":
        read_prompts(args)  # fail on bad prompts before loading anything
    if args.command == "perplexity":
        if args.text is not None:
            check_utf8(Path(args.text))
        max_seq_len = read_run_config(args.checkpoint).model.max_seq_len
        try:  # a window the model cannot take fails before the parameters are restored
            perplexity_window(max_seq_len, args.window)
        except ValueError as e:
            raise UsageError(str(e)) from None
    loaded = load_checkpoint(args.checkpoint)
    (run_generate if args.command == "generate" else run_perplexity)(args, loaded)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_tpu_probe()  # before JAX starts its backends
    if argv and argv[0] in SUBPROGRAMS:  # subcommands with their own parsers
        return SUBPROGRAMS[argv[0]](argv[1:])
    return run(eval_command, argv)


if __name__ == "__main__":
    sys.exit(main())
