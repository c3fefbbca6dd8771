"""The lm-eval adapter on a tiny trained run: loglikelihood is the sum of the model's token log-probs,
rolling loglikelihood sums lm_eval's windows, the local tasks run through lm_eval and the CLI, and
with a chat template the contexts are scored exactly as the template renders them (one BOS)."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from cli import harness as harness_cli
from data.chat import render_chat
from data.hf_tokenizer import HFTokenizer
from eval import harness
from eval.harness import MeshLM
from inference.load import load_run
from inference.sampling import SamplingConfig
from inference.score import Scorer
from model.transformer import Transformer
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import default_rules, tree_shardings
from tests import reference
from tests.helpers import SMALL, host_params, padded_logits, run_in_process, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5  # fp32, relative


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run[0]


@pytest.fixture(scope="module")
def lm(eight_devices, run_dir):
    return MeshLM(run=load_run(run_dir), batch_size=4)


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def _oracle(lm, row, n):
    """(sum of the log-probs of the last n tokens of row, whether each is the argmax), from the plain
    full forward pass over row[:-1] on host parameters (one jitted program for every row length:
    tests/helpers.py, padded_logits)."""
    logits = padded_logits(lm.run.graphdef, jax.device_get(lm.run.params), np.asarray([row[:-1]]),
                           lm.window)[0].astype(np.float64)
    logprobs = reference.log_softmax(logits)
    targets = np.asarray(row[1:])
    picked = logprobs[np.arange(len(targets)), targets][-n:]
    return float(picked.sum()), bool((logits.argmax(-1)[-n:] == targets[-n:]).all())


def test_loglikelihood_is_the_sum_of_token_log_probs(lm):
    bos, window = lm.tok.bos_id, lm.window
    greedy_id = int(np.argmax(padded_logits(lm.run.graphdef, jax.device_get(lm.run.params),
                                            np.asarray([[bos, *lm.tok.encode("import o")]]),
                                            window)[0, -1]))
    assert greedy_id < 128  # one ASCII byte, so the text below encodes to exactly this token
    long_context = "x = [" + ", ".join(str(i) for i in range(30)) + "]\n"  # longer than the window
    pairs = [("import o", "s"), ("import o", chr(greedy_id)), ("", "def f(x):"),
             ("for i in range(10): ", "print(i)"), (long_context, "y = x"), ("a", "")]
    results = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (context, continuation), (logprob, is_greedy) in zip(pairs, results, strict=True):
        if not continuation:
            assert (logprob, is_greedy) == (0.0, True)
            continue
        stripped = context.rstrip()  # lm_eval moves a context's trailing spaces to the continuation
        cont = lm.tok.encode(context[len(stripped):] + continuation)
        row = [bos, *lm.tok.encode(stripped), *cont][-(window + 1):]  # left-truncated to the window
        expected, expected_greedy = _oracle(lm, row, len(cont))
        assert abs(logprob - expected) <= TOL * abs(expected), (context, continuation)
        assert is_greedy == expected_greedy
    assert results[1][1]  # the model's own greedy byte is greedy


def test_a_request_longer_than_the_training_length_is_scored_whole(lm):
    """The window is the model's own (model.max_seq_len = 64), not train.seq_len (32)."""
    context, continuation = "import os, sys, re, json, math, time", ", random\n"
    row = [lm.tok.bos_id, *lm.tok.encode(context + continuation)]
    assert lm.run.cfg.train.seq_len + 1 < len(row) <= lm.run.cfg.model.max_seq_len + 1
    (logprob, is_greedy), = lm.loglikelihood(_requests("loglikelihood", [(context, continuation)]))
    expected, expected_greedy = _oracle(lm, row, len(lm.tok.encode(continuation)))  # the whole row
    assert abs(logprob - expected) <= TOL * abs(expected) and is_greedy == expected_greedy
    assert lm.max_length == lm.run.cfg.model.max_seq_len


def test_long_continuation_is_scored_whole_in_window_pieces(lm):
    text = "import os, sys, re, json, math, time, random, itertools\n" * 2  # longer than the window
    (logprob, _), = lm.loglikelihood(_requests("loglikelihood", [("", text)]))
    tokens = [lm.tok.bos_id, *lm.tok.encode(text)]
    expected, end = 0.0, len(tokens)
    while end > 1:  # pieces of at most `window` targets from the end, each with maximal context
        n = min(lm.window, end - 1)
        expected += _oracle(lm, tokens[max(0, end - lm.window - 1):end], n)[0]
        end -= n
    assert abs(logprob - expected) <= TOL * abs(expected)


def test_rolling_loglikelihood_sums_lm_evals_windows(lm):
    text = "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a + b\n\n\nprint(add(1, 2))\n" * 4
    tokens = lm.tok.encode(text)
    assert len(tokens) > 3 * lm.window
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        tokens, prefix_token=lm.tok.bos_id, max_seq_len=lm.window, context_len=1)]
    assert sum(len(pred) for _, pred in windows) == len(tokens)  # every token predicted once
    expected = sum(_oracle(lm, ctx + pred, len(pred))[0] for ctx, pred in windows)
    short = "x = 1\n"
    got, got_short = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,), (short,)]))
    assert abs(got - expected) <= TOL * abs(expected)
    row = [lm.tok.bos_id, *lm.tok.encode(short)]
    assert abs(got_short - _oracle(lm, row, len(row) - 1)[0]) <= TOL * abs(got_short)


def test_generate_until_cuts_at_the_stop_string(lm):
    args = [("import o", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
            ("def f(", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
            ("def f(", {"until": [], "max_gen_toks": 6, "do_sample": False})]
    cut, _, free = lm.generate_until(_requests("generate_until", args))
    prompt = [lm.tok.bos_id, *lm.tok.encode("def f(")]
    # in a batch of the adapter's size (rows decode independently): the programs generate_until ran
    full = lm._generator(SamplingConfig(temperature=0.0)).generate([prompt] * lm.batch_size, 6,
                                                                   stop_ids=lm.tok.stop_ids)
    assert free == lm.tok.decode(full.tokens[0])  # no stop string: the greedy continuation
    assert "\n" not in cut and len(lm.tok.encode(cut)) <= 6


def test_local_tasks_run_end_to_end_through_lm_eval(lm, run_dir):
    results = simple_evaluate(model="meshlm", model_args={"checkpoint": str(run_dir), "batch_size": 4},
                              tasks=["meshlm_tiny"], task_manager=harness.task_manager(["meshlm_tiny"]),
                              bootstrap_iters=0, log_samples=False)["results"]
    assert set(results) == {"meshlm_tiny_mc", "meshlm_tiny_ppl", "meshlm_tiny_gen"}
    assert 0 <= results["meshlm_tiny_mc"]["acc,none"] <= 1
    assert 0 <= results["meshlm_tiny_gen"]["exact_match,none"] <= 1
    # bits per byte of the perplexity task, recomputed from our own rolling loglikelihoods
    texts = [json.loads(line)["text"]
             for line in (harness.TASKS_DIR / "meshlm_tiny" / "ppl.jsonl").read_text().splitlines()]
    lls = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    bpb = -sum(lls) / sum(len(t.encode()) for t in texts) / math.log(2)
    assert abs(results["meshlm_tiny_ppl"]["bits_per_byte,none"] - bpb) <= 1e-6 * bpb


def test_scorer_equals_the_full_forward_pass_for_moe_with_padded_rows(eight_devices):
    cfg = dataclasses.replace(SMALL, max_seq_len=64, init_std=0.3, num_layers=3, first_dense_layers=1,
                              moe_every=2, num_experts=8, experts_per_token=2, expert_mlp_dim=16)
    mesh, rules = make_mesh(MeshConfig(data=2, expert=4)), default_rules()
    params = host_params(cfg)  # random values drawn by NumPy: no initialiser compiled, op by op
    scorer = Scorer(cfg, jax.device_put(params, tree_shardings(params, mesh, rules)), mesh, rules,
                    window=8, batch_size=2)
    rows = [[5, 9, 2, 33, 7], list(range(1, 10)), [42, 3]]  # two batches, the second padded
    dropless = dataclasses.replace(cfg, moe_impl="dropless")  # never drops: the oracle
    ref_graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(dropless, nnx.Rngs(0))))[0]
    inputs = np.zeros((len(rows), 8), np.int32)  # right padding cannot reach earlier tokens here
    for i, row in enumerate(rows):
        inputs[i, :len(row) - 1] = row[:-1]
    ref = jax.jit(lambda p, x: nnx.merge(ref_graphdef, p)(x))  # one program, not op by op
    all_logits = np.asarray(ref(params, inputs), np.float64)
    for row, logits, (logprob, greedy) in zip(rows, all_logits, scorer.score(rows), strict=True):
        logits, targets = logits[:len(row) - 1], np.asarray(row[1:])
        expected = reference.log_softmax(logits)[np.arange(len(targets)), targets]
        assert reference.relative_error(logprob, expected) < 1e-5
        assert greedy.tolist() == (logits.argmax(-1) == targets).tolist()


def test_cli_runs_local_tasks(eight_devices, run_dir, tmp_path):
    out = tmp_path / "results.json"
    result = run_in_process(harness_cli.main, "--checkpoint", str(run_dir / "checkpoints" / "10"),
                            "--tasks", "meshlm_tiny_mc,meshlm_tiny_gen", "--limit", "3",
                            "--batch-size", "4", "--num-fewshot", "1", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "meshlm_tiny_mc" in result.stdout and "|" in result.stdout  # the results table
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["step"] == 10 and set(report["results"]) == {"meshlm_tiny_mc", "meshlm_tiny_gen"}
    full = json.loads(out.read_text())
    assert full["n-shot"]["meshlm_tiny_mc"] == 1 and full["config"]["meshlm_step"] == 10


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/nonexistent/run", "--tasks", "meshlm_tiny"], "neither a meshlm run directory"),
    (["--checkpoint", "RUN/checkpoints/7", "--tasks", "meshlm_tiny"], "does not exist"),
    (["--checkpoint", "RUN", "--tasks", "no_such_task_xyz"], "unknown task no_such_task_xyz"),
    (["--checkpoint", "RUN", "--tasks", " , "], "--tasks names no task"),
    (["--checkpoint", "RUN", "--tasks", "meshlm_tiny", "--batch-size", "0"], "--batch-size"),
    (["--checkpoint", "RUN", "--tasks", "meshlm_tiny", "--limit", "-1"], "--limit"),
    (["--checkpoint", "RUN", "--tasks", "meshlm_tiny", "--include-path", "/nonexistent"], "--include-path"),
    (["--checkpoint", "RUN", "--tasks", "meshlm_tiny", "--output", "/nonexistent/x.json"], "--output"),
    (["--checkpoint", "RUN"], "--tasks"),
    (["--checkpoint", "RUN", "--tasks", "meshlm_tiny", "--apply-chat-template"],
     "--apply-chat-template: the checkpoint's 'byte' tokenizer has no chat template"),
    (["--checkpoint", "RUN", "--tasks", "meshlm_tiny", "--fewshot-as-multiturn"],
     "--fewshot-as-multiturn needs --apply-chat-template"),
    (["--checkpoint", "RUN", "--tasks", "meshlm_tiny", "--bogus"], "unrecognized arguments"),
])
def test_cli_errors_are_one_line(run_dir, capsys, args, message):
    code = harness_cli.main([a.replace("RUN", str(run_dir)) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_cli_error_through_python_m_eval_has_no_traceback(run_dir):
    result = subprocess.run([sys.executable, "-m", "eval", "harness", "--checkpoint", str(run_dir),
                             "--tasks", "meshlm_tiny", "--limit", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --limit must be > 0, got 0"]


# ------------------------------------------------------------------------------------ chat templates

SYSTEM = "Be brief."
TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """tests/helpers.py's tiny BPE tokenizer (its template writes "<s>" before every turn), made to
    prepend "<s>" to plain text too, as Llama's and Mistral's do: the case where a second BOS could
    creep in."""
    from tokenizers import Tokenizer, processors

    directory = tiny_tokenizer(tmp_path_factory.mktemp("chat_tok"))
    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    backend.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def chat_lm(eight_devices, run_dir, chat_tokenizer_dir):
    """The tiny run's model with the chat tokenizer (the scores mean nothing, but are the model's)."""
    run = load_run(run_dir)
    return MeshLM(run=dataclasses.replace(run, tokenizer=HFTokenizer.from_path(chat_tokenizer_dir)),
                  batch_size=4)


@pytest.fixture(scope="module")
def chat_run_dir(chat_lm, chat_tokenizer_dir, tmp_path_factory):
    """chat_lm saved as a run directory of its own (step 0), for the command line."""
    from convert.checkpoints import save_params

    run_dir = tmp_path_factory.mktemp("chat_run") / "run"
    cfg = chat_lm.run.cfg
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=f"hf:{chat_tokenizer_dir}"),
                              run=dataclasses.replace(cfg.run, dir=str(run_dir)))
    run_dir.mkdir()
    save_params(run_dir, cfg, chat_lm.run.params, chat_lm.tok, {})
    return run_dir


@pytest.fixture(scope="module")
def chat_eval(chat_lm):
    """The multiple-choice task on 2 documents, through the chat template with a system message."""
    return simple_evaluate(model=chat_lm, tasks=["meshlm_tiny_mc"], limit=2, num_fewshot=0,
                           apply_chat_template=True, system_instruction=SYSTEM,
                           task_manager=harness.task_manager(["meshlm_tiny_mc"]), bootstrap_iters=0,
                           log_samples=True)


def test_chat_contexts_are_scored_as_rendered_with_one_bos(chat_lm, chat_eval):
    tok = chat_lm.tok
    bos = tok.token_id("<s>")
    assert tok.bos_id == bos  # plain text gets "<s>" prepended, as in every other test here
    samples = chat_eval["samples"]["meshlm_tiny_mc"]
    assert len(samples) == 2
    for sample in samples:
        rendered = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": sample["doc"]["context"]}])
        assert rendered.startswith("<s>system: Be brief.</s><s>user: ")
        for (context, continuation), [(logprob, is_greedy)] in zip(sample["arguments"], sample["resps"],
                                                                    strict=True):
            assert context == rendered
            stripped = context.rstrip()  # lm_eval moves a context's trailing spaces to the continuation
            head = tok.encode(stripped)
            row = head + tok.encode(stripped + context[len(stripped):] + continuation)[len(head):]
            assert row[0] == bos and row[1] != bos and len(row) <= chat_lm.window + 1  # one BOS, whole
            expected, expected_greedy = _oracle(chat_lm, row, len(row) - len(head))
            assert abs(logprob - expected) <= TOL * abs(expected) and is_greedy == expected_greedy
        # a generation task starts from the rendering's own ids, too
        assert chat_lm.context_ids(rendered) == tok.encode(rendered)
    assert chat_lm.context_ids("import sy") == [bos, *tok.encode("import sy")]  # plain text: as before


def test_chat_rendering_is_transformers_and_lm_evals(chat_lm, chat_tokenizer_dir, lm):
    import transformers

    reference_tok = transformers.AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "import sy"},
               {"role": "assistant", "content": "Answer:"}]
    for messages, prompt in ((history[:2], True), (history, False)):  # gen_prefix: an open final turn
        assert chat_lm.apply_chat_template(messages, add_generation_prompt=prompt) == \
            reference_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                              continue_final_message=not prompt)
    # a template that refuses a system message renders the conversation without it (as HFLM does)
    gemma2 = (TEMPLATES / "gemma2.jinja").read_text(encoding="utf-8")
    tok = HFTokenizer(chat_lm.tok.backend, bos_id=chat_lm.tok.bos_id, eos_id=chat_lm.tok.eos_id,
                      special_tokens=chat_lm.tok.special_tokens, chat_template=gemma2)
    gemma_lm = MeshLM(run=dataclasses.replace(chat_lm.run, tokenizer=tok), batch_size=4)
    assert gemma_lm.apply_chat_template(history[:2]) == render_chat(
        gemma2, history[1:2], add_generation_prompt=True, special_tokens=tok.special_tokens)
    with pytest.raises(ValueError, match="'byte' tokenizer has no chat template"):
        lm.apply_chat_template(history[:2])


LOGLIKELIHOOD_TASK = """task: meshlm_chat_ll
dataset_path: ""
custom_dataset: !function tiny_data.multiple_choice
output_type: loglikelihood
test_split: test
doc_to_text: "{{context}}"
doc_to_target: "{{choices[label]}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def test_cli_applies_the_chat_template(chat_run_dir, chat_lm, tmp_path):
    """A loglikelihood task (its metric: exp(-mean log-likelihood), so the command line's number
    pins the scored contexts) through --apply-chat-template and --system-instruction."""
    for name in ("tiny_data.py", "mc.jsonl"):
        shutil.copy(harness.TASKS_DIR / "meshlm_tiny" / name, tmp_path / name)
    (tmp_path / "meshlm_chat_ll.yaml").write_text(LOGLIKELIHOOD_TASK)
    result = run_in_process(harness_cli.main, "--checkpoint", str(chat_run_dir), "--tasks", "meshlm_chat_ll",
                            "--include-path", str(tmp_path), "--limit", "2", "--bootstrap-iters", "0",
                            "--apply-chat-template", "--system-instruction", SYSTEM)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])["results"]["meshlm_chat_ll"]["perplexity,none"]
    docs = [d for d in map(json.loads, (tmp_path / "mc.jsonl").read_text().splitlines())
            if d["split"] == "test"][:2]
    pairs = [(chat_lm.apply_chat_template([{"role": "system", "content": SYSTEM},
                                           {"role": "user", "content": d["context"]}]),
              d["choices"][d["label"]]) for d in docs]
    lls = [ll for ll, _ in chat_lm.loglikelihood(_requests("loglikelihood", pairs))]
    assert abs(got - math.exp(-sum(lls) / 2)) <= 1e-6 * got
