"""Conversion at scale: an import streams sharded safetensors (through their index, never a stray
``consolidated.safetensors``) into arrays sharded on the run's mesh, equal to the unsharded import;
its peak host memory stays under the bound of convert/checkpoints.py; an export writes sharded
safetensors with an index that ``safetensors`` reads back bitwise and ``transformers`` loads with
the same logits, keeping bfloat16; bad sizes and overrides are one ``error:`` line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec

from tests.helpers import tiny_tokenizer
from tests.test_convert import TOKENS, hf_model

MiB = 2**20


def numpy_params(params) -> dict[tuple[str, ...], np.ndarray]:
    from flax import nnx

    return {tuple(str(p) for p in path): np.asarray(jax.device_get(var.get_value()))
            for path, var in nnx.to_flat_state(params)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama saved by transformers whole and in shards of at most 40 KB (with their index)."""
    root = tmp_path_factory.mktemp("scale")
    model = hf_model("llama", tie_word_embeddings=False)
    for name, size in (("whole", "1GB"), ("sharded", "40KB")):
        model.save_pretrained(root / name, max_shard_size=size)
        tiny_tokenizer(root / name)
    index = json.loads((root / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (root / "whole" / "model.safetensors.index.json").exists()
    return {"whole": root / "whole", "sharded": root / "sharded"}


@pytest.fixture(scope="module")
def whole_params(sources, tmp_path_factory, eight_devices) -> dict[tuple[str, ...], np.ndarray]:
    from convert.checkpoints import import_checkpoint
    from inference.load import load_run

    run = load_run(import_checkpoint(sources["whole"], tmp_path_factory.mktemp("whole") / "run"))
    assert dict(run.mesh.shape)["fsdp"] == 8  # by default every parameter is split over all devices
    assert run.params["blocks"]["attn"]["w_q_dnh"].get_value().sharding.spec == PartitionSpec(None, "fsdp")
    return numpy_params(run.params)


def test_sharded_import_streams_onto_the_mesh_and_equals_the_unsharded_import(sources, whole_params):
    from convert.checkpoints import device_params, plan_import, run_mesh
    from sharding.rules import default_rules

    plan = plan_import(sources["sharded"], sources["sharded"].parent / "unused",
                       overrides=["mesh.fsdp=4", "mesh.tensor=2"])
    assert plan.cfg.model.param_dtype == "float32"  # transformers saved float32: kept
    params = device_params(plan.cfg.model, plan.source.tensors, run_mesh(plan.cfg), default_rules())
    w_q = params["blocks"]["attn"]["w_q_dnh"].get_value()  # [layers, d_model, heads, head_dim]
    assert dict(w_q.sharding.mesh.shape) == dict(data=1, fsdp=4, context=1, tensor=2, expert=1)
    assert w_q.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in w_q.addressable_shards} == {(2, 32 // 4, 4 // 2, 8)}
    got = numpy_params(params)
    assert got.keys() == whole_params.keys()
    for path, value in whole_params.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def test_a_stray_consolidated_file_beside_indexed_shards_is_not_read(sources, whole_params, tmp_path):
    """Mistral's repositories carry consolidated.safetensors (its own names, here other values too)
    beside the indexed shards: the index decides, so the import equals the unsharded one."""
    from safetensors.numpy import save_file

    from convert.checkpoints import import_checkpoint
    from inference.load import load_run

    src = tmp_path / "mistral-style"
    shutil.copytree(sources["sharded"], src)
    rng = np.random.default_rng(1)
    save_file({"tok_embeddings.weight": rng.normal(size=(320, 32)).astype(np.float32),
               "layers.0.attention.wq.weight": rng.normal(size=(32, 32)).astype(np.float32)},
              str(src / "consolidated.safetensors"))
    got = numpy_params(load_run(import_checkpoint(src, tmp_path / "run")).params)
    for path, value in whole_params.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def safetensors_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


def test_export_writes_bfloat16_shards_with_an_index_that_transformers_loads(tmp_path, eight_devices):
    """A bfloat16 checkpoint stays bfloat16 through import and export: the shards read back
    bitwise equal to the original tensors, and transformers computes the same logits from them."""
    from safetensors import safe_open

    import cli.convert
    from convert.checkpoints import import_checkpoint

    src = tmp_path / "bf16"
    model = hf_model("llama", tie_word_embeddings=False).to(torch.bfloat16)
    model.save_pretrained(src)
    tiny_tokenizer(src)
    run_dir = import_checkpoint(src, tmp_path / "run")
    assert "param_dtype: bfloat16" in (run_dir / "config.yaml").read_text()
    out = tmp_path / "out"
    assert cli.convert.main(["export", str(run_dir), str(out), "--shard-size", "20KB"]) == 0

    names = safetensors_files(out)
    assert len(names) > 2 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    want = model.state_dict()
    assert index["weight_map"].keys() == want.keys() and set(index["weight_map"].values()) == set(names)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in want.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for name in names:
        assert (out / name).stat().st_size <= 20_480 + 4096  # the header comes on top
        with safe_open(str(out / name), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16 and torch.equal(t, want[key]), key

    def logits(directory: Path) -> np.ndarray:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory,
                                                                   attn_implementation="eager")
        assert loaded.dtype == torch.bfloat16
        with torch.no_grad():
            return loaded(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()

    np.testing.assert_array_equal(logits(out), logits(src))

    # One file when everything fits (as transformers names it, with no index); --dtype widens.
    whole = tmp_path / "whole"
    assert cli.convert.main(["export", str(run_dir), str(whole), "--dtype", "float32"]) == 0
    assert safetensors_files(whole) == ["model.safetensors"]
    assert not (whole / "model.safetensors.index.json").exists()
    with safe_open(str(whole / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), want[key].float()), key


def test_bad_sizes_and_overrides_are_one_error_line_and_write_nothing(sources, tmp_path, capsys):
    import cli.convert

    cases = [
        (["export", "run", "out", "--shard-size", "0"], "--shard-size: expected a positive size"),
        (["export", "run", "out", "--shard-size", "lots"], "--shard-size: expected a positive size"),
        (["export", "run", "out", "--shard-size=-5GB"], "--shard-size: expected a positive size"),
        (["import", sources["whole"], tmp_path / "a", "model.num_layers=3"], "model.num_layers: comes"),
        (["import", sources["whole"], tmp_path / "b", "run.dir=x"], "run.dir: is not set"),
        (["import", sources["whole"], tmp_path / "c", "mesh.fsdp=3"], "mesh: product of mesh axes"),
        (["import", sources["whole"], tmp_path / "d", "mesh.tensor=3"], "mesh.fsdp: the other axes"),
        (["import", sources["whole"], tmp_path / "e", "--seq-len", "8", "mesh.nope=2"],
         "mesh.nope: unknown key"),
    ]
    for argv, message in cases:
        assert cli.convert.main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
    assert not list(tmp_path.iterdir())


def test_shard_sizes_and_splits_are_hugging_face_s():
    from huggingface_hub import split_state_dict_into_shards_factory

    from convert.safetensors_io import parse_size, plan_shards

    assert [parse_size(s) for s in ("5GB", "500MB", "2GiB", "1e9", "40KB", "123")] == [
        5 * 10**9, 5 * 10**8, 2 * 2**30, 10**9, 40_000, 123]
    sizes = dict(zip("abcdefgh", (4, 4, 7, 1, 3, 5, 8, 2), strict=True))
    hub = split_state_dict_into_shards_factory(sizes, get_storage_size=lambda n: n, max_shard_size=8,
                                               filename_pattern="model{suffix}.safetensors")
    assert plan_shards(sizes.items(), 8) == hub.filename_to_tensors
    assert plan_shards([("a", 4)], 8) == {"model.safetensors": ["a"]}
    # a tensor larger than the limit: alone in its file, the order kept
    assert list(plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 3)], 8).values()) == [
        ["a", "b"], ["c"], ["d"]]


# ------------------------------------------------------------------------------------ host memory

ONE_GB_LLAMA = dict(vocab_size=32768, hidden_size=1024, intermediate_size=4096, num_hidden_layers=28,
                    num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                    tie_word_embeddings=False)  # 493M parameters: 0.99 GB in bfloat16


def test_importing_a_one_gigabyte_checkpoint_stays_under_the_memory_bound(tmp_path, monkeypatch):
    """A synthetic bfloat16 Llama of about 1 GB in 200 MB shards, imported onto 8 CPU devices in a
    fresh process (VmHWM from /proc/self/status). The bound of convert/checkpoints.py while the
    parameters are placed: before + params + 2 x largest tensor + 64 MiB. Orbax then holds the
    chunks it writes in host memory until they reach disk, at most one parameter at a time (its
    save_concurrent_gb, set to the largest): the save adds the largest parameter to that bound.
    Neither is near the model in float32 beside them."""
    from bench.convert import measured, synthetic_checkpoint

    # measured as users run it: the suite's unoptimised code generation (tests/conftest.py) does
    # not update the layer slots in place
    monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"].replace(
        "--xla_backend_optimization_level=0", ""))
    total = synthetic_checkpoint(tmp_path / "hf", ONE_GB_LLAMA, 200 * 10**6)
    m = measured("import", str(tmp_path / "hf"), str(tmp_path / "run"))
    before, placed, saved = (m[k] * 1024 for k in ("before_kib", "placed_kib", "saved_kib"))
    params, largest, slack = m["params_bytes"], m["largest_tensor_bytes"], m["slack_bytes"]
    largest_param = m["largest_param_bytes"]
    print(f"checkpoint {total / MiB:.0f} MiB, params {params / MiB:.0f} MiB, largest tensor "
          f"{largest / MiB:.0f} MiB; VmHWM before {before / MiB:.0f} MiB, placed +"
          f"{(placed - before) / MiB:.0f} MiB, saved +{(saved - before) / MiB:.0f} MiB")
    assert params == total and m["devices"] == 8
    assert placed <= before + params + 2 * largest + slack
    assert saved <= before + params + 2 * largest + largest_param + slack
    assert (tmp_path / "run" / "checkpoints" / "0").is_dir()


@pytest.mark.slow
def test_bench_convert_writes_its_figures(tmp_path):
    from bench import convert

    tiny = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, vocab_size=1024,
                num_attention_heads=4, num_key_value_heads=2)
    assert convert.main(["--model-json", json.dumps(tiny), "--shard-size", "300KB",
                         "--results", str(tmp_path), "--tmp", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "convert.json").read_text())["figures"]
    assert figures["import_gb_per_s"] > 0 and figures["export_gb_per_s"] > 0
    assert figures["export_files"] > 1 and figures["import_peak_saving_mib"] > figures["params_mib"]

