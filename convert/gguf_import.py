"""Reading Llama-family GGUF files (llama.cpp's format) as Hugging Face-layout tensors: metadata to a
Hugging Face-style config, tensor names to Hugging Face names, each tensor read (quantised ones
dequantised with the ``gguf`` package) only when the import places it, and llama.cpp's row
permutation of the Q and K projections undone (its converter reorders each head's rows so that
RoPE rotates interleaved pairs; meshlm and Hugging Face rotate the two halves of each head).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from convert.hf_layout import ConversionError, HFTensors, LazyTensors
from data.gguf_file import open_gguf as open_gguf_file

ARCHITECTURES = ("llama",)
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
}
# llama.cpp stacks experts into one [E, ...] tensor; Hugging Face names each expert's matrix
EXPERT_NAMES = {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3", "ffn_down_exps.weight": "w2"}
LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")


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


def hf_config(reader: Any) -> dict[str, Any]:
    """A Hugging Face-style ``config.json`` for the model in a GGUF file."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(f"unknown architecture {arch!r} in the GGUF file (supported: "
                              f"{', '.join(ARCHITECTURES)})")

    def need(key: str) -> Any:
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise ConversionError(f"the GGUF file lacks {arch}.{key}")
        return value

    heads = int(need("attention.head_count"))
    d = int(need("embedding_length"))
    head_dim = int(field(reader, f"{arch}.attention.key_length", d // heads))
    rotary = int(field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ConversionError(f"partial RoPE ({rotary} of {head_dim} dims) is not supported")
    if field(reader, f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise ConversionError("RoPE scaling is not supported (only plain RoPE)")
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    experts = int(field(reader, f"{arch}.expert_count", 0) or 0)
    names = {t.name for t in reader.tensors}
    out: dict[str, Any] = {
        "model_type": "mixtral" if experts else "llama",
        "vocab_size": int(field(reader, f"{arch}.vocab_size", len(tokens))),
        "hidden_size": d, "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim, "intermediate_size": int(need("feed_forward_length")),
        "max_position_embeddings": int(field(reader, f"{arch}.context_length", 2048)),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if experts:
        out.update(num_local_experts=experts,
                   num_experts_per_tok=int(need("expert_used_count")))
        if f := field(reader, f"{arch}.expert_feed_forward_length"):
            out["intermediate_size"] = int(f)
    return out


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row order: within each head, rows (0, H/2, 1, H/2+1, ...) back to
    (0, 1, ..., H-1), so RoPE's pairs are the two halves again."""
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


def _reader(tensor: Any, heads: int = 0) -> Callable[[], np.ndarray]:
    """Reads ``tensor`` when called, with llama.cpp's Q/K row order undone for ``heads`` > 0."""
    return lambda: unpermute(dequantize(tensor), heads) if heads else dequantize(tensor)


def _expert_reader(tensor: Any, expert: int, last: dict[str, np.ndarray]) -> Callable[[], np.ndarray]:
    """Reads expert ``expert``'s matrix of a stacked [E, out, in] tensor, keeping only the last
    stack dequantised (``last``): the experts of one stack are read one after another."""
    def read() -> np.ndarray:
        if tensor.name not in last:
            last.clear()
            last[tensor.name] = dequantize(tensor)
        return last[tensor.name][expert]

    return read


def hf_tensors(reader: Any, config: dict[str, Any]) -> HFTensors:
    """Every tensor of the GGUF file under its Hugging Face name, read (dequantised) when looked up."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    readers: dict[str, Callable[[], np.ndarray]] = {}
    last_stack: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name in GLOBAL_NAMES:
            readers[GLOBAL_NAMES[name]] = _reader(tensor)
            continue
        match = LAYER_PATTERN.fullmatch(name)
        if not match:
            raise ConversionError(f"tensor {name} is not part of a Llama-family GGUF file")
        layer, part = match.groups()
        prefix = f"model.layers.{int(layer)}."
        if part in EXPERT_NAMES:
            for e in range(int(tensor.shape[-1]) if len(tensor.shape) == 3 else 0):
                readers[f"{prefix}block_sparse_moe.experts.{e}.{EXPERT_NAMES[part]}.weight"] = \
                    _expert_reader(tensor, e, last_stack)
        elif part in LAYER_NAMES:
            permuted = {"attn_q.weight": heads, "attn_k.weight": kv_heads}.get(part, 0)
            readers[prefix + LAYER_NAMES[part]] = _reader(tensor, permuted)
        else:
            raise ConversionError(f"tensor {name} is not part of a Llama-family GGUF file")
    return LazyTensors(readers)
