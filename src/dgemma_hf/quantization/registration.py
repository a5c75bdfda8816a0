"""Registers the NVFP4 configs and quantizers with transformers (called once by `dgemma_hf.register()`).

- "modelopt" and "dgemma_nvfp4" are free names: registered with transformers' `register_quantization_config`
  / `register_quantizer`.
- "compressed-tensors" is transformers' own (its quantizer needs the `compressed-tensors` package and handles
  Linear layers, not DiffusionGemma's fused experts), and `register_*` refuse a taken name. Its two table
  entries are replaced by dispatchers: a config of NVFP4 packed weights only ("nvfp4-pack-quantized", 4-bit
  float, group 16) goes to dgemma_hf, which loads DiffusionGemma and refuses other models by name; any other
  compressed-tensors config goes to transformers' classes exactly as before.
"""

from __future__ import annotations

import warnings

from transformers.quantizers import auto as quantizers_auto
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.utils.quantization_config import CompressedTensorsConfig

from .configs import (
    COMPRESSED_TENSORS,
    MODELOPT,
    ON_LOAD,
    CompressedTensorsNVFP4Config,
    ModelOptNVFP4Config,
    NVFP4Config,
)
from .formats import is_compressed_tensors_nvfp4
from .quantizer import CompressedTensorsQuantizerDispatch, ModelOptNVFP4Quantizer, NVFP4OnLoadQuantizer


class CompressedTensorsConfigDispatch(CompressedTensorsConfig):
    """Stands in transformers' config table for "compressed-tensors"; never instantiated itself."""

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        fields = config_dict.get("quantization_config", config_dict)
        target = CompressedTensorsNVFP4Config if is_compressed_tensors_nvfp4(fields) else CompressedTensorsConfig
        return target.from_dict(fields, return_unused_kwargs=return_unused_kwargs, **kwargs)


def register_quantizers() -> None:
    """Idempotent. A name that another library registered first is left to it, with a warning."""
    configs = quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING
    quantizers = quantizers_auto.AUTO_QUANTIZER_MAPPING
    for name, config_class, quantizer_class in (
        (MODELOPT, ModelOptNVFP4Config, ModelOptNVFP4Quantizer),
        (ON_LOAD, NVFP4Config, NVFP4OnLoadQuantizer),
    ):
        ours = (None, config_class, quantizer_class)
        taken = [table[name] for table in (configs, quantizers) if table.get(name) not in ours]
        if taken:
            warnings.warn(
                f"dgemma_hf: quant_method {name!r} is already registered by {taken[0].__module__}; "
                "dgemma_hf's NVFP4 loader is not registered under that name",
                stacklevel=2,
            )
            continue
        if name not in configs:
            register_quantization_config(name)(config_class)
        if name not in quantizers:
            register_quantizer(name)(quantizer_class)
    configs[COMPRESSED_TENSORS] = CompressedTensorsConfigDispatch
    quantizers[COMPRESSED_TENSORS] = CompressedTensorsQuantizerDispatch
