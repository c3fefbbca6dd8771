"""The eval CLI on a real (tiny) trained run: perplexity agrees with training's evaluation."""

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cli import eval as eval_cli
from data.pipeline import empty_batch, eval_batches
from data.tokenizer import ByteTokenizer
from eval.perplexity import perplexity, trimmed
from inference.load import LoadedRun, load_run
from inference.score import Scorer
from model.transformer import Transformer
from sharding.mesh import make_mesh
from sharding.rules import default_rules, tree_shardings
from tests.helpers import TINY_RUN_SAMPLE, init_params, padded_logits, run_in_process, tiny_config
from train.program import Program
from train.step import eval_step

ROOT = Path(__file__).resolve().parent.parent


SAMPLE = TINY_RUN_SAMPLE  # tokens of the end-of-run sample


@pytest.fixture(scope="module")
def trained_run(tiny_run):
    assert tiny_run[1]["printed"].count("--- sample") == 1
    return tiny_run


def test_the_end_of_run_sample_is_what_generate_gives_from_the_last_checkpoint(trained_run):
    run_dir, summary = trained_run
    sample = summary["printed"].split("--- sample (temperature 0.8) ---\n")[1]
    sample = sample.split("\n--- end of sample ---")[0]
    result = run_eval("generate", "--checkpoint", str(run_dir), "--prompt", "def ", "--seed", "0",
                      "--temperature", "0.8", "--max-new-tokens", str(SAMPLE))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == sample + "\n"


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return run_in_process(eval_cli.main, *args)


def test_perplexity_matches_training_eval_on_another_mesh(eight_devices, trained_run):
    run_dir, summary = trained_run
    result = run_eval("perplexity", "--checkpoint", str(run_dir), "--max-batches", "2",
                      "--window", "32")  # training's eval batches: train.seq_len rows
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["step"] == 20 and report["window"] == 32 and 0 < report["tokens"] <= 2 * 16 * 32
    assert abs(report["loss"] - summary["eval_loss"]) <= 1e-5 * summary["eval_loss"]


def test_generate_from_a_step_directory(eight_devices, trained_run):
    run_dir, _ = trained_run
    result = run_eval("generate", "--checkpoint", str(run_dir / "checkpoints" / "10"),
                      "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["prompt"] == "def " and out["tokens"] <= 8


def test_streamed_generation_equals_the_batched_one(eight_devices, trained_run, tmp_path):
    run_dir, _ = trained_run
    prompts = ["def ", "import numpy as np; x = ", "class"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    batched = run_eval("generate", "--checkpoint", str(run_dir), "--prompts-file",
                       str(tmp_path / "prompts.txt"), "--max-new-tokens", "12", "--temperature", "0",
                       "--json", "--batch-size", "2")
    assert batched.returncode == 0, batched.stderr
    rows = [json.loads(line) for line in batched.stdout.strip().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    streamed = run_eval("generate", "--checkpoint", str(run_dir), "--prompt", prompts[1],
                        "--max-new-tokens", "12", "--temperature", "0")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == prompts[1] + rows[1]["completion"] + "\n"


def test_a_prompt_longer_than_the_window_is_cut_with_a_warning(eight_devices, trained_run):
    run_dir, _ = trained_run
    result = run_eval("generate", "--checkpoint", str(run_dir), "--prompt", "x" * 100,
                      "--max-new-tokens", "3", "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ("warning: prompt has 101 tokens, more than the model's window of "
                                     "64: keeping its last 64")


def test_generate_keeps_a_prompt_longer_than_the_training_length_whole(eight_devices, trained_run,
                                                                       capsys):
    """The window is the model's own (model.max_seq_len = 64), not train.seq_len (32): greedy
    decoding continues the whole prompt, as the plain forward pass over all of it does."""
    run_dir, _ = trained_run
    run = load_run(run_dir)
    prompt = "import numpy as np; x = np.arange(10); y = x * "
    ids = [run.tokenizer.bos_id, *run.tokenizer.encode(prompt)]
    assert run.cfg.train.seq_len < len(ids) and len(ids) + 4 <= run.cfg.model.max_seq_len
    code = eval_cli.main(["generate", "--checkpoint", str(run_dir), "--prompt", prompt,
                          "--max-new-tokens", "4", "--temperature", "0", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and err == "", err  # nothing cut, nothing to warn about
    params, new = jax.device_get(run.params), []
    while len(new) < 4 and run.tokenizer.eos_id not in new:  # one jitted program for every length
        new.append(int(np.argmax(padded_logits(run.graphdef, params, np.asarray([ids + new]),
                                               run.cfg.model.max_seq_len)[0, -1])))
    new = [t for t in new if t != run.tokenizer.eos_id]
    assert json.loads(out.strip().splitlines()[-1])["completion"] == run.tokenizer.decode(new)


def test_perplexity_of_a_text_file_is_exp_of_the_eval_step_mean_loss(eight_devices, trained_run,
                                                                     tmp_path):
    run_dir, _ = trained_run
    text = tmp_path / "poem.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n"
                    * 6)
    result = run_eval("perplexity", "--checkpoint", str(run_dir), "--text", str(text))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    run = load_run(run_dir)
    step = jax.jit(functools.partial(eval_step, graphdef=run.graphdef))
    params = jax.device_get(run.params)
    window = run.cfg.model.max_seq_len  # the model's own context, not train.seq_len (32)
    sums = [jax.device_get(step(params, batch))
            for batch in eval_batches([text.read_text()], run.tokenizer, seq_len=window, batch_size=16)]
    loss = sum(float(s["loss_sum"]) for s in sums) / sum(float(s["weight_sum"]) for s in sums)
    assert report["tokens"] == sum(int(s["weight_sum"]) for s in sums) == len(text.read_bytes()) + 1
    assert report["window"] == window == 64
    assert abs(report["loss"] - loss) <= 1e-5 * loss
    assert report["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(
        report["loss"] * report["tokens"] / math.log(2) / len(text.read_bytes()), rel=1e-5)


def test_perplexity_of_a_moe_model_that_drops_tokens_is_the_scorers_nll(eight_devices, tmp_path):
    """Evaluation has one definition, the model as served: perplexity runs the inference graph (no
    token dropped), as scoring and the harness do. At capacity factor 0.5 the training graph drops
    expert assignments, so training's eval loss is another number."""
    cfg = tiny_config(tmp_path / "moe", "model.num_experts=8", "model.experts_per_token=2",
                      "model.expert_mlp_dim=16", "model.capacity_factor=0.5", "model.init_std=0.3",
                      "mesh.data=2", "mesh.expert=4")
    mesh, rules = make_mesh(cfg.mesh), default_rules()
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))[0]
    params = init_params(cfg.model)
    params = jax.device_put(params, tree_shardings(params, mesh, rules))
    tok = ByteTokenizer()
    run = LoadedRun(cfg=cfg, tokenizer=tok, graphdef=graphdef, params=params, mesh=mesh, rules=rules,
                    step=0, run_dir=tmp_path / "moe")
    text = tmp_path / "line.txt"
    text.write_text("the dog sees the moon.\n")  # one row, shorter than train.seq_len
    report = perplexity(run, text_file=str(text))
    row = [tok.bos_id, *tok.encode(text.read_text()), tok.eos_id]
    assert report["tokens"] == len(row) - 1 <= cfg.train.seq_len
    scorer = Scorer(cfg.model, params, mesh, rules, window=cfg.model.max_seq_len, batch_size=2)
    (logprob, _), = scorer.score([row])
    nll = -float(np.mean(logprob, dtype=np.float64))
    assert abs(report["loss"] - nll) <= 1e-5 * nll
    program = Program(cfg, mesh=mesh)  # the training graph, as the in-training eval_loss runs it
    training_nll = program.evaluate(params, eval_batches([text.read_text()], tok, seq_len=32,
                                                         batch_size=cfg.train.batch_size))
    assert abs(training_nll - nll) > 1e-3 * nll  # tokens were dropped there


def test_perplexity_rows_are_cut_to_the_longest_real_row():
    short, padding = empty_batch(2, 64), empty_batch(2, 64)
    short["inputs"][1, :21], short["weights"][1, :21] = 7, 1.0
    out = trimmed([short, padding], 64)
    assert [b["inputs"].shape for b in out] == [(2, 32), (2, 32)]  # 21 tokens -> a bucket of 32
    assert out[0]["weights"].sum() == 21 and np.all(out[0]["inputs"][1, :21] == 7)
    short["weights"][0, 63] = 1.0  # a full row: nothing to cut
    assert trimmed([short], 64)[0]["weights"].shape == (2, 64)


@pytest.mark.parametrize("args, message", [
    (["perplexity", "--checkpoint", "/nonexistent/run"], "neither a meshlm run directory"),
    (["generate", "--checkpoint", "RUN/checkpoints/7", "--prompt", "x"], "does not exist"),
    (["generate", "--checkpoint", "RUN/checkpoints/30.orbax-checkpoint-tmp-1", "--prompt", "x"],
     "is not a checkpoint step directory"),
    (["generate", "--checkpoint", "RUN", "--prompt", ""], "empty prompt"),
    (["generate", "--checkpoint", "RUN", "--prompts-file", "LATIN1"], "is not UTF-8 text"),
    (["generate", "--checkpoint", "RUN", "--prompts-file", "/nonexistent/p.txt"], "cannot read"),
    (["generate", "--checkpoint", "RUN", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "--checkpoint", "RUN", "--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "--checkpoint", "RUN", "--prompt", "x", "--top-p", "1.5"], "--top-p must be in"),
    (["generate", "--checkpoint", "RUN", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["perplexity", "--checkpoint", "RUN", "--text", "LATIN1"], "is not UTF-8 text"),
    (["perplexity", "--checkpoint", "RUN", "--window", "65"], "--window 65 is outside 2..64"),
    (["perplexity", "--checkpoint", "RUN", "--window", "1"], "--window"),
    (["generate", "--checkpoint", "RUN", "--prompt", "x", "--bogus"], "unrecognized arguments"),
])
def test_eval_errors_exit_2(trained_run, tmp_path, capsys, args, message):
    run_dir, _ = trained_run
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    code = eval_cli.main([a.replace("RUN", str(run_dir)).replace("LATIN1", str(tmp_path / "latin1.txt"))
                          for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_eval_error_through_python_m_eval_has_no_traceback(trained_run):
    run_dir, _ = trained_run
    result = subprocess.run([sys.executable, "-m", "eval", "generate", "--checkpoint", str(run_dir),
                             "--prompt", "x", "--top-p", "0"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --top-p must be in")


def test_a_half_written_checkpoint_is_passed_over(eight_devices, trained_run, tmp_path):
    import shutil

    run_dir, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.copytree(copy / "checkpoints" / "20", copy / "checkpoints" / "30.orbax-checkpoint-tmp-99")
    (copy / "checkpoints" / "30.orbax-checkpoint-tmp-99" / "_CHECKPOINT_METADATA").unlink(missing_ok=True)
    result = run_eval("perplexity", "--checkpoint", str(copy), "--max-batches", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 20


def test_a_tokenizer_that_does_not_belong_to_the_run_is_refused(trained_run, tmp_path):
    import shutil

    run_dir, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "tokenizer.json").write_text(json.dumps({"kind": "byte", "vocab_size": 300}))
    result = run_eval("generate", "--checkpoint", str(copy), "--prompt", "x")
    assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr
    assert "tokenizer" in result.stderr and "Traceback" not in result.stderr
    config = (copy / "config.yaml").read_text()
    (copy / "tokenizer.json").write_text(json.dumps({"kind": "byte", "vocab_size": 259}))
    (copy / "config.yaml").write_text(config.replace("tokenizer: byte", "tokenizer: sentencepiece:x.model"))
    result = run_eval("generate", "--checkpoint", str(copy), "--prompt", "x")
    assert result.returncode == 2 and "do not belong together" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # ~14 s end to end
def test_damaged_input_position_is_detected_and_the_previous_checkpoint_used(trained_run, tmp_path):
    import shutil

    run_dir, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "20" / "data" / "process_0-of-1.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "train", "configs/tiny.yaml", f"run.dir={copy}",
                             "train.steps=30", "optim.decay_steps=20", "mesh.data=2", "mesh.tensor=4",
                             "checkpoint.every=10"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("warning: checkpoint 20 is damaged: data/process_0-of-1.json has 9 bytes"
            in result.stderr and "training resumes from checkpoint 10" in result.stderr)
    assert "steps 10->30" in result.stdout and (copy / "damaged_checkpoints" / "20").is_dir()
