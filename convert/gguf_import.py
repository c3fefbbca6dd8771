"""Reading GGUF files (llama.cpp's format) of the ``llama``, ``qwen2``, ``qwen3``, ``gemma2`` and
``gemma3`` architectures as a Hugging Face-style ``config.json`` (as transformers 5 writes it) and
Hugging Face-named tensors, each read (quantised ones dequantised with the ``gguf`` package) only
when the import places it. What llama.cpp's converter (``convert_hf_to_gguf.py``) and runtime
(``src/llama-model.cpp``) do differently from Hugging Face is undone here, so that
``convert.hf_layout``'s family tables take the result like a Hugging Face checkpoint:

- ``llama`` only: the Q and K rows (weights and biases) are permuted within each head so that
  RoPE rotates interleaved pairs; meshlm and Hugging Face rotate the two halves of each head.
- Gemma 2/3: every ``*norm.weight`` is stored as w + 1 (Gemma's RMSNorm multiplies by 1 + w).
- Gemma 2/3: facts llama.cpp does not store but fixes in code: the attention scale (head_dim, or
  d_model / heads for the 27B models: 46 and 62 layers), every 2nd (Gemma 2) or 6th (Gemma 3,
  unless ``attention.sliding_window_pattern`` says) layer global, Gemma 3's local RoPE base 10000
  (unless ``rope.freq_base_swa``), Gemma 2's soft-caps 50 and 30 when absent.
- Llama 3's ``llama3`` RoPE scaling is no metadata but a ``rope_freqs`` tensor of per-frequency
  divisors; the scaling parameters that give exactly those divisors are recovered, or refused.
- ``rope.scaling.*`` (linear, yarn) as llama.cpp applies it (a factor without a type is linear).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from convert.hf_layout import ConversionError, HFTensors, LazyTensors
from data.gguf_file import open_gguf as open_gguf_file

MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
               "gemma3": "gemma3_text"}
ARCHITECTURES = tuple(MODEL_TYPES)
GEMMA = ("gemma2", "gemma3")
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # llama3 RoPE scaling, read into the config
# a layer's tensor (without .weight/.bias) -> its Hugging Face module, for every architecture
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "block_sparse_moe.gate",
}
# the norms around the MLP, which the two layouts name differently
NORM_NAMES = {"ffn_norm": "post_attention_layernorm"}
GEMMA_NORM_NAMES = {"post_attention_norm": "post_attention_layernorm",
                    "ffn_norm": "pre_feedforward_layernorm",
                    "post_ffw_norm": "post_feedforward_layernorm"}
# llama.cpp stacks experts into one [E, ...] tensor; Hugging Face names each expert's matrix
EXPERT_NAMES = {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3", "ffn_down_exps.weight": "w2"}
LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
BIASED = ("attn_q", "attn_k", "attn_v")  # Qwen2's q/k/v biases
SWA_PERIOD = {"gemma2": 2, "gemma3": 6}  # every Nth layer global, as llama.cpp fixes it
LAYERS_OF_27B = {"gemma2": 46, "gemma3": 62}  # llama.cpp: these scale queries by d_model / heads
GEMMA3_LOCAL_THETA = 10000.0
GEMMA2_SOFTCAPS = (50.0, 30.0)  # llama.cpp's defaults of attn_/final_logit_softcapping
LLAMA3_DEFAULTS = (1.0, 4.0, 8192)  # low/high_freq_factor, original context: every Llama 3.x's
LOCAL, GLOBAL = "sliding_attention", "full_attention"


def open_gguf(path: str | Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path``, its header checked against the file's size
    (``data/gguf_file.py``); ConversionError if it is not a readable GGUF file."""
    try:
        return open_gguf_file(path)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value (numbers, strings, lists of them) or ``default`` when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


# ------------------------------------------------------------------------------------- metadata


def _architecture(reader: Any) -> str:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(f"unknown architecture {arch!r} in the GGUF file's general.architecture "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    return arch


def _dimensions(reader: Any, arch: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The sizes every family's config.json has."""
    def need(key: str) -> Any:
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise ConversionError(f"the GGUF file lacks {arch}.{key}")
        return value

    heads, d = int(need("attention.head_count")), int(need("embedding_length"))
    head_dim = int(field(reader, f"{arch}.attention.key_length", d // heads))
    rotary = int(field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ConversionError(f"{arch}.rope.dimension_count={rotary}: partial RoPE ({rotary} of "
                              f"{head_dim} dims) is not supported")
    embed = tensors.get("token_embd.weight")
    vocab = int(embed.shape[-1]) if embed is not None else int(
        field(reader, f"{arch}.vocab_size", len(field(reader, "tokenizer.ggml.tokens") or [])))
    return {
        "vocab_size": vocab, "hidden_size": d, "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim, "intermediate_size": int(need("feed_forward_length")),
        "max_position_embeddings": int(field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensors,
    }


def _rope_scaling(reader: Any, arch: str) -> dict[str, Any]:
    """``rope.scaling.*`` as Hugging Face rope parameters (without rope_theta), as llama.cpp reads
    them: a factor without a type is linear; yarn's attention factor is llama.cpp's
    yarn_attn_factor * attn_factor on top of its default 0.1 ln(factor) + 1."""
    def get(key: str, default: Any = None) -> Any:
        return field(reader, f"{arch}.rope.{key}", default)

    kind = get("scaling.type", "linear")
    factor = float(get("scaling.factor", 0.0) or get("scale_linear", 0.0) or 1.0)
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return {"rope_type": "default"}
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind != "yarn":
        raise ConversionError(f"{arch}.rope.scaling.type={kind!r} is not supported (none, linear, yarn)")
    for key, plain in (("scaling.yarn_ext_factor", 1.0), ("scaling.yarn_log_multiplier", 0.0)):
        if float(get(key, plain)) != plain:
            raise ConversionError(f"{arch}.rope.{key}={get(key)} is not supported (only {plain}, "
                                  "as Hugging Face's yarn computes)")
    out = {"rope_type": "yarn", "factor": factor,
           "beta_fast": float(get("scaling.yarn_beta_fast", 32.0)),
           "beta_slow": float(get("scaling.yarn_beta_slow", 1.0))}
    if (original := get("scaling.original_context_length")) is not None:
        out["original_max_position_embeddings"] = int(original)
    extra = float(get("scaling.yarn_attn_factor", 1.0)) * float(get("scaling.attn_factor", 1.0))
    if extra != 1.0:
        out["attention_factor"] = extra * (0.1 * math.log(factor) + 1.0)
    return out


def llama3_divisors(theta: float, head_dim: int, factor: float, low: float, high: float,
                    original: int) -> np.ndarray:
    """What llama.cpp's converter writes as ``rope_freqs`` for Llama 3 scaling: per frequency, the
    divisor transformers' ``llama3`` inv_freq applies (1 at high frequencies, ``factor`` at low
    ones, smoothly between)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))


def _llama3_rope(divisors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """The ``llama3`` parameters whose divisors are ``divisors`` (the ``rope_freqs`` tensor);
    ConversionError when no Llama 3.x parameters give them."""
    if divisors.shape != (head_dim // 2,):
        raise ConversionError(f"tensor {ROPE_FREQS} has shape {divisors.shape}, not ({head_dim // 2},)")
    if np.allclose(divisors, 1.0, rtol=0, atol=1e-6):
        return {"rope_type": "default"}
    factor = float(divisors.max())
    low, high, original = LLAMA3_DEFAULTS
    want = llama3_divisors(theta, head_dim, factor, low, high, original)
    if not np.allclose(divisors, want, rtol=1e-4, atol=0):
        raise ConversionError(f"tensor {ROPE_FREQS} holds RoPE divisors that Llama 3 scaling (factor "
                              f"{factor:g}, low_freq_factor {low:g}, high_freq_factor {high:g}, "
                              f"original context {original}) does not give: not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}


def _rope_parameters(reader: Any, arch: str, head_dim: int, tensors: Mapping[str, Any]) -> dict:
    """transformers 5's ``rope_parameters`` of the global layers."""
    theta = float(field(reader, f"{arch}.rope.freq_base", 10000.0))
    rope = _rope_scaling(reader, arch)
    if ROPE_FREQS in tensors:
        if arch != "llama" or rope["rope_type"] != "default":
            raise ConversionError(f"tensor {ROPE_FREQS} ({arch}, rope {rope['rope_type']}) is not "
                                  "supported: only a llama file's Llama 3 scaling")
        rope = _llama3_rope(dequantize(tensors[ROPE_FREQS]).astype(np.float64), theta, head_dim)
    return {**rope, "rope_theta": theta}


def _layer_types(reader: Any, arch: str, layers: int) -> list[str]:
    """Which layers are local (sliding window), as llama.cpp decides: Gemma 2 every 2nd layer
    global; Gemma 3 every 6th, or every Nth / per layer as attention.sliding_window_pattern says
    (llama.cpp: N = 0 makes every layer local)."""
    pattern = field(reader, f"{arch}.attention.sliding_window_pattern") if arch == "gemma3" else None
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ConversionError(f"{arch}.attention.sliding_window_pattern has {len(pattern)} "
                                  f"entries for {layers} layers")
        return [LOCAL if local else GLOBAL for local in pattern]
    every = SWA_PERIOD[arch] if pattern is None else int(pattern)
    return [LOCAL if every == 0 or (i + 1) % every else GLOBAL for i in range(layers)]


def _gemma_fields(reader: Any, arch: str, dims: Mapping[str, Any], rope: dict) -> dict[str, Any]:
    """Gemma's attention scale, soft-caps, local layers and (Gemma 3) local RoPE."""
    layers, heads = dims["num_hidden_layers"], dims["num_attention_heads"]
    big = layers == LAYERS_OF_27B[arch]
    window = int(field(reader, f"{arch}.attention.sliding_window", 4096 if arch == "gemma2" else 0))
    types = _layer_types(reader, arch, layers) if window > 0 else [GLOBAL] * layers
    caps = GEMMA2_SOFTCAPS if arch == "gemma2" else (None, None)
    attn_cap = field(reader, f"{arch}.attn_logit_softcapping", caps[0])
    final_cap = field(reader, f"{arch}.final_logit_softcapping", caps[1])
    out = {"hidden_activation": "gelu_pytorch_tanh",
           "query_pre_attn_scalar": dims["hidden_size"] // heads if big else dims["head_dim"],
           "sliding_window": window if LOCAL in types else None, "layer_types": types,
           "attn_logit_softcapping": float(attn_cap) if attn_cap else None,
           "final_logit_softcapping": float(final_cap) if final_cap else None,
           "rope_parameters": rope}
    if arch == "gemma3":  # scaling (linear) applies to the global layers only
        local = float(field(reader, f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_THETA))
        out["rope_parameters"] = {GLOBAL: rope, LOCAL: {"rope_type": "default", "rope_theta": local}}
    return out


def hf_config(reader: Any) -> dict[str, Any]:
    """A Hugging Face-style ``config.json`` (transformers 5's fields) for the model in a GGUF file."""
    arch = _architecture(reader)
    tensors = {t.name: t for t in reader.tensors}
    try:
        out: dict[str, Any] = {"model_type": MODEL_TYPES[arch],
                               **_dimensions(reader, arch, tensors)}
        rope = _rope_parameters(reader, arch, out["head_dim"], tensors)
        if arch in GEMMA:
            out.update(_gemma_fields(reader, arch, out, rope))
        else:
            out.update(hidden_act="silu", rope_parameters=rope)
        experts = int(field(reader, f"{arch}.expert_count", 0) or 0)
    except ConversionError:
        raise
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise ConversionError(f"the GGUF file's {arch} metadata is garbled ({e})") from None
    if arch in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    if experts and arch == "llama":
        out.update(model_type="mixtral", num_local_experts=experts,
                   num_experts_per_tok=int(field(reader, f"{arch}.expert_used_count", 0)))
        if f := field(reader, f"{arch}.expert_feed_forward_length"):
            out["intermediate_size"] = int(f)
    elif experts:
        raise ConversionError(f"{arch}.expert_count={experts}: mixture-of-experts {arch} files are "
                              "not supported")
    return out


# -------------------------------------------------------------------------------------- tensors


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row order: within each head, rows (0, H/2, 1, H/2+1, ...) back to
    (0, 1, ..., H-1), so RoPE's pairs are the two halves again (weights [rows, in] or biases)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor: Any) -> np.ndarray:
    """A GGUF tensor [rows, cols] (the Hugging Face [out, in] order): F32 and F16 as the file's
    own memory-mapped values (converted when they are placed), others dequantised to float32."""
    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    try:
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            values = np.asarray(tensor.data)
        else:
            values = gguf.quants.dequantize(tensor.data, kind)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise ConversionError(f"tensor {tensor.name} uses quantisation type {kind.name}, which "
                              f"meshlm cannot dequantise ({type(e).__name__})") from None
    return values.reshape(tuple(int(n) for n in reversed(tensor.shape.tolist())))


def _reader(tensor: Any, heads: int = 0, shift: float = 0.0) -> Callable[[], np.ndarray]:
    """Reads ``tensor`` when called: llama.cpp's Q/K row order undone for ``heads`` > 0, Gemma's
    norm offset (``shift``) taken off."""
    def read() -> np.ndarray:
        w = dequantize(tensor)
        if heads:
            w = unpermute(w, heads)
        return w - np.asarray(shift, w.dtype) if shift else w

    return read


def _expert_reader(tensor: Any, expert: int, last: dict[str, np.ndarray]) -> Callable[[], np.ndarray]:
    """Reads expert ``expert``'s matrix of a stacked [E, out, in] tensor, keeping only the last
    stack dequantised (``last``): the experts of one stack are read one after another."""
    def read() -> np.ndarray:
        if tensor.name not in last:
            last.clear()
            last[tensor.name] = dequantize(tensor)
        return last[tensor.name][expert]

    return read


def _layer_tensor(arch: str, part: str, kind: str, config: Mapping[str, Any]) -> tuple[str, int]:
    """(Hugging Face module name, heads to unpermute by) of layer tensor ``part`` ``kind``
    (weight or bias); ConversionError for one the architecture does not have."""
    names = {**LAYER_NAMES, **(GEMMA_NORM_NAMES if arch in GEMMA else NORM_NAMES)}
    if part not in names or (kind == "bias" and part not in BIASED):
        raise KeyError(part)
    if kind == "bias" and arch != "qwen2":
        raise ConversionError(f"tensor attn_q/k/v.bias: q/k/v biases are supported in qwen2 GGUF "
                              f"files only (meshlm's {arch} attention has none)")
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    return names[part], heads.get(part, 0) if arch == "llama" else 0


def hf_tensors(reader: Any, config: dict[str, Any]) -> HFTensors:
    """Every tensor of the GGUF file under its Hugging Face name, read (dequantised) when looked up."""
    arch = field(reader, "general.architecture")
    readers: dict[str, Callable[[], np.ndarray]] = {}
    last_stack: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = tensor.name
        shift = 1.0 if arch in GEMMA and name.endswith("norm.weight") else 0.0
        if name == ROPE_FREQS:
            continue  # read into the config (llama3 RoPE scaling)
        if name in GLOBAL_NAMES:
            readers[GLOBAL_NAMES[name]] = _reader(tensor, shift=shift)
            continue
        match = LAYER_PATTERN.fullmatch(name)
        try:
            if not match:
                raise KeyError(name)
            layer, part, kind = match.groups()
            prefix = f"model.layers.{int(layer)}."
            if f"{part}.{kind}" in EXPERT_NAMES and len(tensor.shape) == 3:
                for e in range(int(tensor.shape[-1])):
                    readers[f"{prefix}block_sparse_moe.experts.{e}.{EXPERT_NAMES[part + '.weight']}"
                            ".weight"] = _expert_reader(tensor, e, last_stack)
                continue
            module, heads = _layer_tensor(arch, part, kind, config)
        except KeyError:
            raise ConversionError(f"tensor {name} is not part of a {arch} GGUF file that meshlm "
                                  "reads") from None
        readers[f"{prefix}{module}.{kind}"] = _reader(tensor, heads, shift)
    return LazyTensors(readers)
