"""Packaging for meshlm: sharded JAX/Flax language models (dense and MoE) for TPU pods."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "importlib_resources>=6.0",  # imported by tensorflow-datasets without being declared
    "grain==0.2.18",
    "array_record==0.8.6",  # the token cache's files (data/token_cache.py)
    "pyarrow==26.0.1",  # parquet: sources (data/hf_sources.py)
    "datasets==5.2.0",  # hf: and hf-stream: sources (Hugging Face datasets; imported only by them)
    "sentencepiece==0.2.3",
    "tokenizers==0.23.3",  # Hugging Face tokenizers (data/hf_tokenizer.py)
    "jinja2==3.1.6",  # chat templates, rendered in its sandbox (data/chat.py)
    "gguf==0.19.0",  # reading GGUF files: their tokenizer (data/hf_tokenizer.py) and tensors
    "numpy>=2.0",
    "pyyaml==6.0.3",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",  # the MoE expert-load picture at the end of a run
    "safetensors==0.8.0",  # convert: Hugging Face weights (never pickled .bin files)
    "fsspec==2026.9.0",  # run directories on object stores (train/store.py)
    "s3fs==2026.9.0",  # run.dir=s3://... (fsspec's S3; conditional writes for the run's lease lock)
    "starlette==1.10.0",  # python -m eval serve: the OpenAI-compatible HTTP API (inference/server.py)
    "uvicorn==0.54.0",  # python -m eval serve: the ASGI server that runs it (cli/serve.py)
    "prometheus-client==0.26.0",  # python -m eval serve: GET /metrics (inference/server_metrics.py)
]

setup(
    name="meshlm",
    version="0.1.0",
    description="Sharded dense and Mixture-of-Experts language models in JAX/Flax NNX for TPU pods",
    python_requires=">=3.11",
    packages=find_packages(include=["core*", "sharding*", "model*", "data*", "train*", "inference*",
                                    "eval*", "convert*", "cli*"]),
    # the local lm-eval tasks (YAML, JSONL and their loader) of python -m eval harness
    package_data={"eval": ["tasks/*/*.yaml", "tasks/*/*.jsonl", "tasks/*/*.py"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # torch 2.13.0 is the CPU build (a newer or unpinned torch pulls several GB of CUDA wheels);
        # transformers is the reference the conversion tests compare logits with (accelerate: its
        # GGUF loader); import-linter checks that imports flow one way (make lint, a test); xprof
        # (TensorBoard's profile plugin) reads back a train.profile trace, wandb logs a run offline;
        # moto's S3 server (on localhost) holds the object-store run directories of the tests; the
        # server's tests talk to it with the real openai client (httpx2: its HTTP client, used directly
        # for malformed requests and /metrics).
        "test": ["pytest==9.2.0", "ruff==0.17.6", "import-linter==2.17", "hypothesis==6.170.17",
                 "lm-eval==0.4.13", "torch==2.13.0", "transformers==5.24.0", "accelerate==1.15.0",
                 "xprof==2.24.2", "wandb==0.31.0", "moto[server]==5.2.6", "openai==3.51.0",
                 "httpx2==2.17.0"],
        # run.dir=gs://...: fsspec's GCS (Orbax's arrays go through TensorStore's own gcs driver).
        "gcs": ["gcsfs==2026.10.1"],
        # run.wandb=PROJECT: Weights & Biases (imported only when a run asks for it).
        "wandb": ["wandb==0.31.0"],
        # viewing train.profile traces: `xprof --logdir RUN/tensorboard` (or TensorBoard with it).
        "profile": ["xprof==2.24.2"],
        # python -m eval harness: EleutherAI's lm-evaluation-harness (no torch needed).
        "harness": ["lm-eval==0.4.13"],
        # TPU runtime: ahead-of-time compiles for TPU topologies on any host (train.compile), and
        # training on TPU VMs. jax[tpu]==0.10.2 pins libtpu==0.0.42.*.
        "tpu": ["libtpu==0.0.42.1"],
    },
    entry_points={
        "console_scripts": [
            "meshlm-train=cli.train:main",
            "meshlm-eval=cli.eval:main",
            "meshlm-serve=cli.serve:main",
        ]
    },
)
