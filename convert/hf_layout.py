"""The Hugging Face layout of Llama- and Mixtral-family checkpoints, both ways: ``config.json`` to
and from ``ModelConfig``, and one explicit table mapping Hugging Face tensor names to meshlm's
parameter paths, with the reshapes and transposes between the two (HF keeps ``nn.Linear`` weights as
[out, in]; meshlm keeps [in, out] with heads split out, stacked over layers on a leading axis).

Tensors here are host NumPy arrays keyed by name: ``{"model.layers.0.self_attn.q_proj.weight": a}``
on the Hugging Face side, ``{("blocks", "attn", "w_q_dnh"): a_lDNH}`` on meshlm's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from model.config import ModelConfig

FLOAT32 = np.dtype(np.float32)
HFTensors = Mapping[str, np.ndarray]  # read when looked up (LazyTensors) or held
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM"}


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


# ------------------------------------------------------------------------------------ config.json


def _rope_theta(hf: Mapping[str, Any]) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise ConversionError(f"RoPE scaling {kind!r} is not supported (only plain RoPE)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """The meshlm architecture of a Hugging Face ``config.json`` (Llama, Mistral or Mixtral)."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConversionError(f"unknown architecture {kind!r} (supported: {', '.join(ARCHITECTURES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConversionError(f"{flag}=true is not supported (meshlm projections have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    try:
        d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        base = dict(
            vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["num_hidden_layers"]),
            num_heads=n, num_kv_heads=int(hf.get("num_key_value_heads") or n),
            head_dim=int(hf.get("head_dim") or d // n), mlp_dim=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)), position="rope",
            rope_theta=_rope_theta(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            activation="swiglu", tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
        if kind == "mixtral":
            base.update(num_experts=int(hf["num_local_experts"]),
                        experts_per_token=int(hf["num_experts_per_tok"]), moe_every=1,
                        first_dense_layers=0, moe_impl="dropless", router_mode="topk_softmax",
                        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)), z_loss_coef=0.0)
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"config.json lacks or garbles {e}") from None
    window = hf.get("sliding_window")
    if window and int(window) < base["max_seq_len"]:
        base["max_seq_len"] = int(window)  # within the window, sliding attention is plain attention
    cfg = ModelConfig(**base)
    if problems := cfg.problems():
        raise ConversionError("; ".join(f"{k}: {m}" for k, m in problems))
    return cfg


def _inexpressible(cfg: ModelConfig) -> tuple[str, str] | None:
    """(key, why) of the first option of ``cfg`` that a Llama or Mixtral ``config.json`` cannot
    say, so that a model in that layout would compute something else; None when there is none.
    (softmax_topk and topk_softmax are one function up to rounding; the capacity path is a training
    device: meshlm's own inference, like Mixtral, drops no token.)"""
    if cfg.position != "rope":
        return "position", "Llama/Mixtral have rotary positions only, no learned table"
    if cfg.activation != "swiglu":
        return "activation", "Llama/Mixtral MLPs are SwiGLU only"
    if not cfg.is_moe:
        return None
    if cfg.router_mode == "softmax_topk_unnormalized":
        return "router_mode", "Mixtral renormalises the top-k gates to sum 1"
    for key, why in (("num_shared_experts", "Mixtral has no always-on experts"),
                     ("first_dense_layers", "every Mixtral layer is MoE"),
                     ("moe_every", "every Mixtral layer is MoE")):
        if getattr(cfg, key) != (1 if key == "moe_every" else 0):
            return key, why
    return None


def hf_config_from_model(cfg: ModelConfig, bos_id: int | None = None,
                         eos_id: int | None = None) -> dict[str, Any]:
    """A Hugging Face ``config.json`` (Llama, or Mixtral for MoE) for a meshlm architecture;
    ConversionError naming the first key the layout cannot express (nothing is exported rather
    than a model that computes something else)."""
    if found := _inexpressible(cfg):
        key, why = found
        raise ConversionError(f"model.{key}={getattr(cfg, key)} has no Hugging Face "
                              f"{'Mixtral' if cfg.is_moe else 'Llama'} form ({why}); nothing was written")
    out: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        attention_dropout=0.0, dtype=cfg.param_dtype, bos_token_id=bos_id, eos_token_id=eos_id)
    if not cfg.is_moe:
        return {"architectures": [ARCHITECTURES["llama"]], "model_type": "llama", **out,
                "attention_bias": False, "mlp_bias": False}
    if cfg.resolved_expert_mlp_dim != cfg.mlp_dim:
        out["intermediate_size"] = cfg.resolved_expert_mlp_dim
    return {"architectures": [ARCHITECTURES["mixtral"]], "model_type": "mixtral", **out,
            "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
            "router_aux_loss_coef": cfg.aux_loss_coef, "sliding_window": None}


# ---------------------------------------------------------------------------------- the name table


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one HF tensor [out, in] becomes one meshlm parameter and back."""

    to_meshlm: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]


def _heads(count: str) -> Layout:
    def to_meshlm(w: np.ndarray, c: ModelConfig) -> np.ndarray:  # [N*H, D] -> [D, N, H]
        return w.T.reshape(c.d_model, getattr(c, count), c.resolved_head_dim)

    def to_hf(w: np.ndarray, c: ModelConfig) -> np.ndarray:
        return w.reshape(c.d_model, -1).T

    return Layout(to_meshlm, to_hf)


SAME = Layout(lambda w, c: w, lambda w, c: w)
TRANSPOSED = Layout(lambda w, c: w.T, lambda w, c: w.T)
Q_HEADS, KV_HEADS = _heads("num_heads"), _heads("num_kv_heads")
OUT_HEADS = Layout(  # [D, N*H] -> [N, H, D]
    lambda w, c: w.T.reshape(c.num_heads, c.resolved_head_dim, c.d_model),
    lambda w, c: w.reshape(-1, c.d_model).T)

# (HF name of a layer's tensor, meshlm path inside the layer's block, layout)
ATTENTION_TABLE: tuple[tuple[str, tuple[str, ...], Layout], ...] = (
    ("input_layernorm.weight", ("attn_norm", "scale"), SAME),
    ("self_attn.q_proj.weight", ("attn", "w_q_dnh"), Q_HEADS),
    ("self_attn.k_proj.weight", ("attn", "w_k_dkh"), KV_HEADS),
    ("self_attn.v_proj.weight", ("attn", "w_v_dkh"), KV_HEADS),
    ("self_attn.o_proj.weight", ("attn", "w_o_nhd"), OUT_HEADS),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), SAME),
)
DENSE_MLP_TABLE = (
    ("mlp.gate_proj.weight", ("mlp", "w_gate_df"), TRANSPOSED),
    ("mlp.up_proj.weight", ("mlp", "w_up_df"), TRANSPOSED),
    ("mlp.down_proj.weight", ("mlp", "w_down_fd"), TRANSPOSED),
)
ROUTER = ("block_sparse_moe.gate.weight", ("moe", "w_router_de"), TRANSPOSED)
# (HF name of expert e's tensor, meshlm path of the [E, ...] stack, layout of one expert's slice)
EXPERT_TABLE = (
    ("block_sparse_moe.experts.{e}.w1.weight", ("moe", "w_gate_edf"), TRANSPOSED),
    ("block_sparse_moe.experts.{e}.w3.weight", ("moe", "w_up_edf"), TRANSPOSED),
    ("block_sparse_moe.experts.{e}.w2.weight", ("moe", "w_down_efd"), TRANSPOSED),
)
EMBED = ("model.embed_tokens.weight", ("embed", "table_vd"), SAME)
FINAL_NORM = ("model.norm.weight", ("final_norm", "scale"), SAME)
HEAD = ("lm_head.weight", ("head_dv",), TRANSPOSED)


def _stack_name(cfg: ModelConfig) -> str:
    return "moe_blocks" if cfg.is_moe else "blocks"


def _parameter_sources(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[Layout, list[str], int]]:
    """Every meshlm parameter -> (layout, the HF tensors it is made of, in stacking order, and how
    many leading axes they stack along: 0 alone, 1 over layers, 2 over layers and experts)."""
    out = {path: (layout, [name], 0)
           for name, path, layout in (EMBED, FINAL_NORM) + (() if cfg.tie_embeddings else (HEAD,))}
    stack, layers = _stack_name(cfg), range(cfg.num_layers)
    for suffix, path, layout in ATTENTION_TABLE + ((ROUTER,) if cfg.is_moe else DENSE_MLP_TABLE):
        out[(stack, *path)] = (layout, [f"model.layers.{i}.{suffix}" for i in layers], 1)
    for template, path, layout in EXPERT_TABLE if cfg.is_moe else ():
        out[(stack, *path)] = (layout, [f"model.layers.{i}.{template.format(e=e)}" for i in layers
                                        for e in range(cfg.num_experts)], 2)
    return out


def _take(tensors: Mapping[str, np.ndarray], name: str, layout: Layout, cfg: ModelConfig,
          shape: tuple[int, ...]) -> np.ndarray:
    """Tensor ``name`` (read now, as stored) as the meshlm parameter slice of ``shape``;
    ConversionError if its shape is not the one the config implies."""
    nothing = np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), shape, (0,) * len(shape))
    want = layout.to_hf(nothing, cfg).shape  # the shape alone: no memory behind it
    w = tensors[name]
    if tuple(w.shape) != tuple(want):
        raise ConversionError(f"tensor {name} has shape {tuple(w.shape)}, the config implies "
                              f"{tuple(want)} (shape mismatch)")
    return layout.to_meshlm(np.asarray(w), cfg)


def _make(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, layout: Layout, names: list[str],
          stacked: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """One parameter in ``dtype``, each HF tensor converted as it is read into its slot."""
    out = np.empty(shape, dtype)
    for slot, name in zip(out.reshape(-1, *shape[stacked:]), names, strict=True):
        slot[...] = _take(tensors, name, layout, cfg, shape[stacked:])
    return out


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig,
                   shapes: Mapping[tuple[str, ...], tuple[int, ...]],
                   dtype: np.dtype = FLOAT32) -> dict[tuple[str, ...], Callable[[], np.ndarray]]:
    """A maker for each meshlm parameter (layers stacked, in ``dtype``) from Hugging Face tensors,
    given the model's parameter ``shapes``: calling it reads the parameter's tensors, one at a time,
    so a caller that keeps one parameter at a time holds the model once, not a float32 copy of it
    beside another. ConversionError, before anything is read, names a missing tensor or one left
    over; a maker raises it for a misshapen one."""
    sources = _parameter_sources(cfg)
    used = [name for _, names, _ in sources.values() for name in names]
    if missing := next((name for name in used if name not in tensors), None):
        raise ConversionError(f"tensor {missing} is missing from the checkpoint")
    ignorable = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry
    extra = sorted(n for n in set(tensors) - set(used) if not n.endswith(ignorable))
    if extra and not (extra == ["lm_head.weight"] and cfg.tie_embeddings):  # some tied ones store it
        raise ConversionError(f"tensor {extra[0]} is not part of a {len(used)}-tensor "
                              f"{'Mixtral' if cfg.is_moe else 'Llama'} checkpoint of this config "
                              f"({len(extra)} such tensors)")
    return {path: functools.partial(_make, tensors, cfg, layout, names, stacked, shapes[path], dtype)
            for path, (layout, names, stacked) in sources.items()}


def hf_from_params(params: Mapping[tuple[str, ...], np.ndarray], cfg: ModelConfig) -> HFTensors:
    """Hugging Face tensors (contiguous, float32 or as stored) from meshlm parameters."""
    out: dict[str, np.ndarray] = {}
    for name, path, layout in (EMBED, FINAL_NORM) + (() if cfg.tie_embeddings else (HEAD,)):
        out[name] = layout.to_hf(np.asarray(params[path]), cfg)
    stack = _stack_name(cfg)
    for suffix, path, layout in ATTENTION_TABLE + ((ROUTER,) if cfg.is_moe else DENSE_MLP_TABLE):
        for i, w in enumerate(np.asarray(params[(stack, *path)])):
            out[f"model.layers.{i}.{suffix}"] = layout.to_hf(w, cfg)
    for template, path, layout in EXPERT_TABLE if cfg.is_moe else ():
        for i, w_e in enumerate(np.asarray(params[(stack, *path)])):
            for e, w in enumerate(w_e):
                out[f"model.layers.{i}.{template.format(e=e)}"] = layout.to_hf(w, cfg)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
