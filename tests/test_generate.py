"""KV-cache generation: cached prefill + decode equal the full forward pass (dense and MoE, prompts of
different lengths in one batch), greedy is the step-by-step argmax, stops, seeds, context shifts."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from inference.generate import Generator, bucket
from inference.sampling import SamplingConfig
from model.transformer import Transformer
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules, tree_shardings
from tests import reference
from tests.helpers import SMALL, padded_logits

TOL_MODEL = 1e-4  # fp32, whole models
GREEDY = SamplingConfig(temperature=0.0)
DENSE = dataclasses.replace(SMALL, max_seq_len=64, init_std=0.3, tie_embeddings=False)
MOE = dataclasses.replace(DENSE, num_layers=5, first_dense_layers=1, moe_every=2, num_experts=8,
                          experts_per_token=2, expert_mlp_dim=16, num_shared_experts=1)
PROMPTS = [[5, 9, 2, 33, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [42], [8, 8, 8, 8, 8, 8, 8]]


def _generator(cfg, mesh_axes, sampling=GREEDY, window=64):
    """A Generator over freshly initialised params sharded on the mesh, and the unsharded params."""
    mesh = make_mesh(MeshConfig(**mesh_axes))
    params = nnx.split(Transformer(cfg, nnx.Rngs(0)))[1]
    sharded = jax.device_put(params, tree_shardings(params, mesh, default_rules()))
    return Generator(cfg, sharded, mesh, default_rules(), window, sampling), params


def _full_logits(cfg, params, tokens):
    """Logits [T, V] of one unpadded row by the plain forward pass (no cache), one jitted program
    (called eagerly it compiled each of its ops apart); an MoE model runs its dropless path, which
    never drops a token."""
    ref_cfg = dataclasses.replace(cfg, moe_impl="dropless")
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(ref_cfg, nnx.Rngs(0))))[0]
    return padded_logits(graphdef, params, np.asarray([tokens], np.int32), len(tokens))[0]


@pytest.mark.parametrize("cfg, mesh_axes", [
    (DENSE, {"data": -1, "tensor": 2}),
    pytest.param(MOE, {"data": 2, "expert": 4}, marks=pytest.mark.slow),  # 19 s: make test-all
], ids=["dense", "moe"])
def test_cached_decoding_equals_the_full_forward_pass(eight_devices, cfg, mesh_axes):
    out = assert_decoding_equals_the_full_pass(cfg, mesh_axes, PROMPTS, 9)
    assert all(len(new) == 9 for new in out.tokens)
    assert all(logits.shape == (9, cfg.vocab_size) for logits in out.logits)


def assert_decoding_equals_the_full_pass(cfg, mesh_axes, prompts, steps):
    """Greedy cached decoding of ``prompts`` for ``steps`` tokens on the mesh: each step's logits
    equal the plain forward pass over prompt + the tokens so far, and each token is their argmax.
    Returns the generator's output."""
    gen, params = _generator(cfg, mesh_axes)
    out = gen.generate(prompts, steps, return_logits=True)
    for prompt, new, logits in zip(prompts, out.tokens, out.logits, strict=True):
        full = _full_logits(cfg, params, prompt + new[:-1])[len(prompt) - 1:]
        assert reference.relative_error(logits, full) < TOL_MODEL
        assert new == np.argmax(full, axis=-1).tolist()  # greedy = argmax of the full pass, each step
    return out


def test_decode_is_compiled_once_and_shards_heads_over_tensor(eight_devices):
    gen, _ = _generator(DENSE, {"data": -1, "tensor": 2})
    first = gen.generate(PROMPTS, 6)
    second = gen.generate([p[::-1] for p in PROMPTS], 6)
    assert first.tokens != second.tokens
    decode = gen._decode(len(PROMPTS), bucket(12 + 6, 64))
    assert decode._cache_size() == 1
    spec = gen._cache_sharding(4, 32)["blocks"][0].spec
    assert spec[1] == "data" and spec[3] == "tensor"  # [L, B, S, K, H]: rows over data, kv heads over tensor


def test_a_stop_id_ends_a_row_and_others_go_on(eight_devices):
    """Stop ids are EOS and then end-of-turn ids (tokenizer.stop_ids): the row stops at an
    end-of-turn id the greedy model emits, though EOS (an id it never emits here) is first."""
    gen, _ = _generator(DENSE, {"data": -1})
    free = gen.generate(PROMPTS, 8)
    stop = free.tokens[0][3]
    eos = next(i for i in range(DENSE.vocab_size) if all(i not in row for row in free.tokens))
    out = gen.generate(PROMPTS, 8, stop_ids=(eos, stop))
    assert out.stopped[0] and out.tokens[0] == free.tokens[0][: free.tokens[0].index(stop)]
    for row in range(1, len(PROMPTS)):
        expected = free.tokens[row][: free.tokens[row].index(stop)] if stop in free.tokens[row] \
            else free.tokens[row]
        assert out.tokens[row] == expected and out.stopped[row] == (stop in free.tokens[row])


def test_sampling_is_seeded_and_reproducible(eight_devices):
    gen, _ = _generator(DENSE, {"data": -1}, SamplingConfig(temperature=1.0, top_k=20, top_p=0.9))
    a, b = gen.generate(PROMPTS, 10, seed=3), gen.generate(PROMPTS, 10, seed=3)
    c = gen.generate(PROMPTS, 10, seed=4)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_streaming_calls_back_each_token_in_order(eight_devices):
    gen, _ = _generator(DENSE, {"data": -1})
    seen = []
    out = gen.generate(PROMPTS[:1], 5, on_token=lambda row, token: seen.append((row, token)))
    assert seen == [(0, t) for t in out.tokens[0]]


def test_generation_past_the_window_shifts_the_context(eight_devices):
    window = 16
    gen, params = _generator(DENSE, {"data": -1}, window=window)
    prompt = list(range(1, 11))
    out = gen.generate([prompt], 20, return_logits=True)
    new = out.tokens[0]
    assert len(new) == 20
    # Until the window fills, the plain forward over the whole sequence; the token that fills it is
    # then re-prefilled with the last half of the window, and decoding goes on from there.
    before = window - len(prompt) + 1  # tokens drawn while prompt + new fits the window
    full = _full_logits(DENSE, params, prompt + new[: before - 1])[len(prompt) - 1:]
    assert reference.relative_error(out.logits[0][:before], full) < TOL_MODEL
    context = (prompt + new[:before])[-(window // 2):]
    shifted = _full_logits(DENSE, params, context)[-1]
    assert reference.relative_error(out.logits[0][before], shifted) < TOL_MODEL


def test_a_prompt_longer_than_the_window_keeps_its_end(eight_devices):
    gen, _ = _generator(DENSE, {"data": -1}, window=16)
    long_prompt = list(range(40))
    assert gen.generate([long_prompt], 4).tokens == gen.generate([long_prompt[-16:]], 4).tokens
