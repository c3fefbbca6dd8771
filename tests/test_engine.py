"""The serving engine (inference/engine.py): requests that join and leave a running batch, chunked
prefill, prefix reuse and cancellation give the greedy tokens of each request alone and of the
static-batch Generator (what ``eval generate`` runs), on one device, and for an MoE preset on a
data x tensor x expert mesh; nothing compiles after ``warm_up``; per-row sampling; the model's
paged path against the full forward pass."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from inference.engine import Engine
from inference.generate import Generator
from inference.requests import Request
from inference.sampling import SamplingConfig, filtered_logits, filtered_rows, sample_rows
from model.transformer import Transformer, paged_cache_shapes
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules, tree_shardings
from tests import reference
from tests.helpers import SMALL, init_params
from train.config import CONFIG_DIR, build_config, load_yaml

TOL_MODEL = 1e-4  # fp32, whole models (as tests/test_generate.py)
DENSE = dataclasses.replace(SMALL, max_seq_len=64, init_std=0.3, tie_embeddings=False)
PREFIX = [7, 3, 19, 42, 5, 5, 61, 2, 30, 11, 8, 50]  # three blocks of 4
LONG = list(range(3, 23))  # 20 tokens: three prefill chunks of 8 (8, 8 and 4)
PROMPTS = {"a": [5, 9, 2, 33, 7], "b": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "c": [42],
           "d": [8, 8, 8, 8, 8, 8, 8], "e": [60, 1, 60, 1, 60], "long": LONG,
           "p1": PREFIX + [1, 2], "p2": PREFIX + [3]}
MAX_TOKENS = {"a": 9, "b": 4, "c": 6, "d": 7, "e": 5, "long": 5, "p1": 8, "p2": 5}
ENGINE_ARGS = {"max_seq_len": 64, "block_size": 4, "num_blocks": 64, "prefill_chunk": 8}


def _setup(cfg, mesh_axes, devices):
    """(params initialised by one jitted program, placed on the mesh; the mesh)."""
    mesh = make_mesh(MeshConfig(**mesh_axes), devices)
    params = init_params(cfg)
    return jax.device_put(params, tree_shardings(params, mesh, default_rules())), mesh


def _expected(cfg, params, mesh) -> dict[str, list[int]]:
    """Each prompt's greedy tokens from the static-batch Generator (one batch for all)."""
    gen = Generator(cfg, params, mesh, default_rules(), 64, SamplingConfig(temperature=0.0))
    out = gen.generate(list(PROMPTS.values()), max(MAX_TOKENS.values())).tokens
    return {name: tokens[: MAX_TOKENS[name]] for name, tokens in zip(PROMPTS, out, strict=True)}


@pytest.fixture(scope="module")
def dense(eight_devices):
    """(engine on one device, warmed up; its compile count then; the Generator's tokens)."""
    params, mesh = _setup(DENSE, {"data": 1}, eight_devices[:1])
    engine = Engine(DENSE, params, mesh, default_rules(), max_batch=4, **ENGINE_ARGS)
    compiles = engine.warm_up()
    return engine, compiles, _expected(DENSE, params, mesh)


class Recorder:
    """Submits requests at given steps of an engine and records each one's tokens per step."""

    def __init__(self, engine: Engine):
        self.engine, self.step_no, self.events = engine, 0, []

    def submit(self, name: str, **kwargs):
        request = Request(PROMPTS[name], MAX_TOKENS[name], **kwargs,
                          on_event=lambda e: self.events.append((self.step_no, name, e.token)))
        return self.engine.submit(request)

    def step(self) -> bool:
        self.step_no += 1
        return self.engine.step()

    def run(self, schedule: dict[int, list[str]]) -> dict[str, list[int]]:
        """Submits ``schedule[k]`` before step k, steps until all is done: tokens by name."""
        handles = {}
        while True:
            handles |= {name: self.submit(name) for name in schedule.get(self.step_no, [])}
            if not self.step() and self.step_no > max(schedule):
                return {name: h.result(0).tokens for name, h in handles.items()}

    def tokens_at(self, name: str, step: int) -> list[int]:
        return [t for k, n, t in self.events if n == name and k == step and t is not None]


def test_requests_joining_a_running_batch_match_each_alone_and_the_generator(dense):
    engine, _, expected = dense
    names = ["a", "b", "c", "d", "e"]
    together = Recorder(engine).run({0: ["a"], 2: ["b"], 3: ["c", "d", "e"]})  # e waits for a slot
    alone = {name: Recorder(engine).run({0: [name]})[name] for name in names}
    assert together == alone == {name: expected[name] for name in names}
    assert engine.stats().kv_blocks_used == 0 and engine.stats().running == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(dense):
    engine, _, expected = dense
    rec = Recorder(engine)
    a = rec.submit("a")
    rec.step(), rec.step()
    long = rec.submit("long")
    for _ in range(3):  # three chunks of 8; a decodes a token in each of these steps
        rec.step()
        assert len(rec.tokens_at("a", rec.step_no)) == 1
    assert [len(rec.tokens_at("long", k)) for k in range(3, 6)] == [0, 0, 1]
    while rec.step():
        pass
    assert long.result(0).tokens == expected["long"] and a.result(0).tokens == expected["a"]


def test_a_shared_prompt_prefix_is_computed_once(dense):
    engine, _, expected = dense
    rec = Recorder(engine)
    first = rec.submit("p1")
    while not rec.tokens_at("p1", rec.step_no):  # until p1's prompt is in the cache
        rec.step()
    reused, used = engine.stats().prefix_blocks_reused, engine.stats().kv_blocks_used
    second = rec.submit("p2")  # its first 12 tokens are p1's first three blocks
    rec.step()
    assert engine.stats().prefix_blocks_reused == reused + 3
    assert engine.stats().kv_blocks_used == used + 5 - 3  # p2 needs 17 slots: 2 blocks of its own
    assert rec.tokens_at("p2", rec.step_no)  # its one uncached token took one chunk
    while rec.step():
        pass
    assert second.result(0).cached_tokens == 12 and first.result(0).cached_tokens == 0
    assert second.result(0).tokens == expected["p2"] and first.result(0).tokens == expected["p1"]


def test_cancelling_ends_a_request_and_frees_its_blocks(dense):
    engine, _, _ = dense
    running = [engine.submit(Request([i + 1] * 6, max_tokens=40)) for i in range(4)]
    waiting = engine.submit(Request([9] * 6, max_tokens=40))
    for _ in range(3):
        engine.step()
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (4, 1, 4 * 12)  # 45 slots each
    running[0].cancel()
    waiting.cancel()
    engine.step()
    assert engine.stats().kv_blocks_used == 3 * 12 and engine.stats().waiting == 0
    assert running[0].result(0).finish_reason == "cancelled" and len(running[0].result(0).tokens) == 3
    assert [e.finish_reason for e in waiting] == ["cancelled"] and not waiting.result(0).tokens
    for handle in running[1:]:
        handle.cancel()
    assert not engine.step()
    assert engine.stats().kv_blocks_used == 0 and engine.stats().running == 0


def test_mixed_sampling_shares_the_warm_programs(dense):
    """Greedy, seeded sampling and logprobs rows in one batch: nothing compiles after warm-up; the
    greedy row is the Generator's; a seed's draws do not depend on the rows beside it."""
    engine, compiles, expected = dense
    hot = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)
    handles = [engine.submit(Request(PROMPTS["a"], 9, logprobs=3)),
               engine.submit(Request(PROMPTS["b"], 6, sampling=hot, seed=7)),
               engine.submit(Request(PROMPTS["b"], 6, sampling=hot, seed=8))]
    while engine.step():
        pass
    greedy, seven, eight = (h.result(0) for h in handles)
    assert greedy.tokens == expected["a"]
    assert [top[0][0] for top in greedy.top_logprobs] == greedy.tokens  # greedy = the most likely
    assert greedy.logprobs == [top[0][1] for top in greedy.top_logprobs]
    assert all(len(top) == 3 and top[0][1] >= top[2][1] for top in greedy.top_logprobs)
    alone = engine.submit(Request(PROMPTS["b"], 6, sampling=hot, seed=7))
    while engine.step():
        pass
    assert alone.result(0).tokens == seven.tokens != eight.tokens
    assert engine.compiles == compiles == len(engine.chunk_lengths) + len(engine.buckets)


def test_bad_requests_are_one_line_errors(dense):
    engine, _, _ = dense
    for request, message in [(Request(list(range(65))), "more than the context window of 64"),
                             (Request([]), "at least one token"),
                             (Request([1, 64]), "prompt token ids must be in [0, 64)"),
                             (Request([1], logprobs=30), "logprobs must be in [0, 20]"),
                             (Request([1], sampling=SamplingConfig(top_p=0.0)), "top_p must be")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            engine.submit(request)
    with pytest.raises(ValueError, match="paged KV cache does not support attention_type=mla"):
        Engine(dataclasses.replace(DENSE, attention_type="mla"), engine.params, engine.mesh,
               default_rules())


def test_the_background_thread_streams_tokens(dense):
    engine, _, expected = dense
    with engine:
        handle = engine.submit(Request(PROMPTS["c"], MAX_TOKENS["c"]))
        events = list(handle)
    assert [e.token for e in events] == expected["c"] and events[-1].finish_reason == "length"


def test_prompt_chunks_through_a_block_table_equal_the_full_forward_pass(dense):
    """The model's paged path alone, in a stack of local (window 4) and global layers: a 20-token
    prompt, 14 tokens in chunks of 8 (the second padded) then 6 one by one (the decode path:
    grouped heads read in the cache's own layout), through a table of scattered physical blocks,
    gives the logits of the full forward pass; only the table's blocks and the scratch block are
    written."""
    cfg = dataclasses.replace(DENSE, sliding_window=4, sliding_window_pattern=2)
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[0]
    params = dense[0].params  # a window changes no parameter
    table_bm = np.array([[9, 2, 7, 4, 11, 1, 0, 0]], np.int32)  # 32 positions, 4 per block
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), paged_cache_shapes(cfg, 12, 4))
    run_chunk = jax.jit(lambda p, tokens, positions, lengths, cache: nnx.merge(graphdef, p)
                        .with_paged_cache(tokens, positions, lengths, table_bm, cache))
    logits = []
    for start, count, width in [(0, 8, 8), (8, 6, 8), *((p, 1, 1) for p in range(14, 20))]:
        ids = LONG[start:start + count]  # the second chunk padded: padding writes the scratch block
        tokens, positions = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
        tokens[0, :len(ids)], positions[0, :len(ids)] = ids, np.arange(start, start + len(ids))
        out, cache = run_chunk(params, tokens, positions, np.array([len(ids)], np.int32), cache)
        logits.append(np.asarray(out[0, :len(ids)]))
    full = jax.jit(lambda p, tokens: nnx.merge(graphdef, p)(tokens))(params, np.array([LONG]))[0]
    assert reference.relative_error(np.concatenate(logits), np.asarray(full)) < TOL_MODEL
    k_lpbkh = np.asarray(cache["blocks"][0])
    assert not k_lpbkh[:, [3, 5, 6, 8, 10]].any() and k_lpbkh[:, [0, 1]].any()


def test_per_row_sampling_equals_the_batch_sampler_row_by_row():
    logits = jax.random.normal(jax.random.key(0), (3, 50)) * 3
    settings = [SamplingConfig(0.7, 5, 1.0), SamplingConfig(1.3, 0, 0.6), SamplingConfig(0.0, 0, 1.0)]
    per_row = (np.array([s.temperature for s in settings], np.float32),
               np.array([s.top_k for s in settings], np.int32),
               np.array([s.top_p for s in settings], np.float32))

    @jax.jit  # one compile, not one per operation
    def both(logits):
        alone = [filtered_logits(logits[row:row + 1], s)[0] for row, s in enumerate(settings[:2])]
        tokens = sample_rows(logits, jnp.zeros(3, jnp.uint32), jnp.zeros(3, jnp.int32), *per_row)
        return filtered_rows(logits, *per_row), alone, tokens

    rows, alone, tokens = both(logits)
    np.testing.assert_array_equal(rows[:2], np.stack(alone))
    assert tokens[2] == np.argmax(logits[2]) and np.isfinite(rows[0][tokens[0]])


def test_an_moe_preset_on_a_data_tensor_expert_mesh_matches_the_generator_on_one_device(
        eight_devices):
    """moe_tiny's model with rows over data, kv heads over tensor (the cache too: its blocks stay
    whole on every device) and experts over expert; joining requests, one waiting for a slot; the
    reference is the Generator on one device."""
    preset = build_config(load_yaml(CONFIG_DIR / "moe_tiny.yaml"), [])
    cfg = dataclasses.replace(preset.model, init_std=0.3)  # far from greedy ties
    params, mesh = _setup(cfg, {"data": 2, "tensor": 2, "expert": 2}, eight_devices)
    engine = Engine(cfg, params, mesh, default_rules(), max_batch=2, **ENGINE_ARGS)
    # [L, P, BS, K, H]: kv heads over tensor, nothing else split
    assert engine.cache_sharding["moe_blocks"][0].spec == PartitionSpec(None, None, None, "tensor")
    out = Recorder(engine).run({0: ["a", "long"], 1: ["e"]})
    one = make_mesh(MeshConfig(data=1), eight_devices[:1])
    params = jax.device_put(params, tree_shardings(params, one, default_rules()))
    gen = Generator(cfg, params, one, default_rules(), 64, SamplingConfig(temperature=0.0))
    ref = gen.generate([PROMPTS[n] for n in out], 9).tokens
    assert out == {name: tokens[: MAX_TOKENS[name]] for name, tokens in zip(out, ref, strict=True)}
