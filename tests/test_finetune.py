"""Fine-tuning: LoRA trains only its adapters (and only they have optimizer moments), the trainable
count is the rank's arithmetic, merged weights give the adapted logits, resumes are exact, full
fine-tuning keeps frozen routers bit-identical, JSON-lines sources, and clear errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from cli.finetune import main as finetune_main
from core.errors import ConfigError
from data.pipeline import eval_batches
from data.sources import open_source
from data.tokenizer import make_tokenizer
from inference.load import load_run
from sharding.constrain import activation_sharding, under_activation_sharding
from tests import reference
from tests.helpers import losses_of, random_batch, small_text, tiny_config
from train.checkpoint import Checkpointer
from train.finetune_config import load_run_config
from train.finetune_trainee import FinetuneTrainee
from train.loop import train
from train.merge import merge_run
from train.program import Program
from train.step import grads_loss_and_metrics
from train.validate import validate

ROOT = Path(__file__).resolve().parent.parent
TINY = ("train.log_every=1", "checkpoint.every=0", "run.peak_flops=1e12", "run.tensorboard=false",
        "run.progress=false", "train.eval_batches=1")
SMALL_BASE = ("model.d_model=32", "model.mlp_dim=64")  # the slow tests' own bases
D, N, K, H, F, L, RANK = 64, 4, 2, 16, 128, 2, 8  # the base model below (configs/tiny.yaml), the rank
BASE_STEP = 20  # its last checkpoint


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """The slow tests' bases' pre-training text, the fine-tuning text (another vocabulary), a cache."""
    root = tmp_path_factory.mktemp("corpus")
    other = root / "other"
    other.mkdir()
    words = ["seven red ships", "an open door", "the quiet river", "four tall towers"]
    rng = np.random.default_rng(1)
    (other / "a.txt").write_text("\n".join(" and ".join(rng.choice(words, 2)) for _ in range(600)))
    return {"base": str(other / "*.txt"), "finetune": small_text(root / "finetune"),
            "cache": str(root / "cache")}


def base_config(run_dir: Path, corpus: dict[str, str], *extra: str):
    return tiny_config(run_dir, *SMALL_BASE, *TINY, f"data.source=text:{corpus['base']}",
                       f"data.cache_dir={corpus['cache']}", *extra)


def ft_config(run_dir: Path, base: Path, corpus: dict[str, str], *extra: str, preset=None):
    cfg = load_run_config(preset, [f"finetune.base={base}", f"run.dir={run_dir}", *TINY,
                                   f"data.source=text:{corpus['finetune']}",
                                   f"data.cache_dir={corpus['cache']}", "train.seq_len=32",
                                   "optim.warmup_steps=1", *extra], finetune=True)
    validate(cfg, jax.device_count())
    return cfg


@pytest.fixture(scope="module")
def base_run(tiny_run) -> Path:
    """A dense base: the session's tiny run (tests/conftest.py: configs/tiny.yaml, d_model 64, 2
    layers, 20 steps, checkpoints at 10 and 20), which fine-tuning only reads."""
    return tiny_run[0]


LORA = ("finetune.lora_dropout=0.1", "optim.lr=1e-2", "optim.decay_steps=4")


@pytest.fixture(scope="module")
def lora_run(corpus, base_run, tmp_path_factory) -> Path:
    """4 LoRA steps with dropout through the training loop."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    train(ft_config(run_dir, base_run, corpus, "train.steps=4", *LORA))
    return run_dir


def flat(state) -> dict[str, np.ndarray]:
    """{"a/b/c": host array} of an nnx State."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return {"/".join(str(k.key) for k in path if hasattr(k, "key")): np.asarray(v)
            for path, v in leaves}


def trainee_for(cfg) -> FinetuneTrainee:
    return Program(cfg).trainee


def test_lora_trains_only_the_adapters(eight_devices, corpus, base_run, tmp_path):
    cfg = ft_config(tmp_path / "ft", base_run, corpus, "finetune.lora_dropout=0.1", "optim.lr=1e-2",
                    "optim.weight_decay=0.1")
    program = Program(cfg)
    trainee = program.trainee
    base = flat(trainee.load_base(cfg.finetune.base_step))
    state = program.init()
    adapters_before = flat(state.params)
    for i in range(3):
        batch = random_batch(16, 32, cfg.model.vocab_size, seed=i)
        state, metrics = program.train_step(
            state, {k: jax.device_put(v, program.batch_sharding) for k, v in batch.items()})
        assert not metrics["skipped"]
    model = flat(nnx.merge_state(state.params, trainee.frozen))
    adapters = flat(state.params)
    assert set(adapters) == {p for p in model if "/lora_" in p and p.endswith(("/a", "/b"))}
    for path, value in adapters.items():  # every adapter weight moved (B from zero)
        assert not np.array_equal(value, adapters_before[path]), path
    assert set(base) == {p for p in model if "/lora_" not in p}
    for path, value in base.items():  # every base weight bit-identical
        assert np.array_equal(model[path], value), path
    moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sorted(moments) == sorted([v.shape for v in adapters.values()] * 2)  # mu and nu only


def test_lora_dropout_microbatches_equal_the_full_batch(eight_devices, corpus, base_run, tmp_path):
    """With dropout on and non-zero adapters, a step split into 4 microbatches has the loss and
    gradients of the whole batch under the same step key: a row's masks do not depend on the
    microbatch it lands in."""
    cfg = ft_config(tmp_path / "ft", base_run, corpus, "finetune.lora_dropout=0.5",
                    "train.batch_size=32")
    program = Program(cfg)
    trainee = program.trainee
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.02 * rng.normal(size=x.shape).astype(x.dtype),
                          jax.device_get(program.init().params))  # B != 0: every adapter matters
    params = jax.device_put(params, trainee.shardings.params)
    batch = {k: jax.device_put(v, program.batch_sharding)
             for k, v in random_batch(32, 32, cfg.model.vocab_size, seed=3).items()}
    step = jax.numpy.int32(5)

    def grads_and_loss(n: int, graphdef: nnx.GraphDef) -> tuple:
        def fn(params, batch, frozen):  # what the train step differentiates
            batch, frozen = trainee.with_dropout(step, batch, frozen)
            return grads_loss_and_metrics(params, batch, frozen, graphdef=graphdef,
                                          microbatches=n)[:2]
        return jax.device_get(jax.jit(under_activation_sharding(fn, program.mesh, program.rules))(
            params, batch, trainee.frozen))

    whole_grads, whole_loss = grads_and_loss(1, trainee.graphdef)
    whole_grads = flat(whole_grads)
    no_dropout = flat(grads_and_loss(1, trainee.eval_graphdef)[0])
    for path, value in whole_grads.items():  # the masks change every gradient
        assert reference.relative_error(value, no_dropout[path]) > 0.1, path
    grads, loss = grads_and_loss(4, trainee.graphdef)
    assert abs(loss - whole_loss) < 1e-5 * abs(whole_loss)
    for path, value in flat(grads).items():
        assert reference.relative_error(value, whole_grads[path]) < 1e-4, path


def test_trainable_count_is_the_rank_arithmetic(base_run, lora_run, corpus, tmp_path):
    per_layer = RANK * ((D + N * H) + 2 * (D + K * H) + (N * H + D) + 3 * (D + F))
    record = next(r for r in map(json.loads, (lora_run / "metrics.jsonl").read_text().splitlines())
                  if "trainable_params" in r)
    base_total = sum(v.size for v in flat(load_run(base_run).params).values())
    assert record["trainable_params"] == L * per_layer
    assert record["total_params"] == base_total + L * per_layer
    assert record["trainable_fraction"] == L * per_layer / (base_total + L * per_layer)
    cfg = ft_config(tmp_path / "qv", base_run, corpus, "finetune.lora_rank=3",
                    "finetune.lora_targets=q,v", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    trainee = trainee_for(cfg)
    assert trainee.trainable_counts()[0] == L * 3 * ((D + N * H) + (D + K * H))
    lora_q = trainee.shardings.params["blocks"]["attn"]["lora_q"]  # laid out like w_q_dnh [L, D, N, H]
    assert lora_q["a"].spec == PartitionSpec(None, "fsdp")  # A [L, D, r]
    assert lora_q["b"].spec == PartitionSpec(None, None, "tensor")  # B [L, r, N, H]


def test_lora_run_checkpoints_adapters_and_a_base_reference(base_run, lora_run):
    losses = losses_of(lora_run)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    meta = json.loads((lora_run / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["base_run"] == str(base_run) and meta["base_step"] == BASE_STEP and meta["lora"]["rank"] == 8
    assert meta["base_manifest_sha256"]
    with pytest.raises(ValueError, match="LoRA adapters"):  # not a model: merge it first
        load_run(lora_run)


@pytest.mark.slow
def test_lora_resume_is_exact(base_run, lora_run, corpus, tmp_path):
    """Stopped after step 2 and resumed: the same losses, bit for bit (dropout masks included)."""
    resumed = tmp_path / "resumed"
    train(ft_config(resumed, base_run, corpus, "train.steps=2", *LORA))
    train(ft_config(resumed, base_run, corpus, "train.steps=4", *LORA))
    a, b = losses_of(lora_run), losses_of(resumed)
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]


def merged_and_adapted_logits(lora_run: Path, out_run: Path, *overrides: str) -> tuple:
    """(logits of the merged run as eval loads it, of the base with the adapters, of the base)."""
    summary = merge_run(lora_run, out_run)
    merged = load_run(out_run)  # a plain run directory, as eval reads it
    base_dir, step = Path(summary["base_run"]), summary["step"]
    cfg = load_run_config(None, [f"finetune.base={base_dir}", f"run.dir={lora_run}",
                                 "train.seq_len=32", *overrides], finetune=True)
    trainee = trainee_for(cfg)
    tokens = jax.numpy.asarray(random_batch(8, 32, 384, seed=5)["inputs"])
    with activation_sharding(trainee.mesh, trainee.rules):
        checkpointer = Checkpointer(lora_run, cfg.checkpoint, read_only=True)
        adapters = checkpointer.restore_params(step, trainee.abstract.params,
                                               trainee.shardings.params)
        checkpointer.close()
        trainee.frozen = trainee.split_base(trainee.load_base(summary["base_step"]))[1]
        assert all(np.any(v) for p, v in flat(adapters).items() if p.endswith("/b"))  # B != 0
        adapted = jax.jit(lambda a, f: nnx.merge(trainee.eval_graphdef, a, f)(tokens))(
            adapters, trainee.frozen)
        plain = jax.jit(lambda p: nnx.merge(merged.graphdef, p)(tokens))(merged.params)
        base = load_run(base_dir)
        before = jax.jit(lambda p: nnx.merge(base.graphdef, p)(tokens))(base.params)
    return plain, adapted, before


def test_merged_weights_give_the_adapted_logits(eight_devices, lora_run, tmp_path):
    plain, adapted, before = merged_and_adapted_logits(lora_run, tmp_path / "merged",
                                                       "finetune.lora_dropout=0.1")
    assert reference.relative_error(plain, adapted) < 1e-4
    assert reference.relative_error(before, adapted) > 1e-3  # the adapters did change the model


@pytest.mark.slow
def test_full_finetune_keeps_frozen_routers(eight_devices, corpus, tmp_path):
    moe = ("model.num_experts=4", "model.experts_per_token=2", "mesh.data=2", "mesh.expert=4",
           "train.steps=2")
    base_dir = tmp_path / "moe_base"
    train(base_config(base_dir, corpus, *moe))
    ft_dir = tmp_path / "moe_full"
    cfg = ft_config(ft_dir, base_dir, corpus, *moe, "finetune.freeze_router=true",
                    preset=ROOT / "configs" / "finetune_full.yaml")
    summary = train(cfg)
    assert summary["step"] == 2 and Checkpointer(ft_dir, cfg.checkpoint).all_steps() == [2]
    before, after = flat(load_run(base_dir).params), flat(load_run(ft_dir).params)
    assert set(before) == set(after)
    routers = [p for p in before if "w_router_de" in p]
    assert routers
    for path in before:
        assert np.array_equal(before[path], after[path]) == (path in routers), path
    trainee = trainee_for(cfg)
    checkpointer = Checkpointer(ft_dir, cfg.checkpoint, read_only=True)
    saved, meta, _ = checkpointer.restore(2, *trainee.checkpoint_abstract)
    checkpointer.close()
    trained = sum(v.size for p, v in after.items() if p not in routers)
    assert sum(x.size for x in jax.tree.leaves(saved.opt_state) if x.ndim) == 2 * trained
    assert meta["method"] == "full" and meta["base_step"] == 2

    # LoRA on the experts too (their adapters are added to the expert weights), then merged.
    lora_dir = tmp_path / "moe_lora"
    train(ft_config(lora_dir, base_dir, corpus, *moe, "finetune.lora_experts=true",
                    "optim.lr=1e-2"))
    expert_b = [p for p in flat(Checkpointer(lora_dir, cfg.checkpoint).restore(
        2, *trainee_for(ft_config(lora_dir, base_dir, corpus, *moe, "finetune.lora_experts=true"))
        .checkpoint_abstract)[0].params) if "moe/lora_up/b" in p]
    assert expert_b
    plain, adapted, before = merged_and_adapted_logits(lora_dir, tmp_path / "moe_merged", *moe,
                                                       "finetune.lora_experts=true")
    assert reference.relative_error(plain, adapted) < 1e-4
    assert reference.relative_error(before, adapted) > 1e-3


@pytest.mark.slow
def test_lora_lowers_held_out_perplexity(eight_devices, corpus, tmp_path):
    """A base trained on one text; 300 LoRA steps on another lower that text's held-out loss."""
    base_dir = tmp_path / "base"
    train(base_config(base_dir, corpus, "train.steps=150"))
    cfg = ft_config(tmp_path / "ft", base_dir, corpus, "train.steps=300", "train.eval_batches=4",
                    "optim.lr=1e-2", "optim.warmup_steps=10")
    program = Program(cfg)
    docs = open_source(cfg.data.source, "eval", cache_dir=corpus["cache"])
    data = eval_batches(docs, make_tokenizer("byte"), seq_len=32, batch_size=16, max_batches=4)
    before = program.evaluate(program.init().params, data)
    after = train(cfg)["eval_loss"]
    print(f"held-out loss of the fine-tuning text: base {before:.3f}, after LoRA {after:.3f}")
    assert after < before - 1.0, (before, after)


# ----------------------------------------------------------------------------------- bad input


def test_bad_finetune_input_is_a_config_error(base_run, lora_run, corpus, tmp_path):
    cases = {
        "finetune.base": [f"finetune.base={tmp_path / 'nope'}"],
        "finetune.base ": [f"finetune.base={tmp_path}"],  # a directory, but not a run
        "finetune.base  ": [f"finetune.base={lora_run}"],  # adapters, not a model
        "finetune.base_step": ["finetune.base_step=3"],
        "finetune.lora_targets": ["finetune.lora_targets=q,proj"],
        "finetune.lora_rank": ["finetune.lora_rank=0"],
        "model.d_model": ["model.d_model=32"],
    }
    messages = {}
    for key, overrides in cases.items():
        with pytest.raises(ConfigError) as e:
            ft_config(tmp_path / "ft", base_run, corpus, *overrides)
        assert e.value.key == key.strip(), str(e.value)
        messages[key] = str(e.value)
    assert "does not exist" in messages["finetune.base"]
    assert "not a meshlm run" in messages["finetune.base "]
    assert "merge them first" in messages["finetune.base  "]
    assert "unknown LoRA target 'proj'" in messages["finetune.lora_targets"]
    assert "d_model=64" in messages["model.d_model"]
    cfg = ft_config(tmp_path / "ft", base_run, corpus, "model.d_model=64", "model.remat=full")
    assert cfg.model.remat == "full" and cfg.model.d_model == 64  # same value, runtime key: fine
    assert cfg.finetune.base == str(base_run) and cfg.finetune.base_step == BASE_STEP


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    result = subprocess.run([sys.executable, "-m", "train.finetune", f"finetune.base={tmp_path}/none",
                             f"run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: finetune.base:") and "does not exist" in lines[0]
    assert not (tmp_path / "run").exists()
    assert finetune_main(["merge", str(tmp_path / "none"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ----------------------------------------------------------------------------- JSON-lines input


def test_jsonl_source_reads_one_document_per_line(tmp_path):
    (tmp_path / "d").mkdir()
    records = [{"text": f"document {i}", "prompt": f"question {i}"} for i in range(40)]
    for part in range(2):
        lines = [json.dumps(r) for r in records[part::2]]
        (tmp_path / "d" / f"{part}.jsonl").write_text("\n".join(lines[:10]) + "\n\n" +
                                                     "\n".join(lines[10:]) + "\n")
    cache = str(tmp_path / "cache")

    def read(spec: str, split: str) -> list[str]:
        docs = open_source(spec, split, eval_fraction=0.2, cache_dir=cache)
        return [docs[i] for i in range(len(docs))]

    spec = f"jsonl:{tmp_path}/d/*.jsonl"
    train_docs, eval_docs = read(spec, "train"), read(spec, "eval")
    assert sorted(train_docs + eval_docs) == sorted(r["text"] for r in records)
    assert train_docs and eval_docs
    prompts = read(spec + ":prompt", "train") + read(spec + ":prompt", "eval")
    assert sorted(prompts) == sorted(r["prompt"] for r in records)
    (tmp_path / "d" / "1.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"1\.jsonl:2 has no field 'text'"):
        open_source(spec, "train", cache_dir=cache)
    (tmp_path / "d" / "1.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="is not a string"):
        open_source(spec, "train", cache_dir=cache)
    with pytest.raises(ValueError, match="matches no files"):
        open_source(f"jsonl:{tmp_path}/none/*.jsonl", "train", cache_dir=cache)
