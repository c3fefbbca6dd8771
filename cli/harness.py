"""``python -m eval harness --checkpoint PATH --tasks TASK[,TASK]``: lm-evaluation-harness tasks on
a meshlm checkpoint through ``eval/harness.py``'s model. Prints lm_eval's results table and, last, a
JSON line of the metrics; mistakes are one ``error:`` line and exit 2. ``--apply-chat-template``
renders every prompt through the checkpoint's chat template, as lm_eval's own
``--apply_chat_template`` (few-shot examples as turns unless ``--no-fewshot-as-multiturn``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.utils import handle_non_serializable, make_table

from cli.args import Parser, add_checkpoint_argument, run
from cli.host import load_checkpoint
from core.errors import UsageError
from eval.harness import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_GEN_TOKS,
    MeshLM,
    QuietCustomDatasetNote,
    summary,
    task_manager,
)
from inference.load import read_run_config
from train.run_dir import RunDir


def build_parser() -> Parser:
    parser = Parser(prog="python -m eval harness",
                    description="Run lm-evaluation-harness tasks on a meshlm checkpoint.")
    add_checkpoint_argument(parser)
    parser.add_argument("--tasks", required=True,
                        help="comma-separated task, group or tag names (meshlm_tiny: the local tasks)")
    parser.add_argument("--limit", type=float, help="documents per task (below 1: a fraction)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--max-gen-toks", type=int, default=DEFAULT_MAX_GEN_TOKS,
                        help="default for generation tasks that set none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap-iters", type=int, default=1000, help="for standard errors; 0: none")
    parser.add_argument("--output", help="write lm_eval's full results here (JSON)")
    parser.add_argument("--include-path", action="append", default=[],
                        help="another directory of task YAML files (repeatable)")
    chat = parser.add_argument_group("instruct formatting")
    chat.add_argument("--apply-chat-template", action="store_true",
                      help="render each prompt through the checkpoint's chat template")
    chat.add_argument("--system-instruction", metavar="TEXT",
                      help="a system message (without --apply-chat-template: text before each prompt)")
    chat.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction,
                      help="few-shot examples as user/assistant turns (default with "
                           "--apply-chat-template; needs it)")
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    """The task names; UsageError for values out of range or paths that cannot work."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks names no task")
    if args.limit is not None and not args.limit > 0:
        raise UsageError(f"--limit must be > 0, got {args.limit:g}")
    if args.limit is not None and args.limit >= 1:
        if args.limit != int(args.limit):
            raise UsageError(f"--limit must be a whole number of documents or a fraction below 1, got "
                             f"{args.limit:g}")
        args.limit = int(args.limit)
    for name, value in (("--batch-size", args.batch_size), ("--max-gen-toks", args.max_gen_toks)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.bootstrap_iters < 0:
        raise UsageError(f"--bootstrap-iters must be >= 0, got {args.bootstrap_iters}")
    for path in args.include_path:
        if not Path(path).is_dir():
            raise UsageError(f"--include-path {path} is not a directory")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise UsageError(f"--output {args.output}: directory {Path(args.output).parent} does not exist")
    if args.fewshot_as_multiturn and not args.apply_chat_template:
        raise UsageError("--fewshot-as-multiturn needs --apply-chat-template")
    if args.fewshot_as_multiturn is None:  # lm_eval's default: turns whenever the template is applied
        args.fewshot_as_multiturn = args.apply_chat_template
    return tasks


def check_chat_template(checkpoint: str) -> None:
    """UsageError unless the checkpoint's tokenizer has a chat template (read before the
    parameters load)."""
    tokenizer = RunDir.of_checkpoint(checkpoint)[0].load_tokenizer()
    if getattr(tokenizer, "chat_template", None) is None:
        raise UsageError(f"--apply-chat-template: the checkpoint's {tokenizer.kind!r} tokenizer has "
                         "no chat template")


def harness_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    tasks = check_args(args)
    read_run_config(args.checkpoint)  # a bad checkpoint path fails before the tasks are indexed
    if args.apply_chat_template:
        check_chat_template(args.checkpoint)
    # Nothing can be downloaded here: fail fast instead of waiting on the network.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("lm_eval.api.task").addFilter(QuietCustomDatasetNote())
    manager = task_manager(tasks, args.include_path)
    loaded = load_checkpoint(args.checkpoint)
    lm = MeshLM(run=loaded, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks, seed=args.seed)
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                              task_manager=manager, log_samples=False,
                              bootstrap_iters=args.bootstrap_iters, random_seed=args.seed,
                              apply_chat_template=args.apply_chat_template,
                              system_instruction=args.system_instruction,
                              fewshot_as_multiturn=args.fewshot_as_multiturn)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        try:
            Path(args.output).write_text(json.dumps(results, indent=2, default=handle_non_serializable))
        except OSError as e:
            raise UsageError(f"cannot write --output {args.output}: {e.strerror}") from None
    print(json.dumps({"checkpoint": str(args.checkpoint), "step": loaded.step,
                      "results": summary(results)}, default=handle_non_serializable))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(harness_command, argv)


if __name__ == "__main__":
    sys.exit(main())
