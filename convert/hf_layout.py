"""The Hugging Face layout of the supported families (Llama 3.x, Mistral, Mixtral, Qwen2/2.5,
Qwen3, Qwen3-MoE, DeepSeek-V3, Gemma 2, Gemma 3 text), both ways, gathered in one import:
``config.json`` to and from ``ModelConfig`` (convert/hf_config.py) and each family's table of
tensor names (convert/hf_names.py), which convert/checkpoints.py streams tensor by tensor.
"""

from __future__ import annotations

from convert.hf_config import model_config_from_hf
from convert.hf_config_export import hf_config_from_model
from convert.hf_names import (
    EMBED_NAME,
    FLOAT32_TENSORS,
    ConversionError,
    HFTensors,
    Layout,
    LazyTensors,
    check_names,
    copied_tensors,
    family_of,
    from_hf,
    hf_shape,
    hf_tensor_view,
    parameter_sources,
    zero_tensors,
)

__all__ = ["EMBED_NAME", "FLOAT32_TENSORS", "ConversionError", "HFTensors", "LazyTensors", "Layout",
           "check_names", "copied_tensors", "family_of", "from_hf", "hf_config_from_model",
           "hf_shape", "hf_tensor_view", "model_config_from_hf", "parameter_sources", "zero_tensors"]
