"""The Hugging Face tensor names of each supported family, one table per family: which HF tensors
make each meshlm parameter, and the reshapes and transposes between the two (HF keeps
``nn.Linear`` weights as [out, in]; meshlm keeps [in, out] with heads split out, stacked over layers
on a leading axis). ``config.json`` is convert/hf_config.py's.

Tensors are host NumPy arrays keyed by name: ``{"model.layers.0.self_attn.q_proj.weight": a}`` on
the Hugging Face side, ``{("blocks", "attn", "w_q_dnh"): a_lDNH}`` on meshlm's.

DeepSeek-V3's latent attention (MLA) rotates its rope dimensions as interleaved pairs (x0, x1),
(x2, x3)... (``rope_interleave``, its checkpoints' layout); meshlm's RoPE rotates halves. The rope
rows of the query and of the shared rope key are permuted to [0, 2, 4, ..., 1, 3, 5, ...] at import
(and back at export): the same rotation of the same pairs, so the same attention scores.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import numpy as np

from model.config import ModelConfig
from model.transformer import stack_depths

HFTensors = Mapping[str, np.ndarray]  # read when looked up (LazyTensors) or held
Path = tuple[str, ...]  # a meshlm parameter's path in the model's flat state

# model_type -> (the transformers class, the family's name in messages)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "Llama"), "mistral": ("MistralForCausalLM", "Mistral"),
    "mixtral": ("MixtralForCausalLM", "Mixtral"), "qwen2": ("Qwen2ForCausalLM", "Qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3"), "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3-MoE"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepSeek-V3"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma 2"), "gemma3_text": ("Gemma3ForCausalLM", "Gemma 3"),
}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted (unknown architecture, missing or misshapen tensors)."""


class LazyTensors(Mapping[str, np.ndarray]):
    """Tensors by name, each read (from its file) when it is looked up, and not kept."""

    def __init__(self, readers: Mapping[str, Callable[[], np.ndarray]]) -> None:
        self._readers = dict(readers)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._readers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def family_of(cfg: ModelConfig) -> str:
    """The Hugging Face family (model_type) a meshlm architecture is exported as, and whose tensor
    names it is imported from, decided by the first rule that applies:
    latent attention (mla) -> deepseek_v3; MoE -> qwen3_moe with qk_norm, else mixtral;
    norm_plus_one -> gemma3_text with qk_norm, else gemma2; qk_norm -> qwen3; qkv_bias -> qwen2;
    a sliding window on every layer -> mistral; otherwise llama.
    (Whether the family can say everything else the config says is hf_config's check.)"""
    if cfg.attention_type == "mla":
        return "deepseek_v3"
    if cfg.is_moe:
        return "qwen3_moe" if cfg.qk_norm else "mixtral"
    if cfg.norm_plus_one:
        return "gemma3_text" if cfg.qk_norm else "gemma2"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    if cfg.sliding_window and all(cfg.is_local_layer(i) for i in range(cfg.num_layers)):
        return "mistral"
    return "llama"


# ------------------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one HF tensor becomes one meshlm parameter slot (one layer's, or one expert's) and back.
    ``rows``: the parameter is made of some rows of an HF tensor whose other rows make other
    parameters (DeepSeek's kv_a_proj_with_mqa and kv_b_proj): (those rows, in the order the
    parameter takes them, and the HF tensor's row count); ``to_meshlm`` receives those rows."""

    to_meshlm: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]
    rows: Callable[[ModelConfig], tuple[np.ndarray, int]] | None = None


def _heads(count: str) -> Layout:
    def to_meshlm(w: np.ndarray, c: ModelConfig) -> np.ndarray:  # [N*H, D] -> [D, N, H]
        return w.T.reshape(c.d_model, getattr(c, count), c.resolved_head_dim)

    def to_hf(w: np.ndarray, c: ModelConfig) -> np.ndarray:
        return w.reshape(c.d_model, -1).T

    return Layout(to_meshlm, to_hf)


def _head_bias(count: str) -> Layout:  # [N*H] -> [N, H]
    return Layout(lambda w, c: w.reshape(getattr(c, count), c.resolved_head_dim),
                  lambda w, c: w.reshape(-1))


SAME = Layout(lambda w, c: w, lambda w, c: w)
TRANSPOSED = Layout(lambda w, c: w.T, lambda w, c: w.T)
Q_HEADS, KV_HEADS = _heads("num_heads"), _heads("num_kv_heads")
Q_BIAS, KV_BIAS = _head_bias("num_heads"), _head_bias("num_kv_heads")
OUT_HEADS = Layout(  # [D, N*H] -> [N, H, D]
    lambda w, c: w.T.reshape(c.num_heads, -1, c.d_model),
    lambda w, c: w.reshape(-1, c.d_model).T)


def rope_order(width: int) -> np.ndarray:
    """Where each half-split rope dimension sits in the interleaved layout: [0, 2, ..., 1, 3, ...]."""
    return np.concatenate([np.arange(0, width, 2), np.arange(1, width, 2)])


def _query_order(c: ModelConfig) -> np.ndarray:
    """A query head's rows as meshlm takes them: the nope rows, then the rope rows de-interleaved."""
    nope = c.qk_nope_head_dim
    return np.concatenate([np.arange(nope), nope + rope_order(c.qk_rope_head_dim)])


def _head_rows(order: Callable[[ModelConfig], np.ndarray] | None = None) -> Layout:
    """[N*H, I] (rows head by head, each head's rows in HF order) -> [I, N, H] (``order``: which HF
    row of a head each meshlm row is)."""
    def to_meshlm(w: np.ndarray, c: ModelConfig) -> np.ndarray:
        w_nhi = w.reshape(c.num_heads, -1, w.shape[-1])
        return (w_nhi if order is None else w_nhi[:, order(c), :]).transpose(2, 0, 1)

    def to_hf(w: np.ndarray, c: ModelConfig) -> np.ndarray:
        w_nhi = w.transpose(1, 2, 0)
        return (w_nhi if order is None else w_nhi[:, np.argsort(order(c)), :]).reshape(-1, w.shape[0])

    return Layout(to_meshlm, to_hf)


def _part(layout: Layout, rows: Callable[[ModelConfig], tuple[np.ndarray, int]]) -> Layout:
    return dataclasses.replace(layout, rows=rows)


def _kv_b_rows(c: ModelConfig, value: bool) -> tuple[np.ndarray, int]:
    """kv_b_proj's rows of each head's key (nope) part or value part: [N*(Hnope+Hv), C]."""
    nope, v = c.qk_nope_head_dim, c.resolved_v_head_dim
    start, width = (nope, v) if value else (0, nope)
    rows = (np.arange(c.num_heads)[:, None] * (nope + v) + start + np.arange(width)).reshape(-1)
    return rows, c.num_heads * (nope + v)


MLA_QUERY = _head_rows(_query_order)  # q_proj [N*Hqk, D] or q_b_proj [N*Hqk, Rq] -> [., N, Hqk]
MLA_KV_DOWN = _part(TRANSPOSED, lambda c: (np.arange(c.kv_lora_rank),
                                           c.kv_lora_rank + c.qk_rope_head_dim))
MLA_K_ROPE = _part(TRANSPOSED, lambda c: (c.kv_lora_rank + rope_order(c.qk_rope_head_dim),
                                          c.kv_lora_rank + c.qk_rope_head_dim))
MLA_K_UP = _part(_head_rows(), lambda c: _kv_b_rows(c, value=False))
MLA_V_UP = _part(_head_rows(), lambda c: _kv_b_rows(c, value=True))


def hf_shape(layout: Layout, cfg: ModelConfig, slot_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the HF tensor that ``layout`` turns into a meshlm slot of ``slot_shape`` (the
    parameter's shape without its stacked axes; the whole tensor, for a part), computed on an
    array of zero-byte items: no memory behind it."""
    shape = tuple(layout.to_hf(np.empty(slot_shape, np.dtype([])), cfg).shape)
    return shape if layout.rows is None else (layout.rows(cfg)[1], *shape[1:])


def from_hf(layout: Layout, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A meshlm slot from its HF tensor (the rows ``layout`` takes of it, for a part)."""
    return layout.to_meshlm(w if layout.rows is None else w[layout.rows(cfg)[0]], cfg)


# ---------------------------------------------------------------------------- the name tables

Entry = tuple[str, Path, Layout]  # (HF name inside a layer, meshlm path inside its block, layout)

ATTENTION: tuple[Entry, ...] = (
    ("self_attn.q_proj.weight", ("attn", "w_q_dnh"), Q_HEADS),
    ("self_attn.k_proj.weight", ("attn", "w_k_dkh"), KV_HEADS),
    ("self_attn.v_proj.weight", ("attn", "w_v_dkh"), KV_HEADS),
    ("self_attn.o_proj.weight", ("attn", "w_o_nhd"), OUT_HEADS),
)
QKV_BIAS: tuple[Entry, ...] = (
    ("self_attn.q_proj.bias", ("attn", "b_q_nh"), Q_BIAS),
    ("self_attn.k_proj.bias", ("attn", "b_k_kh"), KV_BIAS),
    ("self_attn.v_proj.bias", ("attn", "b_v_kh"), KV_BIAS),
)
QK_NORM: tuple[Entry, ...] = (
    ("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), SAME),
    ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), SAME),
)
MLA_FULL_QUERY: tuple[Entry, ...] = (("self_attn.q_proj.weight", ("attn", "w_q_dnh"), MLA_QUERY),)
MLA_LORA_QUERY: tuple[Entry, ...] = (
    ("self_attn.q_a_proj.weight", ("attn", "w_q_down_dr"), TRANSPOSED),
    ("self_attn.q_a_layernorm.weight", ("attn", "q_latent_norm", "scale"), SAME),
    ("self_attn.q_b_proj.weight", ("attn", "w_q_up_rnh"), MLA_QUERY),
)
MLA_KV: tuple[Entry, ...] = (  # kv_a_proj_with_mqa = [latent; rope key], kv_b_proj = per head [k; v]
    ("self_attn.kv_a_proj_with_mqa.weight", ("attn", "w_kv_down_dc"), MLA_KV_DOWN),
    ("self_attn.kv_a_proj_with_mqa.weight", ("attn", "w_k_rope_dr"), MLA_K_ROPE),
    ("self_attn.kv_a_layernorm.weight", ("attn", "kv_latent_norm", "scale"), SAME),
    ("self_attn.kv_b_proj.weight", ("attn", "w_k_up_cnh"), MLA_K_UP),
    ("self_attn.kv_b_proj.weight", ("attn", "w_v_up_cnh"), MLA_V_UP),
    ("self_attn.o_proj.weight", ("attn", "w_o_nhd"), OUT_HEADS),
)
LLAMA_NORMS: tuple[Entry, ...] = (  # Llama's "post_attention" norm is the MLP's pre-norm
    ("input_layernorm.weight", ("attn_norm", "scale"), SAME),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), SAME),
)
GEMMA_NORMS: tuple[Entry, ...] = (  # sandwich norms, each x * (1 + w) with w as stored
    ("input_layernorm.weight", ("attn_norm", "scale"), SAME),
    ("post_attention_layernorm.weight", ("attn_post_norm", "scale"), SAME),
    ("pre_feedforward_layernorm.weight", ("mlp_norm", "scale"), SAME),
    ("post_feedforward_layernorm.weight", ("mlp_post_norm", "scale"), SAME),
)
DENSE_MLP: tuple[Entry, ...] = (
    ("mlp.gate_proj.weight", ("mlp", "w_gate_df"), TRANSPOSED),
    ("mlp.up_proj.weight", ("mlp", "w_up_df"), TRANSPOSED),
    ("mlp.down_proj.weight", ("mlp", "w_down_fd"), TRANSPOSED),
)
SHARED_EXPERTS: tuple[Entry, ...] = (  # DeepSeek's always-on experts: one MLP of n_shared x the width
    ("mlp.shared_experts.gate_proj.weight", ("moe", "shared", "w_gate_df"), TRANSPOSED),
    ("mlp.shared_experts.up_proj.weight", ("moe", "shared", "w_up_df"), TRANSPOSED),
    ("mlp.shared_experts.down_proj.weight", ("moe", "shared", "w_down_fd"), TRANSPOSED),
)
ROUTER_BIAS = "mlp.gate.e_score_correction_bias"  # DeepSeek's selection bias (aux-loss-free balancing)
# The router of each MoE family's layers, and (HF name of expert e's tensor, meshlm path of the
# [E, ...] stack, layout of one expert's slice)
ROUTERS: dict[str, tuple[Entry, ...]] = {
    "mixtral": (("block_sparse_moe.gate.weight", ("moe", "w_router_de"), TRANSPOSED),),
    "qwen3_moe": (("mlp.gate.weight", ("moe", "w_router_de"), TRANSPOSED),),
    "deepseek_v3": (("mlp.gate.weight", ("moe", "w_router_de"), TRANSPOSED),),
}
_QWEN_EXPERTS: tuple[Entry, ...] = (
    ("mlp.experts.{e}.gate_proj.weight", ("moe", "w_gate_edf"), TRANSPOSED),
    ("mlp.experts.{e}.up_proj.weight", ("moe", "w_up_edf"), TRANSPOSED),
    ("mlp.experts.{e}.down_proj.weight", ("moe", "w_down_efd"), TRANSPOSED),
)
EXPERT_TABLES: dict[str, tuple[Entry, ...]] = {
    "mixtral": (("block_sparse_moe.experts.{e}.w1.weight", ("moe", "w_gate_edf"), TRANSPOSED),
                ("block_sparse_moe.experts.{e}.w3.weight", ("moe", "w_up_edf"), TRANSPOSED),
                ("block_sparse_moe.experts.{e}.w2.weight", ("moe", "w_down_efd"), TRANSPOSED)),
    "qwen3_moe": _QWEN_EXPERTS,
    "deepseek_v3": _QWEN_EXPERTS,
}
EXPERTS = EXPERT_TABLES["mixtral"]

# Each family's tensors of one layer besides its feed-forward ones (DENSE_MLP, or the MoE tables)
LAYER_TABLES: dict[str, tuple[Entry, ...]] = {
    "llama": LLAMA_NORMS + ATTENTION,
    "mistral": LLAMA_NORMS + ATTENTION,
    "qwen2": LLAMA_NORMS + ATTENTION + QKV_BIAS,
    "qwen3": LLAMA_NORMS + ATTENTION + QK_NORM,
    "gemma2": GEMMA_NORMS + ATTENTION,
    "gemma3_text": GEMMA_NORMS + ATTENTION + QK_NORM,
    "mixtral": LLAMA_NORMS + ATTENTION,
    "qwen3_moe": LLAMA_NORMS + ATTENTION + QK_NORM,
    "deepseek_v3": LLAMA_NORMS + MLA_KV,
}
EMBED_NAME = "model.embed_tokens.weight"
EMBED: Entry = (EMBED_NAME, ("embed", "table_vd"), SAME)
FINAL_NORM: Entry = ("model.norm.weight", ("final_norm", "scale"), SAME)
HEAD: Entry = ("lm_head.weight", ("head_dv",), TRANSPOSED)
# DeepSeek's multi-token-prediction layer k, model.layers.{num_layers + k}: these, a decoder layer's
# tensors (the MTP module's ``block``), and copies of the embedding and the head
MTP: tuple[Entry, ...] = (
    ("enorm.weight", ("enorm", "scale"), SAME),
    ("hnorm.weight", ("hnorm", "scale"), SAME),
    ("eh_proj.weight", ("w_proj_2dd",), TRANSPOSED),
    ("shared_head.norm.weight", ("final_norm", "scale"), SAME),
)
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
IGNORABLE = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry
FLOAT32_TENSORS = (ROUTER_BIAS,)  # kept in float32 whatever the export dtype (as DeepSeek stores it)


def _layer_entries(cfg: ModelConfig, family: str, moe: bool) -> tuple[Entry, ...]:
    """The tensors of one layer of ``family`` (an MoE layer's without its experts)."""
    out = LAYER_TABLES[family]
    if family == "deepseek_v3":
        out += MLA_LORA_QUERY if cfg.q_lora_rank else MLA_FULL_QUERY
    if not moe:
        return out + DENSE_MLP
    out += ROUTERS[family]
    if family == "deepseek_v3":
        out += SHARED_EXPERTS
        if cfg.router_bias_rate > 0:
            out += ((ROUTER_BIAS, ("moe", "router_bias_e"), SAME),)
    return out


def parameter_sources(cfg: ModelConfig) -> dict[Path, tuple[Layout, list[str], int]]:
    """Every meshlm parameter -> (layout, the HF tensors it is made of, in the order of its
    flattened leading stack axes, and how many leading axes they stack along: 0 alone, 1 over
    layers, 2 over layers and experts), in the names of ``family_of(cfg)``. Each stack (the first
    dense layers, the dense layers of MoE groups, the MoE layers) holds the HF layers at its
    depths."""
    family = family_of(cfg)
    out = {path: (layout, [name], 0)
           for name, path, layout in (EMBED, FINAL_NORM) + (() if cfg.tie_embeddings else (HEAD,))}
    for stack, depths in stack_depths(cfg).items():
        if len(depths):
            out.update(_stack_sources(cfg, family, (stack,), list(depths), stack == "moe_blocks"))
    if cfg.mtp_depth:  # DeepSeek's multi-token-prediction layers, after the model's
        depths = [cfg.num_layers + k for k in range(cfg.mtp_depth)]
        out.update({("mtp", *path): (layout, [f"model.layers.{i}.{suffix}" for i in depths], 1)
                    for suffix, path, layout in MTP})
        out.update(_stack_sources(cfg, family, ("mtp", "block"), depths, cfg.is_moe))
    return out


def _stack_sources(cfg: ModelConfig, family: str, prefix: Path, depths: list[int],
                   moe: bool) -> dict[Path, tuple[Layout, list[str], int]]:
    """The sources of a stack of blocks under ``prefix``: HF layers ``depths``, MoE or dense."""
    out = {(*prefix, *path): (layout, [f"model.layers.{i}.{suffix}" for i in depths], 1)
           for suffix, path, layout in _layer_entries(cfg, family, moe)}
    for template, path, layout in EXPERT_TABLES[family] if moe else ():
        out[(*prefix, *path)] = (layout, [f"model.layers.{i}.{template.format(e=e)}" for i in depths
                                          for e in range(cfg.num_experts)], 2)
    return out


def copied_tensors(cfg: ModelConfig) -> dict[str, tuple[Path, Layout]]:
    """HF tensors of an export that repeat a parameter written elsewhere: each DeepSeek
    multi-token-prediction layer's embedding and head (read by nobody at import)."""
    sources = (EMBED[1:], EMBED[1:] if cfg.tie_embeddings else HEAD[1:])
    return {f"model.layers.{cfg.num_layers + k}.{name}": source for k in range(cfg.mtp_depth)
            for name, source in zip(MTP_COPIES, sources, strict=True)}


def zero_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensors of an export that no meshlm parameter makes, written as zeros: DeepSeek-V3's
    selection bias when the model has none (``router_bias_rate`` 0: no bias)."""
    if family_of(cfg) != "deepseek_v3" or cfg.router_bias_rate > 0 or not cfg.is_moe:
        return {}
    layers = cfg.moe_layer_indices + [cfg.num_layers + k for k in range(cfg.mtp_depth)]
    return {f"model.layers.{i}.{ROUTER_BIAS}": (cfg.num_experts,) for i in layers}


def _left_out(name: str, cfg: ModelConfig) -> bool:
    """DeepSeek-V3's multi-token-prediction layers, model.layers.{num_hidden_layers + k}.*, which
    transformers' model does not run either: an import leaves out those beyond ``mtp_depth`` (0
    unless asked for), and the copies of the embedding and head of those it takes."""
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    if family_of(cfg) != "deepseek_v3" or layer is None or int(layer.group(1)) < cfg.num_layers:
        return False
    return int(layer.group(1)) >= cfg.num_layers + cfg.mtp_depth or name in copied_tensors(cfg)


def check_names(names: Collection[str], cfg: ModelConfig) -> None:
    """ConversionError naming a tensor ``cfg`` needs that ``names`` lacks, or one it holds that is
    no part of the model (a tied model may still carry ``lm_head.weight``; DeepSeek's
    multi-token-prediction layers are left out)."""
    used = [name for _, tensors, _ in parameter_sources(cfg).values() for name in tensors]
    present = set(names)
    if missing := next((name for name in used if name not in present), None):
        raise ConversionError(f"tensor {missing} is missing from the checkpoint")
    extra = sorted(n for n in present - set(used)
                   if not n.endswith(IGNORABLE) and not _left_out(n, cfg))
    if extra and not (extra == ["lm_head.weight"] and cfg.tie_embeddings):
        family = FAMILIES[family_of(cfg)][1]
        raise ConversionError(f"tensor {extra[0]} is not part of a {len(set(used))}-tensor {family} "
                              f"checkpoint of this config ({len(extra)} such tensors)")


def hf_tensor_view(hf: Mapping[str, Any], cfg: ModelConfig, tensors: HFTensors) -> HFTensors:
    """``tensors`` as the name tables read them: a DeepSeek-V3 checkpoint with half-split rope
    dimensions (``rope_interleave`` false, which meshlm's RoPE computes as they are) has its query
    and rope-key rows put in the interleaved order the tables undo."""
    if hf.get("model_type") != "deepseek_v3" or hf.get("rope_interleave", True):
        return tensors
    query = np.argsort(_query_order(cfg))
    rope_key = np.concatenate([np.arange(cfg.kv_lora_rank),
                               cfg.kv_lora_rank + np.argsort(rope_order(cfg.qk_rope_head_dim))])

    def read(name: str) -> np.ndarray:
        w = tensors[name]
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            return w.reshape(cfg.num_heads, -1, w.shape[-1])[:, query, :].reshape(w.shape)
        return w[rope_key] if name.endswith("self_attn.kv_a_proj_with_mqa.weight") else w

    return LazyTensors({name: functools.partial(read, name) for name in tensors})
