"""Importing checkpoints into meshlm from the formats users arrive with (the commands
``python -m convert import|export`` are ``cli/convert.py``; export is ``convert/export.py``).

``import`` reads a Hugging Face model directory (``config.json``, ``*.safetensors`` — sharded ones
through ``model.safetensors.index.json``, which alone decides which file holds each tensor, so a
stray ``consolidated.safetensors`` beside the shards is never read — ``tokenizer.json`` [+
``tokenizer_config.json``]) or a GGUF file (its embedded tokenizer and chat template converted), and
writes a meshlm run directory: ``config.yaml``, the tokenizer and an Orbax checkpoint at step 0
holding the parameters, usable by ``python -m eval``, ``python -m train.finetune`` and ``export``.
Nothing is written to RUN_DIR unless the whole import succeeds (it is assembled beside it and
renamed). The parameters keep the checkpoint's stored dtype (``config.json``'s ``dtype`` or
``torch_dtype``: bfloat16 stays bfloat16; float16 widens to float32, which holds it exactly) unless
``dtype`` says otherwise.

Streaming: the run's mesh is built first (by default ``mesh.fsdp=-1``: every parameter split over
all devices; ``section.key=value`` overrides choose another) and each parameter is created on it as
an empty sharded array; the Hugging Face tensors are then read one at a time, straight from the file
into host memory in their stored dtype (``safetensors_io.read_tensor``), put on the devices already
split as that parameter's layer slot is split, and written into their slot by a jitted
``dynamic_update_slice`` that donates the parameter (updated in place, never copied). The host never
holds a whole [layers, ...] stack, nor the model in float32. Bound on the peak resident memory of
the import (VmHWM), measured by tests/test_convert_scale.py and ``bench.convert``:

    VmHWM <= before + params + 2 x largest tensor + HOST_SLACK

``before`` is the process before the import reads a tensor (Python, JAX, the libraries), ``params``
the device arrays' bytes in the run's dtype (on a CPU host the devices' memory is host memory; on
accelerators this term moves off the host), the largest tensor counted in the wider of its stored
and the run's dtype (its host copy as read, and its device copy, cast on the device), and
HOST_SLACK = 64 MiB for the allocator and the compiled update programs. (Measured: 1.0 GB
checkpoint, VmHWM 111 MiB above before + params against 192 MiB allowed; 2.5 GB, 657 against
1066.) Saving the Orbax checkpoint afterwards adds at most the largest parameter: Orbax
(TensorStore) keeps the chunks it writes in host memory until they are on disk, by default up to the
whole state once more (measured +0.65 GiB for 0.92 GiB of parameters), so the import's save lets
one parameter at a time be in flight (``save_concurrent_gb`` = the largest parameter's size; Orbax
refuses less) and while saving VmHWM <= before + params + 2 x largest tensor + largest parameter +
HOST_SLACK (measured: +0.34 GiB above before + params for 0.92 GiB). On accelerators Orbax's copy
from device to host is not bounded by that setting.

DeepSeek-V3's multi-token-prediction layers (``model.layers.{num_hidden_layers + k}``, which
transformers' model does not run) are left out of an import unless the override
``model.mtp_depth=N`` asks for the first N of them (meshlm's MTP modules, model/mtp.py, hold the
same weights). ``export`` is convert/export.py.

Bad input (unknown architecture, missing or misshapen tensors, an unsupported GGUF quantisation,
an existing RUN_DIR) is a ConversionError (a ValueError) with a one-line message.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convert.gguf_import import hf_config, hf_tensors, open_gguf
from convert.hf_layout import (
    ConversionError,
    HFTensors,
    Layout,
    LazyTensors,
    check_names,
    from_hf,
    hf_shape,
    hf_tensor_view,
    model_config_from_hf,
    parameter_sources,
)
from convert.safetensors_io import (
    Entry,
    read_header,
    read_tensor,
)
from core.errors import ConfigError
from data.hf_tokenizer import HFTokenizer, read_json_object, tokenizer_from_gguf
from model.config import RUNTIME_KEYS, ModelConfig
from model.transformer import Transformer
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import Rules, default_rules, tree_shardings
from train.checkpoint import Checkpointer
from train.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    RunConfig,
    TrainConfig,
    build_config,
    parse_override,
)
from train.run_dir import RunDir
from train.state import TrainState
from train.validate import check_sharding

INDEX_FILE = "model.safetensors.index.json"
MAX_WINDOW = 2048  # the imported run's train.seq_len (generation window) at most; --seq-len overrides
PARAMETERS_SPLIT = MeshConfig(data=1, fsdp=-1)  # import and export: each device holds 1/n of each
DEFAULT_SHARD_SIZE = 5 * 10**9  # bytes, as Hugging Face counts a "5GB" shard
HOST_SLACK = 64 << 20  # the constant of the import's memory bound (module docstring)

RUN_DTYPES = ("float32", "bfloat16")
STORED_AS = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32", "float64": "float32"}
IMPORT_MODEL_KEYS = RUNTIME_KEYS | {"mtp_depth"}  # the model keys an import's overrides may set
NOT_OVERRIDDEN = {"run.dir": "it is RUN_DIR", "data.tokenizer": "it is the checkpoint's tokenizer",
                  "model.param_dtype": "use --dtype"}

# ------------------------------------------------------------------------------------------ sources


@dataclasses.dataclass
class Source:
    """What an import reads: the architecture, the tensors (each read when looked up), the
    tokenizer, and the dtype the tensors are stored in (the run's default)."""

    cfg: ModelConfig
    tensors: HFTensors
    tokenizer: Any
    dtype: str


def _shard(src: Path, name: Any) -> Path:
    """A file the index names: a plain ``*.safetensors`` name in ``src``."""
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise ConversionError(f"{src / INDEX_FILE} names {name!r}, not a *.safetensors file name in "
                              "this directory")
    return src / name


def _entries_by_index(src: Path) -> dict[str, tuple[Path, Entry]]:
    """Tensor name -> (the shard ``model.safetensors.index.json`` names for it, its header entry);
    each shard is checked to hold the tensors the index puts in it."""
    weight_map = read_json_object(src / INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{src / INDEX_FILE} has no weight_map of tensor names to files")
    files = {name: _shard(src, file) for name, file in weight_map.items()}
    headers = {path: read_header(path) for path in set(files.values())}
    if missing := sorted(n for n, p in files.items() if n not in headers[p]):
        raise ConversionError(f"{src / INDEX_FILE} puts tensor {missing[0]} in {files[missing[0]]}, "
                              "which does not hold it")
    return {name: (path, headers[path][name]) for name, path in files.items()}


def safetensors_entries(src: Path) -> dict[str, tuple[Path, Entry]]:
    """Tensor name -> (its file, its header entry) for ``src``'s safetensors. With
    ``model.safetensors.index.json`` its ``weight_map`` says which file holds each tensor (other
    files, such as Mistral's consolidated.safetensors beside the shards, are not read); without it
    every ``*.safetensors`` file is read, and a tensor in two of them is refused."""
    if (src / INDEX_FILE).is_file():
        return _entries_by_index(src)
    entries: dict[str, tuple[Path, Entry]] = {}
    for path in sorted(src.glob("*.safetensors")):
        for name, entry in read_header(path).items():
            if name in entries:
                raise ConversionError(f"tensor {name} is in both {entries[name][0]} and {path}, and "
                                      f"no {INDEX_FILE} says which to read")
            entries[name] = (path, entry)
    if not entries and not any(src.glob("*.safetensors")):
        raise ConversionError(f"{src} holds no *.safetensors weights (only safetensors are read, "
                              "never pickled .bin files)")
    return entries


def lazy_tensors(entries: Mapping[str, tuple[Path, Entry]]) -> HFTensors:
    """The tensors ``entries`` locate, each read when looked up, in its stored dtype."""
    return LazyTensors({name: functools.partial(read_tensor, path, name, entry)
                        for name, (path, entry) in entries.items()})


def read_safetensors(src: Path) -> HFTensors:
    """The tensors of ``src``'s safetensors (see ``safetensors_entries``), each read when looked
    up, in its stored dtype."""
    return lazy_tensors(safetensors_entries(src))


def stored_dtype(hf: Mapping[str, Any], stored: Sequence[np.dtype] = ()) -> str:
    """The run dtype that keeps a checkpoint's stored dtype: ``config.json``'s ``dtype`` (or
    ``torch_dtype``), else the dtype most of the ``stored`` tensors have; float16 widens to float32
    (meshlm keeps parameters in float32 or bfloat16); float32 when nothing says."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    if not isinstance(name, str) and stored:
        name = collections.Counter(np.dtype(d).name for d in stored).most_common(1)[0][0]
    return STORED_AS.get(str(name).removeprefix("torch."), "float32")


def read_hf_dir(src: Path) -> Source:
    """A Hugging Face model directory: its architecture, tensors, tokenizer and stored dtype."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{src} has no config.json: not a Hugging Face model directory")
    hf = read_json_object(config_file)
    cfg = model_config_from_hf(hf)
    if not (src / "tokenizer.json").is_file():
        raise ConversionError(f"{src} has no tokenizer.json (a Hugging Face fast tokenizer is needed)")
    extra = src / "tokenizer_config.json"
    tokenizer = HFTokenizer.from_files(src / "tokenizer.json", extra if extra.is_file() else None)
    entries = safetensors_entries(src)
    return Source(cfg, hf_tensor_view(hf, cfg, lazy_tensors(entries)), tokenizer,
                  stored_dtype(hf, [e.dtype for _, e in entries.values()]))


def read_gguf(src: Path) -> Source:
    """A GGUF file: architecture, dequantised tensors in the Hugging Face layout, tokenizer; float32
    unless its Hugging Face-style config names a dtype."""
    reader = open_gguf(src)
    hf = hf_config(reader)
    return Source(model_config_from_hf(hf), hf_tensors(reader, hf), tokenizer_from_gguf(src),
                  stored_dtype(hf))


def read_source(src: Path) -> Source:
    if src.is_dir():
        return read_hf_dir(src)
    if src.is_file():
        return read_gguf(src)
    raise ConversionError(f"{src} does not exist")


# ------------------------------------------------------------------------------------------- import


def _slot(tensors: HFTensors, name: str, layout: Layout, cfg: ModelConfig,
          slot_shape: tuple[int, ...]) -> np.ndarray:
    """Tensor ``name`` read now, in its stored dtype, as a view in the meshlm slot's layout;
    ConversionError if its shape is not the one the config implies."""
    want, w = hf_shape(layout, cfg, slot_shape), tensors[name]
    if tuple(w.shape) != want:
        raise ConversionError(f"tensor {name} has shape {tuple(w.shape)}, the config implies {want} "
                              "(shape mismatch)")
    return from_hf(layout, np.asarray(w), cfg)


def abstract_params(cfg: ModelConfig) -> Any:
    """The parameter State of the model ``cfg`` describes, as shapes (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[1]


def slot_sharding(sharding: NamedSharding, stacked: int) -> NamedSharding:
    """How one slot (the trailing axes after ``stacked`` leading ones) of an array split by
    ``sharding`` is split: as the array's own trailing axes, so writing it moves no data."""
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[stacked:]))


def _write_slot(buf: jax.Array, slot: jax.Array, index: jax.Array) -> jax.Array:
    """``buf`` with ``slot`` (cast to its dtype) at leading ``index``."""
    k = index.shape[0]
    update = slot.astype(buf.dtype).reshape((1,) * k + slot.shape)
    return jax.lax.dynamic_update_slice(buf, update, [index[i] for i in range(k)] + [0] * slot.ndim)


@functools.cache
def _slot_writer(sharding: NamedSharding) -> Callable[..., jax.Array]:
    # Donating ``buf`` makes the update in place: the device holds the parameter once, plus one slot.
    return jax.jit(_write_slot, donate_argnums=0, out_shardings=sharding)


@functools.cache
def _caster(dtype: str, sharding: NamedSharding) -> Callable[[jax.Array], jax.Array]:
    return jax.jit(lambda x: x.astype(dtype), donate_argnums=0, out_shardings=sharding)


def place_parameter(tensors: HFTensors, cfg: ModelConfig, source: tuple[Layout, list[str], int],
                    shape: tuple[int, ...], dtype: str, sharding: NamedSharding) -> jax.Array:
    """One parameter, created empty on the devices as ``sharding`` splits it, then filled slot by
    slot: each HF tensor is read alone, put on the devices split like its slot, cast there and
    written into the donated parameter. (Rather than ``jax.make_array_from_callback``, whose
    callback would run once per device: each device of a [layers, ...] stack split on an inner axis
    needs a part of every layer's tensor, so every tensor would be read once per device, or the
    whole stack kept on the host between callbacks.)"""
    layout, names, stacked = source
    if not stacked:
        part = jax.device_put(_slot(tensors, names[0], layout, cfg, shape), sharding)
        return part if part.dtype == dtype else _caster(dtype, sharding)(part)
    buf = jnp.zeros(shape, dtype, device=sharding)
    inner, write = slot_sharding(sharding, stacked), _slot_writer(sharding)
    for index, name in zip(np.ndindex(*shape[:stacked]), names, strict=True):
        part = jax.device_put(_slot(tensors, name, layout, cfg, shape[stacked:]), inner)
        buf = write(buf, part, jnp.asarray(index, jnp.int32))
        del part  # the host copy went with the slot's read; its device copy goes here
    return buf


def device_params(cfg: ModelConfig, tensors: HFTensors, mesh: Mesh, rules: Rules) -> Any:
    """The model's parameter State, each parameter on ``mesh`` with its logical sharding, read
    tensor by tensor from ``tensors`` (see ``place_parameter``)."""
    abstract = abstract_params(cfg)
    check_names(list(tensors), cfg)
    sources = parameter_sources(cfg)
    shardings = dict(nnx.to_flat_state(tree_shardings(abstract, mesh, rules)))
    out = []
    for path, var in nnx.to_flat_state(abstract):
        placed = place_parameter(tensors, cfg, sources[tuple(str(p) for p in path)], tuple(var.shape),
                                 str(var.dtype), shardings[path].get_value())
        out.append((path, var.replace(placed)))
    return nnx.from_flat_state(out)


def _check_overrides(overrides: Sequence[str]) -> None:
    """ConfigError for an override an import cannot take: the architecture comes from the
    checkpoint (only ``model``'s runtime keys may change, and ``mtp_depth``: how many of
    DeepSeek-V3's multi-token-prediction layers to import, none by default), RUN_DIR and the
    tokenizer too."""
    for text in overrides:
        section, key, _ = parse_override(text)
        if f"{section}.{key}" in NOT_OVERRIDDEN:
            raise ConfigError(f"{section}.{key}", f"is not set by an override here: "
                              f"{NOT_OVERRIDDEN[f'{section}.{key}']}")
        if section == "model" and key not in IMPORT_MODEL_KEYS:
            raise ConfigError(f"model.{key}", "comes from the checkpoint (only the model's runtime "
                              f"keys may be overridden: {', '.join(sorted(IMPORT_MODEL_KEYS))})")


def run_config(cfg: ModelConfig, run_dir: Path, seq_len: int, overrides: Sequence[str] = ()) -> Config:
    """The imported run's Config: the architecture, its tokenizer, a generation window, parameters
    split over every device (``PARAMETERS_SPLIT``), then ``overrides``."""
    _check_overrides(overrides)
    base = Config(model=cfg, mesh=PARAMETERS_SPLIT, data=DataConfig(tokenizer=f"run:{run_dir}"),
                  train=TrainConfig(seq_len=seq_len, batch_size=8), run=RunConfig(dir=str(run_dir)))
    out = build_config(base.to_dict(), list(overrides))
    for key, message in out.model.problems():
        raise ConfigError(f"model.{key}", message)
    return out


@dataclasses.dataclass
class ImportPlan:
    """An import checked before any device work: what is read, and the run's Config (whose
    ``run.cpu_devices`` a command emulates before JAX starts)."""

    src: Path
    run_dir: Path
    source: Source
    cfg: Config


def plan_import(src: str | Path, run_dir: str | Path, *, seq_len: int = 0, dtype: str = "",
                overrides: Sequence[str] = ()) -> ImportPlan:
    """Reads the source's config and headers and checks everything that needs no device; ``dtype``
    "" keeps the stored dtype."""
    src, run_dir = Path(src), Path(run_dir).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConversionError(f"{run_dir} already exists and is not empty (nothing was overwritten)")
    source = read_source(src)
    dtype = dtype or source.dtype
    cfg = dataclasses.replace(source.cfg, param_dtype=dtype, dtype=dtype)
    if source.tokenizer.vocab_size > cfg.vocab_size:
        raise ConversionError(f"the tokenizer has {source.tokenizer.vocab_size} ids but the model "
                              f"only {cfg.vocab_size}")
    seq_len = seq_len or min(cfg.max_seq_len, MAX_WINDOW)
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ConversionError(f"--seq-len must be in [1, {cfg.max_seq_len}], got {seq_len}")
    return ImportPlan(src, run_dir, source, run_config(cfg, run_dir, seq_len, overrides))


def mesh_sizes(mesh: MeshConfig) -> dict[str, int]:
    """The mesh's axis sizes on this host's devices; ConfigError naming the key that does not fit."""
    try:
        return mesh.sizes(jax.device_count())
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        raise ConfigError(key, message) from None


def run_mesh(cfg: Config) -> Mesh:
    """The run's mesh on this host's devices; ConfigError naming the key that does not fit."""
    check_sharding(cfg, mesh_sizes(cfg.mesh))
    return make_mesh(cfg.mesh)


def save_params(run_dir: Path, cfg: Config, params: Any, tokenizer: Any, meta: dict[str, Any]) -> None:
    """A run directory holding ``params`` as its step-0 checkpoint."""
    RunDir(run_dir).write_config(cfg)
    RunDir(run_dir).save_tokenizer(tokenizer)
    # Orbax writes the state with at most its largest array in flight (it refuses a smaller
    # buffer), so the save adds that array, not the whole state once more, to host memory
    largest = max(leaf.nbytes for leaf in jax.tree.leaves(params))
    checkpointer = Checkpointer(run_dir, CheckpointConfig(every=0, keep=1, async_save=False),
                                save_buffer_gb=(largest + 4096) / 1e9)
    try:
        checkpointer.save(0, TrainState(jnp.zeros((), jnp.int32), params, {}), meta, {})
        checkpointer.wait()
    finally:
        checkpointer.close()


@contextlib.contextmanager
def assembled_beside(target: Path, doing: str) -> Iterator[Path]:
    """A scratch directory beside ``target`` (an absent or empty directory) that becomes ``target``
    when the block succeeds and is removed when it fails: nothing is written to ``target`` unless
    the whole import or export succeeds."""
    scratch = target.with_name(f".{target.name}.{doing}-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        yield scratch
        if target.exists():
            target.rmdir()  # empty (checked by the caller)
        scratch.rename(target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def write_import(plan: ImportPlan) -> Path:
    """Places the parameters on the run's mesh and writes the run directory (atomically)."""
    mesh = run_mesh(plan.cfg)
    params = device_params(plan.cfg.model, plan.source.tensors, mesh, default_rules())
    with assembled_beside(plan.run_dir, "importing") as scratch:
        save_params(scratch, plan.cfg, params, plan.source.tokenizer,
                    {"step": 0, "imported_from": str(plan.src.resolve())})
    return plan.run_dir


def import_checkpoint(src: str | Path, run_dir: str | Path, *, seq_len: int = 0, dtype: str = "",
                      overrides: Sequence[str] = ()) -> Path:
    """Converts a Hugging Face directory or GGUF file into a new meshlm run directory; returns it.
    ``dtype`` "" keeps the stored dtype; ``overrides`` are ``section.key=value`` of the run's
    config (e.g. ``mesh.fsdp=4``)."""
    return write_import(plan_import(src, run_dir, seq_len=seq_len, dtype=dtype, overrides=overrides))
