"""GGUF import of the ``llama`` (with Llama 3 RoPE scaling), ``qwen2``, ``qwen3``, ``gemma2`` and
``gemma3`` architectures. A tiny random transformers model is written as llama.cpp's
``convert_hf_to_gguf.py`` writes it: gguf's own tensor-name table, the Q/K row permutation (llama
only), Gemma's norms stored as w + 1, Llama 3 scaling as a ``rope_freqs`` tensor, the metadata keys
llama.cpp reads. transformers' own GGUF loader, an independent reader of the same conventions, then
loads it with the original's logits (where it ignores a feature, with the original's tensors), and
meshlm's import gives the original's logits on prompts longer than the sliding window. Metadata
that cannot be expressed is one ConversionError line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import hf_logits, meshlm_logits, tiny_tokenizer

ATOL = 1e-4  # whole model, float32
VOCAB = 320
# long enough for Llama 3 scaling, which only touches wavelengths past 2048 positions, to matter
TOKENS = np.random.default_rng(0).integers(0, 300, (1, 128)).astype(np.int32)  # window: 4
ARCH_ENUM = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "gemma2": "GEMMA2",
             "gemma3": "GEMMA3"}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


CLASSES = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "gemma2": transformers.Gemma2Config,
           "gemma3": transformers.Gemma3TextConfig}
_GEMMA = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
              sliding_window=4)
DEFAULTS = {"llama": dict(rope_parameters=LLAMA3_ROPE), "qwen2": dict(rope_theta=5000.0),
            "qwen3": dict(head_dim=128, rope_theta=5000.0), "gemma2": _GEMMA,
            "gemma3": dict(_GEMMA, num_hidden_layers=6)}


def family_model(arch: str, **overrides):
    """A random tiny transformers model of GGUF architecture ``arch``, float32, eager attention.
    Gemma's head_dim and query_pre_attn_scalar are 256 and its local RoPE base 10000, Qwen3's
    head_dim 128, as transformers' GGUF loader assumes (it does not read them; llama.cpp computes
    the attention scale from head_dim)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5)
    config = CLASSES[arch](**{**common, **DEFAULTS[arch], **overrides})
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at 1 (Gemma: 0), biases at 0, scores near 0: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5) if arch.startswith("gemma") else p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(16)
    return model.eval()


def permute_like_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter row order for llama's Q/K: each head's halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """``rope_freqs`` as llama.cpp's converter computes it (LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = 8192  # llama.cpp reads a top-level original_max_position_embeddings, default 8192
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def add_tokenizer(w, tokenizer_dir: Path, chat_template: str | None = None,
                  controls: tuple[str, ...] = ()) -> None:
    """The tiny byte-level BPE tokenizer as GGUF metadata ("gpt2"), ``controls`` appended as
    control tokens, unused ones up to VOCAB."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    for token in controls:
        vocab[token] = len(vocab)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"] for t in spec["added_tokens"]} | set(controls)
    types = [3 if t in specials else 1 for t in tokens]
    pad = range(len(tokens), VOCAB)  # as llama.cpp pads the list to the embedding's rows
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens + [f"[PAD{i}]" for i in pad])
    w.add_token_types(types + [5] * len(pad))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab[controls[-1]] if controls else vocab["</s>"])
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


def add_metadata(w, arch: str, c, extra: dict) -> None:
    """The hyperparameters as llama.cpp's converter writes them for ``arch``."""
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None)
    if head_dim:  # convert_hf_to_gguf.py: when config.json has one
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if arch == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(head_dim or c.hidden_size // c.num_attention_heads)
    if arch.startswith("gemma"):
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    for key, value in extra.items():  # newer converters' keys
        getattr(w, f"add_{key}")(value)


def write_gguf(path: Path, model, arch: str, tokenizer_dir: Path, extra: dict | None = None,
               chat_template: str | None = None, controls: tuple[str, ...] = ()) -> Path:
    """``model`` as llama.cpp's converter writes a GGUF file of ``arch`` (float32 tensors)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    add_metadata(w, arch, c, extra or {})
    add_tokenizer(w, tokenizer_dir, chat_template, controls)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCH_ENUM[arch]), c.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().float().numpy()
        module, suffix = hf_name.rsplit(".", 1)
        gg_name = f"{names.get_name(module)}.{suffix}"
        if arch == "llama" and module.endswith(("q_proj", "k_proj")):
            a = permute_like_llama_cpp(a, c.num_attention_heads if module.endswith("q_proj")
                                       else c.num_key_value_heads)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            a = a + 1  # llama.cpp: Gemma's RMSNorm multiplies by 1 + w
        w.add_tensor(gg_name, np.ascontiguousarray(a))
    if c.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(c.rope_parameters, c.head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# (GGUF architecture, config overrides, newer converters' metadata, whether transformers' loader
# computes the same model: it ignores rope_freqs, rope.freq_base_swa, sliding_window_pattern)
GEMMA3_NEWER = dict(
    num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}})
CASES = {
    "llama-rope-llama3-untied": ("llama", dict(tie_word_embeddings=False), {}, False),
    "qwen2-qkv-bias": ("qwen2", dict(tie_word_embeddings=False), {}, True),
    "qwen3-qk-norm-tied": ("qwen3", dict(tie_word_embeddings=True), {}, True),
    "gemma2-softcaps": ("gemma2", {}, {}, True),
    "gemma3-six-layers": ("gemma3", {}, {}, True),
    "gemma3-newer-metadata": ("gemma3", GEMMA3_NEWER, dict(
        rope_freq_base_swa=20000.0, rope_scaling_type=gguf.RopeScalingType.LINEAR,
        rope_scaling_factor=2.0, sliding_window_pattern=[True, False, True]), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_family_imports_like_transformers(eight_devices, tmp_path, case):
    from convert.checkpoints import import_checkpoint

    arch, overrides, extra, transformers_reads_all = CASES[case]
    model = family_model(arch, **overrides)
    path = write_gguf(tmp_path / f"{arch}.gguf", model, arch, tiny_tokenizer(tmp_path / "tok"), extra)
    want = hf_logits(model, TOKENS)

    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    if transformers_reads_all:  # the test's writer agrees with an independent reader
        np.testing.assert_allclose(hf_logits(theirs, TOKENS), want, atol=ATOL, rtol=0)
    else:  # it reads the same tensors
        for name, t in model.state_dict().items():
            torch.testing.assert_close(theirs.state_dict()[name], t, atol=1e-6, rtol=0)

    ours = meshlm_logits(import_checkpoint(path, tmp_path / "run"), TOKENS)
    print(f"GGUF {case}: max |meshlm - transformers| = {np.abs(ours - want).max():.2e}")
    np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)


# -------------------------------------------------------------------- metadata alone, no model


def config_of(tmp_path: Path, arch: str = "llama", layers: int = 1, tensors: dict | None = None,
              **metadata) -> dict:
    """``hf_config`` of a GGUF file holding ``metadata`` (gguf writer method -> value, or a raw
    key -> value) and ``tensors`` (default: an embedding) beside the keys every file has."""
    from convert.gguf_import import hf_config, open_gguf

    w = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), arch)
    w.add_block_count(layers)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_feed_forward_length(16)
    w.add_layer_norm_rms_eps(1e-6)
    for key, value in metadata.items():
        if "." in key:
            (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
        else:
            getattr(w, f"add_{key}")(value)
    for name, a in (tensors or {"token_embd.weight": np.zeros((16, 8), np.float32)}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf_config(open_gguf(tmp_path / "meta.gguf"))


def test_gguf_metadata_maps_to_transformers_fields(tmp_path):
    yarn = config_of(tmp_path, "qwen2", rope_freq_base=1e6, rope_scaling_type=gguf.RopeScalingType.YARN,
                     rope_scaling_factor=4.0, rope_scaling_orig_ctx_len=32768)
    assert yarn["rope_parameters"] == {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                       "beta_slow": 1.0, "original_max_position_embeddings": 32768,
                                       "rope_theta": 1e6}
    old_key = config_of(tmp_path, **{"llama.rope.scale_linear": 2.0})  # a factor alone is linear
    assert old_key["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    big = config_of(tmp_path, "gemma3", layers=62, sliding_window=512)  # 27B: d_model / heads
    assert (big["query_pre_attn_scalar"], big["vocab_size"], big["tie_word_embeddings"]) == (4, 16, True)
    assert big["layer_types"][4:6] == ["sliding_attention", "full_attention"]
    assert big["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    gemma2 = config_of(tmp_path, "gemma2", key_length=16)
    assert (gemma2["attn_logit_softcapping"], gemma2["final_logit_softcapping"],
            gemma2["query_pre_attn_scalar"], gemma2["sliding_window"]) == (50.0, 30.0, 16, 4096)
    no_window = config_of(tmp_path, "gemma3")  # newer llama.cpp: no window, every layer global
    assert no_window["sliding_window"] is None and no_window["layer_types"] == ["full_attention"]


REFUSED = {
    "unknown architecture 'phi3'": dict(arch="phi3"),
    "rope.scaling.type='longrope'": dict(rope_scaling_type=gguf.RopeScalingType.LONGROPE),
    "yarn_ext_factor=0.5": dict(rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0,
                                rope_scaling_yarn_ext_factor=0.5),
    "partial RoPE": dict(rope_dimension_count=2),
    "rope_freqs.weight holds RoPE divisors": dict(tensors={
        "token_embd.weight": np.zeros((16, 8), np.float32),
        "rope_freqs.weight": np.array([1.0, 3.0], np.float32)}),
    "rope_freqs.weight \\(qwen2": dict(arch="qwen2", tensors={
        "token_embd.weight": np.zeros((16, 8), np.float32),
        "rope_freqs.weight": np.ones(2, np.float32)}),
    "sliding_window_pattern has 2 entries for 1 layers": dict(
        arch="gemma3", sliding_window=4, sliding_window_pattern=[True, False]),
    "mixture-of-experts qwen3": dict(arch="qwen3", expert_count=8),
}


@pytest.mark.parametrize("message", list(REFUSED))
def test_gguf_metadata_meshlm_cannot_express_is_one_line(tmp_path, message):
    from convert.hf_layout import ConversionError

    with pytest.raises(ConversionError, match=message) as e:
        config_of(tmp_path, **REFUSED[message])
    assert "\n" not in str(e.value)


def test_gguf_biases_outside_qwen2_are_refused(tmp_path):
    from convert.gguf_import import hf_config, hf_tensors, open_gguf
    from convert.hf_layout import ConversionError

    biased = family_model("qwen2")  # its q/k/v biases written into a qwen3 file
    reader = open_gguf(write_gguf(tmp_path / "q.gguf", biased, "qwen3", tiny_tokenizer(tmp_path / "tok")))
    with pytest.raises(ConversionError, match="q/k/v biases are supported in qwen2 GGUF files only"):
        hf_tensors(reader, hf_config(reader))
