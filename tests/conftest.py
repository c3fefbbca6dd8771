"""Test setup: 8 emulated CPU devices, configured before JAX initialises its backend, and one
compilation cache for the session.

Many tests compile the same program again: a new Program, or a ``python -m train`` subprocess that
resumes a run. JAX's persistent compilation cache, in a directory of this session's own (removed at
exit, so no run sees another's), makes each such program compile once: the subprocesses inherit it
through the environment. Every program is cached, however fast it compiled.

The test programs are tiny and each runs a few times, so compiling them is most of their cost:
``--xla_backend_optimization_level=0`` skips LLVM's optimisation of the generated CPU code (XLA's
own HLO passes, fusion and layout included, still run, and the float semantics are the same: no
fast-math at any level). Measured on tests/test_sharding.py, test_model.py and test_moe.py: 161 s
-> 120 s. ``--xla_cpu_experimental_ynn_fusion_type=`` (empty) leaves dots and reductions to XLA's
own emitters instead of YNNPACK fusions, which cost more to compile than these tiny programs gain
from them: test_model, test_sharding and test_mla 66.6 -> 61.8 s, test_moe, test_train,
test_generate and test_finetune 142.9 -> 134.1 s (same results). Benchmarks (``make bench``) and
training runs keep XLA's defaults.
"""

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_cpu_experimental_ynn_fusion_type=").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="meshlm-test-xla-cache-")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def eight_devices() -> list:
    """The 8 CPU devices; a test that needs them fails (never skips) with fewer."""
    devices = jax.devices()
    assert len(devices) == 8, f"tests need 8 emulated CPU devices, found {len(devices)}"
    return devices


@pytest.fixture(scope="session")
def tiny_run(eight_devices, tmp_path_factory) -> tuple:
    """(run directory, training summary with what it printed) of configs/tiny.yaml trained 20 steps
    on data=2, tensor=4, checkpoints at 10 and 20, every loss logged, ending with an 8-token sample:
    one run for the eval and harness tests and the remote run's local reference, which only read
    it (a test that changes a run copies it first)."""
    from tests.helpers import TINY_RUN_SAMPLE, trained_tiny_run

    return trained_tiny_run(tmp_path_factory.mktemp("tiny") / "run", sample_tokens=TINY_RUN_SAMPLE)


@pytest.fixture(scope="session")
def chat_run(tiny_run, tmp_path_factory) -> tuple:
    """(run directory, tokenizer directory): the shared tiny run's weights saved as a step-0 run of
    their own with a byte-level BPE whose chat template ends its generation prompt with a newline
    (tests/helpers.py: tiny_tokenizer): the base of the chat SFT and preference fine-tunes."""
    import dataclasses
    import json

    from convert.checkpoints import save_params
    from data.hf_tokenizer import HFTokenizer
    from inference.load import load_run
    from tests.helpers import tiny_tokenizer

    root = tmp_path_factory.mktemp("chat_run")
    tok = tiny_tokenizer(root / "tok")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    # a newline, which byte-level BPE never merges into the reply's first word
    config["chat_template"] = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>"
                               "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    run = load_run(tiny_run[0])
    run_dir = root / "base"
    cfg = dataclasses.replace(run.cfg, data=dataclasses.replace(run.cfg.data, tokenizer=f"hf:{tok}"),
                              run=dataclasses.replace(run.cfg.run, dir=str(run_dir)))
    run_dir.mkdir()
    save_params(run_dir, cfg, run.params, HFTokenizer.from_path(tok), {})
    return run_dir, tok


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2 GGUF's tokenizer (``data.hf_tokenizer.tokenizer_from_gguf``), read once for the
    session (4-10 s of GGUF metadata parsing): the tests only read it (one that changes an attribute
    changes a ``copy.copy`` of it)."""
    from data.hf_tokenizer import tokenizer_from_gguf
    from tests.helpers import smollm2_gguf

    return tokenizer_from_gguf(smollm2_gguf())


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 server on a free localhost port (moto's, in a thread of this process) with one
    bucket; yields its URL. Its endpoint and made-up credentials are in the environment for this
    process and the trainers it starts. One per session: fsspec and epath keep the filesystem
    object of the first endpoint they see."""
    from moto.server import ThreadedMotoServer  # a test extra, needed by few tests (import: ~1 s)

    from train.store import filesystem, run_path

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "meshlm",
           "AWS_SECRET_ACCESS_KEY": "meshlm", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    fs, _ = filesystem(run_path("s3://meshlm-test/"))
    fs.call_s3("create_bucket", Bucket="meshlm-test")
    yield "s3://meshlm-test"
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()
