"""The Hugging Face layout of the supported families (Llama 3.x, Mistral, Mixtral, Qwen2/2.5,
Qwen3, Gemma 2, Gemma 3 text), both ways: ``config.json`` to and from ``ModelConfig``
(convert/hf_config.py) and each family's table of tensor names (convert/hf_names.py), gathered here
with whole-model conversions over them: ``params_from_hf`` (a maker per meshlm parameter) and
``hf_from_params`` (every HF tensor at once, for small models; convert/checkpoints.py streams).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np

from convert.hf_config import hf_config_from_model, model_config_from_hf
from convert.hf_names import (
    FAMILIES,
    ConversionError,
    HFTensors,
    Layout,
    LazyTensors,
    check_names,
    family_of,
    hf_shape,
    parameter_sources,
)
from model.config import ModelConfig

__all__ = ["ARCHITECTURES", "FLOAT32", "ConversionError", "HFTensors", "LazyTensors", "Layout",
           "check_names", "family_of", "hf_config_from_model", "hf_from_params", "hf_shape",
           "model_config_from_hf", "parameter_sources", "params_from_hf"]

FLOAT32 = np.dtype(np.float32)
ARCHITECTURES = {family: cls for family, (cls, _) in FAMILIES.items()}  # model_type -> class
_parameter_sources = parameter_sources  # the earlier name, until convert/checkpoints.py drops it


def _take(tensors: Mapping[str, np.ndarray], name: str, layout: Layout, cfg: ModelConfig,
          shape: tuple[int, ...]) -> np.ndarray:
    """Tensor ``name`` (read now, as stored) as the meshlm parameter slice of ``shape``;
    ConversionError if its shape is not the one the config implies."""
    want = hf_shape(layout, cfg, shape)
    w = tensors[name]
    if tuple(w.shape) != want:
        raise ConversionError(f"tensor {name} has shape {tuple(w.shape)}, the config implies "
                              f"{want} (shape mismatch)")
    return layout.to_meshlm(np.asarray(w), cfg)


def _make(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, layout: Layout, names: list[str],
          stacked: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """One parameter in ``dtype``, each HF tensor converted as it is read into its slot."""
    out = np.empty(shape, dtype)
    for slot, name in zip(out.reshape(-1, *shape[stacked:]), names, strict=True):
        slot[...] = _take(tensors, name, layout, cfg, shape[stacked:])
    return out


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig,
                   shapes: Mapping[tuple[str, ...], tuple[int, ...]],
                   dtype: np.dtype = FLOAT32) -> dict[tuple[str, ...], Callable[[], np.ndarray]]:
    """A maker for each meshlm parameter (layers stacked, in ``dtype``) from Hugging Face tensors,
    given the model's parameter ``shapes``: calling it reads the parameter's tensors, one at a time.
    ConversionError, before anything is read, names a missing tensor or one left over; a maker
    raises it for a misshapen one."""
    check_names(list(tensors), cfg)
    return {path: functools.partial(_make, tensors, cfg, layout, names, stacked, shapes[path], dtype)
            for path, (layout, names, stacked) in parameter_sources(cfg).items()}


def hf_from_params(params: Mapping[tuple[str, ...], np.ndarray], cfg: ModelConfig) -> HFTensors:
    """Hugging Face tensors (contiguous, float32 or as stored) from meshlm parameters."""
    out: dict[str, np.ndarray] = {}
    for path, (layout, names, stacked) in parameter_sources(cfg).items():
        w = np.asarray(params[path])
        for slot, name in zip(w.reshape(-1, *w.shape[stacked:]), names, strict=True):
            out[name] = np.ascontiguousarray(layout.to_hf(slot, cfg))
    return out
