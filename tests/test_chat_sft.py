"""Supervised fine-tuning on conversations (``data.source=chat:GLOB``): the assistant-only mask equals
a hand-labelled one for SmolLM2's ChatML (the real GGUF tokenizer), Llama 3.2's and Gemma 3's
templates (tests/data/chat_templates/); ``{% generation %}`` markers give the turn-by-turn mask; the
loss of packed conversations is the masked mean of plain forward passes; long conversations are cut
to one row and dropped without an assistant token; bad data is one line naming its file and line;
a LoRA fine-tune through `train.finetune` trains, and its evaluation loss covers only assistant tokens;
full fine-tuning on a mesh in microbatches gives the full batch's gradients on one device."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.chat import render_chat_spans
from data.chat_data import ChatDocuments, MaskedIds, chat_source, render_conversation
from data.documents import open_documents
from data.hf_tokenizer import HFTokenizer
from data.pipeline import eval_batches
from data.tokenizer import ByteTokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATION = [SYSTEM, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "Six, I think."}]
SPECIALS = ["<unk>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<bos>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's own template with {% generation %} around what the assistant writes (end of turn included)
CHATML_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endgeneration %}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer) -> HFTokenizer:
    """The SmolLM2 GGUF's tokenizer (the session's, tests/conftest.py)."""
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def bpe_json() -> str:
    """A small byte-level BPE (about 330 ids) whose special tokens cover Llama 3, Gemma and ChatML."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is two and two? Four, I think. You are terse."] * 20, trainer)
    return tok.to_str()


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def small_tokenizer(bpe_json: str, chat_template: str, bos: str) -> HFTokenizer:
    return HFTokenizer(Tokenizer.from_str(bpe_json), special_tokens={"bos_token": bos},
                       eos_id=SPECIALS.index("<|im_end|>"), chat_template=chat_template)


def assistant_texts(tok: HFTokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The decoded runs of masked tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return [tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@pytest.mark.parametrize("name", ["smollm2", "llama3.2", "gemma3"])
def test_assistant_mask_is_hand_labelled(smollm2, bpe_json, name):
    expected = {"smollm2": ["Four.<|im_end|>\n", "Six, I think.<|im_end|>\n"],
                "llama3.2": ["Four.<|eot_id|>", "Six, I think.<|eot_id|>"],
                "gemma3": ["Four.<end_of_turn>\n", "Six, I think.<end_of_turn>\n"]}[name]
    tok = smollm2 if name == "smollm2" else small_tokenizer(
        bpe_json, template(name), "<|begin_of_text|>" if name == "llama3.2" else "<bos>")
    ids, mask = render_conversation(tok, CONVERSATION)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ids.tolist() == tok.encode(tok.apply_chat_template(CONVERSATION, add_generation_prompt=False))
    assert assistant_texts(tok, ids, mask) == expected  # both turns, nothing of the system or users


def test_generation_markers_give_the_turn_by_turn_mask(smollm2):
    plain = render_conversation(smollm2, CONVERSATION)
    without_system = render_conversation(smollm2, CONVERSATION[1:])
    marked = copy.copy(smollm2)  # the session's tokenizer stays as it is
    marked.chat_template = CHATML_MARKED
    text, spans = render_chat_spans(CHATML_MARKED, CONVERSATION)
    assert [text[a:b] for a, b in spans] == ["Four.<|im_end|>\n", "Six, I think.<|im_end|>\n"]
    for conversation, want in ((CONVERSATION, plain), (CONVERSATION[1:], without_system)):
        ids, mask = render_conversation(marked, conversation)
        np.testing.assert_array_equal(ids, want[0])
        np.testing.assert_array_equal(mask, want[1])


def conversations(n: int) -> list[list[dict]]:
    return [[SYSTEM, {"role": "user", "content": f"What is {i}+{i}?"},
             {"role": "assistant", "content": f"It is {2 * i}."},
             {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes." * (i + 1)}]
            for i in range(n)]


def test_packed_loss_is_the_masked_mean_of_plain_forwards(bpe_json):
    from model.config import ModelConfig
    from model.loss import nll_sums, token_nll
    from model.transformer import Transformer
    from tests.helpers import init_params

    tok = small_tokenizer(bpe_json, template("qwen2.5"), "<bos>")
    docs = [MaskedIds(*render_conversation(tok, c)) for c in conversations(3)]
    cfg = ModelConfig(vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=48, max_seq_len=256)
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[0]
    model = nnx.merge(graphdef, init_params(cfg))
    width = max(len(d.ids) for d in docs) - 1  # each conversation alone in a row, padded on the right
    ids = np.stack([np.pad(d.ids, (0, width + 1 - len(d.ids))) for d in docs])
    mask = np.stack([np.pad(d.mask, (0, width + 1 - len(d.mask))) for d in docs])[:, 1:]
    nll = np.asarray(nnx.jit(lambda m, x, y: token_nll(m(x), y))(model, ids[:, :-1], ids[:, 1:]))
    want = float((nll * mask).sum() / mask.sum())  # the masked mean of plain forward passes
    packed = eval_batches(ChatDocuments(docs, "three"), tok, seq_len=256, batch_size=1)
    assert len(packed) == 1 and packed[0]["segment_ids"].max() == 3  # all three in one row
    one_per_row = {k: np.concatenate([eval_batches(ChatDocuments([d], "one"), tok, seq_len=256,
                                                   batch_size=1)[0][k] for d in docs])
                   for k in packed[0]}
    sums = nnx.jit(lambda m, batch: nll_sums(m, batch)[:2])
    for batch in (packed[0], one_per_row):
        loss_sum, weight_sum = sums(model, batch)
        assert float(weight_sum) == mask.sum()
        np.testing.assert_allclose(float(loss_sum) / float(weight_sum), want, rtol=1e-4)


def test_a_long_conversation_is_cut_to_one_row_and_dropped_without_an_assistant_token(bpe_json):
    tok = small_tokenizer(bpe_json, template("qwen2.5"), "<bos>")
    long = MaskedIds(*render_conversation(tok, conversations(8)[7]))
    short = MaskedIds(*render_conversation(tok, [{"role": "system", "content": "x"},
                                                 {"role": "user", "content": "2+2?"},
                                                 {"role": "assistant", "content": "Four."}]))
    first_answer = int(np.flatnonzero(long.mask)[0])
    assert np.flatnonzero(short.mask)[0] < first_answer - 1 and len(long.ids) > first_answer + 4
    seq_len = first_answer + 2  # the row ends two tokens into the first answer
    rows = eval_batches(ChatDocuments([long], "long"), tok, seq_len=seq_len, batch_size=2)
    assert len(rows) == 1 and rows[0]["weights"][1].sum() == 0  # one row, never continued
    np.testing.assert_array_equal(rows[0]["inputs"][0], long.ids[:seq_len])
    np.testing.assert_array_equal(rows[0]["weights"][0], long.mask[1:seq_len + 1])
    cut = first_answer - 1  # no assistant target inside the row: dropped
    rows = eval_batches(ChatDocuments([long, short], "both"), tok, seq_len=cut, batch_size=1)
    n = min(cut, len(short.ids) - 1)  # only the short conversation's row
    assert len(rows) == 1 and rows[0]["segment_ids"].max() == 1
    np.testing.assert_array_equal(rows[0]["inputs"][0, :n], short.ids[:n])


def write_jsonl(path: Path, lines: list) -> str:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines))
    return str(path)


GOOD = {"messages": conversations(1)[0]}
BAD = {  # (line 2 of a JSON-lines file, the message)
    "missing-role": ({"messages": [{"content": "hi"}]}, "message 0 has no 'role'"),
    "missing-content": ({"messages": [{"role": "user"}]}, r"message 0 \(user\) has no string 'content'"),
    "unknown-role": ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    "empty-assistant": ({"messages": [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": " "}]}, "empty assistant turn"),
    "no-assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    "not-utf8": (b'{"messages": "\xff"}', "is not UTF-8"),
    "invalid-json": (b'{"messages": [', "invalid JSON"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_one_line_naming_file_and_line(bpe_json, tmp_path, case):
    tok = small_tokenizer(bpe_json, template("qwen2.5"), "<bos>")
    record, message = BAD[case]
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, record])
    with pytest.raises(ValueError, match=message) as e:
        chat_source(path, "train", tok, 0.0)
    assert str(e.value).startswith(f"{path}:2") and "\n" not in str(e.value)


def test_bad_parquet_row_and_tokenizer_without_template(bpe_json, tmp_path):
    tok = small_tokenizer(bpe_json, template("qwen2.5"), "<bos>")
    rows = [GOOD["messages"], [{"role": "user", "content": "alone"}]]
    pq.write_table(pa.table({"messages": rows}), tmp_path / "chat.parquet")
    with pytest.raises(ValueError, match=r"chat.parquet: row 1: the conversation has no assistant turn"):
        chat_source(str(tmp_path / "chat.parquet"), "train", tok, 0.0)
    with pytest.raises(ValueError, match="byte tokenizer has no chat template"):
        chat_source(str(tmp_path / "chat.parquet"), "train", ByteTokenizer(), 0.0)
    rows[1] = GOOD["messages"]
    pq.write_table(pa.table({"messages": rows}), tmp_path / "chat.parquet")
    assert len(chat_source(str(tmp_path / "chat.parquet"), "train", tok, 0.0)) == 2
    with pytest.raises(ValueError, match="data.token_cache does not apply to chat: sources"):
        open_documents(f"chat:{tmp_path}/*.parquet", "", "train", tok, token_cache=True)


def test_held_out_split_follows_the_crc32_rule(bpe_json, tmp_path):
    from data.hf_sources import held_out_names

    tok = small_tokenizer(bpe_json, template("qwen2.5"), "<bos>")
    records = [{"messages": c} for c in conversations(12)]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    held = held_out_names([f"chat.jsonl#{n}" for n in range(1, 13)], 12, 0.3)
    splits = {s: chat_source(path, s, tok, 0.3) for s in ("train", "eval")}
    want = {s: [MaskedIds(*render_conversation(tok, c)).ids.tolist() for c, h in
                zip(conversations(12), held, strict=True) if h == (s == "eval")] for s in splits}
    assert {s: [d.ids.tolist() for d in docs] for s, docs in splits.items()} == want



def test_cli_bad_chat_line_is_one_error_line(eight_devices, tmp_path):
    """`python -m train` on a chat file with a bad line: one `error:` line, exit 2, no traceback
    (the source is opened, and fails, before anything compiles)."""
    from cli.train import main as train_main
    from tests.helpers import run_in_process, tiny_tokenizer

    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, {"messages": [{"role": "user", "content": "x"}]}])
    result = run_in_process(train_main, "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}",
                            f"data.tokenizer=hf:{tiny_tokenizer(tmp_path / 'tok')}",
                            f"data.source=chat:{path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: data: {path}:2: the conversation has no assistant turn"]


def test_lora_finetune_on_chat_trains_on_assistant_tokens_only(chat_run, tmp_path):
    """`train.finetune` with LoRA on a chat file, from the session's chat base (tests/conftest.py:
    the tiny run's weights with a chat-template tokenizer): finite losses, a final checkpoint, and
    an evaluation loss that is the masked mean of the merged model's plain forward passes over the
    held-out conversations' assistant tokens (the users' tokens are not in it), and a resume from
    the checkpoint of step 2 that logs the same losses, bit for bit (masks come back with the
    input position)."""
    from cli.finetune import main as finetune_main
    from data.tokenizer import make_tokenizer
    from inference.load import load_run
    from tests.helpers import losses_of, padded_logits, run_in_process
    from train.merge import merge_run
    from train.run_dir import RunDir

    base_dir, tok_dir = chat_run
    tok = make_tokenizer(f"hf:{tok_dir}")
    chats = [[{"role": "user", "content": f"a dog {i}"},
              {"role": "assistant", "content": "the cat sat on the mat"},
              {"role": "user", "content": "hello"}, {"role": "assistant", "content": "world " * (i % 3 + 1)}]
             for i in range(16)]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats])
    data = (f"data.source=chat:{path}", "data.eval_fraction=0.25", "train.seq_len=64",
            "train.log_every=1", "run.tensorboard=false", "finetune.lora_targets=q,v")
    args = (f"finetune.base={base_dir}", *data, "train.steps=4", "checkpoint.every=2",
            "train.eval_batches=0", "optim.warmup_steps=1", "optim.lr=3e-2")
    ft = run_in_process(finetune_main, f"run.dir={tmp_path / 'ft'}", *args)
    assert ft.returncode == 0, ft.stderr
    losses = losses_of(tmp_path / "ft")
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert RunDir(tmp_path / "ft").committed_steps() == [2, 4]
    shutil.copytree(tmp_path / "ft", tmp_path / "resumed")  # the run as it was after step 2
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    resumed = run_in_process(finetune_main, f"run.dir={tmp_path / 'resumed'}", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert losses_of(tmp_path / "resumed") == losses
    eval_loss = [json.loads(line)["eval_loss"] for line in
                 (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    merge_run(tmp_path / "ft", tmp_path / "merged")
    held_out = chat_source(path, "eval", tok, 0.25)
    width = max(len(d.ids) for d in held_out)
    ids = np.stack([np.pad(d.ids, (0, width - len(d.ids))) for d in held_out])
    mask = np.stack([np.pad(d.mask, (0, width - len(d.mask))) for d in held_out])[:, 1:]
    merged = load_run(tmp_path / "merged")  # its plain forward pass, jitted (no padding: width)
    logits = padded_logits(merged.graphdef, jax.device_get(merged.params), ids[:, :-1],
                           width - 1).astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, ids[:, 1:, None], -1)[..., 0]
    assert len(held_out) >= 2 and 0 < mask.sum() < (ids[:, 1:] > 0).sum()
    np.testing.assert_allclose(eval_loss[-1], (nll * mask).sum() / mask.sum(), rtol=1e-4)


def test_full_finetune_microbatches_and_meshes_equal_the_full_batch(chat_run, tmp_path,
                                                                    eight_devices):
    """Full fine-tuning on chat, from the session's chat base: a batch of the training pipeline
    (conversations packed several to a row, weights on the assistant tokens only) gives the full
    batch's loss and gradients on a data x fsdp x tensor mesh in 2 microbatches and on one device
    (tests/helpers.py: check_microbatches_and_meshes)."""
    import functools

    from data.pipeline import train_dataset
    from data.tokenizer import make_tokenizer
    from tests.helpers import check_microbatches_and_meshes
    from train.finetune_config import load_run_config
    from train.inputs import open_split
    from train.program import Program
    from train.step import grads_loss_and_metrics
    from train.validate import validate

    base_dir, tok_dir = chat_run
    chats = [[{"role": "user", "content": f"a dog {i}"},
              {"role": "assistant", "content": "the cat sat on the mat" if i % 2 else "world " * (i % 3 + 1)}]
             for i in range(16)]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats])

    def program(name: str, *overrides: str, devices: list = eight_devices) -> Program:
        full = Path(__file__).parent.parent / "configs" / "finetune_full.yaml"
        cfg = load_run_config(full, [f"finetune.base={base_dir}", f"run.dir={tmp_path / name}",
                                     f"data.source=chat:{path}", "train.seq_len=64",
                                     "train.batch_size=8", *overrides], finetune=True)
        validate(cfg, len(devices))
        return Program(cfg, devices=devices)

    sharded = program("a", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.microbatches=2")
    single = program("b", "mesh.data=1", devices=eight_devices[:1])
    tok = make_tokenizer(f"hf:{tok_dir}")
    docs = open_split(sharded.cfg.data, "train", tok, 64)
    batch = next(iter(train_dataset(docs, tok, seq_len=64, batch_size=8, seed=0, prefetch=0)))
    assert batch["segment_ids"].max() >= 2  # packed: two conversations or more in a row
    assert 0 < batch["weights"].sum() < (batch["segment_ids"] > 0).sum()  # assistant tokens only

    def grads_fn(trainee, microbatches: int) -> functools.partial:
        return functools.partial(grads_loss_and_metrics, graphdef=trainee.graphdef,
                                 microbatches=microbatches)

    check_microbatches_and_meshes(sharded, single, grads_fn, batch)
