"""Where a run's measurements go besides metrics.jsonl, from one tiny run: the profiler trace of
``train.profile`` holds the train steps it names (read back by xprof, TensorBoard's profile plugin),
and the Weights & Biases run of ``run.wandb`` (offline: nothing leaves the machine) holds the losses
of metrics.jsonl (read back from W&B's own transaction log)."""

import json
import struct
import zlib
from pathlib import Path

import jax
import pytest
from wandb.proto import wandb_internal_pb2
from xprof.convert import raw_to_tool_data

from core.errors import ConfigError
from tests.helpers import losses_of, tiny_config
from train.config import TrainConfig, build_config
from train.loop import train
from train.run_dir import RunDir
from train.validate import check_profile

STEPS, PROFILE = 4, (2, 3)


@pytest.fixture(scope="module")
def tracked_run(eight_devices, tmp_path_factory) -> Path:
    """A 4-step run traced at steps 2-3 and logged to an offline W&B project."""
    base = tmp_path_factory.mktemp("tracked")
    offline = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
               "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
               "WANDB_ERROR_REPORTING": "false", "WANDB__DISABLE_STATS": "true",
               "WANDB__DISABLE_META": "true", "WANDB_CONFIG_DIR": str(base / "wandb-config"),
               "WANDB_CACHE_DIR": str(base / "wandb-cache"), "WANDB_DATA_DIR": str(base / "wandb-data")}
    with pytest.MonkeyPatch.context() as env:
        for key, value in offline.items():
            env.setenv(key, value)
        # The mesh and schedule of the session's tiny run (conftest.py: tiny_run): the same
        # programs, which the compilation cache holds once that run has trained.
        train(tiny_config(base / "run", f"train.steps={STEPS}", "mesh.data=2", "mesh.tensor=4",
                          "optim.decay_steps=20", "train.log_every=1",
                          "train.profile={}:{}".format(*PROFILE), "run.wandb=meshlm-test",
                          "run.tensorboard=false", "train.eval_batches=1", "checkpoint.every=0"))
    return base / "run"


def test_profile_trace_holds_the_profiled_train_steps(tracked_run):
    traces = list(RunDir(tracked_run).profile_log_dir(0, 1).glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1, traces
    # JAX's own XSpace reader: the step markers are steps 2 and 3, each with its train step
    # dispatched inside it (XLA:CPU's executions carry no module name; a TPU's would)
    events = [e for plane in jax.profiler.ProfileData.from_file(str(traces[0])).planes
              for line in plane.lines for e in line.events]
    steps = {int(dict(e.stats)["step_num"]): (e.start_ns, e.end_ns) for e in events if e.name == "train"}
    assert sorted(steps) == list(range(PROFILE[0], PROFILE[1] + 1)), steps
    dispatches = [e for e in events if e.name == "PjitFunction(train_step)"]
    for start, end in steps.values():
        assert any(start <= e.start_ns and e.end_ns <= end for e in dispatches), (steps, dispatches)
    # and xprof, TensorBoard's profile plugin, opens it: its trace viewer shows the train step
    data, content_type = raw_to_tool_data.xspace_to_tool_data([traces[0]], "trace_viewer@", {})
    names = {e.get("name") for e in json.loads(data)["traceEvents"]}
    assert content_type == "application/json" and "PjitFunction(train_step)" in names, names


def test_wandb_offline_run_holds_the_losses_of_metrics_jsonl(tracked_run):
    run = RunDir(tracked_run)
    run_id = run.wandb_run_id.read_text().strip()
    (offline,) = run.wandb.glob(f"offline-run-*-{run_id}")
    records = wandb_records(offline / f"run-{run_id}.wandb")
    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    logged = {row["step"]: row["loss"] for row in history if "loss" in row}
    assert logged == losses_of(tracked_run) and sorted(logged) == list(range(1, STEPS + 1))
    assert any("eval_loss" in row for row in history)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = items(started.config.update)
    assert started.project == "meshlm-test" and config["train"]["profile"] == "{}:{}".format(*PROFILE)


@pytest.mark.parametrize("spec", ["3", "a:b", "2:", "0:2", "3:2", "4:5", "1:²"])
def test_a_profile_outside_the_run_is_refused(spec):
    with pytest.raises(ConfigError, match="train.profile"):
        check_profile(TrainConfig(steps=4, profile=spec))
    check_profile(TrainConfig(steps=4, profile="4:4"))


def test_a_profile_override_stays_text():  # YAML 1.1 would read 10:12 as the base-60 number 612
    assert build_config({}, ["train.profile=10:12"]).train.profile == "10:12"


def items(entries) -> dict:
    """A W&B record's items (history, config) by name (W&B writes plain names as ``nested_key``)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in entries}


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic
    0xBEE1, version 0), then LevelDB's log format -- 32 KiB blocks of chunks, each with a CRC-32,
    a length and a kind (full, first, middle, last) -- whose joined chunks are
    ``wandb_internal_pb2.Record`` messages. wandb 0.31 reads these files only in its Go core (``wandb
    sync``), so the test reads the format itself, with W&B's own protobuf schema."""
    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + size]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"damaged chunk at byte {pos}"
        pending, pos = pending + chunk, pos + 7 + size
        if kind in (1, 4):  # full, last
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records
