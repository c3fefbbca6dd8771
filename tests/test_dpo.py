"""Preference fine-tuning (DPO, conservative DPO, SimPO) on ``pref:`` pairs: the losses equal a
hand computation from plain forward passes, training raises the reward margin and resumes exactly,
microbatches and meshes give the full batch's gradient, and bad data or settings fail with one line
naming the file and line (or the key)."""

import functools
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cli.finetune import main as finetune_main
from core.errors import ConfigError
from data.hf_tokenizer import HFTokenizer
from data.preference import open_pairs
from data.tokenizer import ByteTokenizer
from inference.load import load_run
from tests.helpers import (
    check_microbatches_and_meshes,
    losses_of,
    run_in_process,
    small_text,
    tiny_tokenizer,
)
from train.finetune_config import load_run_config
from train.finetune_trainee import FinetuneTrainee
from train.loop import train
from train.preference import preference_grads
from train.program import Program
from train.validate import validate

ROOT = Path(__file__).resolve().parent.parent
QUIET = ("train.log_every=1", "checkpoint.every=0", "run.peak_flops=1e12", "run.tensorboard=false",
         "run.progress=false", "train.eval_batches=1")
GOOD, BAD = "the cat sat on the mat", "a dog bites a man"


@pytest.fixture(scope="module")
def files(chat_run, tmp_path_factory) -> dict[str, Path]:
    """The chat tokenizer (tests/conftest.py: chat_run), a base text and 24 pairs (chosen: always
    GOOD)."""
    root = tmp_path_factory.mktemp("dpo")
    lines = [{"prompt": f"hello world {i}", "chosen": GOOD + f" {i % 3}", "rejected": BAD}
             for i in range(16)]
    lines += [{"messages": [{"role": "user", "content": f"the cat {i}"}],
               "chosen": [{"role": "assistant", "content": GOOD}], "rejected": f"a man {i}"}
              for i in range(8)]
    (root / "pairs.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    return {"tok": chat_run[1], "text": Path(small_text(root / "text")),
            "pairs": root / "pairs.jsonl", "root": root}


@pytest.fixture(scope="module")
def base_run(chat_run) -> Path:
    """The session's chat base run (tests/conftest.py: the tiny run's weights, the chat tokenizer)."""
    return chat_run[0]


def dpo_config(run_dir: Path, base: Path, files: dict, *extra: str, preset=None, devices: int = 8):
    lora = () if preset else ("finetune.lora_targets=q,v",)  # fewer adapters: quicker to compile
    cfg = load_run_config(preset, [f"finetune.base={base}", f"run.dir={run_dir}", *QUIET, *lora,
                                   f"data.source=pref:{files['pairs']}", "finetune.objective=dpo",
                                   "train.seq_len=64", "train.batch_size=8", "mesh.data=2",
                                   "mesh.tensor=4", "data.eval_fraction=0.2",
                                   "optim.warmup_steps=1", *extra], finetune=True)
    validate(cfg, devices)
    return cfg


def sequence_logp(logits_btv: np.ndarray, batch: dict) -> np.ndarray:
    """Each row's weighted sum of target log-probabilities, in numpy (float64)."""
    logits = logits_btv.astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return (picked * batch["weights"]).sum(-1)


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def test_losses_are_the_hand_computation(base_run, files, tmp_path):
    """The eval step's DPO (ε = 0 and 0.1) and SimPO losses and metrics equal numpy's from the
    log-probabilities of plain forward passes of the policy (adapters on) and of the base."""
    variants = {"dpo": ("finetune.dpo_beta=0.5",),
                "cdpo": ("finetune.dpo_beta=0.5", "finetune.dpo_label_smoothing=0.1"),
                "simpo": ("finetune.objective=simpo", "finetune.simpo_beta=2.5",
                          "finetune.simpo_gamma=0.3")}
    programs = {k: Program(dpo_config(tmp_path / k, base_run, files, *v)) for k, v in variants.items()}
    first = programs["dpo"]
    trainee = first.trainee
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype),
                          jax.device_get(first.init().params))  # B != 0: the policy moved
    params = jax.device_put(params, trainee.shardings.params)
    for program in programs.values():
        program.trainee.frozen = trainee.frozen
    rows = open_pairs(f"pref:{files['pairs']}", "train", load_run(base_run).tokenizer, 64, 0.2)
    batch = {k: np.concatenate([rows[i][k] for i in range(4)]) for k in rows[0]}
    base = load_run(base_run)
    policy, ref = jax.jit(lambda p, f, b, x: (nnx.merge(trainee.eval_graphdef, p, f)(x),
                                              nnx.merge(base.graphdef, b)(x)))(
        params, trainee.frozen, base.params, batch["inputs"])
    logp, ref_logp = (sequence_logp(np.asarray(x), batch).reshape(-1, 2) for x in (policy, ref))
    lengths = batch["weights"].sum(-1).reshape(-1, 2)
    rewards = {"dpo": 0.5 * (logp - ref_logp), "cdpo": 0.5 * (logp - ref_logp),
               "simpo": 2.5 * logp / lengths}
    for name, program in programs.items():
        z = rewards[name][:, 0] - rewards[name][:, 1]
        expected = {"dpo": -log_sigmoid(z), "cdpo": -0.9 * log_sigmoid(z) - 0.1 * log_sigmoid(-z),
                    "simpo": -log_sigmoid(z - 0.3)}[name]
        out = jax.device_get(program.eval_step(params, program.global_batch(batch)))
        assert out["weight_sum"] == 4
        assert abs(out["loss_sum"] / 4 - expected.mean()) < 1e-5 * abs(expected.mean()), name
        assert abs(out["reward_margin"] / 4 - z.mean()) < 1e-4 * abs(z).max(), name
        assert out["reward_accuracy"] / 4 == (z > 0).mean(), name
        np.testing.assert_allclose(out["logp_chosen"] / 4, logp[:, 0].mean(), rtol=1e-5)
        np.testing.assert_allclose(out["logp_rejected"] / 4, logp[:, 1].mean(), rtol=1e-5)
    assert np.abs(logp - ref_logp).max() > 0.1  # the adapters did move the policy


DPO_RUN = ("optim.lr=1e-2", "optim.decay_steps=4", "finetune.dpo_beta=0.5", "train.steps=4",
           "checkpoint.every=2", "train.eval_batches=0", "data.eval_fraction=0.25")  # 7 held out


def eval_record(run_dir: Path) -> dict:
    """The last evaluation a run logged."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r][-1]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_raises_the_margin_and_resumes_exactly(base_run, files, tmp_path, method):
    """4 DPO steps, LoRA (dropout on) or full fine-tuning (the base's copy kept as the reference),
    raise the reward margin and log held-out metrics over every held-out pair (two evaluation
    batches, the last padded); the run resumed from its checkpoint of step 2 logs the same losses
    for steps 3 and 4 and the same evaluation, bit for bit. Full fine-tuning: the logged held-out
    loss, reward margin and accuracy are numpy's from plain forward passes of the final weights
    and of the base."""
    preset = ROOT / "configs" / "finetune_full.yaml" if method == "full" else None
    straight = tmp_path / "straight"
    summary = train(dpo_config(straight, base_run, files, *DPO_RUN, preset=preset))
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "reward_margin" in r}
    assert steps[1]["reward_margin"] == 0.0 and steps[1]["loss"] == pytest.approx(np.log(2))
    assert steps[4]["reward_margin"] > 0.05 and steps[4]["reward_accuracy"] >= 0.75, steps[4]
    assert steps[4]["loss"] < steps[1]["loss"]
    logged = eval_record(straight)
    assert set(logged) == {"step", "eval_loss", "eval_reward_margin", "eval_reward_accuracy",
                           "eval_logp_chosen", "eval_logp_rejected"}
    assert all(summary[k] == v for k, v in logged.items()) and np.isfinite(logged["eval_loss"])
    resumed = tmp_path / "resumed"  # the run as it was after step 2: its checkpoint 4 removed
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    train(dpo_config(resumed, base_run, files, *DPO_RUN, preset=preset))
    a, b = losses_of(straight), losses_of(resumed)
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]
    assert eval_record(resumed) == logged
    if method == "lora":  # the held-out metrics of a LoRA run: test_losses_are_the_hand_computation
        return
    base = load_run(base_run)
    held = open_pairs(f"pref:{files['pairs']}", "eval", base.tokenizer, 64, 0.25)
    assert len(held) % 4 and len(held) > 4  # more pairs than one batch of 4 holds
    batch = {k: np.concatenate([held[i][k] for i in range(len(held))]) for k in held[0]}
    final = load_run(straight)  # full fine-tuning checkpoints the whole model
    logits = jax.jit(lambda p, b, x: (nnx.merge(final.graphdef, p)(x), nnx.merge(base.graphdef, b)(x)))(
        final.params, base.params, batch["inputs"])
    logp, ref_logp = (sequence_logp(np.asarray(x), batch).reshape(-1, 2) for x in logits)
    z = 0.5 * ((logp - ref_logp)[:, 0] - (logp - ref_logp)[:, 1])
    assert abs(logged["eval_loss"] + log_sigmoid(z).mean()) < 1e-5 * abs(log_sigmoid(z).mean())
    assert abs(logged["eval_reward_margin"] - z.mean()) < 1e-4 * abs(z).max()
    assert logged["eval_reward_accuracy"] == (z > 0).mean()
    batch_means = np.mean([z[:4].mean(), z[4:].mean()])  # what a mean of batch means would log
    assert abs(batch_means - z.mean()) > 1e-2 * abs(z).max()


def test_microbatches_and_meshes_equal_the_full_batch(base_run, files, tmp_path, eight_devices):
    """Full fine-tuning (the base kept as the frozen reference): 2 microbatches of whole pairs on
    a data x fsdp x tensor mesh and one device give the full batch's loss and gradients."""
    full = ROOT / "configs" / "finetune_full.yaml"
    rows = open_pairs(f"pref:{files['pairs']}", "train", load_run(base_run).tokenizer, 64, 0.2)
    batch = {k: np.concatenate([rows[i][k] for i in range(4)]) for k in rows[0]}
    sharded = Program(dpo_config(tmp_path / "a", base_run, files, "mesh.tensor=2", "mesh.fsdp=2",
                                 "train.microbatches=2", preset=full))
    one = dpo_config(tmp_path / "b", base_run, files, "mesh.data=1", "mesh.tensor=1", preset=full,
                     devices=1)

    def grads_fn(trainee: FinetuneTrainee, microbatches: int) -> functools.partial:
        return functools.partial(preference_grads, graphdef=trainee.graphdef,
                                 objective=trainee.objective, reference=trainee.reference_model,
                                 microbatches=microbatches)

    metrics = check_microbatches_and_meshes(sharded, Program(one, devices=eight_devices[:1]),
                                            grads_fn, batch)
    assert metrics["reward_margin"] != 0.0  # the policy differs from the reference


# ----------------------------------------------------------------------------------- bad input

BAD_LINES = {
    "invalid JSON": ('{"prompt": "hi", "chosen": "a"', "invalid JSON"),
    "no prompt": ('{"chosen": "a", "rejected": "b"}', "has no prompt"),
    "no chosen": ('{"prompt": "hi", "rejected": "b"}', "has no field 'chosen'"),
    "no rejected": ('{"prompt": "hi", "chosen": "a"}', "has no field 'rejected'"),
    "same": ('{"prompt": "hi", "chosen": "a", "rejected": "a"}', "chosen equals rejected"),
    "empty": ('{"prompt": "hi", "chosen": " ", "rejected": "b"}', "chosen is an empty response"),
}


def test_bad_pairs_fail_with_one_line_naming_file_and_line(files, base_run, tmp_path):
    tokenizer = HFTokenizer.from_path(files["tok"])
    good = json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
    for name, (line, message) in BAD_LINES.items():
        path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        path.write_text(f"{good}\n\n{line}\n{good}\n")
        with pytest.raises(ValueError) as e:
            open_pairs(f"pref:{path}", "train", tokenizer, 64, 0.2)
        assert str(e.value).startswith(f"{path}:3") and message in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good.encode() + b"\n" + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'
                     .encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=rf"^{path}:2 is not UTF-8"):
        open_pairs(f"pref:{path}", "train", tokenizer, 64, 0.2)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        open_pairs(f"pref:{files['pairs']}", "train", ByteTokenizer(), 64, 0.2)

    # through the command: one error line, before anything compiles or trains
    bad = tmp_path / "same.jsonl"
    run_dir = tmp_path / "run"
    result = run_in_process(finetune_main, f"finetune.base={base_run}", f"run.dir={run_dir}",
                            f"data.source=pref:{bad}", "finetune.objective=dpo", *QUIET)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: data: {bad}:3: chosen equals rejected"), lines[0]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_a_token_across_the_generation_prompt_is_not_trained(tmp_path):
    """tests/helpers.py's template ends its generation prompt in a space, which byte-level BPE merges
    into the reply's first word: the rows hold the whole rendering, and only tokens inside the
    reply are trained (chat SFT's rule), so that first token is context in both rows."""
    tokenizer = HFTokenizer.from_path(tiny_tokenizer(tmp_path / "tok"))
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "hello", "chosen": "the cat", "rejected": "a dog"}) + "\n")
    rows = open_pairs(f"pref:{path}", "train", tokenizer, 32, 0.0)[0]
    for row, reply in enumerate(("the cat", "a dog")):
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"},
                                              {"role": "assistant", "content": reply}],
                                             add_generation_prompt=False)
        n = int(rows["segment_ids"][row].sum())
        ids = np.concatenate([rows["inputs"][row][:1], rows["targets"][row][:n]])
        assert ids.tolist() == tokenizer.encode(text)
        trained = rows["targets"][row][rows["weights"][row] > 0]
        assert tokenizer.decode(trained) == reply[reply.index(" "):] + "</s>"


def test_bad_preference_settings_are_config_errors(base_run, files, tmp_path):
    cases = {
        "finetune.dpo_beta": ["finetune.dpo_beta=0"],
        "finetune.dpo_label_smoothing": ["finetune.dpo_label_smoothing=0.5"],
        "finetune.simpo_gamma": ["finetune.objective=simpo", "finetune.simpo_gamma=-1"],
        "data.source": [f"data.source=text:{files['text']}"],
    }
    for key, overrides in cases.items():
        with pytest.raises(ConfigError) as e:
            dpo_config(tmp_path / "ft", base_run, files, *overrides)
        assert e.value.key == key, str(e.value)
    with pytest.raises(ConfigError, match="set finetune.objective=dpo or simpo") as e:
        dpo_config(tmp_path / "ft", base_run, files, "finetune.objective=sft")
    assert e.value.key == "data.source"
