"""Weight conversions that transformers' loader runs to fill `NVFP4TextExperts` from a checkpoint.

Pre-quantized checkpoints (ModelOpt / compressed-tensors) store each expert projection on its own; a
`WeightConverter` per buffer collects the E per-expert tensors of one layer and `StackExperts` builds the buffer:
codes stacked, gate and up concatenated, converted to the kernels' layout once here; block scales stacked and
converted to the kernels' bf16 layout; global scales stacked into fp32 [E] (the reciprocal taken for
compressed-tensors). A bf16 checkpoint quantized on load has its `experts.gate_up_proj` / `experts.down_proj`
renamed to the packed buffers and quantized by `QuantizeExperts` (the quantizer's `get_quantize_ops`).

Saving does not go back through these transforms: the quantizer writes the ModelOpt tensors itself
(`export.modelopt_state_dict`), so their reverse ops are never run.
"""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming

from ..kernels.nvfp4 import quantize_nvfp4, scales_to_kernel_layout, to_kernel_layout
from .formats import CheckpointFormat

CODES, BLOCK_SCALES, GLOBAL_SCALES = "codes", "block_scales", "global_scales"


class _NotReversed(ConversionOps):
    """Reverse of a loading op: never run (the NVFP4 export writes its tensors directly)."""

    def convert(self, input_dict, source_patterns=None, target_patterns=None, **kwargs):
        raise RuntimeError("NVFP4 experts are saved by dgemma_hf's exporter, not by reversing the loading ops")


class StackExperts(ConversionOps):
    """The E per-expert tensors of each source pattern -> one buffer of a `NVFP4TextExperts`.

    `kind`: CODES (uint8 [out, in/2] each -> [E, sum(out), in/2] in kernel layout), BLOCK_SCALES (E4M3
    [out, in/16] each -> bf16 [E, sum(out), in/16] in kernel layout) or GLOBAL_SCALES (scalars -> fp32 [E];
    `reciprocal` for compressed-tensors' convention). Source patterns are concatenated in their order (gate, up).
    """

    def __init__(self, kind: str, reciprocal: bool = False):
        self.kind = kind
        self.reciprocal = reciprocal

    def __repr__(self):
        return f"StackExperts({self.kind}{', reciprocal' if self.reciprocal else ''})"

    @torch.no_grad
    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, config=None, **kwargs):
        num_experts = config.get_text_config().num_experts
        stacked = []
        for pattern in source_patterns:
            tensors = input_dict.pop(pattern, None) or []
            if len(tensors) != num_experts:
                raise ValueError(
                    f"{full_layer_name}: found {len(tensors)} tensors matching {pattern!r}, expected one per expert "
                    f"({num_experts})"
                )
            if self.kind == GLOBAL_SCALES:  # 0-d (ModelOpt) or [1] (compressed-tensors) each
                tensors = [tensor.reshape(()) for tensor in tensors]
            stacked.append(torch.stack(tensors))
        if self.kind == GLOBAL_SCALES:
            (scales,) = stacked
            scales = scales.to(torch.float32).reshape(num_experts)
            if self.reciprocal:
                scales = torch.reciprocal(scales)
            # Values are checked once loaded (NVFP4ExpertsQuantizer.check_global_scales), naming the tensor.
            return {target_patterns[0]: scales}
        value = torch.cat(stacked, dim=1)
        if self.kind == BLOCK_SCALES:
            if value.dtype != torch.float8_e4m3fn:
                raise TypeError(f"{full_layer_name}: block scales must be float8_e4m3fn, got {value.dtype}")
            return {target_patterns[0]: scales_to_kernel_layout(value)}
        if value.dtype != torch.uint8:
            raise TypeError(f"{full_layer_name}: packed E2M1 codes must be uint8, got {value.dtype}")
        return {target_patterns[0]: to_kernel_layout(value)}

    @property
    def reverse_op(self) -> ConversionOps:
        return _NotReversed()


def prequantized_converters(fmt: CheckpointFormat, input_scales: bool) -> list[WeightConverter]:
    """The converters filling every `NVFP4TextExperts` buffer from a checkpoint in format `fmt`."""

    def source(proj: str, suffix: str) -> str:
        return f"experts.*.{proj}.{suffix}"

    recip = fmt.reciprocal_global_scales
    converters = [
        WeightConverter(
            [source("gate_proj", fmt.packed), source("up_proj", fmt.packed)], "experts.gate_up_packed",
            [StackExperts(CODES)],
        ),
        WeightConverter(
            [source("gate_proj", fmt.block_scale), source("up_proj", fmt.block_scale)], "experts.gate_up_scale",
            [StackExperts(BLOCK_SCALES)],
        ),
        WeightConverter(source("down_proj", fmt.packed), "experts.down_packed", [StackExperts(CODES)]),
        WeightConverter(source("down_proj", fmt.block_scale), "experts.down_scale", [StackExperts(BLOCK_SCALES)]),
    ]
    for proj, target in (("gate_proj", "gate_scale2"), ("up_proj", "up_scale2"), ("down_proj", "down_scale2")):
        converters.append(
            WeightConverter(source(proj, fmt.global_scale), f"experts.{target}", [StackExperts(GLOBAL_SCALES, recip)])
        )
    if input_scales:
        # Activation global scales of W4A4 checkpoints: carried for export, never used (this model runs W4A16).
        for proj in ("gate_proj", "up_proj", "down_proj"):
            target = f"experts.{proj.removesuffix('_proj')}_input_scale"
            converters.append(
                WeightConverter(source(proj, fmt.input_scale), target, [StackExperts(GLOBAL_SCALES, recip)])
            )
    return converters


def quantize_on_load_renamings() -> list[WeightRenaming]:
    """bf16 experts -> the packed buffers' names; `QuantizeExperts` then builds every buffer of the module."""
    return [
        WeightRenaming("experts.gate_up_proj", "experts.gate_up_packed"),
        WeightRenaming("experts.down_proj", "experts.down_packed"),
    ]


class QuantizeExperts(ConversionOps):
    """A layer's bf16/fp32 experts (renamed to `...experts.gate_up_packed` / `...experts.down_packed`) -> all the
    NVFP4 buffers of that projection, quantized per expert and projection like ModelOpt (`quantize_nvfp4`)."""

    def __init__(self, hf_quantizer=None):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad
    def convert(self, input_dict, full_layer_name=None, config=None, **kwargs):
        (key, tensors), = input_dict.items()
        dense = tensors[0] if isinstance(tensors, list) else tensors
        text = config.get_text_config()
        experts, hidden, intermediate = text.num_experts, text.hidden_size, text.moe_intermediate_size
        prefix, _, name = key.rpartition(".")
        if name == "gate_up_packed":
            expected = (experts, 2 * intermediate, hidden)
        elif name == "down_packed":
            expected = (experts, hidden, intermediate)
        else:
            raise ValueError(f"QuantizeExperts: unexpected target {key}")
        if tuple(dense.shape) != expected:
            raise ValueError(f"{key}: dense experts have shape {tuple(dense.shape)}, expected {expected}")
        if name == "down_packed":
            down = quantize_nvfp4(dense)
            return {
                key: to_kernel_layout(down.packed),
                f"{prefix}.down_scale": scales_to_kernel_layout(down.scale),
                f"{prefix}.down_scale2": down.weight_scale_2,
            }
        gate = quantize_nvfp4(dense[:, :intermediate])
        up = quantize_nvfp4(dense[:, intermediate:])
        return {
            key: to_kernel_layout(torch.cat((gate.packed, up.packed), dim=1)),
            f"{prefix}.gate_up_scale": scales_to_kernel_layout(torch.cat((gate.scale, up.scale), dim=1)),
            f"{prefix}.gate_scale2": gate.weight_scale_2,
            f"{prefix}.up_scale2": up.weight_scale_2,
        }

    @property
    def reverse_op(self) -> ConversionOps:
        return _NotReversed()
