"""ModelConfig: the frozen description of a decoder-only language model's architecture."""

from __future__ import annotations

import dataclasses
from typing import Literal

Position = Literal["rope", "learned"]
Activation = Literal["swiglu", "gelu"]
DType = Literal["float32", "bfloat16"]
Remat = Literal["none", "full", "dots", "dots_no_batch"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a dense decoder LM. ``head_dim=0`` means ``d_model // num_heads``."""

    vocab_size: int = 384
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 0
    mlp_dim: int = 1024
    max_seq_len: int = 512
    position: Position = "rope"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    activation: Activation = "swiglu"
    tie_embeddings: bool = True
    param_dtype: DType = "float32"
    dtype: DType = "float32"
    scan_layers: bool = True
    remat: Remat = "none"
    init_std: float = 0.02

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def problems(self) -> list[tuple[str, str]]:
        """Returns (key, message) pairs for every inconsistency; empty when the config is usable."""
        out = []
        for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                    "max_seq_len"):
            if getattr(self, key) < 1:
                out.append((key, f"must be >= 1, got {getattr(self, key)}"))
        if out:
            return out
        if self.head_dim < 0:
            out.append(("head_dim", f"must be >= 0 (0 = d_model // num_heads), got {self.head_dim}"))
        if self.num_kv_heads > self.num_heads or self.num_heads % self.num_kv_heads:
            out.append(("num_kv_heads", f"num_heads={self.num_heads} is not divisible by "
                        f"num_kv_heads={self.num_kv_heads}"))
        if not self.head_dim and self.d_model % self.num_heads:
            out.append(("num_heads", f"d_model={self.d_model} is not divisible by num_heads="
                        f"{self.num_heads}; set model.head_dim explicitly"))
        if self.position == "rope" and self.resolved_head_dim % 2:
            out.append(("head_dim", f"RoPE needs an even head_dim, got {self.resolved_head_dim}"))
        if self.norm_eps <= 0:
            out.append(("norm_eps", f"must be > 0, got {self.norm_eps}"))
        if self.rope_theta <= 0:
            out.append(("rope_theta", f"must be > 0, got {self.rope_theta}"))
        if self.init_std <= 0:
            out.append(("init_std", f"must be > 0, got {self.init_std}"))
        return out
