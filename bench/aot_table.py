"""``python -m bench.aot_table [--only TEXT ...] [--timeout S]``: the AOT table of issue 19 point 5:
``python -m train.compile --json`` for each row of ROWS (config, overrides, TPU topology), written to
bench/results/aot_table.json and as a markdown table to bench/results/aot_table.md.

Every row of ROWS (or of ``--only``) is a row of the table: one that does not fit carries the error
line naming its largest memory term, one that fails otherwise its error line; none is skipped. Each
compile runs in its own process (libtpu's environment is set before JAX starts, and an 8B model's
compiles take minutes and GiBs of host memory).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, write_result
from cli.args import Parser, run

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    config: str
    topology: str
    overrides: tuple[str, ...] = ()


def llama(seq_k: int, topology: str, sequences: int, context: int = 1) -> Row:
    """llama3_8b at ``seq_k`` K tokens of context, ``sequences`` per step, the sequence sharded over
    ``context`` devices; attention ``auto`` (splash on TPU)."""
    seq = seq_k * 1024
    overrides = (f"model.max_seq_len={seq}", f"train.seq_len={seq}", f"train.batch_size={sequences}",
                 "model.attention_impl=auto", f"mesh.context={context}")
    return Row(f"llama3_8b {seq_k}k", "configs/llama3_8b.yaml", topology, overrides)


# About 1M tokens per step on v5p:4x4x4 (64 chips), 2M on v6e:16x16 (256 chips); one sequence or
# more per device (fsdp fills the rest of the slice) where it fits, else context parallelism.
ROWS: tuple[Row, ...] = (
    llama(8, "v5p:4x4x4", 128), llama(32, "v5p:4x4x4", 32, context=2),
    llama(128, "v5p:4x4x4", 8, context=8),
    llama(8, "v6e:16x16", 256), llama(32, "v6e:16x16", 64, context=4),
    llama(128, "v6e:16x16", 16, context=16),
    Row("mixtral_8x7b dropless megablox", "configs/mixtral_8x7b.yaml", "v5p:4x4x4",
        ("model.moe_impl=dropless", "model.moe_matmul=megablox")),
)


def compile_row(row: Row, timeout: float) -> dict[str, Any]:
    """``python -m train.compile --json`` for one row: {"row", "report" (or None), "error" (the
    ``error:`` line, or None), "seconds"}."""
    command = [sys.executable, "-m", "train.compile", "--topology", row.topology, row.config,
               *row.overrides, "--json"]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"row": dataclasses.asdict(row), "report": None,
                "error": f"error: no report within {timeout:.0f} s", "seconds": timeout}
    report = None
    if result.stdout.strip():
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError:
            pass
    lines = result.stderr.strip().splitlines()
    error = None if result.returncode == 0 else (lines[-1] if lines else f"exit {result.returncode}")
    return {"row": dataclasses.asdict(row), "report": report, "error": error,
            "seconds": time.perf_counter() - start}


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def markdown_row(entry: dict[str, Any]) -> str:
    """One line of the markdown table."""
    row, r, error = entry["row"], entry["report"], entry["error"]
    head = f"| {row['name']} | {row['topology']} |"
    if r is None:
        return f"{head} {' | '.join(['-'] * 8)} | {error} |"
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
    pallas = ", ".join(r["kernels"]["pallas"]) or "none"
    attention = "XLA dots" if r["kernels"]["attention_xla_dots"] else "kernel"
    roof = r["roofline"]
    serial = roof["serial"]
    cells = [mesh, f"{r['batch']['batch_size']} x {r['batch']['seq_len']}",
             f"{pallas}; attention {attention}",
             f"{gib(r['memory_per_chip']['total'])} ({r['hbm_fraction']:.0%})",
             gib(r["collectives"]["total_bytes_per_device"]),
             " / ".join("-" if roof[k] is None else f"{roof[k]:.2f}"
                        for k in ("compute_s", "memory_s", "ici_s")),
             f"{roof['overlapped']['step_s']:.2f} s, {roof['overlapped']['mfu']:.1%} "
             f"({roof['overlapped']['mfu_full_attention']:.1%})",
             f"{serial['step_s']:.2f} s, {serial['mfu']:.1%} ({serial['mfu_full_attention']:.1%})"
             if serial else "ICI not modelled"]
    note = error or f"{roof['bound']}-bound"
    return f"{head} {' | '.join(cells)} | {note} |"


def markdown(entries: list[dict[str, Any]]) -> str:
    header = ("| Config | Topology | Mesh | Batch x seq | Kernels | HBM per chip | Collectives per "
              "device | Compute / HBM / ICI s | Overlapped: step, MFU (full-T MFU) | Not overlapped: "
              "step, MFU (full-T MFU) | Note |")
    rule = "|" + "---|" * (header.count("|") - 1)
    return "\n".join([header, rule, *(markdown_row(e) for e in entries)]) + "\n"


def aot_table_command(argv: Sequence[str]) -> int:
    parser = Parser(prog="python -m bench.aot_table", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=[], metavar="TEXT",
                        help="only the rows whose name or topology contains one of these")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds one row's compiles may take (default 3600)")
    args = parser.parse_args(argv)
    rows = [r for r in ROWS
            if not args.only or any(t in f"{r.name} {r.topology}" for t in args.only)]
    entries = []
    for row in rows:
        entries.append(compile_row(row, args.timeout))
        print(markdown_row(entries[-1]), flush=True)
    table = markdown(entries)
    path = write_result("aot_table", {"rows": [dataclasses.asdict(r) for r in rows]},
                        {"rows": entries, "markdown": table})
    (RESULTS_DIR / "aot_table.md").write_text(table)
    print(f"\n{table}\n  wrote {path} and {RESULTS_DIR / 'aot_table.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(aot_table_command, argv)


if __name__ == "__main__":
    sys.exit(main())
