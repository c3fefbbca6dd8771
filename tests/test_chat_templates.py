"""Real chat templates (Llama 3.1 and 3.2, Qwen2.5, Qwen3, Gemma 2 and 3, Mistral Nemo; their text
and origin in tests/data/chat_templates/) render a multi-turn conversation with a system prompt
(Gemma 2 refuses one: there, without) exactly as transformers' ``apply_chat_template`` renders it
with the same template; a conversation a template rejects is one line, for ``generate --chat`` a
UsageError; and ``python -m eval generate --chat`` answers, end to end, as transformers' greedy
decoding does on a tiny qwen2 GGUF that carries Qwen2.5's template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import transformers

from cli import eval as eval_cli
from tests.helpers import run_in_process, tiny_tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SYSTEM = {"role": "system", "content": "You are terse.  "}
TURNS = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " 4\n"},
         {"role": "user", "content": "And 3+3? Ünïcode ✓"}]
THINKING = [TURNS[0], {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, TURNS[2]]
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Adds two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}]
# (template, conversation, extra template variables)
CASES = {
    "llama3.1": ("llama3.1", [SYSTEM, *TURNS], {}),
    "llama3.1-tools": ("llama3.1", [SYSTEM, *TURNS], {"tools": TOOLS}),
    "llama3.2": ("llama3.2", [SYSTEM, *TURNS], {}),
    "qwen2.5": ("qwen2.5", [SYSTEM, *TURNS], {}),
    "qwen2.5-tools": ("qwen2.5", TURNS, {"tools": TOOLS}),
    "qwen3-thinking": ("qwen3", [SYSTEM, *THINKING], {}),
    "qwen3-no-thinking": ("qwen3", [SYSTEM, *TURNS], {"enable_thinking": False}),
    "gemma2": ("gemma2", TURNS, {}),
    "gemma3": ("gemma3", [SYSTEM, *TURNS], {}),
    "mistral-nemo": ("mistral-nemo", [SYSTEM, *TURNS], {}),
}
# (template, a conversation it rejects, its message)
REJECTED = {
    "gemma2-system": ("gemma2", [SYSTEM, *TURNS], "System role not supported"),
    "gemma3-two-users": ("gemma3", [SYSTEM, TURNS[0], TURNS[2]], "roles must alternate"),
    "mistral-nemo-two-users": ("mistral-nemo", [TURNS[0], TURNS[2]], "roles must alternate"),
}


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(meshlm's tokenizer, transformers') of one tokenizer directory: the same special tokens."""
    from data.hf_tokenizer import HFTokenizer

    directory = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return HFTokenizer.from_path(directory), transformers.AutoTokenizer.from_pretrained(directory)


def test_every_template_has_its_source_recorded():
    source = (TEMPLATES / "SOURCE.md").read_text()
    assert all(f"`{path.name}`" in source for path in TEMPLATES.glob("*.jinja"))


@pytest.mark.parametrize("generation_prompt", [True, False], ids=["prompt", "no-prompt"])
@pytest.mark.parametrize("case", list(CASES))
def test_render_equals_transformers(tokenizers, case, generation_prompt):
    ours, theirs = tokenizers
    name, messages, extra = CASES[case]
    text = template(name)
    ours.chat_template = text
    want = theirs.apply_chat_template(messages, chat_template=text, tokenize=False,
                                      add_generation_prompt=generation_prompt, **extra)
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, **extra) == want


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_conversation_is_one_line(tokenizers, case):
    import jinja2

    from cli.eval import prompt_ids
    from core.errors import UsageError

    ours, theirs = tokenizers
    name, messages, message = REJECTED[case]
    ours.chat_template = template(name)
    with pytest.raises(jinja2.TemplateError, match=message):
        theirs.apply_chat_template(messages, chat_template=ours.chat_template, tokenize=False)
    with pytest.raises(ValueError, match=message) as e:
        ours.apply_chat_template(messages)
    assert "\n" not in str(e.value)
    if name == "gemma2":  # generate --chat --system on a model whose template has no system role
        with pytest.raises(UsageError, match=f"--chat: chat template: {message}"):
            prompt_ids(ours, "hi", True, "be brief")


def test_generate_chat_on_an_imported_gguf_answers_as_transformers(eight_devices, tmp_path, tokenizers):
    import torch

    from cli.eval import prompt_ids
    from convert.checkpoints import import_checkpoint
    from data.tokenizer import load_tokenizer
    from tests.test_gguf_families import family_model, write_gguf

    model = family_model("qwen2", tie_word_embeddings=False)
    controls = ("<|im_start|>", "<|im_end|>")  # control tokens, EOS the last
    path = write_gguf(tmp_path / "qwen2.gguf", model, "qwen2", tiny_tokenizer(tmp_path / "tok"),
                      chat_template=template("qwen2.5"), controls=controls)
    run_dir = import_checkpoint(path, tmp_path / "run")
    tok = load_tokenizer(run_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi cat"}]
    text = tokenizers[1].apply_chat_template(messages, chat_template=template("qwen2.5"),
                                             tokenize=False, add_generation_prompt=True)
    ids = prompt_ids(tok, "hi cat", True, "be brief")
    assert ids == tok.encode(text) and ids.count(tok.token_id("<|im_start|>")) == 3

    result = run_in_process(eval_cli.main, "generate", "--checkpoint", str(run_dir), "--chat",
                            "--system", "be brief", "--prompt", "hi cat", "--temperature", "0",
                            "--max-new-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout.strip().splitlines()[-1])["completion"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new  # meshlm stops before EOS
    print(f"generate --chat on the imported qwen2 GGUF: {ours!r}")
    assert new and ours == tok.decode(np.asarray(new))
