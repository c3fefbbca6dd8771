"""Published figures of TPU chips (peak bf16 FLOP/s, HBM capacity and bandwidth, ICI bandwidth) for
the roofline estimates of ``train.compile``; looked up by a topology name's prefix or a device's
``device_kind``.
"""

from __future__ import annotations

import dataclasses

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: ``name`` is the topology prefix (``v5p`` in ``v5p:4x4x4``), ``kind`` the
    ``device_kind`` JAX reports for it. HBM capacity: the documents say "GB"; the chips' own
    ``memory_stats()`` report about that many GiB, so the figure is taken in GiB.
    ``ici_bandwidth``: the bidirectional inter-chip interconnect bandwidth of one chip, all its links
    together, as the Cloud TPU docs publish it; None where they publish no per-chip figure (the
    report then leaves collectives out of the step time and says so)."""

    name: str
    kind: str
    peak_bf16_flops: float  # FLOP/s per chip, dense bf16 matmuls
    hbm_bytes: int  # per chip
    hbm_bandwidth: float  # bytes/s per chip
    source: str
    ici_bandwidth: float | None  # bytes/s per chip, both directions of every link
    ici_source: str


CHIPS: tuple[Chip, ...] = (
    # Cloud TPU docs, "TPU v3" system architecture: 123 TFLOP/s, 32 GiB HBM, 900 GB/s per chip.
    # No per-chip ICI bandwidth on the page.
    Chip("v3", "TPU v3", 123e12, 32 * GiB, 900e9, "cloud.google.com/tpu/docs/v3", None,
         "not published per chip in the Cloud TPU docs"),
    # Cloud TPU docs, "TPU v4": 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s per chip. The page gives
    # ICI only per Pod (all-reduce 1.1 PB/s, bisection 24 TB/s), not per chip.
    Chip("v4", "TPU v4", 275e12, 32 * GiB, 1200e9, "cloud.google.com/tpu/docs/v4", None,
         "not published per chip in the Cloud TPU docs (only per Pod)"),
    # Cloud TPU docs, "TPU v5e" (and the v6e page's comparison table): 197 TFLOP/s bf16,
    # 16 GB HBM at 819 GB/s per chip; "Bidirectional inter-chip interconnect (ICI) bandwidth (per
    # chip): 400 GBps" (earlier versions of the page: "Interchip Interconnect BW 1600 Gbps", one way).
    Chip("v5e", "TPU v5 lite", 197e12, 16 * GiB, 819e9, "cloud.google.com/tpu/docs/v5e", 400e9,
         "cloud.google.com/tpu/docs/v5e: bidirectional ICI bandwidth per chip 400 GBps"),
    # Cloud TPU docs, "TPU v5p": 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s per chip;
    # "Bidirectional inter-chip interconnect (ICI) bandwidth per chip (GBps): 1200" (earlier: 4800
    # Gbps, one way).
    Chip("v5p", "TPU v5", 459e12, 95 * GiB, 2765e9, "cloud.google.com/tpu/docs/v5p", 1200e9,
         "cloud.google.com/tpu/docs/v5p: bidirectional ICI bandwidth per chip 1200 GBps"),
    # Cloud TPU docs, "TPU v6e" (Trillium): 918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s per chip;
    # "Bidirectional inter-chip interconnect (ICI) bandwidth (per chip): 800 GBps".
    Chip("v6e", "TPU v6 lite", 918e12, 32 * GiB, 1640e9, "cloud.google.com/tpu/docs/v6e", 800e9,
         "cloud.google.com/tpu/docs/v6e: bidirectional ICI bandwidth per chip 800 GBps"),
)


def chip_for_topology(topology: str) -> Chip | None:
    """The chip named by a topology's prefix (``v5e:2x2`` -> v5e), or None if not in the table."""
    prefix = topology.split(":", 1)[0].strip().lower()
    return next((c for c in CHIPS if c.name == prefix), None)


def chip_for_kind(device_kind: str) -> Chip | None:
    """The chip whose ``device_kind`` is exactly ``device_kind`` (``TPU v5 lite``), or None."""
    return next((c for c in CHIPS if c.kind.lower() == device_kind.strip().lower()), None)
