"""``config.json`` of the supported Hugging Face families to ``ModelConfig`` (the other way is
convert/hf_config_export.py): each field as
transformers 5 reads it (with its defaults where a saved config leaves a field out, its
``rope_parameters`` and older ``rope_scaling``/``rope_theta``, its ``layer_types``), and one
ConversionError line naming the field, or the meshlm key, that the other side cannot say.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

from convert.hf_names import FAMILIES, ConversionError
from model.config import ModelConfig

_LLAMA = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", rope_theta=10000.0)
_QWEN = dict(_LLAMA, max_position_embeddings=32768, num_key_value_heads=32, use_sliding_window=False,
             sliding_window=4096, max_window_layers=28)
_GEMMA = dict(rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
              head_dim=256, num_key_value_heads=4, query_pre_attn_scalar=256, sliding_window=4096)
# transformers 5.24's defaults of the fields read here, which a saved config.json may leave out
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_LLAMA, max_position_embeddings=2048),
    "mistral": dict(_LLAMA, max_position_embeddings=131072, num_key_value_heads=8, sliding_window=4096),
    "mixtral": dict(_LLAMA, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072,
                    num_key_value_heads=8, sliding_window=None, num_local_experts=8,
                    num_experts_per_tok=2, router_aux_loss_coef=0.001),
    "qwen2": _QWEN,
    "qwen3": dict(_QWEN, head_dim=128),
    "gemma2": dict(_GEMMA, max_position_embeddings=8192, rope_theta=10000.0,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(_GEMMA, max_position_embeddings=131072, rope_theta=1e6,
                        rope_local_base_freq=10000.0, sliding_window_pattern=6),
    "qwen3_moe": dict(_LLAMA, max_position_embeddings=32768, num_key_value_heads=4,
                      use_sliding_window=False, sliding_window=4096, decoder_sparse_step=1,
                      mlp_only_layers=[], moe_intermediate_size=768, num_experts_per_tok=8,
                      num_experts=128, norm_topk_prob=False, router_aux_loss_coef=0.001),
    "deepseek_v3": dict(_LLAMA, max_position_embeddings=4096, intermediate_size=18432,
                        moe_intermediate_size=2048, n_shared_experts=1, n_routed_experts=256,
                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
                        topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
                        norm_topk_prob=True, rope_interleave=True),
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LATENT_NORM_EPS = 1e-6  # transformers' DeepSeek-V3 q_a_layernorm and kv_a_layernorm, fixed
LOCAL, GLOBAL = "sliding_attention", "full_attention"


def _refuse(field: str, value: Any, why: str) -> ConversionError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ConversionError(f"config.json {field}={shown} is not supported: {why}")


def _field(hf: Mapping[str, Any], family: str, key: str) -> Any:
    return hf[key] if key in hf else DEFAULTS[family].get(key)


# --------------------------------------------------------------------------- config.json -> meshlm


def _family(hf: Mapping[str, Any]) -> str:
    """The family of ``hf``, refusing vision towers, unknown model types and heads other than a
    causal LM's."""
    kind = hf.get("model_type")
    for tower in ("vision_config", "audio_config"):
        if tower in hf:
            raise ConversionError(f"config.json {tower}: model_type {kind!r} has a {tower[:5]} tower "
                                  "(e.g. Gemma3ForConditionalGeneration), which is not supported; only "
                                  "text models import (Gemma 3's text model: model_type gemma3_text)")
    if kind not in FAMILIES:
        raise ConversionError(f"unknown architecture {kind!r} in config.json model_type (supported: "
                              f"{', '.join(FAMILIES)})")
    archs = hf.get("architectures") or []
    for arch in [archs] if isinstance(archs, str) else archs:
        if not str(arch).endswith("ForCausalLM"):
            raise _refuse("architectures", arch, f"only a causal LM ({FAMILIES[kind][0]}) imports")
    return kind


def _refuse_unsupported(family: str, get: Any) -> None:
    """Fields whose values meshlm's blocks cannot compute."""
    if quantized := get("quantization_config"):
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else quantized
        raise _refuse("quantization_config", method, "quantized weights (and their scale tensors) "
                      "are not read: import a checkpoint in bfloat16, float16 or float32")
    if family in ("llama", "qwen3", "gemma2", "gemma3_text", "qwen3_moe") and get("attention_bias"):
        raise _refuse("attention_bias", True, "it biases o_proj too, and meshlm's attention output "
                      "has no bias (only q/k/v biases, as Qwen2's)")
    if get("mlp_bias"):
        raise _refuse("mlp_bias", True, "meshlm's MLP projections have no bias")
    if family.startswith("gemma"):
        if get("hidden_activation") != "gelu_pytorch_tanh":
            raise _refuse("hidden_activation", get("hidden_activation"), "Gemma MLPs import as "
                          "GeGLU with the tanh GELU (gelu_pytorch_tanh) only")
        if get("use_bidirectional_attention"):
            raise _refuse("use_bidirectional_attention", True, "meshlm attention is causal")
    elif get("hidden_act") != "silu":
        raise _refuse("hidden_act", get("hidden_act"), "only silu (SwiGLU MLPs)")
    if get("partial_rotary_factor") not in (None, 1, 1.0):
        raise _refuse("partial_rotary_factor", get("partial_rotary_factor"),
                      "meshlm rotates whole heads (partial rotary embeddings)")
    if family == "deepseek_v3":
        _refuse_deepseek(get)


def _refuse_deepseek(get: Any) -> None:
    """DeepSeek's own config.json fields that transformers' DeepSeek-V3 ignores: values other than
    V3's would make the two compute different models, so neither is imported."""
    if get("attention_bias"):
        raise _refuse("attention_bias", True, "it biases q_a_proj, kv_a_proj_with_mqa and o_proj, "
                      "and meshlm's latent attention has no bias")
    if get("rms_norm_eps") != LATENT_NORM_EPS:
        raise _refuse("rms_norm_eps", get("rms_norm_eps"), "transformers' DeepSeek-V3 norms the "
                      f"latents (q_a_layernorm, kv_a_layernorm) with eps {LATENT_NORM_EPS} whatever "
                      "it says, meshlm with this eps: only 1e-6 imports")
    for field, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if get(field) not in (None, want):
            raise _refuse(field, get(field), f"DeepSeek-V3 in transformers computes {field}={want} "
                          "whatever the field says")


def _dimensions(family: str, get: Any) -> dict[str, Any]:
    d, n = int(get("hidden_size")), int(get("num_attention_heads"))
    out = dict(vocab_size=int(get("vocab_size")), d_model=d, num_layers=int(get("num_hidden_layers")),
               num_heads=n, num_kv_heads=int(get("num_key_value_heads") or n),
               head_dim=int(get("head_dim") or d // n), mlp_dim=int(get("intermediate_size")),
               max_seq_len=int(get("max_position_embeddings")), position="rope",
               norm_eps=float(get("rms_norm_eps")), activation="swiglu",
               tie_embeddings=bool(get("tie_word_embeddings")))
    if family == "deepseek_v3":
        out.update(_mla_keys(get))
    if family == "qwen2":
        out["qkv_bias"] = True
    if family in ("qwen3", "qwen3_moe", "gemma3_text"):
        out["qk_norm"] = True
    if family.startswith("gemma"):
        out.update(norm_plus_one=True, post_norms=True, embed_scale=True, activation="geglu",
                   query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
                   attn_logit_softcap=float(get("attn_logit_softcapping") or 0.0),
                   final_logit_softcap=float(get("final_logit_softcapping") or 0.0))
    if family == "mixtral":
        out.update(num_experts=int(get("num_local_experts")),
                   experts_per_token=int(get("num_experts_per_tok")), moe_every=1,
                   first_dense_layers=0, moe_impl="dropless", router_mode="topk_softmax",
                   aux_loss_coef=float(get("router_aux_loss_coef")), z_loss_coef=0.0)
    elif family == "qwen3_moe":
        out.update(_qwen3_moe_keys(get, out["num_layers"]))
    elif family == "deepseek_v3":
        out.update(_deepseek_moe_keys(get, out["num_layers"]))
    return out


def _mla_keys(get: Any) -> dict[str, Any]:
    """DeepSeek's latent attention: q_lora_rank null = a full-rank query; num_key_value_heads and
    head_dim (transformers sets it to qk_rope_head_dim) say nothing of it. meshlm's head_dim is
    the query/key head width, whose inverse square root scales the scores by default."""
    nope, rope = int(get("qk_nope_head_dim")), int(get("qk_rope_head_dim"))
    return dict(attention_type="mla", q_lora_rank=int(get("q_lora_rank") or 0),
                kv_lora_rank=int(get("kv_lora_rank")), qk_rope_head_dim=rope, qk_nope_head_dim=nope,
                v_head_dim=int(get("v_head_dim")), head_dim=nope + rope,
                num_kv_heads=int(get("num_attention_heads")))


def _moe_layers(moe: list[bool], field: str, value: Any) -> dict[str, int]:
    """first_dense_layers and moe_every of the layers ``moe`` marks, the first (fewest layers per
    group) that gives them; refused, naming ``field``, when none does."""
    layers = len(moe)
    for every in range(1, layers + 1):
        for first in range(layers):
            groups, rest = divmod(layers - first, every)
            if not rest and groups and moe == [i >= first and (i - first + 1) % every == 0
                                               for i in range(layers)]:
                return dict(first_dense_layers=first, moe_every=every)
    raise _refuse(field, value, "meshlm's MoE layers are the last of each group of moe_every layers "
                  "after first_dense_layers dense ones (the last layer is MoE), and these are not")


def _qwen3_moe_keys(get: Any, layers: int) -> dict[str, Any]:
    """Layer i is MoE unless listed in mlp_only_layers, when (i + 1) % decoder_sparse_step == 0;
    the router's softmax top-k gates are renormalised when norm_topk_prob. No MoE layer (no
    experts, or all listed): a dense model."""
    experts = int(get("num_local_experts") or get("num_experts") or 0)
    dense, step = list(get("mlp_only_layers") or []), int(get("decoder_sparse_step"))
    moe = [experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(layers)]
    if not any(moe):
        return {}
    field = "mlp_only_layers" if dense else "decoder_sparse_step"
    return dict(_moe_layers(moe, field, dense or step), num_experts=experts,
                experts_per_token=int(get("num_experts_per_tok")),
                expert_mlp_dim=int(get("moe_intermediate_size")), moe_impl="dropless",
                router_mode="softmax_topk" if get("norm_topk_prob") else "softmax_topk_unnormalized",
                aux_loss_coef=float(get("router_aux_loss_coef")), z_loss_coef=0.0)


def _deepseek_moe_keys(get: Any, layers: int) -> dict[str, Any]:
    """The layers from first_k_dense_replace on are MoE (none: a dense model): sigmoid scores, a
    selection bias (e_score_correction_bias: the aux-loss-free balancing variable, so
    router_bias_rate > 0; 0.001 is DeepSeek-V3's rate), group-limited top-k, the chosen scores
    renormalised when norm_topk_prob and scaled by routed_scaling_factor, plus n_shared_experts
    always-on experts in one MLP. The sequence-wise balance loss when DeepSeek's config says
    seq_aux (aux_loss_alpha)."""
    first = int(get("first_k_dense_replace") or 0)
    if first >= layers:
        return {}
    groups = int(get("n_group") or 1)
    return dict(num_experts=int(get("n_routed_experts")), experts_per_token=int(get("num_experts_per_tok")),
                expert_mlp_dim=int(get("moe_intermediate_size")), first_dense_layers=first,
                moe_every=1, num_shared_experts=int(get("n_shared_experts")), moe_impl="dropless",
                router_mode="sigmoid_topk" if get("norm_topk_prob") else "sigmoid_topk_unnormalized",
                routed_scaling_factor=float(get("routed_scaling_factor")), router_groups=groups,
                router_topk_groups=int(get("topk_group") or groups), router_bias_rate=0.001,
                aux_loss_coef=0.0, z_loss_coef=0.0,
                seq_aux_loss_coef=float(get("aux_loss_alpha") or 0.0) if get("seq_aux") else 0.0)


def _pattern(types: Any, layers: int, field: str) -> int | None:
    """``sliding_window_pattern`` of a ``layer_types`` list (0: every layer local), None when no
    layer is local; refused, naming ``field``, when no every-Nth-layer-global pattern gives it."""
    if (not isinstance(types, list) or len(types) != layers
            or any(t not in (LOCAL, GLOBAL) for t in types)):
        raise _refuse(field, types, f"it must give {GLOBAL} or {LOCAL} for each of {layers} layers")
    if LOCAL not in types:
        return None
    every = types.index(GLOBAL) + 1 if GLOBAL in types else 0  # the first global layer says N
    if any((t == LOCAL) != (not every or (i + 1) % every != 0) for i, t in enumerate(types)):
        raise _refuse(field, types, "meshlm's local layers are all, or all but every Nth "
                      "(sliding_window_pattern), and these follow no such pattern")
    return every


def _default_pattern(family: str, get: Any, layers: int) -> int | None:
    """sliding_window_pattern (None: no local layer) of the local layers transformers derives
    when ``layer_types`` is absent (computed, not listed: the layer count comes from the file)."""
    if family in ("mistral", "mixtral", "qwen3_moe"):
        return 0  # a window on every layer
    if family in ("qwen2", "qwen3"):  # the layers from max_window_layers on are local
        first = int(get("max_window_layers"))
        if 0 < first < layers:
            raise _refuse("max_window_layers", first, f"its {first} global layers before {layers - first} "
                          "local ones follow no every-Nth-layer-global pattern (sliding_window_pattern)")
        return 0 if first <= 0 else None
    every = 2 if family == "gemma2" else int(get("sliding_window_pattern"))  # every Nth is global
    if every < 1:
        raise _refuse("sliding_window_pattern", every, "it must be >= 1")
    return None if every == 1 else 0 if every > layers else every


def _window(hf: Mapping[str, Any], family: str, get: Any, layers: int) -> dict[str, Any]:
    """sliding_window and sliding_window_pattern (absent: no local layer)."""
    window = get("sliding_window")
    if family in ("llama", "deepseek_v3") or not window or (
            family in ("qwen2", "qwen3", "qwen3_moe") and not get("use_sliding_window")):
        return {}
    if hf.get("layer_types") and family not in ("mistral", "mixtral", "qwen3_moe"):  # which they ignore
        pattern = _pattern(hf["layer_types"], layers, "layer_types")
    else:
        pattern = _default_pattern(family, get, layers)
    return {} if pattern is None else {"sliding_window": int(window), "sliding_window_pattern": pattern}


def _rope_dicts(hf: Mapping[str, Any], family: str, get: Any) -> tuple[str, dict, dict | None]:
    """(the field errors name, the global layers' RoPE parameters, Gemma 3's local layers'), each
    with its rope_theta, as transformers standardises them."""
    if family == "gemma3_text":
        nested = hf.get("rope_parameters") or {}
        full = dict(nested.get(GLOBAL) or {"rope_type": "default"}, **(hf.get("rope_scaling") or {}))
        full.setdefault("rope_theta", get("rope_theta"))
        local = dict(nested.get(LOCAL) or {"rope_type": "default"})
        local.setdefault("rope_theta", get("rope_local_base_freq"))
        return f"rope_parameters.{GLOBAL}", full, local
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if GLOBAL in rope or LOCAL in rope:
        raise _refuse(field, sorted(rope), "RoPE per layer type is Gemma 3's only")
    rope.setdefault("rope_theta", get("rope_theta"))
    return field, rope, None


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def _yarn_attention_factor(rope: Mapping[str, Any], factor: float) -> float:
    """yarn's factor on cos and sin; 0 = meshlm's default, transformers' 0.1 ln(factor) + 1."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not (mscale and mscale_all_dim) or factor <= 1:
        return 0.0
    return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)


def _rope(field: str, rope: Mapping[str, Any], max_len: int, original: Any = None) -> dict[str, Any]:
    """The rope_* keys of one RoPE parameter dict (``original``: a top-level
    original_max_position_embeddings, which transformers prefers to the dict's)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise _refuse(f"{field}.rope_type", kind, f"unknown RoPE type (supported: {', '.join(ROPE_TYPES)})")
    if rope.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise _refuse(f"{field}.partial_rotary_factor", rope["partial_rotary_factor"],
                      "meshlm rotates whole heads (partial rotary embeddings)")
    out: dict[str, Any] = {"rope_theta": float(rope["rope_theta"]),
                           "rope_scaling": "none" if kind == "default" else kind}
    if kind == "default":
        return out
    original = int(original or rope.get("original_max_position_embeddings") or max_len)
    factor = float(rope["factor"] if rope.get("factor") is not None or kind != "yarn"
                   else max_len / original)
    out["rope_scaling_factor"] = factor
    if kind == "llama3":
        out.update(rope_original_max_len=original, rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]))
    elif kind == "yarn":
        out.update(rope_original_max_len=original, rope_beta_fast=float(rope.get("beta_fast") or 32),
                   rope_beta_slow=float(rope.get("beta_slow") or 1),
                   rope_truncate=bool(rope.get("truncate", True)),
                   rope_attention_factor=_yarn_attention_factor(rope, factor))
    return out


def _rope_keys(hf: Mapping[str, Any], family: str, get: Any, max_len: int,
               has_local: bool) -> dict[str, Any]:
    """The rope_* keys: the global layers' RoPE, and Gemma 3's local layers' base when it differs
    (meshlm's local layers take plain RoPE at rope_local_theta, or the global layers' RoPE)."""
    field, full, local = _rope_dicts(hf, family, get)
    out = _rope(field, full, max_len, hf.get("original_max_position_embeddings"))
    if local is None or not has_local:
        return out
    local_field = f"rope_parameters.{LOCAL}"
    if local.get("rope_type", local.get("type", "default")) == "default":
        _rope(local_field, local, max_len)  # refuses a partial rotary factor
        if out["rope_scaling"] != "none" or float(local["rope_theta"]) != out["rope_theta"]:
            out["rope_local_theta"] = float(local["rope_theta"])
        return out
    if _rope(local_field, local, max_len) != out:
        raise _refuse(local_field, local.get("rope_type", local.get("type")), "scaled RoPE on the "
                      "local layers unlike the global layers' (meshlm's local layers take plain RoPE "
                      "at rope_local_theta, or the global layers' RoPE)")
    return out


def _mla_scale(hf: Mapping[str, Any], family: str, get: Any, qk_head_dim: int) -> dict[str, Any]:
    """DeepSeek's scaled RoPE (with ``mscale_all_dim``) multiplies the softmax scale
    qk_head_dim**-0.5 by mscale**2 (transformers' yarn_apply_mscale): query_pre_attn_scalar =
    qk_head_dim / mscale**4 says the same."""
    _, rope, _ = _rope_dicts(hf, family, get)
    if rope.get("rope_type", rope.get("type", "default")) == "default" or not rope.get("mscale_all_dim"):
        return {}
    mscale = _yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"]))
    return {} if mscale == 1 else {"query_pre_attn_scalar": qk_head_dim / mscale**4}


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """The meshlm architecture of a Hugging Face ``config.json`` (Llama 3.x, Mistral, Mixtral,
    Qwen2/2.5, Qwen3, Qwen3-MoE, DeepSeek-V3, Gemma 2, Gemma 3 text); ConversionError naming the
    first field it has that meshlm cannot compute (vision towers, unknown RoPE types, an o_proj
    bias, partial rotary, local layers in no every-Nth-global pattern, quantized weights, ...)."""
    family = _family(hf)
    get = functools.partial(_field, hf, family)
    _refuse_unsupported(family, get)
    try:
        keys = _dimensions(family, get)
        keys.update(_window(hf, family, get, keys["num_layers"]))
        keys.update(_rope_keys(hf, family, get, keys["max_seq_len"], "sliding_window" in keys))
        if family == "deepseek_v3":
            keys.update(_mla_scale(hf, family, get, keys["head_dim"]))
    except ConversionError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
        raise ConversionError(f"config.json lacks or garbles {e}") from None
    cfg = ModelConfig(**keys)
    if problems := cfg.problems():
        raise ConversionError("; ".join(f"{k}: {m}" for k, m in problems))
    return cfg
