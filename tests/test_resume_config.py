"""Resuming with a changed config: keys that fix the model, the data order or the optimisation are
refused with one ``error:`` line naming the key (config.yaml untouched); keys that only change how
the same run is computed (runtime model keys, the mesh, logging, checkpoints) are applied, and the
run directory keeps the history of the configs it ran with."""

import jax
import pytest
import yaml

import cli.train as train_main
from core.errors import ConfigError
from tests.helpers import losses_of, tiny_config
from train.config import CONFIG_DIR, build_config, load_yaml
from train.loop import train
from train.run_dir import RunDir


def _cfg(run_dir, *overrides):
    """configs/tiny.yaml with overrides (the comparison needs no validation or devices)."""
    return build_config(load_yaml(CONFIG_DIR / "tiny.yaml"), [f"run.dir={run_dir}", *overrides])


def _history(run_dir) -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((run_dir / "config_history").glob("*.yaml"))]


@pytest.mark.parametrize("override, key, old, new", [
    ("data.tokenizer=run:/elsewhere", "data.tokenizer", "byte", "run:/elsewhere"),
    ("train.batch_size=32", "train.batch_size", "16", "32"),
    ("data.streams=4", "data.streams", "8", "4"),
    ("train.steps=200", "train.steps", "100", "200"),  # the cosine's length is train.steps
    ("data.source=text:/x/*.txt", "data.source", "stdlib", "text:/x/*.txt"),
    ("model.moe_impl=dropless", "model.moe_impl", "capacity", "dropless"),  # a different function
    ("model.param_dtype=bfloat16", "model.param_dtype", "float32", "bfloat16"),
    ("optim.lr=1e-3", "optim.lr", "0.003", "0.001"),
    ("finetune.lora_rank=4", "finetune.lora_rank", "8", "4"),
])
def test_a_changed_fixed_key_is_refused_naming_it_and_config_yaml_is_kept(tmp_path, override, key,
                                                                         old, new):
    run = RunDir(tmp_path / "run")
    run.prepare(_cfg(run.path))
    before = run.config_file.read_bytes()
    with pytest.raises(ConfigError) as e:
        run.prepare(_cfg(run.path, override, "model.remat=full"))  # remat alone would be fine
    assert e.value.key == key
    message = str(e.value)
    assert message.startswith(f"{key}: ") and f"={old}" in message and f"={new}" in message, message
    assert "\n" not in message
    assert run.config_file.read_bytes() == before
    assert len(_history(run.path)) == 1


def test_train_steps_may_change_when_the_schedule_length_is_explicit(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare(_cfg(run.path))
    with pytest.raises(ConfigError, match="optim.decay_steps=100") as e:  # says how to extend
        run.prepare(_cfg(run.path, "train.steps=200"))
    run.prepare(_cfg(run.path, "train.steps=200", "optim.decay_steps=100"))  # the same schedule
    assert run.read_config().train.steps == 200
    with pytest.raises(ConfigError) as e:  # now the schedule really would change
        run.prepare(_cfg(run.path, "train.steps=200", "optim.decay_steps=150"))
    assert e.value.key == "optim.decay_steps"


def test_runtime_changes_are_applied_and_the_history_keeps_every_config(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare(_cfg(run.path))
    run.prepare(_cfg(run.path))  # an unchanged resume adds nothing
    changed = ("model.remat=full", "model.dtype=bfloat16", "model.attention_impl=xla",
               "model.scan_layers=false", "mesh.data=2", "mesh.fsdp=4", "train.microbatches=2",
               "train.log_every=1", "checkpoint.every=7", "data.prefetch=0", "run.progress=true")
    run.prepare(_cfg(run.path, *changed))
    assert run.read_config() == _cfg(run.path, *changed)
    history = _history(run.path)
    assert [h["model"]["remat"] for h in history] == ["none", "full"]
    assert [h["mesh"]["fsdp"] for h in history] == [1, 4]

    # A run directory from before the history existed: its config becomes the first entry.
    for path in (run.path / "config_history").iterdir():
        path.unlink()
    run.prepare(_cfg(run.path))
    assert [h["model"]["remat"] for h in _history(run.path)] == ["full", "none"]


def test_the_cli_refuses_with_one_error_line_and_exit_2(eight_devices, tmp_path, monkeypatch,
                                                        capsys):
    run = RunDir(tmp_path / "run")
    run.prepare(_cfg(run.path, "train.steps=2"))
    before = run.config_file.read_bytes()
    monkeypatch.setattr(train_main, "setup_devices", lambda run_config: jax.device_count())
    code = train_main.main(["configs/tiny.yaml", f"run.dir={run.path}", "train.steps=2",
                            "data.streams=4", "train.batch_size=32"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.streams: "), err
    assert "train.batch_size" in lines[0]  # the other refused change is named on the same line
    assert run.config_file.read_bytes() == before
    assert not run.checkpoints.exists()  # refused before anything ran


def test_a_resume_on_another_mesh_with_remat_continues_and_records_both_configs(eight_devices,
                                                                                 tmp_path):
    run_dir = tmp_path / "run"
    common = ("train.log_every=1", "checkpoint.every=2", "optim.decay_steps=4",
              "optim.warmup_steps=1", "train.eval_batches=1", "run.tensorboard=false")
    train(tiny_config(run_dir, "train.steps=2", *common))
    summary = train(tiny_config(run_dir, "train.steps=4", "model.remat=full", "mesh.data=2",
                                "mesh.fsdp=4", *common))
    assert summary["step"] == 4 and sorted(losses_of(run_dir)) == [1, 2, 3, 4]
    current = RunDir(run_dir).read_config()
    assert (current.model.remat, current.mesh.fsdp, current.train.steps) == ("full", 4, 4)
    history = _history(run_dir)
    assert [(h["model"]["remat"], h["mesh"]["fsdp"], h["train"]["steps"]) for h in history] == [
        ("none", 1, 2), ("full", 4, 4)]
