"""Checkpoint conversion at scale: import and export throughput (GB/s of safetensors) and peak host
memory (VmHWM) for a synthetic Llama-3.2-1B-shaped checkpoint (1.24B parameters, bfloat16, tied
embeddings, sharded safetensors with an index; random values, written by this benchmark into a
temporary directory), on 8 emulated CPU devices with every parameter split over them.

Each measurement runs in a fresh process (``python -m bench.convert measure ...``), so its VmHWM is
its own: ``before`` is the process with JAX started (and a program compiled), before anything is
read. While the import places the parameters its bound (convert/checkpoints.py) is ``before +
params + 2 x largest tensor + HOST_SLACK`` (``import_bound_placing_mib``); Orbax's save afterwards
holds the chunks it writes until they reach disk (``import_saving_over_params_mib``). The export's
peak is its Orbax restore plus one gathered tensor at a time (``export_over_params_mib``).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tokenizers import Tokenizer, models

from bench.common import print_table, write_result
from cli.args import Parser, run, subcommands
from cli.host import quiet_tpu_probe, use_cpu_devices
from convert.checkpoints import (
    HOST_SLACK,
    INDEX_FILE,
    device_params,
    plan_import,
    run_mesh,
    safetensors_entries,
    save_params,
)
from convert.export import export_checkpoint
from convert.safetensors_io import DTYPES, SafetensorsWriter, parse_size, plan_shards
from sharding.rules import default_rules

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
LAYER = {"input_layernorm.weight": ("D",), "self_attn.q_proj.weight": ("NH", "D"),
         "self_attn.k_proj.weight": ("KH", "D"), "self_attn.v_proj.weight": ("KH", "D"),
         "self_attn.o_proj.weight": ("D", "NH"), "post_attention_layernorm.weight": ("D",),
         "mlp.gate_proj.weight": ("F", "D"), "mlp.up_proj.weight": ("F", "D"),
         "mlp.down_proj.weight": ("D", "F")}
MiB = 2**20
RUN_CODES = {"float32": "F32", "bfloat16": "BF16"}


def llama_shapes(hf: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint of config ``hf``, in transformers' order, with its shape."""
    dims = {"D": hf["hidden_size"], "F": hf["intermediate_size"],
            "NH": hf["num_attention_heads"] * hf["head_dim"],
            "KH": hf["num_key_value_heads"] * hf["head_dim"]}
    out = {"model.embed_tokens.weight": (hf["vocab_size"], dims["D"])}
    for i in range(hf["num_hidden_layers"]):
        for name, axes in LAYER.items():
            out[f"model.layers.{i}.{name}"] = tuple(dims[a] for a in axes)
    out["model.norm.weight"] = (dims["D"],)
    if not hf.get("tie_word_embeddings"):
        out["lm_head.weight"] = (hf["vocab_size"], dims["D"])
    return out


def random_bfloat16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random bfloat16 values of magnitude in [2**-8, 2**-4), from random bits (fast: no normal
    samples and no float32 copy)."""
    bits = np.frombuffer(rng.bytes(2 * math.prod(shape)), np.uint16)
    bits = (bits & 0x807F) | ((119 + ((bits >> 7) & 3)) << 7).astype(np.uint16)
    return bits.view(DTYPES["BF16"]).reshape(shape)


def synthetic_checkpoint(directory: Path, hf: dict[str, Any], shard_size: int, seed: int = 0) -> int:
    """Writes a Llama checkpoint of config ``hf`` with random bfloat16 tensors into ``directory``
    (config.json, a one-word tokenizer, sharded safetensors and their index), one tensor in memory
    at a time; returns the tensors' bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, **hf}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(
        str(directory / "tokenizer.json"))
    shapes, dtype, rng = llama_shapes(config), DTYPES["BF16"], np.random.default_rng(seed)
    files = plan_shards(((n, math.prod(s) * dtype.itemsize) for n, s in shapes.items()), shard_size)
    for file, names in files.items():
        with SafetensorsWriter(directory / file, {n: (dtype, shapes[n]) for n in names}) as writer:
            for name in names:
                writer.write(name, random_bfloat16(rng, shapes[name]))
    total = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    if len(files) > 1:
        (directory / INDEX_FILE).write_text(json.dumps({
            "metadata": {"total_size": total},
            "weight_map": {n: file for file, names in files.items() for n in names}}, indent=2))
    return total


def vm_kib(field: str) -> int:
    """A field of /proc/self/status, in KiB (VmHWM: peak resident memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def device_bytes(tree: Any) -> int:
    """Bytes the devices hold for ``tree``'s arrays (every shard, replicas included)."""
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards)


def warm_up() -> None:
    """Starts JAX and runs one compiled program, so that ``before`` holds the compiler's code."""
    jax.block_until_ready(jax.jit(lambda x: x * 2)(np.ones(8, np.float32)))


def measure_import(src: Path, run_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """One import in this process (the steps of ``write_import``), timed and measured."""
    plan = plan_import(src, run_dir, overrides=overrides)
    use_cpu_devices(plan.cfg.run.cpu_devices)
    warm_up()
    entries = [e for _, e in safetensors_entries(src).values()]
    wide = max(DTYPES[RUN_CODES[plan.cfg.model.param_dtype]].itemsize, *(e.dtype.itemsize for e in entries))
    before, start = vm_kib("VmHWM"), time.perf_counter()
    params = jax.block_until_ready(device_params(plan.cfg.model, plan.source.tensors,
                                                 run_mesh(plan.cfg), default_rules()))
    placed, placed_kib = time.perf_counter(), vm_kib("VmHWM")
    run_dir.mkdir(parents=True)
    save_params(run_dir, plan.cfg, params, plan.source.tokenizer, {"step": 0})
    return {"before_kib": before, "placed_kib": placed_kib, "saved_kib": vm_kib("VmHWM"),
            "params_bytes": device_bytes(params), "checkpoint_bytes": sum(e.nbytes for e in entries),
            "largest_tensor_bytes": max(math.prod(e.shape) for e in entries) * wide,
            "largest_param_bytes": max(leaf.nbytes for leaf in jax.tree.leaves(params)),
            "slack_bytes": HOST_SLACK, "place_s": placed - start,
            "save_s": time.perf_counter() - placed, "devices": jax.device_count()}


def measure_export(run_dir: Path, out_dir: Path, shard_size: int) -> dict[str, Any]:
    """One export in this process, timed and measured."""
    use_cpu_devices(8)
    warm_up()
    before, start = vm_kib("VmHWM"), time.perf_counter()
    export_checkpoint(run_dir, out_dir, shard_size=shard_size)
    return {"before_kib": before, "peak_kib": vm_kib("VmHWM"), "export_s": time.perf_counter() - start,
            "files": len(list(out_dir.glob("*.safetensors"))),
            "written_bytes": sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))}


def measured(*args: str) -> dict[str, Any]:
    """The figures a fresh ``python -m bench.convert measure ...`` process prints."""
    result = subprocess.run([sys.executable, "-m", "bench.convert", "measure", *args],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise RuntimeError(f"bench.convert measure {args[0]} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def figures_of(imp: dict[str, Any], exp: dict[str, Any], generate_s: float) -> dict[str, Any]:
    """Throughputs, and VmHWM figures in MiB: absolute, and above ``before`` + the parameters."""
    gb, params = imp["checkpoint_bytes"] / 1e9, imp["params_bytes"] / MiB
    before, largest = imp["before_kib"] / 1024, imp["largest_tensor_bytes"] / MiB
    bound = before + params + 2 * largest + imp["slack_bytes"] / MiB
    return {
        "checkpoint_gb": gb, "generate_s": generate_s, "import_place_s": imp["place_s"],
        "import_save_s": imp["save_s"], "export_s": exp["export_s"],
        "import_place_gb_per_s": gb / imp["place_s"],
        "import_gb_per_s": gb / (imp["place_s"] + imp["save_s"]),
        "export_gb_per_s": gb / exp["export_s"],
        "params_mib": params, "largest_tensor_mib": largest, "import_before_mib": before,
        "import_peak_placing_mib": imp["placed_kib"] / 1024,
        "import_bound_placing_mib": bound,
        "import_placing_over_params_mib": imp["placed_kib"] / 1024 - before - params,
        "import_peak_saving_mib": imp["saved_kib"] / 1024,
        "import_saving_over_params_mib": imp["saved_kib"] / 1024 - before - params,
        "import_bound_saving_mib": bound + imp["largest_param_bytes"] / MiB,
        "export_before_mib": exp["before_kib"] / 1024, "export_peak_mib": exp["peak_kib"] / 1024,
        "export_over_params_mib": (exp["peak_kib"] - exp["before_kib"]) / 1024 - params,
        "export_files": exp["files"],
    }


def bench_command(args: Any) -> int:
    hf = {**LLAMA_1B, **json.loads(args.model_json or "{}")}
    with tempfile.TemporaryDirectory(prefix="meshlm-bench-convert-", dir=args.tmp) as tmp:
        start = time.perf_counter()
        synthetic_checkpoint(Path(tmp) / "hf", hf, args.shard_size)
        generate_s = time.perf_counter() - start
        imp = measured("import", f"{tmp}/hf", f"{tmp}/run")
        exp = measured("export", f"{tmp}/run", f"{tmp}/out", str(args.shard_size))
        shutil.rmtree(tmp, ignore_errors=True)
    figures = figures_of(imp, exp, generate_s)
    print_table(f"Conversion: {figures['checkpoint_gb']:.2f} GB bfloat16 Llama checkpoint, "
                f"{imp['devices']} CPU devices, parameters split over all (fsdp)",
                [(k, f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in figures.items()])
    path = write_result("convert", {"hf_config": hf, "shard_size": args.shard_size,
                                    "mesh": "fsdp=-1", "devices": imp["devices"]}, figures,
                        Path(args.results) if args.results else None)
    print(f"  wrote {path}")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="python -m bench.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("2GB"),
                        help="safetensors file size of the synthetic checkpoint and the export")
    parser.add_argument("--model-json", default="", help="JSON overrides of the Llama config.json")
    parser.add_argument("--results", default="", help="directory for convert.json (default "
                                                       "bench/results)")
    parser.add_argument("--tmp", default=None, help="where the temporary checkpoints go")
    sub = subcommands(parser)
    sub.required = False
    child = sub.add_parser("measure", help="one measurement in this process (JSON on stdout)")
    child.add_argument("what", choices=("import", "export"))
    child.add_argument("src", type=Path)
    child.add_argument("dst", type=Path)
    child.add_argument("rest", nargs="*", help="import: overrides; export: the shard size")
    return parser


def convert_bench_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    quiet_tpu_probe()
    if args.command != "measure":
        return bench_command(args)
    if args.what == "import":
        figures = measure_import(args.src, args.dst, args.rest)
    else:
        figures = measure_export(args.src, args.dst, parse_size(args.rest[0]) if args.rest else 5 * 10**9)
    print(json.dumps(figures))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(convert_bench_command, argv)


if __name__ == "__main__":
    sys.exit(main())
