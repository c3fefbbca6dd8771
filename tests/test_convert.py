"""Checkpoint conversion: random tiny Llama (GQA and MHA, tied and untied) and Mixtral models built
with ``transformers`` are imported and give transformers' logits; exported again they load in
transformers with the same logits; a GGUF file written from one (llama.cpp's Q/K row order) imports
to the same model; bad checkpoints give one ``error:`` line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from cli import convert as cli_convert
from tests.helpers import hf_logits, meshlm_logits, run_in_process, tiny_tokenizer

ATOL = 1e-4  # whole model, float32
VOCAB = 320


def hf_model(kind: str, **overrides):
    """A random tiny model of ``kind`` (llama or mixtral), float32, eager attention."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=5000.0)
    common.update(overrides)
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **common)
        model = transformers.MixtralForCausalLM(config)
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # norms start at 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int32)
CASES = {
    "llama-gqa-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mixtral-top2-of-8": ("mixtral", dict(tie_word_embeddings=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_and_export_round_trips(eight_devices, tmp_path, case):
    from convert.checkpoints import import_checkpoint
    from convert.export import export_checkpoint

    kind, overrides = CASES[case]
    model = hf_model(kind, **overrides)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    tiny_tokenizer(src)
    want = hf_logits(model, TOKENS)

    run_dir = import_checkpoint(src, tmp_path / "run")
    np.testing.assert_allclose(meshlm_logits(run_dir, TOKENS), want, atol=ATOL, rtol=0)

    out = export_checkpoint(run_dir, tmp_path / "exported")
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(again.float().eval(), TOKENS), want, atol=ATOL, rtol=0)
    reloaded_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded_tok("the cat")["input_ids"] == transformers.AutoTokenizer.from_pretrained(src)(
        "the cat")["input_ids"]


# ------------------------------------------------------------------------------------------- GGUF


def permute_like_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter row order for Q/K: each head's halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path: Path, model, tokenizer_dir: Path, quant_of: dict[str, object] | None = None,
               hf_dir: Path | None = None, f16: bool = False):
    """``model`` (a tiny Llama, or a Mixtral saved in ``hf_dir``) as a llama.cpp-style GGUF with the
    tokenizer embedded (matrices in F16 with ``f16``, as llama.cpp writes them)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"] for t in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_add_bos_token(False)
    w.add_chat_template(json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"])
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(c.num_hidden_layers):
        for hf, gg in GGUF_NAMES.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    experts = getattr(c, "num_local_experts", 0)
    if experts:  # llama.cpp stacks a layer's experts: [E, out, in] per projection
        w.add_expert_count(experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        from safetensors.numpy import load_file

        saved = load_file(str(hf_dir / "model.safetensors"))  # per-expert tensors, HF names
        for i in range(c.num_hidden_layers):
            prefix = f"model.layers.{i}.block_sparse_moe."
            sd[prefix + "gate.weight"] = saved[prefix + "gate.weight"]
            names[prefix + "gate.weight"] = f"blk.{i}.ffn_gate_inp.weight"
            for hf, gg in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                sd[f"{prefix}{hf}"] = np.stack([saved[f"{prefix}experts.{e}.{hf}.weight"]
                                                for e in range(experts)])
                names[f"{prefix}{hf}"] = f"blk.{i}.{gg}.weight"
    for hf_name, gg_name in names.items():
        if hf_name not in sd or (hf_name == "lm_head.weight" and c.tie_word_embeddings):
            continue
        a = sd[hf_name]
        if gg_name.endswith("attn_q.weight"):
            a = permute_like_llama_cpp(a, c.num_attention_heads)
        elif gg_name.endswith("attn_k.weight"):
            a = permute_like_llama_cpp(a, c.num_key_value_heads)
        qtype = (quant_of or {}).get(gg_name)
        if qtype is None:
            w.add_tensor(gg_name, np.ascontiguousarray(a.astype(np.float16) if f16 and a.ndim > 1 else a))
        else:
            raw = np.zeros((a.shape[0], a.shape[1] // gguf.GGML_QUANT_SIZES[qtype][0]
                            * gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
            w.add_tensor(gg_name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_import_undoes_llama_cpp_permutation(eight_devices, tmp_path):
    from convert.checkpoints import import_checkpoint

    model = hf_model("llama", tie_word_embeddings=False)
    tok_dir = tiny_tokenizer(tmp_path / "tok")
    path = write_gguf(tmp_path / "tiny.gguf", model, tok_dir)
    run_dir = import_checkpoint(path, tmp_path / "run")
    np.testing.assert_allclose(meshlm_logits(run_dir, TOKENS), hf_logits(model, TOKENS),
                               atol=ATOL, rtol=0)
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(run_dir)
    reference = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert tok.encode("the cat sat") == reference("the cat sat")["input_ids"]
    from eval.inspect import word_form  # inspect embeddings looks words up as in running text

    assert len(tok.encode(" the")) == 1 and word_form(tok, "the") == " the"
    assert word_form(tok, " the") == " the"

    # generate --chat starts from the chat template's rendering of the conversation
    from cli.eval import prompt_ids
    from core.errors import UsageError

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi cat"}]
    want = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt_ids(tok, "hi cat", True, "be brief") == tok.encode(want)
    from data.tokenizer import ByteTokenizer

    with pytest.raises(UsageError, match="no chat template"):
        prompt_ids(ByteTokenizer(), "hi", True, None)


# ------------------------------------------------------------------------------------- bad input


def convert_in_process(*args: str) -> subprocess.CompletedProcess:
    return run_in_process(cli_convert.main, *map(str, args))


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("llama")
    hf_model("llama").save_pretrained(src)
    tiny_tokenizer(src)
    return src


def edited_copy(src: Path, dst: Path, config=None, drop: str | None = None) -> Path:
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    if config:
        hf = json.loads((dst / "config.json").read_text())
        hf.update(config)
        (dst / "config.json").write_text(json.dumps(hf))
    if drop:
        tensors = load_file(str(dst / "model.safetensors"))
        del tensors[drop]
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_gguf_mixtral_experts_import(eight_devices, tmp_path):
    from convert.checkpoints import import_checkpoint

    model = hf_model("mixtral", tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "hf")
    path = write_gguf(tmp_path / "moe.gguf", model, tiny_tokenizer(tmp_path / "tok"),
                      hf_dir=tmp_path / "hf")
    run_dir = import_checkpoint(path, tmp_path / "run")
    np.testing.assert_allclose(meshlm_logits(run_dir, TOKENS), hf_logits(model, TOKENS),
                               atol=ATOL, rtol=0)


def test_bad_checkpoints_are_one_error_line(llama_dir, tmp_path):
    import gguf

    from convert.checkpoints import import_checkpoint
    from convert.hf_layout import ConversionError

    cases = {
        "unknown architecture 'gpt2'": edited_copy(llama_dir, tmp_path / "a", {"model_type": "gpt2"}),
        "model.layers.1.mlp.up_proj.weight is missing": edited_copy(
            llama_dir, tmp_path / "b", drop="model.layers.1.mlp.up_proj.weight"),
        "shape mismatch": edited_copy(llama_dir, tmp_path / "c", {"intermediate_size": 40}),
    }
    for message, src in cases.items():
        with pytest.raises(ConversionError, match=message):
            import_checkpoint(src, tmp_path / f"run-{src.name}")
        assert not (tmp_path / f"run-{src.name}").exists()
    gguf_path = write_gguf(tmp_path / "q.gguf", hf_model("llama"), llama_dir,
                           {"blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_1})
    with pytest.raises(ConversionError, match="quantisation type Q8_1"):
        import_checkpoint(gguf_path, tmp_path / "run-q")

    result = convert_cli("import", cases["shape mismatch"], tmp_path / "run-cli")
    assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "shape mismatch" in result.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = convert_in_process("import", llama_dir, tmp_path / "taken")
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------- what the HF layout can say

MOE = dict(num_experts=4, experts_per_token=2, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
           mlp_dim=48, vocab_size=VOCAB)
INEXPRESSIBLE = {  # a meshlm option Mixtral's config.json has no way to say -> its key
    # (refused by tests/test_convert_families.py: test_export_refuses_what_no_family_says)
    "router_mode": dict(MOE, router_mode="softmax_topk_unnormalized"),
    "num_shared_experts": dict(MOE, num_shared_experts=1),
    "first_dense_layers": dict(MOE, first_dense_layers=1, num_layers=3),
    "moe_every": dict(MOE, moe_every=2),
    "position": dict(MOE, position="learned"),
    "activation": dict(MOE, activation="gelu"),
}


def test_export_keeps_the_router_modes_mixtral_computes():
    """softmax_topk and topk_softmax are the same function up to rounding: both are Mixtral's."""
    from convert.hf_layout import hf_config_from_model
    from model.config import ModelConfig

    for mode in ("softmax_topk", "topk_softmax"):
        assert hf_config_from_model(ModelConfig(**MOE, router_mode=mode))["model_type"] == "mixtral"


def test_export_of_an_unnormalised_router_is_one_error_line_and_writes_nothing(eight_devices,
                                                                               tmp_path):
    from convert.checkpoints import import_checkpoint

    src = tmp_path / "hf"
    hf_model("mixtral").save_pretrained(src)
    tiny_tokenizer(src)
    run_dir = import_checkpoint(src, tmp_path / "run")
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("router_mode: topk_softmax",
                                                 "router_mode: softmax_topk_unnormalized"))
    result = convert_in_process("export", run_dir, tmp_path / "out")
    assert result.returncode == 2 and result.stderr.startswith("error: model.router_mode="), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- sharded safetensors


def test_index_decides_which_file_holds_each_tensor(llama_dir, tmp_path):
    """A Mistral-style repository: shards named by model.safetensors.index.json, and a
    consolidated file beside them holding the same tensors (here: altered, and sorted last). The
    index decides; without it, a tensor in two files is refused, naming both."""
    from safetensors.numpy import load_file, save_file

    from convert.checkpoints import read_safetensors
    from convert.hf_layout import ConversionError

    src = tmp_path / "sharded"
    hf_model("llama").save_pretrained(src, max_shard_size="40KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    want = {}
    for shard in set(index.values()):
        want.update(load_file(str(src / shard)))
    save_file({k: v + 1 for k, v in want.items()}, str(src / "model.safetensors"))
    save_file({"layers.0.attention.wq.weight": np.zeros((2, 2), np.float32)},
              str(src / "consolidated.safetensors"))
    got = read_safetensors(src)
    assert sorted(got) == sorted(index)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), value)

    (src / "model.safetensors.index.json").unlink()
    (src / "consolidated.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"tensor \S+ is in both \S+model-0000\d-of-0000\d"
                                              r"\.safetensors and \S+model\.safetensors"):
        read_safetensors(src)


def test_index_naming_a_file_outside_the_directory_is_refused(llama_dir, tmp_path):
    import shutil

    from convert.checkpoints import read_safetensors
    from convert.hf_layout import ConversionError

    src = tmp_path / "hf"
    shutil.copytree(llama_dir, src)
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(ConversionError, match="file name in this directory"):
        read_safetensors(src)


# ------------------------------------------------------------------------------ GGUF, streamed


def test_gguf_import_holds_the_model_once(eight_devices, tmp_path):
    """An F16 GGUF is converted tensor by tensor into the run's dtype: the import's host
    allocations peak well under the model's float32 size (before: two to three float32 copies)."""
    import gc
    import tracemalloc

    import jax

    from convert.checkpoints import import_checkpoint

    model = hf_model("llama", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                     tie_word_embeddings=False)
    path = write_gguf(tmp_path / "f16.gguf", model, tiny_tokenizer(tmp_path / "tok"), f16=True)
    float32_bytes = 4 * sum(p.numel() for p in model.parameters())
    import_checkpoint(path, tmp_path / "warm", dtype="bfloat16")  # compiles what the import needs
    gc.collect()  # the import's own cyclic garbage is then collected when it makes it, not by chance
    tracemalloc.start()
    try:
        run_dir = import_checkpoint(path, tmp_path / "run", dtype="bfloat16")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"model {float32_bytes / 2**20:.1f} MiB in float32, import peak {peak / 2**20:.1f} MiB")
    assert peak < 0.75 * float32_bytes
    from inference.load import load_run

    params = load_run(run_dir).params
    assert {str(v.dtype) for v in jax.tree.leaves(params)} == {"bfloat16"}
