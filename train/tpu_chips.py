"""Published figures of TPU chips (peak bf16 FLOP/s, HBM capacity and bandwidth) for the roofline
estimates of ``train.compile``; looked up by a topology name's prefix or a device's ``device_kind``.
"""

from __future__ import annotations

import dataclasses

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: ``name`` is the topology prefix (``v5p`` in ``v5p:4x4x4``), ``kind`` the
    ``device_kind`` JAX reports for it. HBM capacity: the documents say "GB"; the chips' own
    ``memory_stats()`` report about that many GiB, so the figure is taken in GiB."""

    name: str
    kind: str
    peak_bf16_flops: float  # FLOP/s per chip, dense bf16 matmuls
    hbm_bytes: int  # per chip
    hbm_bandwidth: float  # bytes/s per chip
    source: str


CHIPS: tuple[Chip, ...] = (
    # Cloud TPU docs, "TPU v3" system architecture: 123 TFLOP/s, 32 GiB HBM, 900 GB/s per chip.
    Chip("v3", "TPU v3", 123e12, 32 * GiB, 900e9, "cloud.google.com/tpu/docs/v3"),
    # Cloud TPU docs, "TPU v4": 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s per chip.
    Chip("v4", "TPU v4", 275e12, 32 * GiB, 1200e9, "cloud.google.com/tpu/docs/v4"),
    # Cloud TPU docs, "TPU v5e" (and the v6e page's comparison table): 197 TFLOP/s bf16,
    # 16 GB HBM at 819 GB/s per chip.
    Chip("v5e", "TPU v5 lite", 197e12, 16 * GiB, 819e9, "cloud.google.com/tpu/docs/v5e"),
    # Cloud TPU docs, "TPU v5p": 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s per chip.
    Chip("v5p", "TPU v5", 459e12, 95 * GiB, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    # Cloud TPU docs, "TPU v6e" (Trillium): 918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s per chip.
    Chip("v6e", "TPU v6 lite", 918e12, 32 * GiB, 1640e9, "cloud.google.com/tpu/docs/v6e"),
)


def chip_for_topology(topology: str) -> Chip | None:
    """The chip named by a topology's prefix (``v5e:2x2`` -> v5e), or None if not in the table."""
    prefix = topology.split(":", 1)[0].strip().lower()
    return next((c for c in CHIPS if c.name == prefix), None)


def chip_for_kind(device_kind: str) -> Chip | None:
    """The chip whose ``device_kind`` is exactly ``device_kind`` (``TPU v5 lite``), or None."""
    return next((c for c in CHIPS if c.kind.lower() == device_kind.strip().lower()), None)
