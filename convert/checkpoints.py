"""Converting checkpoints between meshlm and the formats users arrive and leave with (the commands
``python -m convert import|export`` are ``cli/convert.py``).

``import`` reads a Hugging Face model directory (``config.json``, ``*.safetensors``, ``tokenizer.json``
[+ ``tokenizer_config.json``]) of the Llama or Mixtral family, or a Llama-family GGUF file (its
embedded tokenizer and chat template converted), and writes a meshlm run directory:
``config.yaml``, the tokenizer and an Orbax checkpoint at step 0 holding the parameters, usable by
``python -m eval``, ``python -m train.finetune`` and ``export``. Nothing is written to RUN_DIR
unless the whole import succeeds (it is assembled beside it and renamed). Tensors are read one
parameter at a time, each converted into the run's dtype as it is read and placed on the device,
so the host never holds the model more than once (before: two or three float32 copies).

``export`` writes a run's latest checkpoint (merge LoRA adapters first) in the Hugging Face layout:
``config.json``, ``generation_config.json``, ``model.safetensors`` and, for Hugging Face
tokenizers, ``tokenizer.json`` and ``tokenizer_config.json`` — loadable by ``transformers``.

Bad input (unknown architecture, missing or misshapen tensors, an unsupported GGUF quantisation,
an existing RUN_DIR) is a ConversionError (a ValueError) with a one-line message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from convert.gguf_import import hf_config, hf_tensors, open_gguf
from convert.hf_layout import (
    ConversionError,
    HFTensors,
    LazyTensors,
    hf_config_from_model,
    hf_from_params,
    model_config_from_hf,
    params_from_hf,
)
from core.errors import first_line
from data.hf_tokenizer import HFTokenizer, read_json_object, tokenizer_from_gguf
from inference.load import load_run, read_run_config
from model.config import ModelConfig
from model.transformer import Transformer
from train.checkpoint import Checkpointer
from train.config import CheckpointConfig, Config, DataConfig, RunConfig, TrainConfig
from train.run_dir import RunDir
from train.state import TrainState

INDEX_FILE = "model.safetensors.index.json"
MAX_WINDOW = 2048  # the imported run's train.seq_len (generation window) at most; --seq-len overrides


# ------------------------------------------------------------------------------------------ sources


def _shard(src: Path, name: Any) -> Path:
    """A file the index names: a plain ``*.safetensors`` name in ``src``."""
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise ConversionError(f"{src / INDEX_FILE} names {name!r}, not a *.safetensors file name in "
                              "this directory")
    return src / name


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path} is not a readable safetensors file ({first_line(e)})") from None


def _tensor_reader(path: Path, name: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        try:
            with safe_open(str(path), framework="numpy") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise ConversionError(f"tensor {name} of {path} is not readable ({first_line(e)})") from None

    return read


def _files_by_index(src: Path) -> dict[str, Path]:
    """Tensor name -> the shard ``model.safetensors.index.json`` names for it (each checked to
    hold it)."""
    weight_map = read_json_object(src / INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{src / INDEX_FILE} has no weight_map of tensor names to files")
    files = {name: _shard(src, file) for name, file in weight_map.items()}
    for path in set(files.values()):
        held = set(_tensor_names(path))
        if missing := sorted(n for n, p in files.items() if p == path and n not in held):
            raise ConversionError(f"{src / INDEX_FILE} puts tensor {missing[0]} in {path}, which "
                                  "does not hold it")
    return files


def read_safetensors(src: Path) -> HFTensors:
    """The tensors of ``src``'s safetensors, each read when looked up. With
    ``model.safetensors.index.json`` its ``weight_map`` says which file holds each tensor (other
    files, such as Mistral's consolidated.safetensors beside the shards, are not read); without it
    every ``*.safetensors`` file is read, and a tensor in two of them is refused."""
    if (src / INDEX_FILE).is_file():
        files = _files_by_index(src)
    else:
        files = {}
        for path in sorted(src.glob("*.safetensors")):
            for name in _tensor_names(path):
                if name in files:
                    raise ConversionError(f"tensor {name} is in both {files[name]} and {path}, and "
                                          f"no {INDEX_FILE} says which to read")
                files[name] = path
        if not files and not any(src.glob("*.safetensors")):
            raise ConversionError(f"{src} holds no *.safetensors weights (only safetensors are "
                                  "read, never pickled .bin files)")
    return LazyTensors({name: _tensor_reader(path, name) for name, path in files.items()})


def read_hf_dir(src: Path) -> tuple[ModelConfig, HFTensors, Any]:
    """(architecture, tensors, tokenizer) of a Hugging Face model directory."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{src} has no config.json: not a Hugging Face model directory")
    cfg = model_config_from_hf(read_json_object(config_file))
    if not (src / "tokenizer.json").is_file():
        raise ConversionError(f"{src} has no tokenizer.json (a Hugging Face fast tokenizer is needed)")
    extra = src / "tokenizer_config.json"
    tokenizer = HFTokenizer.from_files(src / "tokenizer.json", extra if extra.is_file() else None)
    return cfg, read_safetensors(src), tokenizer


def read_gguf(src: Path) -> tuple[ModelConfig, HFTensors, Any]:
    """(architecture, dequantised tensors in the Hugging Face layout, tokenizer) of a GGUF file."""
    reader = open_gguf(src)
    hf = hf_config(reader)
    cfg = model_config_from_hf(hf)
    return cfg, hf_tensors(reader, hf), tokenizer_from_gguf(src)


def read_source(src: Path) -> tuple[ModelConfig, HFTensors, Any]:
    if src.is_dir():
        return read_hf_dir(src)
    if src.is_file():
        return read_gguf(src)
    raise ConversionError(f"{src} does not exist")


# ------------------------------------------------------------------------------------------- import


def abstract_params(cfg: ModelConfig) -> Any:
    """The parameter State of the model ``cfg`` describes, as shapes (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[1]


def param_shapes(abstract: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shape of every parameter of ``abstract``, by path."""
    return {tuple(str(p) for p in path): tuple(var.shape) for path, var in nnx.to_flat_state(abstract)}


def params_state(abstract: Any, makers: Mapping[tuple[str, ...], Callable[[], np.ndarray]]) -> Any:
    """``abstract``'s State on one device, each parameter made (read and converted,
    ``params_from_hf``) and placed in turn: the host holds one parameter at a time."""
    return nnx.from_flat_state([(path, var.replace(jnp.asarray(makers[tuple(str(p) for p in path)]())))
                                for path, var in nnx.to_flat_state(abstract)])


def run_config(cfg: ModelConfig, run_dir: Path, seq_len: int) -> Config:
    """The imported run's Config: the architecture, its tokenizer, a generation window."""
    return Config(model=cfg, data=DataConfig(tokenizer=f"run:{run_dir}"),
                  train=TrainConfig(seq_len=seq_len, batch_size=8), run=RunConfig(dir=str(run_dir)))


def import_checkpoint(src: str | Path, run_dir: str | Path, *, seq_len: int = 0,
                      dtype: str = "float32") -> Path:
    """Converts a Hugging Face directory or GGUF file into a new meshlm run directory; returns it."""
    src, run_dir = Path(src), Path(run_dir).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConversionError(f"{run_dir} already exists and is not empty (nothing was overwritten)")
    cfg, tensors, tokenizer = read_source(src)
    cfg = dataclasses.replace(cfg, param_dtype=dtype, dtype=dtype)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{cfg.vocab_size}")
    seq_len = seq_len or min(cfg.max_seq_len, MAX_WINDOW)
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ConversionError(f"--seq-len must be in [1, {cfg.max_seq_len}], got {seq_len}")
    abstract = abstract_params(cfg)
    makers = params_from_hf(tensors, cfg, param_shapes(abstract), jnp.dtype(cfg.param_dtype))
    state = TrainState(jnp.zeros((), jnp.int32), params_state(abstract, makers), {})
    del makers, tensors
    scratch = run_dir.with_name(f".{run_dir.name}.importing-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        RunDir(scratch).write_config(run_config(cfg, run_dir, seq_len))
        RunDir(scratch).save_tokenizer(tokenizer)
        checkpointer = Checkpointer(scratch, CheckpointConfig(every=0, keep=1, async_save=False))
        try:
            checkpointer.save(0, state, {"step": 0, "imported_from": str(src.resolve())}, {})
            checkpointer.wait()
        finally:
            checkpointer.close()
        if run_dir.exists():
            run_dir.rmdir()  # empty (checked above)
        scratch.rename(run_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return run_dir


# ------------------------------------------------------------------------------------------- export


def special_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """(BOS, EOS) ids for a Hugging Face config: the named tokens' ids, None where there is none."""
    def named(name: str, fallback: int) -> int | None:
        text = getattr(tokenizer, "special_tokens", {}).get(name)
        found = tokenizer.token_id(text) if text else fallback
        return found if found >= 0 else None

    return named("bos_token", tokenizer.bos_id), named("eos_token", tokenizer.eos_id)


def save_hf_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template) of an
    ``hf`` tokenizer, as ``transformers.AutoTokenizer`` reads them."""
    (out_dir / "tokenizer.json").write_text(tokenizer.backend.to_str(), encoding="utf-8")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              **tokenizer.special_tokens}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Writes the run's latest (or given step's) parameters in the Hugging Face layout."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} already exists and is not empty (nothing was overwritten)")
    hf_config_from_model(read_run_config(run_dir).model)  # refused before the weights are read
    run = load_run(run_dir)
    cfg, tokenizer = run.cfg.model, run.tokenizer
    bos, eos = special_ids(tokenizer)
    hf_cfg = hf_config_from_model(cfg, bos, eos)
    params = {tuple(str(p) for p in path): np.asarray(jax.device_get(var[...]), np.float32)
              for path, var in nnx.to_flat_state(run.params)}
    tensors = hf_from_params(params, cfg)
    if dtype == "bfloat16":
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    hf_cfg["dtype"] = dtype  # of the written tensors
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    generation = {"bos_token_id": hf_cfg["bos_token_id"], "eos_token_id": eos}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer.kind == "hf":
        save_hf_tokenizer(tokenizer, out_dir)
    else:
        print(f"warning: the run's {tokenizer.kind!r} tokenizer has no Hugging Face form; only the "
              "weights and config were written", file=sys.stderr)
    return out_dir
