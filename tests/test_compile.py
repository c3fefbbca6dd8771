"""train.compile: ahead-of-time compiles of the real train step for small TPU topologies (libtpu's
compile-only devices, no TPU needed), the report's consistency, the collective bytes and kernel
names read from a compiled program against a hand count, and its one-line errors.

Each compile runs in a subprocess: the CLI must set libtpu's environment before JAX starts, and this
test process already runs JAX on 8 emulated CPU devices.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cli.compile import format_report
from model.flops import causal_train_flops_per_token
from train.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def run_compile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.compile", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


# One process runs every command of this file's tests, one after another (`python -m train.compile`
# is cli.compile.main; its stdout and stderr are captured per command): each process start costs
# about 3.5 s of JAX and libtpu set-up. A real subprocess still checks one error's stderr whole.
BATCH_PROGRAM = """
import contextlib, io, json, sys
from cli.compile import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def report_args(*args: str) -> tuple[str, ...]:
    return (*args, "--json")


def batch_commands() -> list[tuple[str, ...]]:
    return ([report_args("--topology", topology, preset, *overrides)
             for preset, topology, overrides in CASES]
            + [report_args(*SLICES_REPORT), *ERROR_CASES])


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Every command of this file run once in one process: argv -> (returncode, stdout, stderr)."""
    commands = batch_commands()
    result = subprocess.run([sys.executable, "-c", BATCH_PROGRAM, json.dumps(commands)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    return {tuple(argv): subprocess.CompletedProcess(argv, code, out, err)
            for argv, (code, out, err) in zip(commands, outputs, strict=True)}


def compile_report(compiled: dict, *args: str) -> dict:
    result = compiled[report_args(*args)]
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# moe_tiny at d_model 256: at its own 64 the routing's gathers, scatters and elementwise work add
# 12% to the matmuls (compiled / expected = 1.117); at 256 they are within the 10% of the others.
# The remat case runs 128-token sequences, which attention "auto" gives the splash kernel on TPU.
# The first case is not scanned: with no loops the report's costs come from the real program itself.
CASES = [("configs/tiny.yaml", "v5e:2x2", ("model.scan_layers=false",)),
         ("configs/tiny.yaml", "v5e:2x2", ("model.remat=full", "model.max_seq_len=128",
                                           "train.seq_len=128")),
         ("configs/moe_tiny.yaml", "v5e:2x4", ("model.d_model=256",))]


@pytest.mark.parametrize("preset, topology, overrides", CASES)
def test_compile_report_is_consistent(compiled: dict, preset: str, topology: str,
                                      overrides: tuple[str, ...]) -> None:
    r = compile_report(compiled, "--topology", topology, preset, *overrides)
    chips = {"v5e:2x2": 4, "v5e:2x4": 8}[topology]
    assert r["chip"]["name"] == "v5e" and r["chips"] == r["devices"] == chips
    assert math.prod(r["mesh"].values()) == chips

    mem = r["memory_per_chip"]
    assert mem["total"] == (mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
                            + mem["code"])
    assert mem["arguments"] >= r["state_bytes_per_device"] > 0
    assert mem["aliased"] >= r["state_bytes_per_device"] * 0.9  # the state is donated, updated in place
    assert r["fits"] and 0 < r["hbm_fraction"] < 1
    assert r["hbm_fraction"] == pytest.approx(mem["total"] / r["chip"]["hbm_bytes"])

    flops = r["flops"]  # every layer counted though the step scans over them
    assert flops["compiled_per_step"] == pytest.approx(flops["compiled_per_device"] * chips)
    # model/flops.py plus what the step executes beyond the model's FLOPs: remat's recomputed
    # forward pass and the capacity path's padded expert slots (none for plain tiny)
    assert abs(flops["executed_ratio"] - 1) <= 0.10, flops
    if overrides == CASES[0][2]:  # neither remat's recomputation nor padded expert slots
        assert flops["executed_per_step"] == flops["formula_per_step"]
        assert abs(flops["ratio"] - 1) <= 0.10, flops
    else:
        assert flops["executed_per_step"] > flops["formula_per_step"]

    # collectives: the data-parallel gradients are all-reduced (or reduce-scattered); the real
    # program (loops times their trip counts) and the unrolled cost programs count alike
    coll = r["collectives"]
    assert coll["total_bytes_per_device"] == pytest.approx(sum(coll["bytes_per_device"].values()))
    assert coll["total_bytes_per_device"] > 0 and not coll["unknown_trip_count_loops"]
    assert sum(coll["unrolled_bytes_per_device"].values()) == pytest.approx(
        coll["total_bytes_per_device"], rel=0.25)
    kernels = r["kernels"]
    if r["batch"]["seq_len"] % 128:  # einsum: splash takes multiples of 128 tokens
        assert kernels["attention_xla_dots"] and kernels["pallas"] == {}
        assert flops["kernel_estimate_per_step"] == 0
    else:  # splash, whose FLOPs XLA does not count (no cost estimate): the report estimates them
        assert not kernels["attention_xla_dots"]
        assert {name.split("_")[2] for name in kernels["pallas"]} == {"fwd", "dq", "dkv"}
        assert not any(k["cost_estimate"] for k in kernels["pallas"].values())
        assert flops["kernel_estimate_per_step"] > 0
    assert not flops["uncounted_kernels"] and flops["loops_counted_once"] == 0
    assert flops["counted_per_step"] == flops["compiled_per_step"] + flops["kernel_estimate_per_step"]
    assert r["largest_buffers"] and r["largest_buffers"][0]["array_bytes"] > 0

    roof, chip = r["roofline"], r["chip"]
    assert chip["ici_bandwidth"] == 400e9 and "v5e" in chip["ici_source"]
    assert roof["compute_s"] == pytest.approx(
        flops["counted_per_step"] / chips / chip["peak_bf16_flops"])
    assert roof["memory_s"] == pytest.approx(r["bytes_accessed_per_device"] / chip["hbm_bandwidth"])
    assert roof["ici_s"] == pytest.approx(coll["total_bytes_per_device"] / chip["ici_bandwidth"])
    over, serial = roof["overlapped"], roof["serial"]
    assert over["step_s"] == max(roof["compute_s"], roof["memory_s"], roof["ici_s"]) > 0
    assert serial["step_s"] == pytest.approx(max(roof["compute_s"], roof["memory_s"]) + roof["ici_s"])
    for t in (over, serial):
        assert t["mfu_full_attention"] == pytest.approx(
            flops["formula_per_step"] / (chips * chip["peak_bf16_flops"] * t["step_s"]))
        cfg = load_config(ROOT / preset, list(overrides))
        causal = causal_train_flops_per_token(cfg.model, cfg.train.seq_len) * r["batch"]["tokens_per_step"]
        assert t["mfu"] == pytest.approx(causal / (chips * chip["peak_bf16_flops"] * t["step_s"]))
        assert t["mfu"] < t["mfu_full_attention"]
        assert t["tokens_per_s"] == pytest.approx(r["batch"]["tokens_per_step"] / t["step_s"])
    assert 0 < serial["mfu"] < over["mfu"] < 1


def test_compile_text_report(compiled: dict) -> None:
    # what `python -m train.compile` prints without --json: the first case's report as text
    preset, topology, overrides = CASES[0]
    out = format_report(compile_report(compiled, "--topology", topology, preset, *overrides))
    for fragment in ("4 x TPU v5 lite", "HBM per chip", "temporaries", "largest buffers",
                     "FLOPs per step", "collectives", "all-reduce", "kernels (Pallas calls per step): "
                     "none; attention as XLA dots: yes", "400 GB/s ICI", "overlapped",
                     "not overlapped", "MFU"):
        assert fragment in out, out
    assert "+ 0.0 s for the cost programs" in out  # no loops: the real program's costs are exact


SLICES_REPORT = ("--topology", "v5e:2x2", "--slices", "2", "configs/tiny.yaml",
                 "model.scan_layers=false", "mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=4")


def test_compile_for_two_slices_reports_what_crosses_the_network(compiled: dict) -> None:
    # Two v5e:2x2 slices: data parallelism across them (dcn_data=2), fsdp 4 within each. Only the
    # data-parallel reduction of the gradients crosses the network: an all-reduce over the two
    # slices (p = 2) of each device's fsdp quarter of the float32 gradients, which sends
    # 2 (p - 1)/p x 4 bytes x params / 4 = 1 byte per parameter (the step's scalars, loss and
    # weight sums, add a few bytes). libtpu compiles one program per slice and sends the DCN
    # all-reduces to its megascale runtime as host transfers of (8, 128)-tiled buffers: 100,352
    # bytes for tiny's 98,624 parameters (1.8% of padding). fsdp's weight all-gathers and
    # reduce-scatters stay within a slice.
    r = compile_report(compiled, *SLICES_REPORT)
    assert r["topology"] == "2 x v5e:2x2" and r["slices"] == 2 and r["chips"] == r["devices"] == 8
    assert r["mesh"]["data"] == 2 and r["mesh"]["fsdp"] == 4
    coll, dcn = r["collectives"], r["collectives"]["dcn"]
    assert dcn["groups_not_read"] == 0
    assert dcn["bytes_per_device"]["all-reduce"] == pytest.approx(r["model"]["params"], rel=0.03), dcn
    assert dcn["total_bytes_per_device"] == pytest.approx(dcn["bytes_per_device"]["all-reduce"])
    assert dcn["bytes_per_device"]["all-gather"] == 0 < coll["bytes_per_device"]["all-gather"]


# Per-device blocks of a shard_map over the 4 chips of v5e:2x2, one collective of each kind, one
# all-reduce in a 3-trip loop counting from 1, and a Pallas kernel: the bytes each device sends by hand (f32):
# all-gather of an [8, 128] block (4 KiB): 3 x 4 KiB; reduce-scatter of [4096, 128] (2 MiB): 3/4 of
# it; all-reduce of [8, 128]: 2 x 3/4 x 4 KiB, once and three times in the loop; all-to-all of
# [32, 128]: 3/4 x 16 KiB; collective-permute of [8, 128]: 4 KiB. (A small reduce-scatter, e.g. of
# [32, 128], becomes an all-reduce and a slice in libtpu's program, and counts as that all-reduce.)
HAND_COUNT = {"all-gather": 3 * 4096, "reduce-scatter": 3 / 4 * 2**21, "all-reduce": 4 * 6144,
              "all-to-all": 12288, "collective-permute": 4096}
COLLECTIVES_PROGRAM = """
import json
from cli.compile import prepare_environment
prepare_environment()
import jax, numpy as np
from jax.experimental import pallas as pl, topologies
from jax.sharding import Mesh, PartitionSpec as P
from train import hlo

mesh = Mesh(np.array(topologies.get_topology_desc("v5e:2x2", "tpu").devices), ("x",))

def double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

def block(a, b, c, d, e):
    # a counter from 1 to 4 (as XLA leaves a loop it peeled an iteration out of): 3 trips
    loop = jax.lax.while_loop(lambda iv: iv[0] < 4,
                              lambda iv: (iv[0] + 1, jax.lax.psum(iv[1], "x") * 0.5), (1, c + 1))[1]
    return (jax.lax.all_gather(a, "x", tiled=True), jax.lax.psum_scatter(b, "x", tiled=True),
            jax.lax.psum(c, "x"), loop, jax.lax.all_to_all(d, "x", 0, 0, tiled=True),
            jax.lax.ppermute(e, "x", [(i, (i + 1) % 4) for i in range(4)]),
            pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(e.shape, e.dtype),
                           name="meshlm_double")(e))

step = jax.jit(jax.shard_map(block, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False))
shapes = [(32, 128), (16384, 128), (32, 128), (128, 128), (32, 128)]
args = [jax.ShapeDtypeStruct(s, np.float32) for s in shapes]
program = hlo.Program(step.lower(*args).compile().as_text())
found = hlo.collectives(program)
print(json.dumps({"bytes": found.bytes_by_kind(), "ops": found.count_by_kind(),
                  "unknown": found.unknown_loops,
                  "kernels": {k: [v.calls, v.cost_estimate] for k, v in hlo.kernels(program).items()}}))
"""


def test_collectives_and_kernels_of_a_compiled_program_match_a_hand_count() -> None:
    result = subprocess.run([sys.executable, "-c", COLLECTIVES_PROGRAM], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["bytes"] == pytest.approx(HAND_COUNT), found
    assert found["ops"]["all-reduce"] == 4 and not found["unknown"], found
    assert found["kernels"] == {"meshlm_double": [1, False]}, found


# 34B parameters on 4 v5e chips: the state alone does not fit; found before compiling.
BIG = ("model.d_model=8192", "model.num_heads=64", "model.num_kv_heads=8", "model.mlp_dim=32768",
       "model.num_layers=32")
# 64 sequences of 8192 on 4 chips, einsum attention: the float32 scores of both layers,
# 2 x 16 x 2 x 2 x 8192^2 x 4 bytes = 32 GiB per device, are kept for the backward pass.
LONG = ("model.max_seq_len=8192", "train.seq_len=8192", "train.batch_size=64",
        "model.attention_impl=einsum")
ERRORS = {("configs/tiny.yaml",): "--topology is required",
          ("--topology", "v5e:2x2", "configs/moe_tiny.yaml"): "mesh",
          ("--topology", "v5e:2x2", "configs/tiny.yaml", *BIG): "does not fit: the train state alone",
          ("--topology", "v5e:2x2", "configs/tiny.yaml", *LONG):
              "does not fit: XLA could not fit the train step in HBM: temporaries need "}
ERROR_CASES = list(ERRORS)


def test_compile_errors_are_one_line(compiled: dict) -> None:
    # a process of its own: nothing else (libtpu's or absl's logging) reaches stderr either
    assert_one_line_error(run_compile("--topology", "v9z:2x2", "configs/tiny.yaml"),
                          "unknown TPU topology 'v9z:2x2'")
    for argv, fragment in ERRORS.items():
        assert_one_line_error(compiled[argv], fragment)
    assert ("available; largest buffer f32[2,16,2,2,8192,8192] (32.00 GiB"
            in compiled[ERROR_CASES[-1]].stderr)


def test_compile_without_libtpu_is_a_clear_error() -> None:
    code = ("import sys; sys.modules['libtpu'] = None; from cli.compile import main; "
            "sys.exit(main(['--topology', 'v5e:2x2', 'configs/tiny.yaml']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert_one_line_error(result, "libtpu is not installed")
