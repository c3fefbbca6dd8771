"""A post-training demonstration, offline: SmolLM2-135M-Instruct (imported from its GGUF) learns
two-digit addition by chat SFT with LoRA, then DPO with LoRA, each merged; held-out exact match and
preference accuracy are measured before and after each phase (``bench/posttrain_task.py``).

Training and merging run as the commands a user types (``python -m train.finetune ...``, printed
as they start); the measurements run in this process through ``inference/``. Sizing, measured on
the 2-core CPU host (2 emulated devices, batch 8 x 64 tokens): an SFT step takes about 3.2 s, a DPO
step (4 pairs and the reference's forward pass) about 4.4 s, each training process about 25 s more
to start and compile, a merge 11 s; the defaults (120 SFT steps: about 2.5 epochs of the 380
questions that data.eval_fraction leaves to training; 40 DPO steps) come to about 12 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.baby import device_count
from bench.common import RESULTS_DIR, print_table, write_result
from bench.posttrain_task import Problem, make_task, measure, write_task
from cli.args import Parser
from cli.args import run as run_command
from cli.host import quiet_tpu_probe
from core.errors import UsageError
from train.run_dir import METRICS_FILE


def build_parser() -> Parser:
    parser = Parser(prog="python -m bench.posttrain", description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=Path("runs/smollm2"),
                        help="the imported model's run (make demo-posttrain imports it)")
    parser.add_argument("--root", type=Path, default=Path("runs/posttrain"),
                        help="where the task files and the runs go (its phase runs are replaced)")
    parser.add_argument("--train", type=int, default=400, help="training problems")
    parser.add_argument("--held-out", type=int, default=50, help="held-out problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=120)
    parser.add_argument("--dpo-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (DPO: 2 per pair)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--dpo-lr", type=float, default=5e-4)
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="CPU devices each training process emulates (run.cpu_devices; 0: the "
                             "most, up to one per core, that divide the batch)")
    parser.add_argument("--name", default="posttrain", help="results file NAME.json")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where JSON results go")
    return parser


def finetune_args(args: Any, base: Path, out: Path, source: str, steps: int, lr: float,
                  extra: Sequence[str] = ()) -> list[str]:
    """The ``python -m train.finetune`` command of one LoRA phase."""
    return ["python", "-m", "train.finetune", f"finetune.base={base}", f"data.source={source}",
            f"run.dir={out}", f"train.steps={steps}", f"train.batch_size={args.batch_size}",
            f"train.seq_len={args.seq_len}", f"optim.lr={lr}", f"optim.warmup_steps={max(1, steps // 5)}",
            f"train.log_every={max(1, steps // 4)}", "train.eval_batches=2",
            f"checkpoint.every={steps}", f"run.cpu_devices={args.cpu_devices}", *extra]


def run_phase(command: list[str], outs: Sequence[Path]) -> float:
    """Runs ``command`` (printed first) after removing its earlier outputs; its wall seconds."""
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    if subprocess.run([sys.executable, *command[1:]]).returncode:  # this interpreter runs "python"
        raise UsageError(f"the command failed: {' '.join(command)}")
    return time.perf_counter() - start


def trainable_fraction(run_dir: Path) -> float | None:
    """The trainable-parameter fraction the run's start-up record gives in ``metrics.jsonl``."""
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        if "trainable_fraction" in record:
            return float(record["trainable_fraction"])
    return None


def timed_measure(run_dir: Path, held_out: Sequence[Problem]) -> tuple[dict, float]:
    start = time.perf_counter()
    figures = measure(run_dir, held_out)
    return figures, time.perf_counter() - start


def posttrain(args: Any) -> dict[str, Any]:
    """The pipeline: task, base measurement, SFT + merge + measurement, DPO + merge + measurement."""
    root = args.root
    train, held_out = make_task(args.seed, args.train, args.held_out)
    paths = write_task(root, train, held_out)
    phases: dict[str, Any] = {}
    phases["base"], seconds = timed_measure(args.base, held_out)
    wall = {"measure_base": seconds}
    commands = []
    for name, base, source, steps, lr, extra in (
            ("sft", args.base, f"chat:{paths['train_chat']}", args.sft_steps, args.sft_lr, ()),
            ("dpo", root / "sft_merged", f"pref:{paths['train_pref']}", args.dpo_steps, args.dpo_lr,
             ("finetune.objective=dpo",))):
        train_cmd = finetune_args(args, base, root / name, source, steps, lr, extra)
        merge_cmd = ["python", "-m", "train.finetune", "merge", str(root / name),
                     str(root / f"{name}_merged")]
        wall[f"train_{name}"] = run_phase(train_cmd, [root / name])
        wall[f"merge_{name}"] = run_phase(merge_cmd, [root / f"{name}_merged"])
        phases[name], wall[f"measure_{name}"] = timed_measure(root / f"{name}_merged", held_out)
        phases[name]["trainable_fraction"] = trainable_fraction(root / name)
        commands += [" ".join(c) for c in (train_cmd, merge_cmd)]
    return {"phases": phases, "wall_s": wall, "commands": commands, "total_s": sum(wall.values()),
            "preference_accuracy_before_dpo": phases["sft"]["preference_accuracy"],
            "preference_accuracy_after_dpo": phases["dpo"]["preference_accuracy"]}


def report(args: Any, figures: dict[str, Any]) -> None:
    phases, wall = figures["phases"], figures["wall_s"]
    rows = []
    for name, label in (("base", "SmolLM2-135M-Instruct"), ("sft", "after SFT (LoRA, merged)"),
                        ("dpo", "after DPO (LoRA, merged)")):
        p = phases[name]
        trained = ("" if name == "base" else
                   f", trainable {p['trainable_fraction']:.2%}, train {wall[f'train_{name}']:.0f} s,"
                   f" merge {wall[f'merge_{name}']:.0f} s")
        rows.append((label, f"exact match {p['exact_match']:.1%}, preference accuracy "
                            f"{p['preference_accuracy']:.1%} (measure {wall[f'measure_{name}']:.0f} s"
                            f"{trained})"))
    rows.append(("total", f"{figures['total_s']:.0f} s"))
    print_table(f"post-training demo: {args.train} train / {args.held_out} held-out additions, "
                f"SFT {args.sft_steps} steps, DPO {args.dpo_steps} steps, batch {args.batch_size} x "
                f"{args.seq_len}", rows)
    for name in ("base", "sft", "dpo"):
        sample = phases[name]["samples"][0]
        print(f"  {name}: {sample['question']!r} -> {sample['reply']!r}")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(f"  wrote {write_result(args.name, config, figures, args.results)}")


def posttrain_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if not (args.base / "config.yaml").is_file():
        raise UsageError(f"--base: {args.base} is not a run directory (make demo-posttrain imports "
                         f"SmolLM2 into runs/smollm2)")
    if min(args.sft_steps, args.dpo_steps, args.batch_size, args.seq_len) < 1:
        raise UsageError("--sft-steps, --dpo-steps, --batch-size and --seq-len must be >= 1")
    quiet_tpu_probe()
    args.cpu_devices = device_count(args.cpu_devices, args.batch_size, os.cpu_count() or 1)
    args.base, args.root = args.base.resolve(), args.root.resolve()
    report(args, posttrain(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(posttrain_command, argv)


if __name__ == "__main__":
    sys.exit(main())
