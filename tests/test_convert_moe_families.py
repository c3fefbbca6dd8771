"""Qwen3-MoE and DeepSeek-V3 both ways: tiny random models built by transformers itself (dense
first layers, MoE groups, 8-16 experts, softmax and sigmoid routers, group-limited routing with
DeepSeek's selection bias, shared experts, latent attention with and without a query rank,
interleaved and half-split rope rows, yarn's mscale) import with transformers' logits, exported
again load in transformers with the same logits, and import again to the same parameters.
DeepSeek's multi-token-prediction layer, which transformers' model does not run, is left out of an
import unless ``model.mtp_depth`` asks for it, and then written back as it came. What a
config.json says that meshlm cannot compute, or a meshlm MoE config no family can say, is one
error line naming the field."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import transformers

from tests.helpers import hf_logits, meshlm_logits, tiny_tokenizer

ATOL = 1e-4  # whole model, float32
VOCAB = 320
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 20)).astype(np.int32)
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
              max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.2,
              tie_word_embeddings=False)
QWEN = dict(num_key_value_heads=2, head_dim=16, moe_intermediate_size=16,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0))
DEEPSEEK = dict(num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=16,
                num_experts_per_tok=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=12)
CASES = {  # name -> (transformers config class, its fields beyond COMMON)
    # DeepSeek cases: the checkpoint also holds an MTP layer, imported (model.mtp_depth=1) by the
    # first, left out by the second
    # layers 0, 1, 3 dense, 2 and 4 MoE: first_dense_layers=1, moe_every=2
    "qwen3-moe-dense-first-groups": ("Qwen3MoeConfig", dict(
        QWEN, num_hidden_layers=5, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0, 1, 3],
        norm_topk_prob=True)),
    "qwen3-moe-unnormalized-window-tied": ("Qwen3MoeConfig", dict(
        QWEN, num_hidden_layers=3, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
        use_sliding_window=True, sliding_window=8, tie_word_embeddings=True)),
    "deepseek-v3-groups-yarn-qlora": ("DeepseekV3Config", dict(
        DEEPSEEK, num_hidden_layers=4, first_k_dense_replace=1, n_shared_experts=2, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=24,
        max_position_embeddings=256, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
            mscale=1.0, mscale_all_dim=0.7, beta_fast=32.0, beta_slow=1.0))),
    "deepseek-v3-full-query-halves-unnormalized": ("DeepseekV3Config", dict(
        DEEPSEEK, num_hidden_layers=3, first_k_dense_replace=1, n_shared_experts=1, n_group=1,
        topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False, q_lora_rank=None,
        rope_interleave=False, tie_word_embeddings=True)),
}


def moe_model(case: str):
    """The tiny random float32 model of ``case``, eager attention, every norm and DeepSeek's
    selection bias randomised so that each matters (norms start at 1, the bias at 0)."""
    import torch

    torch.manual_seed(0)
    kind, fields = CASES[case]
    config = getattr(transformers, kind)(**{**COMMON, **copy.deepcopy(fields)})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("norm.weight"):
                p.add_(torch.empty_like(p).uniform_(-0.5, 0.5))
            elif name.endswith("e_score_correction_bias"):
                p.uniform_(-0.3, 0.3)
    return model.float().eval()


def add_mtp_layer(src, model) -> dict[str, np.ndarray]:
    """An MTP layer appended to the checkpoint in DeepSeek's layout (model.layers.{L}: enorm,
    hnorm, eh_proj, shared_head.norm, a copy of the last (MoE) layer's tensors, and copies of
    the embedding and head), in a file of its own; returns its tensors."""
    from safetensors.numpy import load_file, save_file

    saved, c = load_file(str(src / "model.safetensors")), model.config
    last, mtp = f"model.layers.{c.num_hidden_layers - 1}.", f"model.layers.{c.num_hidden_layers}."
    rng, d = np.random.default_rng(1), c.hidden_size
    out = {mtp + name[len(last):]: value for name, value in saved.items() if name.startswith(last)}
    out |= {mtp + "enorm.weight": rng.uniform(0.5, 1.5, d), mtp + "hnorm.weight": rng.uniform(0.5, 1.5, d),
            mtp + "shared_head.norm.weight": rng.uniform(0.5, 1.5, d),
            mtp + "eh_proj.weight": rng.normal(0, 0.2, (d, 2 * d)),
            mtp + "embed_tokens.weight": saved["model.embed_tokens.weight"],
            mtp + "shared_head.head.weight": saved.get("lm_head.weight",
                                                       saved["model.embed_tokens.weight"])}
    out = {name: np.asarray(value, np.float32) for name, value in out.items()}
    save_file(out, str(src / "mtp.safetensors"))
    return out


def _params(run_dir) -> dict:
    from flax import nnx

    from inference.load import load_run

    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(load_run(run_dir).params)}


@pytest.mark.parametrize("case", list(CASES))
def test_moe_family_imports_with_transformers_logits_and_round_trips(eight_devices, tmp_path, case):
    from convert.checkpoints import import_checkpoint
    from convert.export import export_checkpoint

    model = moe_model(case)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    tiny_tokenizer(src)
    want = hf_logits(model, TOKENS)
    mtp = add_mtp_layer(src, model) if case.startswith("deepseek") else {}
    overrides = ["model.mtp_depth=1"] if case == "deepseek-v3-groups-yarn-qlora" else []

    run_dir = import_checkpoint(src, tmp_path / "run", overrides=overrides)
    imported = np.abs(meshlm_logits(run_dir, TOKENS) - want).max()
    out = export_checkpoint(run_dir, tmp_path / "exported")
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(again) is type(model)
    round_trip = np.abs(hf_logits(again.float().eval(), TOKENS) - want).max()
    print(f"parity {case}: logits up to {np.abs(want).max():.1f}, max |diff| import "
          f"{imported:.2e}, round trip {round_trip:.2e}")
    assert imported <= ATOL and round_trip <= ATOL
    first = _params(run_dir)
    second = _params(import_checkpoint(out, tmp_path / "again", overrides=overrides))
    assert first.keys() == second.keys()
    for path, value in first.items():
        np.testing.assert_array_equal(second[path], value, err_msg=str(path))
    assert any(path[0] == "mtp" for path in first) == bool(overrides)
    from safetensors.numpy import load_file

    written = load_file(str(out / "model.safetensors"))
    assert {n for n in written if n.startswith(f"model.layers.{model.config.num_hidden_layers}.")} == (
        set(mtp) if overrides else set())
    for name, value in mtp.items() if overrides else ():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    if case == "deepseek-v3-full-query-halves-unnormalized":  # the selection bias stays float32
        from convert.safetensors_io import read_header

        bf16 = export_checkpoint(run_dir, tmp_path / "bf16", dtype="bfloat16")
        dtypes = {name: e.dtype.name for name, e in read_header(bf16 / "model.safetensors").items()}
        assert {d for n, d in dtypes.items() if n.endswith("e_score_correction_bias")} == {"float32"}
        assert {d for n, d in dtypes.items() if not n.endswith("e_score_correction_bias")} == {"bfloat16"}


# ---------------------------------------------------------------- config.json as published

QWEN3_30B_A3B = dict(  # Qwen/Qwen3-30B-A3B's config.json (the fields read)
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
    intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
    rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=False, attention_bias=False,
    use_sliding_window=False, sliding_window=None, max_window_layers=48, decoder_sparse_step=1,
    moe_intermediate_size=768, num_experts_per_tok=8, num_experts=128, norm_topk_prob=True,
    router_aux_loss_coef=0.001, mlp_only_layers=[], torch_dtype="bfloat16")
DEEPSEEK_V3 = dict(  # deepseek-ai/DeepSeek-V3's config.json (its fp8 quantization_config left out)
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280,
    hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_nextn_predict_layers=1, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
    n_routed_experts=256, ep_size=1, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
    qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8,
    topk_group=4, num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3,
    norm_topk_prob=True, scoring_func="sigmoid", aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu",
    max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000, tie_word_embeddings=False,
    rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                      original_max_position_embeddings=4096, type="yarn"),
    attention_bias=False, torch_dtype="bfloat16")


def test_published_configs_read_as_transformers_reads_them_and_write_back():
    """Qwen3-30B-A3B and DeepSeek-V3 as published: every layer MoE after DeepSeek's three dense
    ones, the routers, MLA's dimensions, yarn's mscale_all_dim as the softmax scale's
    query_pre_attn_scalar; written back and read again, the same architecture."""
    import math

    from convert.hf_layout import hf_config_from_model, model_config_from_hf

    qwen = model_config_from_hf(QWEN3_30B_A3B)
    assert (qwen.num_experts, qwen.experts_per_token, qwen.expert_mlp_dim) == (128, 8, 768)
    assert (qwen.first_dense_layers, qwen.moe_every, qwen.router_mode) == (0, 1, "softmax_topk")
    assert qwen.qk_norm and qwen.moe_impl == "dropless" and qwen.num_shared_experts == 0
    deepseek = model_config_from_hf(DEEPSEEK_V3)
    assert (deepseek.attention_type, deepseek.q_lora_rank, deepseek.kv_lora_rank) == ("mla", 1536, 512)
    assert (deepseek.qk_nope_head_dim, deepseek.qk_rope_head_dim, deepseek.v_head_dim) == (128, 64, 128)
    assert (deepseek.first_dense_layers, deepseek.num_experts, deepseek.num_shared_experts) == (3, 256, 1)
    assert (deepseek.router_mode, deepseek.router_groups, deepseek.router_topk_groups) == (
        "sigmoid_topk", 8, 4)
    assert (deepseek.routed_scaling_factor, deepseek.router_bias_rate, deepseek.seq_aux_loss_coef) == (
        2.5, 0.001, 0.001)
    mscale = 0.1 * math.log(40) + 1
    assert math.isclose(deepseek.query_pre_attn_scalar ** -0.5, 192 ** -0.5 * mscale**2)
    assert (deepseek.rope_scaling, deepseek.rope_scaling_factor, deepseek.rope_attention_factor) == (
        "yarn", 40, 1.0)
    assert deepseek.mtp_depth == 0  # the MTP layer is imported only when asked for
    for cfg in (qwen, deepseek):
        again = model_config_from_hf(hf_config_from_model(cfg))
        assert dataclasses_equal(again, cfg, rel=1e-12)


def dataclasses_equal(a, b, rel: float) -> bool:
    import dataclasses
    import math

    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        same = math.isclose(x, y, rel_tol=rel) if isinstance(x, float) else x == y
        assert same, (field.name, x, y)
    return True


@pytest.mark.parametrize("dense, step, want", [
    ([], 1, (0, 1)), ([0, 1], 1, (2, 1)), ([], 2, (0, 2)), ([0, 2], 1, (0, 2)), ([0, 1], 2, (3, 1)),
    ([1], 1, None), ([0, 1, 3], 1, None), ([], 3, None), ([0, 1, 2, 3], 1, "dense")])
def test_qwen3_moe_layer_pattern_maps_onto_first_dense_layers_and_moe_every(dense, step, want):
    """Layer i is MoE unless in mlp_only_layers, when (i + 1) % decoder_sparse_step == 0 (4
    layers): the pattern is first_dense_layers, moe_every; one they cannot give is refused, naming
    the field; written back, it lists the dense layers."""
    from convert.hf_layout import ConversionError, hf_config_from_model, model_config_from_hf

    hf = {**QWEN3_30B_A3B, "num_hidden_layers": 4, "mlp_only_layers": dense, "decoder_sparse_step": step}
    if want is None:
        field = "mlp_only_layers" if dense else "decoder_sparse_step"
        with pytest.raises(ConversionError, match=rf"^config.json {field}="):
            model_config_from_hf(hf)
        return
    cfg = model_config_from_hf(hf)
    if want == "dense":
        assert cfg.num_experts == 0
        return
    assert (cfg.first_dense_layers, cfg.moe_every) == want
    moe = [i for i in range(4) if i not in dense and (i + 1) % step == 0]
    assert cfg.moe_layer_indices == moe
    assert hf_config_from_model(cfg)["mlp_only_layers"] == [i for i in range(4) if i not in moe]


REFUSED = {  # (published config, its fields changed) -> the field the error names
    "qwen-attention_bias": (QWEN3_30B_A3B, dict(attention_bias=True)),
    "quantization_config": (DEEPSEEK_V3, dict(quantization_config=dict(quant_method="fp8"))),
    "attention_bias": (DEEPSEEK_V3, dict(attention_bias=True)),
    "rms_norm_eps": (DEEPSEEK_V3, dict(rms_norm_eps=1e-5)),
    "scoring_func": (DEEPSEEK_V3, dict(scoring_func="softmax")),
    "topk_method": (DEEPSEEK_V3, dict(topk_method="greedy")),
    "moe_layer_freq": (DEEPSEEK_V3, dict(moe_layer_freq=2)),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_meshlm_cannot_compute_is_one_line_naming_the_field(case):
    from convert.hf_layout import ConversionError, model_config_from_hf

    base, fields = REFUSED[case]
    field = case.split("-")[-1]
    with pytest.raises(ConversionError, match=rf"^config.json {field}=") as info:
        model_config_from_hf({**base, **fields})
    assert "\n" not in str(info.value)


QWEN_MOE = dict(vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48,
                num_experts=8, experts_per_token=2, expert_mlp_dim=16, qk_norm=True)
MLA = dict(QWEN_MOE, qk_norm=False, attention_type="mla", kv_lora_rank=16, qk_rope_head_dim=8,
           qk_nope_head_dim=8, router_mode="sigmoid_topk", num_shared_experts=1)
UNSAYABLE = {  # a meshlm MoE config no Hugging Face family says -> the key the error names
    "qwen-router_mode": dict(QWEN_MOE, router_mode="sigmoid_topk"),
    "mixtral-router_mode": dict(QWEN_MOE, qk_norm=False, router_mode="sigmoid_topk_unnormalized"),
    "qwen-num_shared_experts": dict(QWEN_MOE, num_shared_experts=1),
    "qwen-router_groups": dict(QWEN_MOE, router_groups=2),
    "qwen-routed_scaling_factor": dict(QWEN_MOE, routed_scaling_factor=2.0),
    "qwen-router_bias_rate": dict(QWEN_MOE, router_bias_rate=0.001),
    "qwen-mtp_depth": dict(QWEN_MOE, mtp_depth=1),
    "qwen-sliding_window_pattern": dict(QWEN_MOE, sliding_window=8, sliding_window_pattern=3),
    "deepseek-router_mode": dict(MLA, router_mode="softmax_topk"),
    "deepseek-moe_every": dict(MLA, moe_every=3),
    "deepseek-num_shared_experts": dict(MLA, num_shared_experts=0),
    "deepseek-query_pre_attn_scalar": dict(MLA, query_pre_attn_scalar=10.0),
    "deepseek-sliding_window": dict(MLA, sliding_window=8),
    "deepseek-norm_eps": dict(MLA, norm_eps=1e-5),
    "deepseek-post_norms": dict(MLA, post_norms=True),
}


@pytest.mark.parametrize("case", list(UNSAYABLE))
def test_export_refuses_what_no_moe_family_says(case):
    from convert.hf_layout import ConversionError, hf_config_from_model
    from model.config import ModelConfig

    cfg = ModelConfig(**UNSAYABLE[case])
    assert not cfg.problems()
    with pytest.raises(ConversionError, match=rf"^model\.{case.split('-')[-1]}=") as info:
        hf_config_from_model(cfg)
    assert "\n" not in str(info.value)


def test_moe_export_family_follows_the_documented_rule():
    """mla -> deepseek_v3 (also dense: every layer before first_k_dense_replace); MoE with qk_norm
    -> qwen3_moe, without -> mixtral."""
    from convert.hf_layout import hf_config_from_model, model_config_from_hf
    from model.config import ModelConfig

    dense_mla = {k: v for k, v in MLA.items() if k not in ("num_experts", "router_mode")}
    want = {"qwen3_moe": QWEN_MOE, "mixtral": dict(QWEN_MOE, qk_norm=False), "deepseek_v3": MLA,
            "deepseek_v3 ": dense_mla}
    for family, keys in want.items():
        hf = hf_config_from_model(ModelConfig(**keys))
        assert hf["model_type"] == family.strip(), (family, hf["model_type"])
    hf = hf_config_from_model(ModelConfig(**dense_mla))
    assert hf["first_k_dense_replace"] == 3 and model_config_from_hf(hf).num_experts == 0


def test_deepseek_export_of_a_model_without_selection_bias_writes_zeros():
    """A sigmoid-routed MLA model trained without aux-loss-free balancing (no router_bias_e)
    exports DeepSeek-V3's e_score_correction_bias as zeros, which select as no bias does."""
    from flax import nnx

    from convert.checkpoints import abstract_params
    from convert.export import hf_tensor, out_tensors
    from model.config import ModelConfig

    cfg = ModelConfig(**dict(MLA, num_layers=2, first_dense_layers=1))
    shapes = {tuple(map(str, path)): tuple(var.shape)
              for path, var in nnx.to_flat_state(abstract_params(cfg))}
    biases = [t for t in out_tensors(cfg, shapes) if t.name.endswith("e_score_correction_bias")]
    assert [(t.name, t.parts, t.shape) for t in biases] == [
        ("model.layers.1.mlp.gate.e_score_correction_bias", (), (8,))]
    np.testing.assert_array_equal(hf_tensor(biases[0], {}, cfg, np.dtype(np.float32)), np.zeros(8))
