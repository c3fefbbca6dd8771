"""Ahead-of-time compilation of the real train step for a TPU topology that is not attached (libtpu's
compile-only devices), and its report: HBM per chip (and, when it does not fit, the largest buffer),
FLOPs per step against model/flops.py, the bytes each device sends in collectives, the Pallas kernels
the program calls, and a roofline estimate of step time and MFU with and without overlap of the
collectives. The command around it is ``cli/compile.py``; the HLO reading is ``train/hlo.py``.

XLA's ``cost_analysis()`` counts the body of a loop once, and the step loops over layers
(``lax.scan``) and microbatches. So the FLOP and HBM-traffic costs come from two extra compiles of
the same model with its layers unrolled, one and two layer groups deep, microbatches folded into one
batch: the cost of one group is their difference, extrapolated to the real depth. Memory comes from
the real program. So do the collectives: ``train/hlo.py`` multiplies a loop body's collectives by the
loop's trip count, so the real program's count holds every layer and every microbatch (the step
all-gathers the weights and reduce-scatters the gradients once per microbatch: checked, 2
microbatches send exactly twice the bytes of one). The same count over the unrolled cost programs,
extrapolated like the FLOPs, is reported beside it as a check (microbatches folded there).
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from typing import Any

import jax
from jax.experimental import topologies
from jax.sharding import Mesh

from core.errors import first_line
from model.config import ModelConfig
from model.flops import (
    attention_flops_per_token,
    causal_train_flops_per_token,
    matmul_params,
    param_counts,
    train_flops_per_token,
)
from sharding.mesh import make_mesh
from train import hlo
from train.config import Config
from train.program import Program, memory_report
from train.tpu_chips import Chip, chip_for_kind, chip_for_topology
from train.validate import validate

COST_KEYS = ("flops", "bytes accessed", "transcendentals", "optimal_seconds")
COST_PROGRAM = "the cost program (layers unrolled, microbatches folded into one batch)"
# the source files whose matmuls are attention's own (not its projections) when run as XLA dots
ATTENTION_SOURCES = re.compile(r"model/[\w]*attention[\w]*\.py$")


class CompileError(ValueError):
    """A config that cannot run on the topology, or an unknown topology (one line, exit 2)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    chip: Chip
    devices: list
    chips: int
    slices: int = 1

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips


def topology(name: str, slices: int = 1) -> Topology:
    """The compile-only devices of a TPU topology such as ``v5e:2x2`` or ``v5p:4x4x4``, or of
    ``slices`` such slices joined by the data-center network (libtpu's ``num_slices``)."""
    if slices < 1:
        raise CompileError(f"--slices: must be >= 1, got {slices}")
    try:
        devices = topologies.get_topology_desc(name, "tpu", num_slices=slices).devices
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
        raise CompileError(f"--topology: unknown TPU topology {name!r} (expected e.g. v5e:2x2, "
                           f"v5p:4x4x4, v6e:8x8): {first_line(e)}") from None
    chip = chip_for_kind(devices[0].device_kind) or chip_for_topology(name)
    if chip is None:
        raise CompileError(f"--topology: no published figures for {devices[0].device_kind!r} "
                           f"({name}); known chips: v3, v4, v5e, v5p, v6e (train/tpu_chips.py)")
    chips = len({(getattr(d, "slice_index", 0), *d.coords) for d in devices})
    return Topology(name if slices == 1 else f"{slices} x {name}", chip, list(devices), chips,
                    slices)


def topology_mesh(cfg: Config, topo: Topology) -> Mesh:
    """The config's mesh over the topology's devices, laid out along the physical torus (and, with
    several slices, the hybrid mesh of ``mesh.dcn_*``)."""
    try:
        return make_mesh(cfg.mesh, devices=topo.devices, physical=True)
    except ValueError as e:
        raise CompileError(f"{e}; --slices {cfg.mesh.slices} compiles for that many") from None


def lower_train_step(cfg: Config, mesh: Mesh) -> tuple[Any, int]:
    """(the lowered train step of the training program, the bytes of train state one device
    holds)."""
    program = Program(cfg, mesh=mesh)
    return program.lower_train_step(), program.state_bytes_per_device()


def compile_lowered(lowered: Any, what: str, dump_dir: str | None = None) -> Any:
    """``lowered.compile()``, XLA dumping its files into ``dump_dir`` when given (their memory-usage
    report names the largest buffers). Running out of HBM becomes a CompileError that names the
    largest memory term XLA reports and, with a dump, the largest buffer."""
    try:
        return lowered.compile(compiler_options={"xla_dump_to": dump_dir} if dump_dir else None)
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
            buffers = hlo.largest_buffers(dump_dir) if dump_dir else []
            raise CompileError(f"does not fit: XLA could not fit {what} in HBM: "
                               f"{out_of_memory_detail(text)}{largest_buffer_note(buffers)}"
                               ) from None
        raise


def out_of_memory_detail(text: str) -> str:
    """The memory term of XLA's out-of-memory error, e.g. "temporaries need 82.19G per device, more
    than the 15.75G available"."""
    temporaries = re.search(r"HLO temporaries \(([^)]*)\) exceeds available HBM \(([^)]*)\)", text)
    if temporaries:
        return (f"temporaries need {temporaries.group(1)} per device, more than the "
                f"{temporaries.group(2)} available")
    allocation = re.search(r"Allocation \(size=(\d+)\) would exceed memory \(size=(\d+)\)", text)
    if allocation:
        return (f"one allocation of {int(allocation.group(1)) / 2**30:.2f} GiB exceeds the "
                f"{int(allocation.group(2)) / 2**30:.2f} GiB of HBM")
    return next((line.strip() for line in text.splitlines() if "memory" in line.lower()),
                text.splitlines()[0])


def largest_buffer_note(buffers: list[dict[str, Any]]) -> str:
    """"; largest buffer f32[...] (32.00 GiB)" for the largest of ``hlo.largest_buffers``, or ""."""
    if not buffers:
        return ""
    top = buffers[0]
    shared = "" if top["array_bytes"] >= top["bytes"] else f", in a {top['bytes'] / 2**30:.2f} GiB slot"
    return f"; largest buffer {top['largest_array']} ({top['array_bytes'] / 2**30:.2f} GiB{shared})"


def costs_of(compiled: Any) -> dict[str, float]:
    """Per-device cost figures of a compiled program (XLA's cost analysis)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0]
    return {k: float(analysis.get(k, 0.0)) for k in COST_KEYS}


def costs_and_collectives(compiled: Any) -> dict[str, float]:
    """``costs_of`` plus the bytes one device sends per run in each kind of collective
    (``collective all-gather``, ...; train/hlo.py) and the number of ``while`` loops left whose
    bodies XLA's cost analysis counts once (``loops``: trip count other than 1, or unknown)."""
    program = hlo.Program(compiled.as_text())
    sent = hlo.collectives(program).bytes_by_kind()
    loops = sum(1 for i in program.instructions
                if i.opcode == "while" and program.trip_count(i) != 1)
    return (costs_of(compiled) | {f"collective {kind}": b for kind, b in sent.items()}
            | {"loops": float(loops)})


def layer_units(cfg: Config) -> tuple[int, int]:
    """(repeated units of the stack: layers of a dense model, MoE groups of an MoE model, layers per
    unit)."""
    m = cfg.model
    return (m.num_moe_layers, m.moe_every) if m.is_moe else (m.num_layers, 1)


def with_units(cfg: Config, units: int) -> Config:
    """The config with ``units`` repeated units, layers unrolled and microbatches folded into one."""
    m = cfg.model
    layers = (m.first_dense_layers if m.is_moe else 0) + units * layer_units(cfg)[1]
    return dataclasses.replace(cfg, model=dataclasses.replace(m, num_layers=layers, scan_layers=False),
                               train=dataclasses.replace(cfg.train, microbatches=1))


def step_costs(cfg: Config, mesh: Mesh, compiled: Any) -> tuple[dict[str, float], float]:
    """(per-device costs of one whole step, ``costs_and_collectives``, seconds spent on extra
    compiles). A program without loops is measured directly; otherwise one unit's cost is the
    difference of the unrolled 1- and 2-unit programs, and the step costs the 1-unit program plus
    (units - 1) units."""
    units, _ = layer_units(cfg)
    if not cfg.model.scan_layers and cfg.train.microbatches == 1:
        return costs_and_collectives(compiled), 0.0
    start = time.perf_counter()
    one = costs_and_collectives(compile_lowered(lower_train_step(with_units(cfg, 1), mesh)[0],
                                                COST_PROGRAM))
    if units == 1:
        return one, time.perf_counter() - start
    two = costs_and_collectives(compile_lowered(lower_train_step(with_units(cfg, 2), mesh)[0],
                                                COST_PROGRAM))
    total = {k: one[k] + (units - 1) * (two[k] - one[k]) for k in one}
    return total, time.perf_counter() - start


def roofline(flops_per_device: float, bytes_per_device: float, sent_per_device: float,
             topo: Topology, model_flops: float, tokens: int,
             full_attention_flops: float | None = None) -> dict[str, Any]:
    """Estimates, not measurements. Compute at the chip's bf16 peak, HBM traffic at its HBM
    bandwidth, and the bytes a device sends in collectives at the chip's published ICI bandwidth:
    all links, both directions, which no collective fully uses, so the ICI time is a lower bound.
    ``overlapped``: step = max(compute, HBM, ICI), collectives hidden behind compute; ``serial``:
    max(compute, HBM) + ICI, nothing hidden. Each with the tokens/s and MFU it gives: ``mfu`` from
    ``model_flops`` (causal attention, MaxText's count), ``mfu_full_attention`` from
    ``full_attention_flops`` (every query over all T keys, PaLM's count and the one training logs,
    which passes 100% at long contexts). Without a published ICI bandwidth (``ici_s`` None) the
    collectives are not modelled: serial is None."""
    chip, share = topo.chip, topo.devices_per_chip  # a chip's figures are split among its devices
    compute_s = flops_per_device * share / chip.peak_bf16_flops
    memory_s = bytes_per_device * share / chip.hbm_bandwidth
    ici_s = sent_per_device * share / chip.ici_bandwidth if chip.ici_bandwidth else None
    terms = {"compute": compute_s, "memory": memory_s, "ici": ici_s or 0.0}

    def at(step_s: float) -> dict[str, float]:
        peak = topo.chips * chip.peak_bf16_flops * step_s
        full = model_flops if full_attention_flops is None else full_attention_flops
        return {"step_s": step_s, "tokens_per_s": tokens / step_s if step_s else 0.0,
                "mfu": model_flops / peak if step_s else 0.0,
                "mfu_full_attention": full / peak if step_s else 0.0}

    return {"compute_s": compute_s, "memory_s": memory_s, "ici_s": ici_s,
            "bound": max(terms, key=terms.get),
            "overlapped": at(max(terms.values())),
            "serial": at(max(compute_s, memory_s) + ici_s) if ici_s is not None else None}


def program_contents(compiled: Any, mesh: Mesh, slices: int = 1
                     ) -> tuple[dict[str, Any], dict[str, hlo.Kernel], dict[str, float]]:
    """(the collectives of the compiled step: bytes and ops per device per step by kind, loops of
    unknown trip count, and with several ``slices`` those that cross the data-center network
    (``dcn``); its custom kernels by name; attention's XLA matmuls per step by function)."""
    program = hlo.Program(compiled.as_text())
    slice_of = [d.slice_index for d in mesh.devices.flat] if slices > 1 else None
    found = hlo.collectives(program, slice_of)
    sent = found.bytes_by_kind()
    collectives = {"bytes_per_device": sent, "total_bytes_per_device": sum(sent.values()),
                   "ops_per_step": found.count_by_kind(),
                   "unknown_trip_count_loops": list(found.unknown_loops)}
    if slices > 1:
        dcn = found.cross_slice()
        dcn_sent = dcn.bytes_by_kind()
        collectives["dcn"] = {"bytes_per_device": dcn_sent,
                              "total_bytes_per_device": sum(dcn_sent.values()),
                              "ops_per_step": dcn.count_by_kind(),
                              "groups_not_read": sum(c.cross_slice is None for c in dcn.ops)}
    dots: dict[str, float] = {}
    for name in {file for file, _ in program.frames.values() if ATTENTION_SOURCES.search(file)}:
        for function, runs in hlo.dots_from(program, name).items():
            dots[function] = dots.get(function, 0.0) + runs
    return collectives, hlo.kernels(program), dict(sorted(dots.items()))


def flop_counts(cfg: Config, devices: int, costs: dict[str, float],
                kernels: dict[str, hlo.Kernel]) -> dict[str, Any]:
    """FLOPs per step: XLA's count of the compiled program, the estimate of what its attention
    kernels compute beyond it, their sum ("counted"), model/flops.py's formula (MFU's numerator) and
    the formula plus what the step executes beyond it, with the ratios of the count to both; and
    the loops left in the cost programs, whose bodies XLA counted once (0 on the shipped paths: the
    layers are unrolled and microbatches folded there, and TPU attention runs in splash)."""
    m, t = cfg.model, cfg.train
    tokens = t.batch_size * t.seq_len
    # a kernel's calls count every microbatch already: each call covers one microbatch's rows
    kernel, uncounted = kernel_attention_flops(m, t.batch_size // t.microbatches, t.seq_len, kernels)
    compiled = costs["flops"] * devices
    formula = train_flops_per_token(m, t.seq_len) * tokens
    executed = executed_flops_per_step(m, t.batch_size, t.seq_len, kernel if kernel else None)
    return {"compiled_per_step": compiled, "compiled_per_device": costs["flops"],
            "kernel_estimate_per_step": kernel, "uncounted_kernels": uncounted,
            "loops_counted_once": round(costs["loops"]),
            "counted_per_step": compiled + kernel, "formula_per_step": formula,
            "ratio": (compiled + kernel) / formula, "executed_per_step": executed,
            "executed_ratio": (compiled + kernel) / executed}


def executed_flops_per_step(m: ModelConfig, batch_size: int, seq_len: int,
                            kernel_attention: float | None = None) -> float:
    """model/flops.py's FLOPs plus the work a step executes beyond them: the capacity path's padded
    expert slots (E * C per row and MoE layer instead of T * k) and the forward pass that
    ``model.remat`` recomputes in the backward pass (``full``: every layer's matmuls and attention;
    ``dots_no_batch``: attention's batched einsums; ``dots``: none). Not in model/flops.py, which
    counts the model's FLOPs as MFU defines them. ``kernel_attention``: the FLOPs of attention run in
    kernels (``kernel_attention_flops``), in place of the einsum count of its scores and values."""
    tokens = batch_size * seq_len
    one_expert = (3 if m.activation == "swiglu" else 2) * m.d_model * m.resolved_expert_mlp_dim
    extra_slots = 0  # per row and MoE layer
    if m.is_moe and m.moe_impl == "capacity":
        extra_slots = m.num_experts * m.expert_capacity(seq_len) - seq_len * m.experts_per_token
    padding = one_expert * extra_slots * batch_size * m.num_moe_layers  # forward FLOPs / 2
    attention_fwd = attention_flops_per_token(m, seq_len, backward=False) * tokens
    layers_fwd = 2 * (matmul_params(m) - m.d_model * m.vocab_size) * tokens + 2 * padding + attention_fwd
    recompute = {"full": layers_fwd, "dots_no_batch": attention_fwd}.get(m.remat, 0)
    total = train_flops_per_token(m, seq_len) * tokens + 6 * padding + recompute
    if kernel_attention is None:
        return total
    einsum_attention = (3 + (m.remat in ("full", "dots_no_batch"))) * attention_fwd
    return total - einsum_attention + kernel_attention


# Forward passes of one layer's attention (two matmuls: QK^T and PV) that one call of a splash kernel
# computes: the forward kernel QK^T and PV; dq recomputes QK^T and forms dP = dO V^T and dS K (three
# matmuls); dkv recomputes QK^T and forms dP, dV and dK (four).
SPLASH_PASSES = {"fwd": 1, "dq": 1.5, "dkv": 2}


def kernel_attention_flops(m: ModelConfig, batch_size: int, seq_len: int,
                           kernels: dict[str, hlo.Kernel]) -> tuple[float, list[str]]:
    """(estimated FLOPs per step of the program's splash attention kernels; the other kernels that
    carry no cost estimate, whose FLOPs are counted nowhere). XLA's cost analysis counts no FLOPs in
    a Pallas call without a cost estimate, and splash's have none. Splash computes every key block
    not wholly in the future: with blocks of b keys a query of a global layer meets (T + b)/2 keys on
    average, one of a local layer with window W at most b * (ceil((W - 1) / b) + 1). A layer's
    forward pass is 4 x keys x N x H per query, and each call counts as SPLASH_PASSES of them (one
    call per layer and pass; under context parallelism each device's call covers its queries, and
    the count is the mesh's total). Both branches of a mixed local/global stack's lax.cond are
    counted as run (train/hlo.py), so such a stack's splash FLOPs are overcounted."""
    passes, block, unknown = 0.0, 0, []
    for name, kernel in kernels.items():
        if kernel.cost_estimate:  # XLA counts it
            continue
        kind = re.search(r"splash\w*?_(dkv|dq|fwd)", name)
        if kind is None:
            unknown.append(name)
            continue
        passes += kernel.calls * SPLASH_PASSES[kind.group(1)]
        block = max([block, *(v for k, v in kernel.metadata.items()
                              if k.startswith("block_kv") and isinstance(v, int))])
    causal = (seq_len + block) / 2
    local = block * (-(-(m.sliding_window - 1) // block) + 1) if block else m.sliding_window
    keys = [min(causal, local) if m.is_local_layer(d) else causal
            for d in range(m.num_layers)]
    layer_forward = 4 * sum(keys) / len(keys) * m.num_heads * m.resolved_head_dim
    return layer_forward * batch_size * seq_len * passes, unknown


def compile_step(cfg: Config, topo: Topology, mesh: Mesh) -> tuple[Any, int, float, list]:
    """(the compiled train step, the bytes of train state one device holds, compile seconds, its
    largest HBM buffers). Raises CompileError when the state alone or the program does not fit."""
    capacity = topo.chip.hbm_bytes // topo.devices_per_chip
    start = time.perf_counter()
    lowered, state_bytes = lower_train_step(cfg, mesh)
    if state_bytes > capacity:  # before the (long) compile: the state alone is too big
        raise CompileError(f"does not fit: the train state alone takes {state_bytes / 2**30:.2f} GiB "
                           f"per device, more than the {capacity / 2**30:.1f} GiB of HBM of a "
                           f"{topo.chip.kind} device; shard it further (mesh.fsdp) or use more chips")
    with tempfile.TemporaryDirectory(prefix="meshlm-xla-dump-") as dump_dir:
        compiled = compile_lowered(lowered, "the train step", dump_dir)
        buffers = hlo.largest_buffers(dump_dir)
    return compiled, state_bytes, time.perf_counter() - start, buffers


def compile_report(cfg: Config, topology_name: str, config_name: str,
                   slices: int = 1) -> dict[str, Any]:
    """Compiles the train step of ``cfg`` for ``topology_name`` (``slices`` of it joined by the
    data-center network) and returns the report (a JSON-able dict). Raises CompileError (or
    ConfigError) for what the user must change, including a state or program that does not fit in
    HBM."""
    topo = topology(topology_name, slices)
    validate(cfg, len(topo.devices))
    mesh = topology_mesh(cfg, topo)
    m, t = cfg.model, cfg.train
    compiled, state_bytes, compile_s, buffers = compile_step(cfg, topo, mesh)
    memory = memory_report(compiled)
    collectives, kernels, attention_dots = program_contents(compiled, mesh, topo.slices)
    costs, cost_compile_s = step_costs(cfg, mesh, compiled)
    collectives["unrolled_bytes_per_device"] = {k: costs[f"collective {k}"] for k in hlo.KINDS}
    n = len(topo.devices)
    flops = flop_counts(cfg, n, costs, kernels)
    counts = param_counts(m)
    return {
        "config": config_name,
        "topology": topo.name,
        "chip": dataclasses.asdict(topo.chip),
        "chips": topo.chips,
        "slices": topo.slices,
        "devices": n,
        "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
        "model": {"params": counts["total"], "active_params": counts["active"], "dtype": m.dtype,
                  "param_dtype": m.param_dtype, "remat": m.remat, "scan_layers": m.scan_layers,
                  "attention_impl": m.attention_impl, "moe_impl": m.moe_impl if m.is_moe else None,
                  "moe_matmul": m.moe_matmul if m.is_moe else None},
        "batch": {"batch_size": t.batch_size, "seq_len": t.seq_len, "microbatches": t.microbatches,
                  "tokens_per_step": t.batch_size * t.seq_len},
        "compile_s": compile_s,
        "cost_compile_s": cost_compile_s,
        "memory_per_device": memory,
        "memory_per_chip": {k: v * topo.devices_per_chip for k, v in memory.items()},
        "largest_buffers": buffers,
        "hbm_per_chip": topo.chip.hbm_bytes,
        "hbm_fraction": memory["total"] * topo.devices_per_chip / topo.chip.hbm_bytes,
        "state_bytes_per_device": state_bytes,
        "flops": flops,
        "bytes_accessed_per_device": costs["bytes accessed"],
        "xla_optimal_seconds": costs["optimal_seconds"],
        "collectives": collectives,
        "kernels": {"pallas": {name: {"calls": k.calls, "cost_estimate": k.cost_estimate}
                               for name, k in kernels.items()},
                    "attention_xla_dots": attention_dots},
        "roofline": roofline(flops["counted_per_step"] / n, costs["bytes accessed"],
                             collectives["total_bytes_per_device"], topo,
                             causal_train_flops_per_token(m, t.seq_len) * t.batch_size * t.seq_len,
                             t.batch_size * t.seq_len, flops["formula_per_step"]),
        "fits": memory["total"] * topo.devices_per_chip <= topo.chip.hbm_bytes,
    }


def largest_memory_term(report: dict[str, Any]) -> str:
    """The largest of a report's memory terms per chip, with its largest buffer when known, e.g.
    "temporaries 61.20 GiB; largest buffer f32[4,32,8192,8192] (32.00 GiB)"."""
    per_chip = report["memory_per_chip"]
    terms = {"arguments": per_chip["arguments"], "outputs": per_chip["outputs"] - per_chip["aliased"],
             "temporaries": per_chip["temporaries"], "code": per_chip["code"]}
    name = max(terms, key=terms.get)
    return f"{name} {terms[name] / 2**30:.2f} GiB{largest_buffer_note(report['largest_buffers'])}"


def check_fits(report: dict[str, Any]) -> None:
    """Raises CompileError naming the largest memory term when the compiled program needs more HBM
    than a chip has."""
    if report["fits"]:
        return
    raise CompileError(
        f"does not fit: the train step needs {report['memory_per_chip']['total'] / 2**30:.2f} GiB of "
        f"HBM per chip, more than the {report['hbm_per_chip'] / 2**30:.1f} GiB of a "
        f"{report['chip']['kind']}; largest term: {largest_memory_term(report)}; use more chips, more "
        "fsdp sharding, model.remat, train.microbatches or a smaller batch")
