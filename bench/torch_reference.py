"""nanoGPT's "baby GPT" as a PyTorch eager program, so that bench.baby can time meshlm against it in
the same run, on the same batches, under the same load (the machines here are shared and noisy).

The model is written here from nanoGPT's published architecture and training recipe, not copied:
pre-norm blocks with LayerNorm (scale only, no bias), one fused q/k/v Linear, PyTorch's
``scaled_dot_product_attention`` (causal), a 4x exact-GELU MLP, no biases, learned absolute
positions, a tied output head, N(0, 0.02) init with residual projections scaled by 1/sqrt(2L);
AdamW with weight decay on matrices only, gradient clipping at 1.0, and a linear-warmup,
cosine-decay learning rate (meshlm's own schedule, evaluated once up front by the caller). Sizes
and optimizer settings come from meshlm's config, so both sides train the same configuration
(nanoGPT's own vocabulary is 65 characters; here it is meshlm's byte vocabulary). Float32 on the
CPU, as nanoGPT runs there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from model.config import ModelConfig
from train.config import OptimConfig


class _LayerNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.heads = cfg.num_heads
        self.ln_attn, self.ln_mlp = _LayerNorm(d), _LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, cfg.mlp_dim, bias=False)
        self.down = nn.Linear(cfg.mlp_dim, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (a.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for a in self.qkv(self.ln_attn(x)).split(d, dim=2))
        y = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(functional.gelu(self.up(self.ln_mlp(x))))


class BabyGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.ln_out = _LayerNorm(cfg.d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scaled = name.endswith(("attn_out.weight", "down.weight"))
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * cfg.num_layers) if scaled else 1.0))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tokens(inputs) + self.positions(torch.arange(inputs.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_out(x) @ self.tokens.weight.T
        return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class TorchBaby:
    """Trains ``BabyGPT`` one batch at a time: ``step(rows)`` and ``loss(rows)`` take [B, T + 1]
    token windows (inputs are the first T, targets the last T)."""

    def __init__(self, cfg: ModelConfig, optim: OptimConfig, lrs: np.ndarray, seed: int = 0):
        """``lrs``: the learning rate of every step (meshlm's schedule, evaluated by the caller)."""
        torch.manual_seed(seed)
        self.model = BabyGPT(cfg)
        matrices = [p for p in self.model.parameters() if p.dim() >= 2]
        vectors = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": matrices, "weight_decay": optim.weight_decay},
                                      {"params": vectors, "weight_decay": 0.0}],
                                     lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps)
        self.clip_norm, self.lrs, self.done = optim.clip_norm, lrs, 0

    def step(self, rows: np.ndarray) -> float:
        for group in self.opt.param_groups:
            group["lr"] = float(self.lrs[self.done])
        batch = torch.from_numpy(rows.astype(np.int64))
        loss = self.model(batch[:, :-1], batch[:, 1:])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.opt.step()
        self.done += 1
        return loss.item()

    @torch.no_grad()
    def loss(self, rows: np.ndarray) -> float:
        batch = torch.from_numpy(rows.astype(np.int64))
        return self.model(batch[:, :-1], batch[:, 1:]).item()
