"""The Hugging Face layout of the supported families (Llama 3.x, Mistral, Mixtral, Qwen2/2.5,
Qwen3, Gemma 2, Gemma 3 text), both ways, gathered in one import: ``config.json`` to and from
``ModelConfig`` (convert/hf_config.py) and each family's table of tensor names
(convert/hf_names.py), which convert/checkpoints.py streams tensor by tensor.
"""

from __future__ import annotations

from convert.hf_config import hf_config_from_model, model_config_from_hf
from convert.hf_names import (
    ConversionError,
    HFTensors,
    Layout,
    LazyTensors,
    check_names,
    family_of,
    hf_shape,
    parameter_sources,
)

__all__ = ["ConversionError", "HFTensors", "LazyTensors", "Layout", "check_names",
           "family_of", "hf_config_from_model", "hf_shape", "model_config_from_hf",
           "parameter_sources"]
