"""Exporting a meshlm run to the Hugging Face layout (``python -m convert export``, cli/convert.py).

``export`` writes a run's latest checkpoint (merge LoRA adapters first) in the Hugging Face layout:
``config.json``, ``generation_config.json``, sharded safetensors (at most ``shard_size`` bytes each,
split and named as ``transformers`` does: ``model.safetensors`` alone, or
``model-00001-of-00003.safetensors``... with ``model.safetensors.index.json``) and, for Hugging Face
tokenizers, ``tokenizer.json`` and ``tokenizer_config.json`` — loadable by ``transformers``. The
parameters are restored sharded over the devices, and each Hugging Face tensor is gathered alone
(one layer's slot of one parameter) and written straight into its file
(``safetensors_io.SafetensorsWriter``), in the run's ``param_dtype`` unless ``dtype`` says
otherwise: the host holds one tensor twice (gathered, and in the Hugging Face layout) beside what
Orbax's restore holds (measured: VmHWM 0.8 GiB above before + params for 2.3 GiB of parameters).
Nothing is written to OUT_DIR unless the whole export succeeds.

A run with ``mtp_depth`` > 0 exports its multi-token-prediction modules in DeepSeek-V3's layout
(``model.layers.{num_hidden_layers + k}``, ``num_nextn_predict_layers`` = N, each layer with its
copies of the embedding and head, as DeepSeek's checkpoints hold them).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from convert.checkpoints import (
    DEFAULT_SHARD_SIZE,
    INDEX_FILE,
    PARAMETERS_SPLIT,
    assembled_beside,
    mesh_sizes,
    slot_sharding,
)
from convert.hf_layout import (
    EMBED_NAME,
    FLOAT32_TENSORS,
    ConversionError,
    Layout,
    copied_tensors,
    hf_config_from_model,
    hf_shape,
    parameter_sources,
    zero_tensors,
)
from convert.safetensors_io import DTYPES, SafetensorsWriter, plan_shards
from inference.load import load_run, read_run_config
from model.config import ModelConfig
from sharding.mesh import MeshConfig


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


@dataclasses.dataclass(frozen=True)
class OutTensor:
    """One Hugging Face tensor of an export: made of slot ``index`` of parameter ``path`` under
    ``layout``, for each of its ``parts`` (several: rows of one tensor that make several meshlm
    parameters, as DeepSeek's kv_a_proj_with_mqa; none: a tensor of zeros)."""

    name: str
    parts: tuple[tuple[tuple[str, ...], tuple[int, ...], Layout], ...]
    shape: tuple[int, ...]


def _file_order(t: OutTensor) -> tuple[int, int]:
    """Files hold the embeddings first, then layer by layer, then the rest (as transformers
    orders a state dict), so that a layer's tensors share a file."""
    layer = re.search(r"\.layers\.(\d+)\.", t.name)
    return (1, int(layer.group(1))) if layer else (0 if t.name == EMBED_NAME else 2, 0)


def out_tensors(cfg: ModelConfig, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[OutTensor]:
    """Every Hugging Face tensor of the model, in file order, with its shape (nothing is read)."""
    parts: dict[str, list] = collections.defaultdict(list)
    shape_of = dict(zero_tensors(cfg))
    for path, (layout, names, stacked) in parameter_sources(cfg).items():
        shape = shapes[path]
        for index, name in zip(np.ndindex(*shape[:stacked]), names, strict=True):
            parts[name].append((path, index, layout))
            shape_of[name] = hf_shape(layout, cfg, shape[stacked:])
    for name, (path, layout) in copied_tensors(cfg).items():
        parts[name].append((path, (), layout))
        shape_of[name] = hf_shape(layout, cfg, shapes[path])
    out = [OutTensor(name, tuple(parts[name]), shape) for name, shape in shape_of.items()]
    return sorted(out, key=_file_order)


def hf_tensor(t: OutTensor, params: Mapping[tuple[str, ...], jax.Array], cfg: ModelConfig,
              dtype: np.dtype) -> np.ndarray:
    """Tensor ``t`` in the Hugging Face layout, each of its parts gathered alone."""
    if len(t.parts) == 1 and t.parts[0][2].rows is None:
        path, index, layout = t.parts[0]
        return np.ascontiguousarray(layout.to_hf(gather_slot(params[path], index), cfg), dtype)
    out = np.zeros(t.shape, dtype)
    for path, index, layout in t.parts:  # each part's rows (rows=None: all of them)
        rows = layout.rows(cfg)[0] if layout.rows else slice(None)
        out[rows] = layout.to_hf(gather_slot(params[path], index), cfg)
    return out


def _read_slot(param: jax.Array, index: jax.Array) -> jax.Array:
    k = index.shape[0]
    sizes = (1,) * k + param.shape[k:]
    starts = [index[i] for i in range(k)] + [0] * (param.ndim - k)
    return jax.lax.dynamic_slice(param, starts, sizes).reshape(param.shape[k:])


@functools.cache
def _slot_reader(sharding: NamedSharding) -> Callable[..., jax.Array]:
    return jax.jit(_read_slot, out_shardings=sharding)


def gather_slot(param: jax.Array, index: tuple[int, ...]) -> np.ndarray:
    """Slot ``index`` (leading axes) of a sharded parameter, on the host: one slot is gathered,
    never the parameter."""
    if not index:
        return np.asarray(jax.device_get(param))
    reader = _slot_reader(slot_sharding(param.sharding, len(index)))
    return np.asarray(jax.device_get(reader(param, jnp.asarray(index, jnp.int32))))


def write_safetensors(params: Mapping[tuple[str, ...], jax.Array], cfg: ModelConfig, out_dir: Path,
                      dtype: str, shard_size: int) -> None:
    """The parameters as Hugging Face safetensors files in ``out_dir`` (and their index when there
    are several), one tensor gathered, converted and written at a time."""
    tensors = out_tensors(cfg, {path: tuple(p.shape) for path, p in params.items()})
    run_dtype = DTYPES["BF16" if dtype == "bfloat16" else "F32"]
    dtypes = {t.name: DTYPES["F32"] if t.name.endswith(FLOAT32_TENSORS) else run_dtype
              for t in tensors}
    nbytes = {t.name: int(np.prod(t.shape)) * dtypes[t.name].itemsize for t in tensors}
    by_name = {t.name: t for t in tensors}
    files = plan_shards(((t.name, nbytes[t.name]) for t in tensors), shard_size)
    for file, names in files.items():
        specs = {name: (dtypes[name], by_name[name].shape) for name in names}
        with SafetensorsWriter(out_dir / file, specs, {"format": "pt"}) as writer:
            for name in names:
                writer.write(name, hf_tensor(by_name[name], params, cfg, dtypes[name]))
    if len(files) > 1:
        total = sum(int(np.prod(t.shape)) for t in tensors)
        index = {"metadata": {"total_parameters": total, "total_size": sum(nbytes.values())},
                 "weight_map": {name: file for file, names in files.items() for name in names}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _flat_params(params: Any) -> Iterator[tuple[tuple[str, ...], jax.Array]]:
    for path, var in nnx.to_flat_state(params):
        yield tuple(str(p) for p in path), var.get_value()


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "",
                      shard_size: int = DEFAULT_SHARD_SIZE, mesh: MeshConfig = PARAMETERS_SPLIT) -> Path:
    """Writes the run's latest (or given step's) parameters in the Hugging Face layout, restored
    onto ``mesh`` (default: every parameter split over all devices), in files of at most
    ``shard_size`` bytes (a larger tensor alone in its file); ``dtype`` "" keeps the run's
    ``param_dtype``."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} already exists and is not empty (nothing was overwritten)")
    if shard_size < 1:
        raise ConversionError(f"the shard size must be at least 1 byte, got {shard_size}")
    hf_config_from_model(read_run_config(run_dir).model)  # refused before the weights are read
    mesh_sizes(mesh)
    run = load_run(run_dir, mesh)
    cfg, tokenizer = run.cfg.model, run.tokenizer
    dtype = dtype or cfg.param_dtype
    bos, eos = special_ids(tokenizer)
    hf_cfg = {**hf_config_from_model(cfg, bos, eos), "dtype": dtype}  # of the written tensors
    with assembled_beside(out_dir, "exporting") as scratch:
        write_safetensors(dict(_flat_params(run.params)), cfg, scratch, dtype, shard_size)
        (scratch / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        stops = list(tokenizer.stop_ids)  # EOS first, then end-of-turn ids
        generation = {"bos_token_id": hf_cfg["bos_token_id"],
                      "eos_token_id": stops if len(stops) > 1 else eos}
        (scratch / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer.kind == "hf":
            save_hf_tokenizer(tokenizer, scratch)
        else:
            print(f"warning: the run's {tokenizer.kind!r} tokenizer has no Hugging Face form; only "
                  "the weights and config were written", file=sys.stderr)
    return out_dir

