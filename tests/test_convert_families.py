"""Every supported Hugging Face family, both ways: a tiny random model built by transformers itself
(Llama 3.x RoPE scaling, Mistral's window, Qwen2's biases with yarn, Qwen3's QK norm with local and
global layers, Gemma 2's soft-caps and sandwich norms, Gemma 3's local RoPE base beside linearly
scaled global layers) imports with transformers' logits on prompts longer than the window, and
exported again loads in transformers with the same logits. What a config.json says that meshlm
cannot compute, or a meshlm config no family can say, is one error line naming the field."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import transformers

from tests.helpers import hf_logits, meshlm_logits, tiny_tokenizer
from tests.test_convert import INEXPRESSIBLE

ATOL = 1e-4  # whole model, float32
VOCAB, WINDOW = 320, 8
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 20)).astype(np.int32)  # > WINDOW
LOCAL, GLOBAL = "sliding_attention", "full_attention"
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False)
CASES = {  # name -> (transformers config class, its fields beyond COMMON)
    "llama3.2-rope-tied": ("LlamaConfig", dict(
        tie_word_embeddings=True, max_position_embeddings=256,
        rope_parameters=dict(rope_type="llama3", rope_theta=5000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral-window": ("MistralConfig", dict(
        sliding_window=WINDOW, rope_parameters=dict(rope_type="default", rope_theta=5000.0))),
    "qwen2.5-bias-yarn": ("Qwen2Config", dict(
        hidden_size=64, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=64))),
    "qwen3-qknorm-local-global": ("Qwen3Config", dict(
        head_dim=16, use_sliding_window=True, sliding_window=WINDOW, layer_types=[LOCAL, LOCAL, GLOBAL],
        rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "gemma2-softcap-window": ("Gemma2Config", dict(
        head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
        final_logit_softcapping=3.0, sliding_window=WINDOW, tie_word_embeddings=True)),
    "gemma3-local-global": ("Gemma3TextConfig", dict(
        head_dim=16, query_pre_attn_scalar=12, sliding_window=WINDOW, layer_types=[LOCAL, LOCAL, GLOBAL],
        rope_parameters={GLOBAL: dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
                         LOCAL: dict(rope_type="default", rope_theta=100.0)})),
}


def family_model(case: str):
    """The tiny random float32 model of ``case``, eager attention, every norm and bias randomised
    so that each matters (Gemma's (1 + w) norms start at w = 0, the others at 1)."""
    import torch

    torch.manual_seed(0)
    kind, fields = CASES[case]
    config = getattr(transformers, kind)(**{**COMMON, **fields})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.empty_like(p).uniform_(-0.5, 0.5))
    return model.float().eval()


@pytest.mark.parametrize("case", list(CASES))
def test_family_imports_with_transformers_logits_and_exports_back(eight_devices, tmp_path, case):
    from convert.checkpoints import import_checkpoint
    from convert.export import export_checkpoint

    model = family_model(case)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    tiny_tokenizer(src)
    # an end-of-turn id beside EOS (</s> = 2), as Gemma's [1, 106] or Llama 3's eot ids
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    want = hf_logits(model, TOKENS)

    run_dir = import_checkpoint(src, tmp_path / "run")
    imported = np.abs(meshlm_logits(run_dir, TOKENS) - want).max()
    out = export_checkpoint(run_dir, tmp_path / "exported")
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(again) is type(model)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [2, 1]
    round_trip = np.abs(hf_logits(again.float().eval(), TOKENS) - want).max()
    print(f"parity {case}: logits up to {np.abs(want).max():.1f}, max |diff| import "
          f"{imported:.2e}, round trip {round_trip:.2e}")
    assert imported <= ATOL and round_trip <= ATOL


# ------------------------------------------------------------------------ what cannot be said

BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2)
REFUSED = {  # (model_type, config.json fields) -> the field the error names
    "model_type": ("gpt2", {}),
    "vision_config": ("gemma3", dict(vision_config={"model_type": "siglip_vision_model"},
                                     text_config={})),
    "architectures": ("llama", dict(architectures=["LlamaForSequenceClassification"])),
    "rope_parameters.rope_type": ("llama", dict(rope_parameters=dict(rope_type="dynamic", factor=2.0))),
    "rope_scaling.rope_type": ("qwen2", dict(rope_scaling=dict(type="longrope", short_factor=[1.0]))),
    "partial_rotary_factor": ("llama", dict(partial_rotary_factor=0.5)),
    "rope_parameters.partial_rotary_factor": (
        "qwen3", dict(rope_parameters=dict(rope_type="default", partial_rotary_factor=0.5))),
    "attention_bias": ("llama", dict(attention_bias=True)),
    "mlp_bias": ("llama", dict(mlp_bias=True)),
    "hidden_act": ("mistral", dict(hidden_act="gelu")),
    "hidden_activation": ("gemma2", dict(hidden_activation="gelu")),
    "use_bidirectional_attention": ("gemma3_text", dict(use_bidirectional_attention=True)),
    "max_window_layers": ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "layer_types": ("gemma3_text", dict(layer_types=[GLOBAL, LOCAL, LOCAL])),
    "rope_parameters.sliding_attention": ("gemma3_text", dict(rope_parameters={
        GLOBAL: dict(rope_type="default", rope_theta=1e6),
        LOCAL: dict(rope_type="linear", factor=2.0, rope_theta=1e4)})),
}


@pytest.mark.parametrize("field", list(REFUSED))
def test_what_meshlm_cannot_compute_is_one_line_naming_the_field(field):
    from convert.hf_layout import ConversionError, model_config_from_hf

    kind, fields = REFUSED[field]
    with pytest.raises(ConversionError) as info:
        model_config_from_hf({**BASE, "model_type": kind, **copy.deepcopy(fields)})
    message = str(info.value)
    assert "\n" not in message and f" {field}" in message.split(":")[0], message


def test_refused_config_writes_nothing(tmp_path):
    """A Gemma 3 image-text checkpoint is refused before anything is read or written."""
    from convert.checkpoints import import_checkpoint
    from convert.hf_layout import ConversionError

    src = tiny_tokenizer(tmp_path / "hf")
    (src / "config.json").write_text(json.dumps({
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {**BASE, "model_type": "gemma3_text"}, "vision_config": {}}))
    with pytest.raises(ConversionError, match="^config.json vision_config: "):
        import_checkpoint(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_configs_as_published_read_as_transformers_reads_them():
    """Fields a config.json leaves out take the family's transformers defaults; Qwen2.5's window
    is off unless use_sliding_window; Mistral v0.1's window covers every layer and no longer
    shortens the context; a Gemma 3 config in the older form (rope_theta, rope_local_base_freq,
    rope_scaling on global layers, sliding_window_pattern) reads as the nested one."""
    from convert.hf_layout import model_config_from_hf

    qwen = model_config_from_hf({**BASE, "model_type": "qwen2", "use_sliding_window": False,
                                 "sliding_window": 131072, "max_window_layers": 21})
    assert (qwen.sliding_window, qwen.qkv_bias, qwen.tie_embeddings) == (0, True, False)
    mistral = model_config_from_hf({**BASE, "model_type": "mistral", "sliding_window": 4096,
                                    "max_position_embeddings": 32768})
    assert (mistral.sliding_window, mistral.sliding_window_pattern, mistral.max_seq_len) == (4096, 0, 32768)
    gemma = model_config_from_hf({**BASE, "model_type": "gemma3_text", "num_hidden_layers": 12,
                                  "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                  "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert (gemma.sliding_window, gemma.sliding_window_pattern, gemma.head_dim) == (4096, 6, 256)
    assert (gemma.rope_theta, gemma.rope_scaling, gemma.rope_scaling_factor) == (1e6, "linear", 8.0)
    assert (gemma.rope_local_theta, gemma.query_pre_attn_scalar, gemma.final_logit_softcap) == (1e4, 256, 0)
    assert gemma.norm_plus_one and gemma.post_norms and gemma.embed_scale and gemma.qk_norm


MESHLM = dict(vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48)
GEMMA = dict(MESHLM, norm_plus_one=True, post_norms=True, embed_scale=True, activation="geglu")
UNSAYABLE = {  # a meshlm config no Hugging Face family says -> the key the error names
    "qkv_bias": dict(MESHLM, qk_norm=True, qkv_bias=True),
    "activation": dict(MESHLM, norm_plus_one=True, post_norms=True, embed_scale=True),
    "post_norms": dict(MESHLM, qk_norm=True, post_norms=True),
    "attn_logit_softcap": dict(MESHLM, qkv_bias=True, attn_logit_softcap=5.0),
    "sliding_window_pattern": dict(MESHLM, sliding_window=8, sliding_window_pattern=3),
    "rope_local_theta": dict(GEMMA, sliding_window=8, sliding_window_pattern=3, rope_local_theta=100.0),
}


@pytest.mark.parametrize("key, fields", [(k, f) for k, f in INEXPRESSIBLE.items()] +
                         [(k, f) for k, f in UNSAYABLE.items()],
                         ids=[f"mixtral-{k}" for k in INEXPRESSIBLE] + list(UNSAYABLE))
def test_export_refuses_what_no_family_says(key, fields):
    from convert.hf_layout import ConversionError, hf_config_from_model
    from model.config import ModelConfig

    cfg = ModelConfig(**fields)
    assert not cfg.problems()
    with pytest.raises(ConversionError, match=rf"^model\.{key}=") as info:
        hf_config_from_model(cfg)
    assert "\n" not in str(info.value)


def test_export_family_follows_the_documented_rule():
    from convert.hf_layout import hf_config_from_model
    from model.config import ModelConfig

    want = {"llama": MESHLM, "mistral": dict(MESHLM, sliding_window=8),
            "qwen2": dict(MESHLM, qkv_bias=True, sliding_window=8, sliding_window_pattern=3),
            "qwen3": dict(MESHLM, qk_norm=True), "gemma2": GEMMA,
            "gemma3_text": dict(GEMMA, qk_norm=True, sliding_window=8, sliding_window_pattern=3,
                                rope_local_theta=100.0)}
    for family, keys in want.items():
        hf = hf_config_from_model(ModelConfig(**keys))
        assert hf["model_type"] == family, (family, hf["model_type"])
