"""Runs on an object store: ``run.dir=s3://...`` against a real S3 server (moto's, started on
localhost by tests/conftest.py; the trainer reaches it through ``AWS_ENDPOINT_URL``). Orbax writes
the checkpoints straight to the bucket; config, tokenizer, metrics, TensorBoard events, profiles
(traced locally, then uploaded), manifests and the lease lock live there too. A run interrupted and
resumed from the bucket on another mesh (in this process), or killed and resumed on another process
count (slow), trains as one uninterrupted local run."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from orbax.checkpoint._src.serialization import tensorstore_utils

from core.errors import ConfigError
from tests.helpers import losses_of, tiny_config
from train import orbax_s3
from train.checkpoint import MANIFEST, Checkpointer
from train.lease import ObjectLease
from train.loop import train
from train.run_dir import COMMIT_FILE, DAMAGED_DIR, RunDir
from train.store import file_sizes

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5
# Steps 1-10 on data=2 x tensor=4, the resume on data=8: the programs (and the schedule of 20 steps)
# of the tests that train tiny.yaml for 20 steps on these meshes, so the compilation cache has them.
OVERRIDES = ("train.log_every=1", "optim.decay_steps=20", "checkpoint.every=5",
             "train.eval_batches=1", "run.peak_flops=1e12", "run.lock_ttl=3")
FIRST_MESH = ("mesh.data=2", "mesh.tensor=4")


def _fresh(bucket: str) -> str:
    return f"{bucket}/{uuid.uuid4().hex[:8]}/run"


def test_orbax_still_needs_and_accepts_the_s3_patch():
    """Fails loudly when an Orbax upgrade renames the three replaced functions or fixes s3:// itself
    (then train/orbax_s3.py should go)."""
    for module, name in orbax_s3.PATCHED:
        assert callable(getattr(module, name)), f"{module.__name__}.{name} is gone"
    assert orbax_s3._ORIGINAL["_normalize_path"]("s3://b/run") == "s3:/b/run"  # Orbax's bug
    assert not orbax_s3._ORIGINAL["_use_gcs_driver"]("s3://b/run")
    orbax_s3.enable_s3()
    spec = tensorstore_utils.build_kvstore_tspec("s3://b/run/checkpoints/4/state", "params")
    assert spec["driver"] == "ocdbt" and spec["base"]["driver"] == "s3", spec
    assert (spec["base"]["bucket"], spec["base"]["path"]) == ("b", "run/checkpoints/4/state")
    assert tensorstore_utils.build_kvstore_tspec("gs://b/run", use_ocdbt=False)["driver"] == "gcs"


def test_run_dir_urls_are_checked():
    with pytest.raises(ConfigError, match=r"run.dir: 'az://c/run': az:// is not supported"):
        tiny_config("az://c/run")
    with pytest.raises(ConfigError, match="names no bucket"):
        tiny_config("s3:///run")
    with pytest.raises(ConfigError, match="run.lock_ttl: must be seconds > 0"):
        tiny_config("s3://b/run", "run.lock_ttl=0")


def test_a_held_remote_lock_is_refused_and_a_stale_one_taken_over(s3_server, capsys):
    run = RunDir(_fresh(s3_server))
    # 3 s: the holder refreshes every second, and a loaded machine may stall a thread for one
    holder = ObjectLease(run.lock_file, 3.0, {"pid": 4242, "host": "elsewhere"})
    assert holder.acquire() == ""
    with pytest.raises(ConfigError) as refused:
        with run.locked(3.0):
            pass
    assert str(refused.value).count("\n") == 0
    assert "in use by another trainer (pid 4242 on elsewhere" in str(refused.value)

    holder.stop.set()  # the holder dies: its lease is never refreshed again, nor deleted
    holder.thread.join()
    capsys.readouterr()
    with run.locked(3.0):
        assert "taking over the stale lock of pid 4242 on elsewhere" in capsys.readouterr().err
        assert f"{os.getpid()}" in run.lock_file.read_text()
    assert not run.lock_file.exists()  # released

    with pytest.raises(ConfigError, match=r"run.dir: cannot write to s3://no-such-bucket/run: "):
        with RunDir("s3://no-such-bucket/run").locked(1.0):
            pass


def test_a_run_interrupted_on_s3_resumes_there_on_another_mesh_like_a_local_run(
        eight_devices, s3_server, tiny_run, capsys):
    """The resume starts from checkpoint 5: checkpoint 10 was damaged in the bucket, so it is moved
    to damaged_checkpoints/ there (as on a disk). The uninterrupted local run is the shared tiny
    run: the same 20 steps and schedule (its checkpoints, evaluations and mesh change no loss)."""
    url = _fresh(s3_server)
    train(tiny_config(url, *OVERRIDES, "train.steps=10", *FIRST_MESH))
    run = RunDir(url)
    assert run.committed_steps() == [5, 10]
    files = file_sizes(run.path)
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "checkpoints/10/" + MANIFEST,
                 "checkpoints/10/" + COMMIT_FILE, "checkpoints/10/data/process_0-of-1.json"):
        assert name in files, sorted(files)
    assert any(name.startswith("tensorboard/events.out.tfevents.") for name in files)
    assert not any(".orbax-checkpoint-tmp" in name for name in files)  # written in place
    state_file = next(p for p in files if p.startswith("checkpoints/10/state/") and "/d/" in p)
    (run.path / state_file).write_bytes((run.path / state_file).read_bytes()[:-1])  # truncated
    unfinished = run.path / "checkpoints" / "25" / "meta" / "metadata"  # a save killed midway:
    unfinished.write_bytes(b"{}")  # no commit file

    capsys.readouterr()
    train(tiny_config(url, *OVERRIDES, "train.steps=20", "run.tensorboard=false"))
    err = capsys.readouterr().err
    assert "checkpoint 10 is damaged" in err and "training resumes from checkpoint 5" in err
    assert (run.path / DAMAGED_DIR / "10" / MANIFEST).is_file()
    assert run.committed_steps() == [10, 15, 20]  # 10 written again after the resume
    assert not unfinished.exists()  # removed at the start, never listed
    local, remote = losses_of(tiny_run[0]), losses_of(url)
    assert sorted(remote) == list(range(1, 21))
    assert all(abs(remote[s] - local[s]) <= TOL * local[s] for s in local), (local, remote)
    checkpointer = Checkpointer(url, tiny_config(url).checkpoint, read_only=True)
    assert checkpointer.readable_step() == 20
    checkpointer.close()


def _launch(run_dir: str, *extra: str) -> subprocess.Popen:
    """``python -m train.launch --processes 2`` in a process group of its own (killed whole)."""
    return subprocess.Popen(
        [sys.executable, "-m", "train.launch", "--processes", "2", "configs/tiny.yaml",
         *OVERRIDES, f"run.dir={run_dir}", *extra], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow  # ~45 s: two processes to a SIGKILL, a resume in one process, a local reference
def test_two_processes_killed_on_s3_resume_in_one_like_an_uninterrupted_local_run(
        s3_server, tmp_path):
    steps = ["train.steps=20", "run.tensorboard=false"]
    url = _fresh(s3_server)
    proc = _launch(url, *steps, "train.profile=2:3")
    run = RunDir(url)
    deadline = time.monotonic() + 300
    while not run.committed_steps() or run.committed_steps()[-1] < 10:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint 10 in time"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both trainers, mid-run
    proc.communicate()
    killed_at = run.committed_steps()[-1]
    assert killed_at < 20 and run.lock_file.exists()  # unfinished, its lease left behind
    assert "process_1-of-2.json" in str(file_sizes(run.path / "checkpoints" / "10" / "data"))
    traces = [name for name in file_sizes(run.path / "tensorboard") if name.endswith(".xplane.pb")]
    assert sorted(name.split("/")[0] for name in traces) == ["process0", "process1"], traces

    local = tmp_path / "local"
    for run_dir in (url, str(local)):
        result = subprocess.run([sys.executable, "-m", "train", "configs/tiny.yaml", *OVERRIDES,
                                 *steps, f"run.dir={run_dir}"], cwd=ROOT, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        if run_dir == url:  # it waited out the killed trainers' lease (2 s), then took it over
            assert f"steps {killed_at}->20" in result.stdout
            assert "taking over the stale lock" in result.stderr
    remote, reference = losses_of(url), losses_of(local)
    assert sorted(remote) == list(range(1, 21))
    assert all(abs(remote[s] - reference[s]) <= TOL * reference[s] for s in reference)
