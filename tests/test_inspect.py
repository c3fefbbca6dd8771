"""``python -m eval inspect``: token spans, next-token probabilities under temperature, embedding
neighbours and analogies, attention weights and MoE routing from the real forward pass, checked against
plain oracles on a tiny trained checkpoint (dense) and an initialised MoE one."""

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cli import inspect as inspect_cli
from convert.checkpoints import save_params
from data.tokenizer import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
from eval import inspect
from inference.generate import inference_graphdef
from inference.load import load_run
from model.attention import Attention, Span
from model.moe import MoE
from model.transformer import Transformer, sown_arrays
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules, tree_shardings
from tests import reference
from tests.helpers import SMALL, host_params, init_params, padded_logits, small_text
from train.config import CONFIG_DIR, build_config, load_yaml
from train.validate import validate

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4  # fp32, whole models
PROMPT = "the dog bites the man"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return small_text(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def dense_dir(tiny_run):
    """The session's tiny run (tests/conftest.py: configs/tiny.yaml trained 20 steps on data=2,
    tensor=4), which these tests only read."""
    return tiny_run[0]


@pytest.fixture(scope="module")
def moe_dir(eight_devices, tmp_path_factory):
    """configs/moe_tiny.yaml's model as initialised, saved as a run directory of its own (step 0):
    nothing inspect reports depends on training, and training it compiled the costliest programs
    of this file (the MoE train and eval steps)."""
    run_dir = tmp_path_factory.mktemp("inspect") / "moe"
    cfg = build_config(load_yaml(CONFIG_DIR / "moe_tiny.yaml"), [f"run.dir={run_dir}"])
    validate(cfg, jax.device_count())
    params = init_params(cfg.model)
    run_dir.mkdir()
    save_params(run_dir, cfg, params, ByteTokenizer(), {})
    return run_dir


@pytest.fixture(scope="module")
def dense(dense_dir):
    return load_run(dense_dir)


@pytest.fixture(scope="module")
def moe(moe_dir):
    return load_run(moe_dir)


def _layers(model: Transformer) -> list[nnx.Module]:
    """The model's blocks one by one, in depth order (each cut out of its stack)."""
    cfg = model.cfg

    def cut(stack, i):
        graphdef, state = nnx.split(stack)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    blocks = [cut(model.blocks, i) for i in range(cfg.num_dense_first)]
    per_group = cfg.moe_every - 1
    for g in range(cfg.num_moe_layers):
        blocks += [cut(model.group_blocks, g * per_group + j) for j in range(per_group)]
        blocks.append(cut(model.moe_blocks, g))
    return blocks


def _walk(run, ids):
    """Block by block, unscanned and without a mesh (one jit): per layer in depth order, its input
    ``x`` [T, D], attention weights ``probs`` [N, T, T] and weights; MoE layers add their input
    ``moe_in`` [T, D], output ``moe_out`` [T, D], routing metrics and expert weights."""
    _, graphdef = inference_graphdef(run.cfg.model, (Attention, MoE))  # both sow intermediates
    tokens = np.asarray([ids], np.int32)
    positions = np.arange(len(ids), dtype=np.int32)[None]

    def walk(params):
        model = nnx.merge(graphdef, params)
        x = model.embed(tokens)
        out = []
        for block in _layers(model):
            (y, _), sown = nnx.capture(block.attn, nnx.Intermediate)(block.attn_norm(x), Span(positions))
            step = {"x": x[0], "probs": sown_arrays(sown)["attention_probs"][0],
                    "scale": block.attn_norm.scale[...],
                    "w_q_dnh": block.attn.w_q_dnh[...], "w_k_dkh": block.attn.w_k_dkh[...]}
            x = x + y
            h = block.mlp_norm(x)
            if hasattr(block, "moe"):  # an MoE block
                (moe_out, metrics), sown = nnx.capture(block.moe, nnx.Intermediate)(h)
                step |= {"moe_in": h[0], "moe_out": moe_out[0], "metrics": metrics | sown_arrays(sown),
                         **{name: getattr(block.moe, name)[...] for name in
                            ("w_router_de", "w_gate_edf", "w_up_edf", "w_down_efd")}}
                x = x + moe_out
            else:
                x = x + block.mlp(h)
            out.append(step)
        return out

    return jax.device_get(jax.jit(walk)(jax.device_get(run.params)))


def _reference_weights(step, cfg):
    """Attention weights [N, T, T] of a layer on its input by the NumPy oracles."""
    h = reference.rms_norm(step["x"], step["scale"], cfg.norm_eps)
    q = np.einsum("td,dnh->tnh", h, step["w_q_dnh"])[None]
    k = np.einsum("td,dkh->tkh", h, step["w_k_dkh"])[None]
    positions = [list(range(h.shape[0]))]
    if cfg.position == "rope":
        q, k = reference.rope(q, positions, cfg.rope_theta), reference.rope(k, positions, cfg.rope_theta)
    return reference.attention_weights(q, k)[0]


# ------------------------------------------------------------------------------------------ tokens


def test_tokens_give_pieces_ids_and_byte_spans_for_byte_and_sentencepiece(tmp_path, text):
    sample = "Hello, héllo ▁ wörld\n"
    report = inspect.inspect_tokens(ByteTokenizer(), sample)
    raw = sample.encode("utf-8")
    assert [t["id"] for t in report["tokens"]] == list(raw)
    assert [(t["start"], t["end"]) for t in report["tokens"]] == [(i, i + 1) for i in range(len(raw))]
    assert report["tokens"][8]["piece"] == "\\xc3" and report["tokens"][-1]["piece"] == "\\n"
    assert report["chars_per_token"] == len(sample) / len(raw) and report["tokens_per_word"] == len(raw) / 4

    model = train_sentencepiece(sorted(Path(text).parent.glob("*.txt")), 300, "bpe", tmp_path / "sp")
    sp = SentencePieceTokenizer(model)
    sample = "the dog bites ▁ a man, é\n"
    report = inspect.inspect_tokens(sp, sample)
    raw = sample.encode("utf-8")
    assert [t["id"] for t in report["tokens"]] == sp.encode(sample)
    assert report["num_tokens"] < len(raw)  # merged pieces
    spans = [(t["start"], t["end"]) for t in report["tokens"]]
    assert spans[0][0] == 0 and spans[-1][1] == len(raw)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    for t in report["tokens"]:
        assert sp.token_bytes(t["id"]) == raw[t["start"]:t["end"]]
    assert any(t["piece"].startswith(" ") and len(t["piece"]) > 1 for t in report["tokens"])
    assert inspect.piece(sp, sp.bos_id) == "<bos>" and inspect.piece(sp, 999) == "<unused 999>"


# -------------------------------------------------------------------------------------------- next


def test_next_probabilities_are_softmax_of_logits_over_temperature(dense):
    temps = [0.0, 1e-4, 0.5, 1.0, 2.0]
    report = inspect.inspect_next(dense, PROMPT, temps, top=dense.cfg.model.vocab_size)
    ids = inspect.prompt_ids(dense.tokenizer, PROMPT, dense.cfg.model.max_seq_len)
    logits_v = padded_logits(dense.graphdef, jax.device_get(dense.params), np.asarray([ids]),
                             dense.cfg.model.max_seq_len)[0, -1]  # the plain full forward pass
    order = [row["id"] for row in report["top"]]
    assert sorted(order) == list(range(dense.cfg.model.vocab_size))
    probs_tv = np.array([row["probs"] for row in report["top"]]).T
    for j, t in enumerate(temps):
        assert abs(probs_tv[j].sum() - 1) < 1e-6
        if t >= 0.5:
            expected = np.asarray(jax.nn.softmax(logits_v / t))[order]
            assert np.max(np.abs(probs_tv[j] - expected)) < 1e-6
    argmax = int(np.argmax(logits_v))
    assert order[0] == argmax and probs_tv[0][0] == 1.0 and report["entropy_bits"][0] == 0.0
    assert probs_tv[1][0] > 0.999  # T -> 0: the mass goes to the argmax
    assert report["entropy_bits"][2] < report["entropy_bits"][3] < report["entropy_bits"][4]


def test_next_keeps_a_prompt_longer_than_the_training_length_whole(dense, capsys):
    """The window is the model's own (model.max_seq_len = 64), not train.seq_len (32)."""
    prompt = "the dog bites the man. the cat sees the old sailor."
    ids = [dense.tokenizer.bos_id, *dense.tokenizer.encode(prompt)]
    assert dense.cfg.train.seq_len < len(ids) <= dense.cfg.model.max_seq_len
    report = inspect.inspect_next(dense, prompt, [1.0], top=5)
    assert capsys.readouterr().err == ""  # nothing cut, nothing to warn about
    logits_v = padded_logits(dense.graphdef, jax.device_get(dense.params), np.asarray([ids]),
                             dense.cfg.model.max_seq_len)[0, -1]  # the whole prompt
    got = np.array([row["logit"] for row in report["top"]])
    assert reference.relative_error(got, logits_v[[row["id"] for row in report["top"]]]) < TOL


def test_greedy_probabilities_need_no_vocab_by_vocab_matrix():
    import tracemalloc

    vocab = 8192  # np.eye(vocab) would take 512 MB
    logits_v = np.random.default_rng(0).normal(size=vocab).astype(np.float32)
    tracemalloc.start()
    try:
        p_v = inspect.temperature_probs(logits_v, 0.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak / 2**20:.0f} MiB for one distribution over {vocab} tokens"
    assert p_v.shape == (vocab,) and p_v.dtype == np.float64
    assert p_v[int(np.argmax(logits_v))] == 1.0 and p_v.sum() == 1.0


# ----------------------------------------------------------------------------------------- attention


MOE_GROUPS = dataclasses.replace(SMALL, max_seq_len=32, num_layers=5, first_dense_layers=1, moe_every=2,
                                 num_experts=8, experts_per_token=2, expert_mlp_dim=16,
                                 num_shared_experts=1, init_std=0.3)


def _random_run(cfg, mesh_axes):
    """A stand-in for a loaded run: freshly initialised params sharded on a mesh."""
    mesh = make_mesh(MeshConfig(**mesh_axes))
    params = host_params(cfg)  # random values without compiling an initialiser
    params = jax.device_put(params, tree_shardings(params, mesh, default_rules()))
    return types.SimpleNamespace(cfg=types.SimpleNamespace(model=cfg), params=params, mesh=mesh,
                                 rules=default_rules())


@pytest.mark.parametrize("which", ["dense", pytest.param("moe", marks=pytest.mark.slow), "moe_groups"])
def test_attention_weights_are_causal_rows_equal_to_the_reference(which, request, eight_devices):
    run = (_random_run(MOE_GROUPS, {"data": 2, "expert": 4}) if which == "moe_groups"
           else request.getfixturevalue(which))
    ids = [1, 5, 9, 2, 33, 7, 11, 40] if which == "moe_groups" else \
        inspect.prompt_ids(run.tokenizer, PROMPT, 32)
    probs_lntt = inspect.forward(run, ids, attention=True)[1]["attention_probs"]
    cfg = run.cfg.model
    assert probs_lntt.shape == (cfg.num_layers, cfg.num_heads, len(ids), len(ids))
    assert np.allclose(probs_lntt.sum(-1), 1, atol=1e-5)
    assert np.all(np.triu(probs_lntt, 1) == 0)
    for layer, step in enumerate(_walk(run, ids)):  # depth order, each on its own input
        assert reference.relative_error(probs_lntt[layer], step["probs"]) < TOL, layer
        expected = _reference_weights(step, cfg)
        assert reference.relative_error(probs_lntt[layer], expected) < TOL, layer


# ------------------------------------------------------------------------------------------- routing


def test_routing_shows_the_routers_top_k_and_the_weights_the_layer_used(moe):
    report = inspect.inspect_routing(moe, PROMPT)
    cfg = moe.cfg.model
    ids = inspect.prompt_ids(moe.tokenizer, PROMPT, 32)
    walked = [step for step in _walk(moe, ids) if "moe_in" in step]
    assert [layer["layer"] for layer in report["moe_layers"]] == [0, 1] and len(walked) == 2
    for layer, step in zip(report["moe_layers"], walked, strict=True):
        experts_tr, weights_tr = np.array(layer["experts"]), np.array(layer["weights"])
        chosen, _ = reference.moe_routing(step["moe_in"][None], step["w_router_de"], k=cfg.experts_per_token)
        assert experts_tr.tolist() == chosen[0]
        assert np.array_equal(experts_tr, np.asarray(step["metrics"]["routing_experts"][0]))
        assert np.allclose(weights_tr, np.asarray(step["metrics"]["routing_weights"][0]), atol=1e-6)
        assert np.allclose(weights_tr.sum(-1), 1, atol=1e-5)  # softmax_topk, nothing dropped
        # The layer's own output is the weighted sum of the chosen experts with these weights.
        w = {name: np.asarray(step[name], np.float64) for name in ("w_gate_edf", "w_up_edf", "w_down_efd")}
        x_td = step["moe_in"].astype(np.float64)
        y_td = np.zeros_like(x_td)
        for t in range(len(ids)):
            for e, g in zip(experts_tr[t], weights_tr[t], strict=True):
                gate, up = x_td[t] @ w["w_gate_edf"][e], x_td[t] @ w["w_up_edf"][e]
                y_td[t] += g * ((gate / (1 + np.exp(-gate)) * up) @ w["w_down_efd"][e])
        assert reference.relative_error(step["moe_out"], y_td) < TOL
        load = np.bincount(experts_tr.ravel(), minlength=cfg.num_experts) / experts_tr.size
        assert np.allclose(layer["load"], load)


# ---------------------------------------------------------------------------------------- embeddings


def test_a_tokens_own_vector_is_its_nearest_neighbor(dense):
    table = np.asarray(nnx.merge(dense.graphdef, dense.params).embed.table_vd[...])[:259]
    for token in (32, 97, 100, 257):
        assert inspect.cosine_neighbors(table, table[token], 3)[0] == (token, pytest.approx(1.0))


def test_analogy_arithmetic_finds_the_planted_answer():
    rng = np.random.default_rng(0)
    royal, male, female, person = np.eye(64)[:4] * 3
    words = {"king": royal + male + person, "queen": royal + female + person, "man": male + person,
             "woman": female + person, "prince": royal + male}
    table = rng.normal(0, 0.3, (40, 64))
    ids = {w: 30 + i for i, w in enumerate(words)}
    for w, v in words.items():
        table[ids[w]] = v + rng.normal(0, 0.05, 64)
    query = table[ids["king"]] - table[ids["man"]] + table[ids["woman"]]
    best = inspect.cosine_neighbors(table, query, 3, exclude={ids["king"], ids["man"], ids["woman"]})
    assert best[0][0] == ids["queen"] and best[0][1] > 0.95


# ----------------------------------------------------------------------------- the command, end to end


def _main(capsys, *argv):
    code = inspect_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_subcommand_prints_a_table_json_and_a_png(dense_dir, moe_dir, tmp_path, capsys):
    cases = [("tokens", dense_dir, "--text", "the dog bites"),
             ("next", dense_dir, "--prompt", "the dog", "--top", "5"),
             ("embeddings", dense_dir, "--analogy", "king", "man", "w"),
             ("attention", dense_dir, "--prompt", "the dog bites", "--layer", "1", "--head", "2"),
             ("routing", moe_dir, "--prompt", "the dog bites")]
    for command, run_dir, *args in cases:
        png = tmp_path / f"{command}.png"
        code, out, err = _main(capsys, command, "--checkpoint", run_dir, *args, "--plot", png)
        assert code == 0, err
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
        assert out.strip().endswith(f"wrote {png}")
        code, out, err = _main(capsys, command, "--checkpoint", run_dir, *args, "--json")
        assert code == 0, err
        report = json.loads(out)
        if command == "embeddings":
            assert report["words"][0]["tokens"] == 4 and report["words"][2]["tokens"] == 1
            assert report["excluded"] == [ord("w")]
        if command == "attention":
            assert report["head"] == 2 and report["position"] == 13 and len(report["weights"]) == 14
        if command == "tokens":
            assert report["num_tokens"] == 13 and report["chars_per_token"] == 1.0


@pytest.mark.parametrize("which, args, message", [
    ("dense", ["attention", "--prompt", "x", "--layer", "2"], "--layer 2 does not exist"),
    ("dense", ["attention", "--prompt", "x", "--head", "4"], "--head 4 does not exist"),
    ("dense", ["attention", "--prompt", "x", "--position", "5"], "--position 5 is outside"),
    ("dense", ["routing", "--prompt", "x"], "dense model"),
    ("dense", ["embeddings", "--neighbors", ""], "empty word"),
    ("dense", ["next", "--prompt", "x", "--temperatures", "1,-1"], ">= 0"),
    ("dense", ["next", "--prompt", "x", "--top", "0"], "--top must be"),
    ("dense", ["tokens", "--text", "x", "--plot", "a.jpg"], "ending in .png"),
    ("dense", ["next", "--prompt", "x", "--layer", "1"], "unrecognized arguments"),
    ("missing", ["tokens", "--text", "x"], "neither a meshlm run directory"),
])
def test_mistakes_give_one_error_line_and_exit_2(which, args, message, dense_dir, tmp_path, capsys):
    run_dir = dense_dir if which == "dense" else tmp_path
    code, out, err = _main(capsys, args[0], "--checkpoint", run_dir, *args[1:])
    assert code == 2 and err.startswith("error:") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_python_m_eval_inspect_runs(moe_dir):
    result = subprocess.run([sys.executable, "-m", "eval", "inspect", "next", "--checkpoint", str(moe_dir),
                             "--prompt", "the dog", "--temperatures", "0,1", "--top", "3", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert len(report["top"]) == 3 and report["top"][0]["probs"][0] == 1.0
