"""transformers quantizers that load DiffusionGemma checkpoints with NVFP4 routed experts.

Pre-quantized (`ModelOptNVFP4Quantizer`, `CompressedTensorsNVFP4Quantizer`), in `from_pretrained` order:
1. `_process_model_before_weight_loading` (model on the meta device, checkpoint files known): checks the
   safetensors headers (every expert tensor present, right dtype and shape; nothing else quantized), raising
   `CheckpointError` naming the tensor before any weight is read; swaps in `NVFP4TextExperts` (one module per
   layer, shared by encoder and decoder); reads the small tensors carried to the export (KV-cache scales).
2. `update_weight_conversions`: adds the converters that stack the per-expert tensors into the buffers
   (the kernels' layouts for the codes and the block scales, done once here; `get_new_dtype` keeps the
   checkpoint's dtypes on the way from disk, so the E4M3 scales reach the converter as stored).
3. transformers loads; `_process_model_after_weight_loading` checks the global scales' values (naming a bad
   one) and sets the ModelOpt config the model saves with (DiffusionGemmaForMaskedGeneration.save_pretrained
   writes the rest) (`export.py`).
Quantize-on-load (`NVFP4OnLoadQuantizer`, or any of them with a bf16 checkpoint): the dense experts are renamed
to the packed buffers and quantized by `QuantizeExperts` as they load (one layer's dense experts at a time).
"""

from __future__ import annotations

import re

import torch
from safetensors import safe_open
from transformers.quantizers import HfQuantizer
from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..checkpoint import CheckpointError
from . import formats
from .configs import CompressedTensorsNVFP4Config, ModelOptNVFP4Config
from .export import modelopt_state_dict
from .loading import QuantizeExperts, StackExperts, prequantized_converters, quantize_on_load_renamings
from .nvfp4_experts import NVFP4TextExperts
from .swap import find_moe_layers, nvfp4_experts_modules, swap_in_nvfp4_experts
from .validation import ExpertsShape, check_dense, check_prequantized, read_headers


class NVFP4ExpertsQuantizer(HfQuantizer):
    """Base: NVFP4 routed experts for DiffusionGemma, read from `source_format` (None: quantize while loading)."""

    requires_calibration = False
    source_format: formats.CheckpointFormat | None = None

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.input_scales = False
        self.passthrough = {}  # checkpoint tensors written back unchanged by save_pretrained
        self._transforms = []

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized and self.source_format is None:
            raise ValueError(
                f"quant_method={self.quantization_config.quant_method!r} quantizes a bf16 checkpoint while loading "
                "it; a checkpoint saved from such a model is a ModelOpt one (quant_method 'modelopt')"
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("NVFP4 experts cannot be offloaded to disk (device_map has 'disk')")

    # -- before loading -----------------------------------------------------------------------------------------

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        _, pairs, _ = find_moe_layers(model)
        text = model.config.get_text_config()
        shape = ExpertsShape(len(pairs), text.num_experts, text.hidden_size, text.moe_intermediate_size)
        headers = read_headers(checkpoint_files) if checkpoint_files else None
        if self.pre_quantized:
            self.input_scales = self.quantization_config.has_input_scales
            if headers is not None:
                layout = check_prequantized(headers, self.source_format, shape, self.input_scales)
                self.input_scales = layout.input_scales
                self.passthrough = _read_tensors(headers, layout.passthrough)
            self._transforms = prequantized_converters(self.source_format, self.input_scales)
        else:
            if headers is not None:
                check_dense(headers, shape)
            self._transforms = quantize_on_load_renamings()
        swap_in_nvfp4_experts(model, self.input_scales)
        if self.passthrough:
            ignored = {re.escape(key) + "$" for key in self.passthrough}
            model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | ignored
        return model

    def update_weight_conversions(self, weight_conversions, model):
        return super().update_weight_conversions(weight_conversions, model) + list(self._transforms)

    def get_new_dtype(self, converter, param, dtype):
        # The experts' converters read the checkpoint's own dtypes (E4M3 block scales, not the bf16 buffer they
        # become): no cast on the way from disk.
        if any(isinstance(op, StackExperts) for op in getattr(converter, "operations", ())):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, NVFP4TextExperts) and name in ("gate_up_packed", "down_packed")

    def get_quantize_ops(self):
        return QuantizeExperts(self)

    # -- after loading ------------------------------------------------------------------------------------------

    def export_config(self) -> ModelOptNVFP4Config:
        """The ModelOpt config the loaded model saves with (the one read, for a ModelOpt checkpoint)."""
        if self.pre_quantized and isinstance(self.quantization_config, ModelOptNVFP4Config):
            return self.quantization_config
        return ModelOptNVFP4Config.for_export("NVFP4" if self.input_scales else "W4A16_NVFP4")

    def check_global_scales(self, model) -> None:
        """Every per-expert global scale read must be finite and > 0 (else the experts decode to garbage)."""
        for name, experts in nvfp4_experts_modules(model).items():
            for proj in ("gate", "up", "down"):
                scales = getattr(experts, f"{proj}_scale2")
                bad = ~torch.isfinite(scales) | (scales <= 0)
                if bool(bad.any()):
                    expert = int(bad.nonzero()[0])
                    value = scales[expert].item()
                    if self.source_format.reciprocal_global_scales:
                        value = 1 / value if value != 0 else float("inf")
                    key = f"{name}.{expert}.{proj}_proj.{self.source_format.global_scale}"
                    raise CheckpointError(f"{key} is {value}; a global scale must be finite and > 0")

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            self.check_global_scales(model)
        # Saved as ModelOpt whatever it was read from, so the config describes what save_pretrained writes.
        model.config.quantization_config = self.export_config()
        return model

    def get_state_dict_and_metadata(self, model):
        return modelopt_state_dict(model, self.passthrough), {}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return False


def _read_tensors(headers, keys) -> dict:
    tensors = {}
    for key in keys:
        with safe_open(headers[key].path, framework="pt") as handle:
            tensors[key] = handle.get_tensor(key)
    return tensors


class ModelOptNVFP4Quantizer(NVFP4ExpertsQuantizer):
    """`quant_method: "modelopt"` (NVIDIA Model Optimizer NVFP4 checkpoints)."""

    source_format = formats.MODELOPT


class CompressedTensorsNVFP4Quantizer(NVFP4ExpertsQuantizer):
    """`quant_method: "compressed-tensors"` with "nvfp4-pack-quantized" weights."""

    source_format = formats.COMPRESSED_TENSORS


class NVFP4OnLoadQuantizer(NVFP4ExpertsQuantizer):
    """`NVFP4Config`: quantizes a bf16/fp32 checkpoint's experts while loading."""

    source_format = None


class CompressedTensorsQuantizerDispatch(CompressedTensorsHfQuantizer):
    """Stands in transformers' quantizer table for "compressed-tensors": NVFP4 packed configs (parsed as
    `CompressedTensorsNVFP4Config`) go to dgemma_hf's quantizer, every other config to transformers' own."""

    def __new__(cls, quantization_config, **kwargs):
        if isinstance(quantization_config, CompressedTensorsNVFP4Config):
            return CompressedTensorsNVFP4Quantizer(quantization_config, **kwargs)
        return CompressedTensorsHfQuantizer(quantization_config, **kwargs)
