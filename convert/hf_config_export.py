"""``ModelConfig`` to the ``config.json`` of the Hugging Face family that computes the same model
(``hf_config_from_model``), written as transformers 5 reads it; what that family's config cannot
say is one ConversionError line naming the meshlm key. The other way is convert/hf_config.py.
"""

from __future__ import annotations

import math
from typing import Any

from convert.hf_config import GLOBAL, LATENT_NORM_EPS, LOCAL
from convert.hf_names import FAMILIES, ConversionError, family_of
from model.config import ModelConfig

_PLAIN = dict(norm_plus_one=False, post_norms=False, embed_scale=False, activation="swiglu",
              query_pre_attn_scalar=0.0, attn_logit_softcap=0.0, final_logit_softcap=0.0)
_GEMMA_KEYS = dict(norm_plus_one=True, post_norms=True, embed_scale=True, activation="geglu",
                   qkv_bias=False)
# What each family's blocks compute, as meshlm keys (the others are free: its config.json says them)
FIXED: dict[str, dict[str, Any]] = {
    "llama": dict(_PLAIN, qkv_bias=False, qk_norm=False),
    "mistral": dict(_PLAIN, qkv_bias=False, qk_norm=False),
    "mixtral": dict(_PLAIN, qkv_bias=False, qk_norm=False),
    "qwen2": dict(_PLAIN, qkv_bias=True, qk_norm=False),
    "qwen3": dict(_PLAIN, qkv_bias=False, qk_norm=True),
    "gemma2": dict(_GEMMA_KEYS, qk_norm=False),
    "gemma3_text": dict(_GEMMA_KEYS, qk_norm=True),
    "qwen3_moe": dict(_PLAIN, qkv_bias=False, qk_norm=True),
    "deepseek_v3": {k: v for k, v in dict(_PLAIN, qkv_bias=False, qk_norm=False).items()
                    if k != "query_pre_attn_scalar"},  # said by yarn's mscale_all_dim
}
RULE = {"mixtral": "num_experts > 0 without qk_norm", "gemma3_text": "norm_plus_one with qk_norm",
        "gemma2": "norm_plus_one without qk_norm", "qwen3": "qk_norm", "qwen2": "qkv_bias",
        "mistral": "a sliding window on every layer", "llama": "none of the other families' keys",
        "qwen3_moe": "num_experts > 0 with qk_norm", "deepseek_v3": "attention_type mla"}
# The router modes each MoE family computes (softmax_topk and topk_softmax are one function up to
# rounding), and the MoE keys it fixes, with why
ROUTER_MODES = {"mixtral": ("softmax_topk", "topk_softmax"),
                "qwen3_moe": ("softmax_topk", "topk_softmax", "softmax_topk_unnormalized"),
                "deepseek_v3": ("sigmoid_topk", "sigmoid_topk_unnormalized")}
_NO_DEEPSEEK_ROUTING = dict(routed_scaling_factor=(1.0, "gates are not scaled"),
                            router_groups=(1, "there is no group-limited routing"),
                            router_bias_rate=(0.0, "there is no selection bias"))
MOE_FIXED: dict[str, dict[str, tuple[Any, str]]] = {
    "mixtral": dict(num_shared_experts=(0, "there are no always-on experts"),
                    first_dense_layers=(0, "every layer is MoE"), moe_every=(1, "every layer is MoE"),
                    **_NO_DEEPSEEK_ROUTING),
    "qwen3_moe": dict(num_shared_experts=(0, "there are no always-on experts"), **_NO_DEEPSEEK_ROUTING),
    "deepseek_v3": dict(moe_every=(1, "every layer after first_k_dense_replace is MoE")),
}


def _moe_inexpressible(cfg: ModelConfig, family: str) -> tuple[str, str] | None:
    """The MoE keys ``family`` cannot say. The capacity path is a training device: meshlm's own
    inference, like the Hugging Face families', drops no token."""
    name = FAMILIES[family][1]
    if cfg.router_mode not in ROUTER_MODES[family]:
        return "router_mode", f"{name} routes with {' or '.join(ROUTER_MODES[family])}" + (
            ": the top-k gates renormalised to sum 1" if family == "mixtral" else "")
    for key, (want, why) in MOE_FIXED[family].items():
        if getattr(cfg, key) != want:
            return key, f"in {name}, {why}"
    if family == "deepseek_v3" and not cfg.num_shared_experts:
        return "num_shared_experts", "DeepSeek-V3's MoE layers always add shared experts"
    return None


def _mla_inexpressible(cfg: ModelConfig) -> tuple[str, str] | None:
    """DeepSeek-V3's attention: scores scaled by qk_head_dim**-0.5, or that times yarn's
    mscale**2 (query_pre_attn_scalar = qk_head_dim / mscale**4); no window."""
    scale, qk = cfg.query_pre_attn_scalar, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if scale and scale != qk and not (cfg.rope_scaling == "yarn" and cfg.rope_scaling_factor > 1):
        return "query_pre_attn_scalar", ("DeepSeek-V3 scales attention scores otherwise than by "
                                         "qk_head_dim**-0.5 only through yarn RoPE's mscale_all_dim")
    if cfg.sliding_window:
        return "sliding_window", "DeepSeek-V3 has no sliding-window attention"
    if cfg.norm_eps != LATENT_NORM_EPS:
        return "norm_eps", (f"DeepSeek-V3 norms the latents with eps {LATENT_NORM_EPS} whatever "
                            "rms_norm_eps says")
    return None


def _inexpressible(cfg: ModelConfig, family: str) -> tuple[str, str] | None:
    """(key, why) of the first option of ``cfg`` that ``family``'s config.json cannot say, so that
    a model in that layout would compute something else; None when there is none."""
    name = FAMILIES[family][1]
    if cfg.position != "rope":
        return "position", f"{name} has rotary positions only, no learned table"
    if cfg.is_moe and (found := _moe_inexpressible(cfg, family)):
        return found
    if family == "deepseek_v3" and (found := _mla_inexpressible(cfg)):
        return found
    if cfg.mtp_depth and family != "deepseek_v3":
        return "mtp_depth", f"{name} has no multi-token-prediction modules (only DeepSeek-V3 has)"
    for key, want in FIXED[family].items():
        have = getattr(cfg, key)
        if key == "query_pre_attn_scalar" and have == cfg.resolved_head_dim:
            have = 0.0  # the default scale, said otherwise
        if have != want:
            return key, f"the config is exported as {name} ({RULE[family]}), which has {key}={want}"
    local = [cfg.is_local_layer(i) for i in range(cfg.num_layers)]
    if any(local) and not all(local) and family in ("llama", "mistral", "mixtral", "qwen3_moe"):
        return "sliding_window_pattern", (f"{name} has a window on every layer or none; only Qwen2/3 "
                                          "and Gemma configs say which layers are local")
    if any(local) and cfg.rope_local_theta and family != "gemma3_text":
        return "rope_local_theta", (f"{name} gives local layers the global layers' RoPE (only "
                                    "Gemma 3 has its own)")
    return None


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """transformers 5's rope_parameters of the global layers."""
    if cfg.rope_scaling == "none":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out = {"rope_type": cfg.rope_scaling, "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling_factor}
    original = cfg.rope_original_max_len or cfg.max_seq_len
    if cfg.rope_scaling == "llama3":
        out.update(original_max_position_embeddings=original, low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor)
    elif cfg.rope_scaling == "yarn":
        out.update(original_max_position_embeddings=original, beta_fast=cfg.rope_beta_fast,
                   beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
        if cfg.rope_attention_factor:
            out["attention_factor"] = cfg.rope_attention_factor
        if mscale := _mla_mscale(cfg):
            out["mscale_all_dim"] = mscale
    return out


def _mla_mscale(cfg: ModelConfig) -> float:
    """DeepSeek's yarn mscale_all_dim that multiplies the softmax scale qk_head_dim**-0.5 by
    (0.1 mscale_all_dim ln(factor) + 1)**2 = (qk_head_dim / query_pre_attn_scalar)**0.5; 0 = none."""
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.attention_type != "mla" or not cfg.query_pre_attn_scalar or cfg.query_pre_attn_scalar == qk:
        return 0.0
    return ((qk / cfg.query_pre_attn_scalar) ** 0.25 - 1) / (0.1 * math.log(cfg.rope_scaling_factor))


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _family_fields(cfg: ModelConfig, family: str) -> dict[str, Any]:
    """The fields of ``family``'s config.json beyond the dimensions every family has."""
    layers = range(cfg.num_layers)
    types = [LOCAL if cfg.is_local_layer(i) else GLOBAL for i in layers]
    window = cfg.sliding_window if LOCAL in types else None
    if family == "llama":
        return dict(hidden_act="silu", attention_bias=False, mlp_bias=False)
    if family == "mistral":
        return dict(hidden_act="silu", sliding_window=window)
    if family == "mixtral":
        return dict(hidden_act="silu", sliding_window=window, num_local_experts=cfg.num_experts,
                    intermediate_size=cfg.resolved_expert_mlp_dim,
                    num_experts_per_tok=cfg.experts_per_token, router_aux_loss_coef=cfg.aux_loss_coef)
    if family == "qwen3_moe":
        return _qwen3_moe_fields(cfg, window)
    if family == "deepseek_v3":
        return _deepseek_fields(cfg)
    if family in ("qwen2", "qwen3"):
        first_local = types.index(LOCAL) if window else cfg.num_layers
        out = dict(hidden_act="silu", use_sliding_window=window is not None, sliding_window=window,
                   max_window_layers=first_local, layer_types=types)
        return out if family == "qwen2" else dict(out, attention_bias=False)
    out = dict(hidden_activation="gelu_pytorch_tanh", attention_bias=False,
               query_pre_attn_scalar=_number(cfg.query_pre_attn_scalar or cfg.resolved_head_dim),
               attn_logit_softcapping=float(cfg.attn_logit_softcap) or None,
               final_logit_softcapping=float(cfg.final_logit_softcap) or None,
               sliding_window=window, layer_types=types)
    if family == "gemma3_text":
        full = _rope_parameters(cfg)
        local = ({"rope_type": "default", "rope_theta": cfg.rope_local_theta}
                 if cfg.rope_local_theta else dict(full))
        out.update(rope_parameters={GLOBAL: full, LOCAL: local}, use_bidirectional_attention=False)
    return out


def _qwen3_moe_fields(cfg: ModelConfig, window: int | None) -> dict[str, Any]:
    """Qwen3-MoE: the layers that are not MoE listed in mlp_only_layers (with
    decoder_sparse_step 1, which says every other layer is); the experts under ``num_experts``,
    the name Qwen's configs and transformers 4 read (transformers 5 reads it too)."""
    moe = set(cfg.moe_layer_indices)
    return dict(hidden_act="silu", attention_bias=False, use_sliding_window=window is not None,
                sliding_window=window, decoder_sparse_step=1,
                mlp_only_layers=[i for i in range(cfg.num_layers) if i not in moe],
                num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                moe_intermediate_size=cfg.resolved_expert_mlp_dim,
                norm_topk_prob=cfg.router_mode != "softmax_topk_unnormalized",
                router_aux_loss_coef=cfg.aux_loss_coef)


def _deepseek_fields(cfg: ModelConfig) -> dict[str, Any]:
    """DeepSeek-V3: latent attention (rope dimensions interleaved, as DeepSeek's checkpoints and
    the tensors written beside), MoE layers from first_k_dense_replace on (none: every layer
    dense), the multi-token-prediction layers' count."""
    out: dict[str, Any] = dict(
        hidden_act="silu", attention_bias=False, num_key_value_heads=cfg.num_heads,
        head_dim=cfg.qk_rope_head_dim, q_lora_rank=cfg.q_lora_rank or None,
        kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.resolved_v_head_dim,
        rope_interleave=True, first_k_dense_replace=cfg.num_dense_first,
        num_nextn_predict_layers=cfg.mtp_depth)
    if not cfg.is_moe:
        return out
    out.update(n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
               moe_intermediate_size=cfg.resolved_expert_mlp_dim,
               n_shared_experts=cfg.num_shared_experts,
               routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.router_groups,
               topk_group=cfg.router_topk_groups or cfg.router_groups,
               norm_topk_prob=cfg.router_mode == "sigmoid_topk")
    if cfg.seq_aux_loss_coef:  # DeepSeek's own fields (transformers ignores them)
        out.update(seq_aux=True, aux_loss_alpha=cfg.seq_aux_loss_coef)
    return out


def hf_config_from_model(cfg: ModelConfig, bos_id: int | None = None,
                         eos_id: int | None = None) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for a meshlm architecture, in the family ``family_of``
    picks (mla -> deepseek_v3; MoE -> qwen3_moe with qk_norm, else mixtral; norm_plus_one ->
    gemma3_text with qk_norm, else gemma2; qk_norm -> qwen3; qkv_bias -> qwen2; a window on every
    layer -> mistral; else llama); ConversionError
    naming the first key that family cannot express (nothing is exported rather than a model that
    computes something else)."""
    family = family_of(cfg)
    if found := _inexpressible(cfg, family):
        key, why = found
        raise ConversionError(f"model.{key}={getattr(cfg, key)} has no Hugging Face form ({why}); "
                              "nothing was written")
    out: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters=_rope_parameters(cfg), rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0, dtype=cfg.param_dtype,
        bos_token_id=bos_id, eos_token_id=eos_id)
    out.update(_family_fields(cfg, family))
    return {"architectures": [FAMILIES[family][0]], "model_type": family, **out}
