"""The Hugging Face tensor names of each supported family, one table per family: which HF tensors
make each meshlm parameter, and the reshapes and transposes between the two (HF keeps
``nn.Linear`` weights as [out, in]; meshlm keeps [in, out] with heads split out, stacked over layers
on a leading axis). ``config.json`` is convert/hf_config.py's.

Tensors are host NumPy arrays keyed by name: ``{"model.layers.0.self_attn.q_proj.weight": a}`` on
the Hugging Face side, ``{("blocks", "attn", "w_q_dnh"): a_lDNH}`` on meshlm's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping

import numpy as np

from model.config import ModelConfig

HFTensors = Mapping[str, np.ndarray]  # read when looked up (LazyTensors) or held
Path = tuple[str, ...]  # a meshlm parameter's path in the model's flat state

# model_type -> (the transformers class, the family's name in messages)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "Llama"), "mistral": ("MistralForCausalLM", "Mistral"),
    "mixtral": ("MixtralForCausalLM", "Mixtral"), "qwen2": ("Qwen2ForCausalLM", "Qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3"), "gemma2": ("Gemma2ForCausalLM", "Gemma 2"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma 3"),
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
    MoE -> mixtral; norm_plus_one -> gemma3_text with qk_norm, else gemma2; qk_norm -> qwen3;
    qkv_bias -> qwen2; a sliding window on every layer -> mistral; otherwise llama.
    (Whether the family can say everything else the config says is hf_config's check.)"""
    if cfg.is_moe:
        return "mixtral"
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
    """How one HF tensor becomes one meshlm parameter slot (one layer's, or one expert's) and back."""

    to_meshlm: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]


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
    lambda w, c: w.T.reshape(c.num_heads, c.resolved_head_dim, c.d_model),
    lambda w, c: w.reshape(-1, c.d_model).T)


def hf_shape(layout: Layout, cfg: ModelConfig, slot_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the HF tensor that ``layout`` turns into a meshlm slot of ``slot_shape`` (the
    parameter's shape without its stacked axes), computed without memory behind it."""
    nothing = np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), slot_shape, (0,) * len(slot_shape))
    return tuple(layout.to_hf(nothing, cfg).shape)


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
ROUTER: tuple[Entry, ...] = (("block_sparse_moe.gate.weight", ("moe", "w_router_de"), TRANSPOSED),)
# (HF name of expert e's tensor, meshlm path of the [E, ...] stack, layout of one expert's slice)
EXPERTS: tuple[Entry, ...] = (
    ("block_sparse_moe.experts.{e}.w1.weight", ("moe", "w_gate_edf"), TRANSPOSED),
    ("block_sparse_moe.experts.{e}.w3.weight", ("moe", "w_up_edf"), TRANSPOSED),
    ("block_sparse_moe.experts.{e}.w2.weight", ("moe", "w_down_efd"), TRANSPOSED),
)

# Each family's tensors of one layer (a Mixtral layer also has EXPERTS)
LAYER_TABLES: dict[str, tuple[Entry, ...]] = {
    "llama": LLAMA_NORMS + ATTENTION + DENSE_MLP,
    "mistral": LLAMA_NORMS + ATTENTION + DENSE_MLP,
    "qwen2": LLAMA_NORMS + ATTENTION + QKV_BIAS + DENSE_MLP,
    "qwen3": LLAMA_NORMS + ATTENTION + QK_NORM + DENSE_MLP,
    "gemma2": GEMMA_NORMS + ATTENTION + DENSE_MLP,
    "gemma3_text": GEMMA_NORMS + ATTENTION + QK_NORM + DENSE_MLP,
    "mixtral": LLAMA_NORMS + ATTENTION + ROUTER,
}
EMBED: Entry = ("model.embed_tokens.weight", ("embed", "table_vd"), SAME)
FINAL_NORM: Entry = ("model.norm.weight", ("final_norm", "scale"), SAME)
HEAD: Entry = ("lm_head.weight", ("head_dv",), TRANSPOSED)
IGNORABLE = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry


def parameter_sources(cfg: ModelConfig) -> dict[Path, tuple[Layout, list[str], int]]:
    """Every meshlm parameter -> (layout, the HF tensors it is made of, in the order of its
    flattened leading stack axes, and how many leading axes they stack along: 0 alone, 1 over
    layers, 2 over layers and experts), in the names of ``family_of(cfg)``."""
    family = family_of(cfg)
    out = {path: (layout, [name], 0)
           for name, path, layout in (EMBED, FINAL_NORM) + (() if cfg.tie_embeddings else (HEAD,))}
    stack, layers = "moe_blocks" if cfg.is_moe else "blocks", range(cfg.num_layers)
    for suffix, path, layout in LAYER_TABLES[family]:
        out[(stack, *path)] = (layout, [f"model.layers.{i}.{suffix}" for i in layers], 1)
    for template, path, layout in EXPERTS if cfg.is_moe else ():
        out[(stack, *path)] = (layout, [f"model.layers.{i}.{template.format(e=e)}" for i in layers
                                        for e in range(cfg.num_experts)], 2)
    return out


def check_names(names: Collection[str], cfg: ModelConfig) -> None:
    """ConversionError naming a tensor ``cfg`` needs that ``names`` lacks, or one it holds that is
    no part of the model (a tied model may still carry ``lm_head.weight``)."""
    used = [name for _, tensors, _ in parameter_sources(cfg).values() for name in tensors]
    present = set(names)
    if missing := next((name for name in used if name not in present), None):
        raise ConversionError(f"tensor {missing} is missing from the checkpoint")
    extra = sorted(n for n in present - set(used) if not n.endswith(IGNORABLE))
    if extra and not (extra == ["lm_head.weight"] and cfg.tie_embeddings):
        family = FAMILIES[family_of(cfg)][1]
        raise ConversionError(f"tensor {extra[0]} is not part of a {len(used)}-tensor {family} "
                              f"checkpoint of this config ({len(extra)} such tensors)")
