"""The benchmark harness runs every case end to end (shrunk models, a few steps, results in a
temporary directory), so `make bench` cannot rot between the runs that produce real figures."""

import json
from pathlib import Path

import numpy as np
import pytest

from bench import baby, checkpoint, longctx, serve, train
from bench.posttrain_task import make_task
from bench.serve_clients import make_workload
from model.config import ModelConfig

SHRINK = ["model.num_layers=1", "model.d_model=64", "model.num_heads=2", "model.num_kv_heads=2",
          "model.mlp_dim=128", "model.expert_mlp_dim=64", "model.max_seq_len=64", "train.seq_len=64"]


@pytest.mark.slow
def test_train_cases_and_summary_write_results(tmp_path: Path, capsys) -> None:
    for case in train.CASES:
        assert train.main([case, "--steps", "2", "--results", str(tmp_path), *SHRINK]) == 0
        record = json.loads((tmp_path / f"train_{case}.json").read_text())
        figures = record["figures"]
        assert figures["step_ms"] > 0 and figures["tokens_per_s"] > 0 and figures["compile_s"] > 0
        assert 0 < figures["mfu"] < 1.5 and figures["xla_memory_bytes"]["total"] > 0
        assert record["config"]["seq_len"] == 64 and record["git_commit"]
    assert train.main(["summary", "--results", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "train_summary.json").read_text())["figures"]
    assert summary["moe_medium_capacity_over_dense_medium"] > 0
    assert "MFU" in capsys.readouterr().out


@pytest.mark.slow
def test_baby_trains_on_a_given_text_file(tmp_path: Path) -> None:
    text = tmp_path / "tiny.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    assert baby.main(["--data", str(text), "--steps", "30", "--eval-batches", "2",
                      "--results", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "baby.json").read_text())["figures"]
    assert figures["ms_per_step"] > 0 and figures["val_loss"] < 5.5  # below uniform (ln 384 = 5.95)
    # the PyTorch eager reference took turns on the same text
    assert figures["torch_ms_per_step"] > 0 and figures["torch_val_loss"] < 5.95
    assert figures["torch_over_meshlm"] == figures["torch_ms_per_step"] / figures["ms_per_step"]


@pytest.mark.slow  # ~15 s: a shrunk model saved and restored on disk and on moto's S3 server
def test_checkpoint_bench_measures_disk_and_s3(s3_server: str, tmp_path: Path) -> None:
    assert checkpoint.main(["--steps", "1", "--results", str(tmp_path), "--s3",
                            f"{s3_server}/{tmp_path.name}", "model.d_model=64",
                            "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
                            "model.mlp_dim=128"]) == 0
    figures = json.loads((tmp_path / "checkpoint.json").read_text())["figures"]
    for store in ("disk", "s3"):
        assert figures[store]["save_mb_per_s"] > 0 and figures[store]["restore_mb_per_s"] > 0
        assert figures[store]["megabytes"] == figures["disk"]["megabytes"]


def test_baby_refuses_a_missing_data_file(tmp_path: Path, capsys) -> None:
    assert baby.main(["--data", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err.startswith("error: --data")


def test_longctx_measures_paths_and_fits_growth_exponents(tmp_path: Path, capsys) -> None:
    # one one-device path and the 8-device context path (blockwise differs from einsum only by
    # its attention_impl override); two lengths, one timed step each: about 15 s
    paths, lengths = ["einsum", "context"], [128, 256]
    assert longctx.main(["--paths", ",".join(paths), "--lengths", ",".join(map(str, lengths)),
                         "--steps", "1", "--results", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "longctx.json").read_text())["figures"]
    rows = {(r["path"], r["seq_len"]): r for r in figures["rows"]}
    assert set(rows) == {(p, t) for p in paths for t in lengths}
    for (path, _), row in rows.items():
        assert row["temp_bytes"] > 0 and row["tokens_per_s"] > 0 and row["step_ms"] > 0
        assert row["devices"] == (longctx.CONTEXT if path == "context" else 1)
    for path in paths:  # two lengths: both fits are the one slope between them
        expected = np.log2(rows[path, 256]["temp_bytes"] / rows[path, 128]["temp_bytes"])
        assert figures["growth_exponent"][path] == pytest.approx(expected, rel=1e-6)
        assert figures["growth_exponent_last_doubling"][path] == pytest.approx(expected, rel=1e-6)
    assert figures["fastest_one_device_path"] == {"128": "einsum", "256": "einsum"}
    assert "growth exponent" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["--paths", "einsum,ring"], "error: --paths: unknown ring"),
                                           (["--lengths", "1k"], "error: --lengths: expected")])
def test_longctx_refuses_unknown_paths_and_lengths(args: list[str], message: str, capsys) -> None:
    assert longctx.main(args) == 2
    assert capsys.readouterr().err.startswith(message)


def test_posttrain_task_is_seeded_and_held_out_questions_are_unseen() -> None:
    train_set, held_out = make_task(3, 400, 50)
    assert (train_set, held_out) == make_task(3, 400, 50)
    assert make_task(4, 400, 50) != (train_set, held_out)
    assert len(train_set) == 400 and len(held_out) == 50
    assert not {p.question for p in train_set} & {p.question for p in held_out}
    for p in train_set + held_out:
        a, b = (int(w) for w in p.question.split("?")[0].split()[-3::2])
        assert p.answer == str(a + b) and p.wrong != p.answer


def test_serve_bench_counts_every_token_and_compiles_nothing_after_warm_up(tmp_path: Path) -> None:
    # a tiny random model (its byte tokenizer has 259 ids; large weights: no near-ties, so both
    # sides' greedy tokens agree), four requests per configuration, the engine at 1 and 2 clients,
    # transformers at batch 1 and 2: about 8 s
    cfg = ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=48, max_seq_len=32, init_std=0.3)
    settings = serve.Settings(clients=(1, 2), hf_batches=(1, 2), requests=4, prompt_lens=(3, 20),
                              output_lens=(2, 6), decode_steps=2, prefill_chunk=8)
    run_dir = serve.save_random_run(cfg, tmp_path / "run")
    path = serve.run_bench({"tiny": run_dir}, settings, tmp_path)
    figures = json.loads(path.read_text())["figures"]["tiny"]
    expected = sum(w.max_tokens for w in make_workload(4, 320, 0, (3, 20), (2, 6)))
    for c in (1, 2):
        m = figures["meshlm"][f"clients_{c}"]
        assert m["output_tokens"] == expected and m["requests"] == 4
        assert m["recompiles_after_warm_up"] == 0
        assert m["tokens_per_s"] == pytest.approx(expected / m["wall_s"])
        assert 0 < m["ttft_p50_ms"] <= m["ttft_p99_ms"] and 0 < m["itl_p50_ms"] <= m["itl_p99_ms"]
        hf = figures["transformers"][f"batch_{c}"]
        assert hf["output_tokens"] == expected and hf["tokens_per_s"] > 0
        assert figures["greedy_equal_to_transformers"][f"batch_{c}"]["whole_outputs"] == 1.0
    assert figures["meshlm"]["decode_step_ms"]["2"] > 0
    # prefill chunks of 2, 4 and 8 tokens, decode steps of 1 and 2 rows
    assert figures["meshlm"]["compiles_at_end"] == figures["meshlm"]["compiles_at_warm_up"] == 5
    assert figures["targets"]["recompiles_after_warm_up_clients_2"] == {"value": 0, "target": 0,
                                                                        "met": True}
    ratio = figures["targets"]["meshlm_1_clients_over_transformers_batch_1"]
    assert ratio["ratio"] == pytest.approx(figures["meshlm"]["clients_1"]["tokens_per_s"]
                                           / figures["transformers"]["batch_1"]["tokens_per_s"])
