"""Ahead-of-time compilation of the real train step for a TPU topology that is not attached (libtpu's
compile-only devices), and its report: HBM per chip, FLOPs per step against model/flops.py, and a
roofline estimate of step time and MFU. The command around it is ``cli/compile.py``.

XLA's ``cost_analysis()`` counts the body of a loop once, and the step loops over layers
(``lax.scan``) and microbatches. So the costs come from two extra compiles of the same model with
its layers unrolled, one and two layer groups deep, microbatches folded into one batch: the cost of
one group is their difference, extrapolated to the real depth. Memory comes from the real program.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
from jax.experimental import topologies
from jax.sharding import Mesh

from core.errors import first_line
from model.config import ModelConfig
from model.flops import matmul_params, param_counts, train_flops_per_token
from sharding.mesh import make_mesh
from train.config import Config
from train.program import Program, memory_report
from train.tpu_chips import Chip, chip_for_kind, chip_for_topology
from train.validate import validate

COST_KEYS = ("flops", "bytes accessed", "transcendentals", "optimal_seconds")


class CompileError(ValueError):
    """A config that cannot run on the topology, or an unknown topology (one line, exit 2)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    chip: Chip
    devices: list
    chips: int

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips


def topology(name: str) -> Topology:
    """The compile-only devices of a TPU topology such as ``v5e:2x2`` or ``v5p:4x4x4``."""
    try:
        devices = topologies.get_topology_desc(name, "tpu").devices
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
        raise CompileError(f"--topology: unknown TPU topology {name!r} (expected e.g. v5e:2x2, "
                           f"v5p:4x4x4, v6e:8x8): {first_line(e)}") from None
    chip = chip_for_kind(devices[0].device_kind) or chip_for_topology(name)
    if chip is None:
        raise CompileError(f"--topology: no published figures for {devices[0].device_kind!r} "
                           f"({name}); known chips: v3, v4, v5e, v5p, v6e (train/tpu_chips.py)")
    chips = len({tuple(d.coords) for d in devices})
    return Topology(name, chip, list(devices), chips)


def topology_mesh(cfg: Config, topo: Topology) -> Mesh:
    """The config's mesh over the topology's devices, laid out along the physical torus."""
    return make_mesh(cfg.mesh, devices=topo.devices, physical=True)


def lower_train_step(cfg: Config, mesh: Mesh) -> tuple[Any, int]:
    """(the lowered train step of the training program, the bytes of train state one device
    holds)."""
    program = Program(cfg, mesh=mesh)
    return program.lower_train_step(), program.state_bytes_per_device()


def compile_lowered(lowered: Any, what: str) -> Any:
    """``lowered.compile()``; running out of HBM becomes a CompileError."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
            detail = next((line.strip() for line in text.splitlines() if "memory" in line.lower()),
                          text.splitlines()[0])
            raise CompileError(f"does not fit: XLA could not fit {what} in HBM: {detail}") from None
        raise


def costs_of(compiled: Any) -> dict[str, float]:
    """Per-device cost figures of a compiled program (XLA's cost analysis)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0]
    return {k: float(analysis.get(k, 0.0)) for k in COST_KEYS}


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
    """(per-device costs of one whole step, seconds spent on extra compiles). A program without
    loops is measured directly; otherwise one unit's cost is the difference of the unrolled
    1- and 2-unit programs, and the step costs the 1-unit program plus (units - 1) units."""
    units, _ = layer_units(cfg)
    if not cfg.model.scan_layers and cfg.train.microbatches == 1:
        return costs_of(compiled), 0.0
    start = time.perf_counter()
    one = costs_of(compile_lowered(lower_train_step(with_units(cfg, 1), mesh)[0], "the cost program"))
    if units == 1:
        return one, time.perf_counter() - start
    two = costs_of(compile_lowered(lower_train_step(with_units(cfg, 2), mesh)[0], "the cost program"))
    total = {k: one[k] + (units - 1) * (two[k] - one[k]) for k in COST_KEYS}
    return total, time.perf_counter() - start


def roofline(flops_per_device: float, bytes_per_device: float, topo: Topology,
             model_flops: float, tokens: int) -> dict[str, float | str]:
    """Step time as the slower of compute at the chip's peak and HBM traffic at its bandwidth
    (collectives over ICI not modelled, perfect overlap assumed), and the MFU that time gives."""
    share = topo.devices_per_chip  # a chip's peak and bandwidth are split among its devices
    compute_s = flops_per_device * share / topo.chip.peak_bf16_flops
    memory_s = bytes_per_device * share / topo.chip.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    mfu = model_flops / (topo.chips * topo.chip.peak_bf16_flops * step_s) if step_s else 0.0
    return {"compute_s": compute_s, "memory_s": memory_s, "step_s": step_s,
            "bound": "compute" if compute_s >= memory_s else "memory",
            "tokens_per_s": tokens / step_s if step_s else 0.0, "mfu": mfu}


def executed_flops_per_step(m: ModelConfig, batch_size: int, seq_len: int) -> float:
    """model/flops.py's FLOPs plus the work a step executes beyond them: the capacity path's padded
    expert slots (E * C per row and MoE layer instead of T * k) and the forward pass that
    ``model.remat`` recomputes in the backward pass (``full``: every layer's matmuls and attention;
    ``dots_no_batch``: attention's batched einsums; ``dots``: none). Not in model/flops.py, which
    counts the model's FLOPs as MFU defines them."""
    tokens = batch_size * seq_len
    one_expert = (3 if m.activation == "swiglu" else 2) * m.d_model * m.resolved_expert_mlp_dim
    extra_slots = 0  # per row and MoE layer
    if m.is_moe and m.moe_impl == "capacity":
        extra_slots = m.num_experts * m.expert_capacity(seq_len) - seq_len * m.experts_per_token
    padding = one_expert * extra_slots * batch_size * m.num_moe_layers  # forward FLOPs / 2
    attention_fwd = 4 * m.num_layers * seq_len * m.num_heads * m.resolved_head_dim * tokens
    layers_fwd = 2 * (matmul_params(m) - m.d_model * m.vocab_size) * tokens + 2 * padding + attention_fwd
    recompute = {"full": layers_fwd, "dots_no_batch": attention_fwd}.get(m.remat, 0)
    return train_flops_per_token(m, seq_len) * tokens + 6 * padding + recompute


def compile_report(cfg: Config, topology_name: str, config_name: str) -> dict[str, Any]:
    """Compiles the train step of ``cfg`` for ``topology_name`` and returns the report (a JSON-able
    dict). Raises CompileError (or ConfigError) for what the user must change, including a state or
    program that does not fit in HBM."""
    topo = topology(topology_name)
    validate(cfg, len(topo.devices))
    mesh = topology_mesh(cfg, topo)
    m, t = cfg.model, cfg.train
    capacity = topo.chip.hbm_bytes // topo.devices_per_chip
    start = time.perf_counter()
    lowered, state_bytes = lower_train_step(cfg, mesh)
    if state_bytes > capacity:  # before the (long) compile: the state alone is too big
        raise CompileError(f"does not fit: the train state alone takes {state_bytes / 2**30:.2f} GiB "
                           f"per device, more than the {capacity / 2**30:.1f} GiB of HBM of a "
                           f"{topo.chip.kind} device; shard it further (mesh.fsdp) or use more chips")
    compiled = compile_lowered(lowered, "the train step")
    compile_s = time.perf_counter() - start
    memory = memory_report(compiled)
    costs, cost_compile_s = step_costs(cfg, mesh, compiled)

    tokens = t.batch_size * t.seq_len
    n = len(topo.devices)
    formula = train_flops_per_token(m, t.seq_len) * tokens
    executed = executed_flops_per_step(m, t.batch_size, t.seq_len)
    compiled_flops = costs["flops"] * n
    counts = param_counts(m)
    return {
        "config": config_name,
        "topology": topo.name,
        "chip": {"name": topo.chip.name, "kind": topo.chip.kind,
                 "peak_bf16_flops": topo.chip.peak_bf16_flops, "hbm_bytes": topo.chip.hbm_bytes,
                 "hbm_bandwidth": topo.chip.hbm_bandwidth, "source": topo.chip.source},
        "chips": topo.chips,
        "devices": n,
        "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
        "model": {"params": counts["total"], "active_params": counts["active"], "dtype": m.dtype,
                  "param_dtype": m.param_dtype, "remat": m.remat, "scan_layers": m.scan_layers,
                  "moe_impl": m.moe_impl if m.is_moe else None},
        "batch": {"batch_size": t.batch_size, "seq_len": t.seq_len, "microbatches": t.microbatches,
                  "tokens_per_step": tokens},
        "compile_s": compile_s,
        "cost_compile_s": cost_compile_s,
        "memory_per_device": memory,
        "memory_per_chip": {k: v * topo.devices_per_chip for k, v in memory.items()},
        "hbm_per_chip": topo.chip.hbm_bytes,
        "hbm_fraction": memory["total"] / capacity,
        "state_bytes_per_device": state_bytes,
        "flops": {"compiled_per_step": compiled_flops, "compiled_per_device": costs["flops"],
                  "formula_per_step": formula, "ratio": compiled_flops / formula,
                  "executed_per_step": executed, "executed_ratio": compiled_flops / executed},
        "bytes_accessed_per_device": costs["bytes accessed"],
        "xla_optimal_seconds": costs["optimal_seconds"],
        "roofline": roofline(costs["flops"], costs["bytes accessed"], topo, formula, tokens),
        "fits": memory["total"] <= capacity,
    }


def check_fits(report: dict[str, Any]) -> None:
    """Raises CompileError when the compiled program needs more HBM than a device has."""
    if report["fits"]:
        return
    per_chip = report["memory_per_chip"]
    raise CompileError(
        f"does not fit: the train step needs {per_chip['total'] / 2**30:.2f} GiB of HBM per chip "
        f"(arguments {per_chip['arguments'] / 2**30:.2f}, temporaries "
        f"{per_chip['temporaries'] / 2**30:.2f}), more than the {report['hbm_per_chip'] / 2**30:.1f} "
        f"GiB of a {report['chip']['kind']}; use more chips, more fsdp sharding, model.remat, "
        "train.microbatches or a smaller batch")


