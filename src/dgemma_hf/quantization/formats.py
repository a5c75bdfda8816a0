"""How NVFP4 expert weights are named and typed in the checkpoint formats dgemma_hf reads and writes.

Both formats store the routed experts split per expert, one linear per projection, under the decoder (the
encoder's text weights are tied to the decoder's and not stored):

    {prefix}.layers.{L}.experts.{e}.{gate_proj,up_proj,down_proj}.{suffix}

ModelOpt (NVIDIA Model Optimizer, `quant_method: "modelopt"`; e.g. nvidia/diffusiongemma-26B-A4B-it-NVFP4):
    weight          U8       [out, in/2]   E2M1 codes, even element in the low nibble
    weight_scale    F8_E4M3  [out, in/16]  block scales
    weight_scale_2  F32      []            global scale, W = e2m1 * weight_scale * weight_scale_2
    input_scale     F32      []            activation global scale (W4A4 calibration only)
compressed-tensors (`quant_method: "compressed-tensors"`, format "nvfp4-pack-quantized"):
    weight_packed        U8       [out, in/2]   same codes and nibble order
    weight_scale         F8_E4M3  [out, in/16]
    weight_global_scale  F32      [1]     the reciprocal: W = e2m1 * weight_scale / weight_global_scale
    input_global_scale   F32      [1]     activation global scale, reciprocal convention (W4A4 only)
"""

from __future__ import annotations

from dataclasses import dataclass

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
GROUP_SIZE = 16

# safetensors dtype names (what a file header says) of the tensors read and written.
U8, F8_E4M3, F32 = "U8", "F8_E4M3", "F32"


@dataclass(frozen=True)
class CheckpointFormat:
    """The tensor names of one NVFP4 checkpoint format (suffixes after `experts.{e}.{proj}.`)."""

    name: str
    packed: str
    block_scale: str
    global_scale: str
    input_scale: str
    reciprocal_global_scales: bool  # compressed-tensors stores 1 / weight_scale_2 (and 1 / input_scale)
    input_scale_dtypes: tuple[str, ...]

    def suffixes(self, with_input_scale: bool) -> tuple[str, ...]:
        names = (self.packed, self.block_scale, self.global_scale)
        return names + ((self.input_scale,) if with_input_scale else ())


MODELOPT = CheckpointFormat(
    name="ModelOpt",
    packed="weight",
    block_scale="weight_scale",
    global_scale="weight_scale_2",
    input_scale="input_scale",
    reciprocal_global_scales=False,
    input_scale_dtypes=(F32,),
)

COMPRESSED_TENSORS = CheckpointFormat(
    name="compressed-tensors",
    packed="weight_packed",
    block_scale="weight_scale",
    global_scale="weight_global_scale",
    input_scale="input_global_scale",
    reciprocal_global_scales=True,
    # Some releases store the activation global scale of some experts in bf16; it is only carried, never used.
    input_scale_dtypes=(F32, "BF16", "F16"),
)

# Suffixes that mark a tensor as quantized, whatever the format (used to find quantized non-expert modules).
QUANTIZED_SUFFIXES = (".weight_scale", ".weight_scale_2", ".weight_packed", ".weight_global_scale")

# ModelOpt's FP8 KV-cache scales (`self_attn.k_proj.k_scale`, `self_attn.v_proj.v_scale`): this model keeps a
# bf16 KV cache, so they are not used; they are carried through save_pretrained so an engine that runs an FP8
# KV cache (vLLM) finds them in an exported checkpoint.
PASSTHROUGH_SUFFIXES = (".k_scale", ".v_scale")


def projection_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """Logical [out, in] of each projection of one expert."""
    return {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}


def expected_tensor(fmt: CheckpointFormat, suffix: str, out_features: int, in_features: int):
    """(allowed dtypes, allowed shapes) of one per-expert tensor; the global and input scales are scalars
    stored 0-d (ModelOpt) or [1] (compressed-tensors), and either is accepted."""
    if suffix == fmt.packed:
        return (U8,), ([out_features, in_features // 2],)
    if suffix == fmt.block_scale:
        return (F8_E4M3,), ([out_features, in_features // GROUP_SIZE],)
    if suffix == fmt.global_scale:
        return (F32,), ([], [1])
    if suffix == fmt.input_scale:
        return fmt.input_scale_dtypes, ([], [1])
    raise KeyError(suffix)


def is_compressed_tensors_nvfp4(config: dict) -> bool:
    """Whether a compressed-tensors `quantization_config` dict describes NVFP4 packed weights only: format
    "nvfp4-pack-quantized" (top level or on every group) and every group's weights 4-bit float, group size 16."""
    if not isinstance(config, dict) or config.get("quant_method") != "compressed-tensors":
        return False
    groups = config.get("config_groups") or {}
    if not groups or not all(isinstance(group, dict) for group in groups.values()):
        return False
    top_format = config.get("format")
    for group in groups.values():
        if group.get("format", top_format) != "nvfp4-pack-quantized":
            return False
        weights = group.get("weights") or {}
        if weights.get("num_bits") != 4 or weights.get("type") != "float" or weights.get("group_size") != GROUP_SIZE:
            return False
    return True
