"""NVFP4 weight format: pack, unpack, quantize and dequantize, byte-exact with ModelOpt checkpoints.

Layout of one weight [N, K] (or stacked experts [E, N, K]):

* ``packed``  uint8 [..., N, K/2]: 4-bit E2M1 codes, two per byte along K, the even element in the low nibble.
  Codes 0..7 are the magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}; bit 3 is the sign (code 8 is -0).
* ``scale``   float8_e4m3fn [..., N, K/16]: one scale per 16 consecutive K elements, row-major, not swizzled.
* ``weight_scale_2``  float32, one per tensor (0-d) or one per expert ([E]).

``W = E2M1[code] * (float(scale) * weight_scale_2)`` (ModelOpt convention). compressed-tensors stores the
reciprocal of ``weight_scale_2`` as ``weight_global_scale``; convert with the two ``global_scale_*`` helpers.

Depends on torch only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "BLOCK_SIZE",
    "E2M1_VALUES",
    "E2M1_MAX",
    "E4M3_MAX",
    "NVFP4Weight",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "pack_e2m1",
    "unpack_e2m1",
    "global_scale_from_compressed_tensors",
    "global_scale_to_compressed_tensors",
    "KERNEL_BLOCK",
    "KERNEL_ROWS",
    "KERNEL_SCALE_OFFSET",
    "KERNEL_ROTATIONS",
    "KERNEL_BF16_BITS",
    "to_kernel_layout",
    "from_kernel_layout",
    "scales_to_kernel_layout",
    "scales_from_kernel_layout",
]

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0

# Index = 4-bit code. Code 8 is -0 (equal to 0 in every comparison and product that matters).
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)

# Midpoints between consecutive E2M1 magnitudes. A magnitude exactly on a midpoint is a tie; ModelOpt resolves
# ties to the even code (even mantissa bit), i.e. IEEE round-half-to-even: 0.25->0, 0.75->1, 1.25->1,
# 1.75->2, 2.5->2, 3.5->4, 5->4. `bucketize(right=False)` sends every tie down; the ties whose even neighbour
# is the upper one are bumped up by one.
_E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
_TIES_ROUNDING_UP = (0.75, 1.75, 3.5)

# A block scale below this rounds to 448 in E4M3 under round-to-nearest; at or above it, the cast saturates
# or gives NaN depending on the torch version, so a weight_scale_2 that small is rejected.
_E4M3_OVERFLOW = 464.0

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NVFP4Weight(NamedTuple):
    """One NVFP4 tensor in ModelOpt layout (see the module docstring)."""

    packed: torch.Tensor  # uint8 [..., N, K/2]
    scale: torch.Tensor  # float8_e4m3fn [..., N, K/16]
    weight_scale_2: torch.Tensor  # float32, 0-d (2D weight) or [E] (3D weight)


# ----------------------------------------------------------------------------------------------------------------
# Input checks (all run before any work)


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_dtype(name: str, value: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if value.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {expected}, got {value.dtype}")


def _check_global_scale(name: str, value, n_experts: int | None, device: torch.device | None) -> torch.Tensor:
    """Validate a per-tensor (n_experts None) or per-expert global scale; return it as fp32 on `device`."""
    _require_tensor(name, value)
    _require_dtype(name, value, (torch.float32,))
    if n_experts is None:
        # ModelOpt stores a 0-d tensor, compressed-tensors a [1] tensor: accept both.
        if value.numel() != 1 or value.ndim > 1:
            raise ValueError(
                f"{name} must be a scalar (0-d or [1]) tensor for a 2D weight, got shape {tuple(value.shape)}"
            )
    elif tuple(value.shape) != (n_experts,):
        raise ValueError(
            f"{name} must have shape [{n_experts}] (one per expert) for a 3D weight, got {tuple(value.shape)}"
        )
    if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
        raise ValueError(f"{name} must be finite and > 0, got {value.tolist()}")
    return value if device is None else value.to(device)


def _check_weight(weight) -> None:
    _require_tensor("weight", weight)
    _require_dtype("weight", weight, _FLOAT_DTYPES)
    if weight.ndim not in (2, 3):
        raise ValueError(f"weight must be 2D [N, K] or 3D [E, N, K], got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if weight.shape[-1] % BLOCK_SIZE != 0:
        raise ValueError(f"weight's last dimension K must be a multiple of {BLOCK_SIZE}, got K={weight.shape[-1]}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite (found NaN or inf)")


# ----------------------------------------------------------------------------------------------------------------
# Nibble packing


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes uint8 [..., K] (K even, 0..15) into bytes [..., K/2], even element in the low nibble."""
    _require_tensor("codes", codes)
    _require_dtype("codes", codes, (torch.uint8,))
    if codes.ndim < 1 or codes.shape[-1] % 2 != 0:
        raise ValueError(f"codes must have an even last dimension, got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes must hold 4-bit values 0..15, found {int(codes.max())}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Unpack bytes uint8 [..., K/2] into 4-bit codes uint8 [..., K] (low nibble first)."""
    _require_tensor("packed", packed)
    _require_dtype("packed", packed, (torch.uint8,))
    if packed.ndim < 1:
        raise ValueError("packed must have at least one dimension, got a 0-d tensor")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def _round_to_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """fp32 values -> nearest E2M1 codes (ties to even, |x| > 6 clamps to 6), uint8."""
    magnitude = x.abs()
    codes = torch.bucketize(magnitude, _E2M1_MIDPOINTS.to(x.device))
    tie_up = torch.zeros_like(magnitude, dtype=torch.bool)
    for t in _TIES_ROUNDING_UP:
        tie_up |= magnitude == t
    codes = codes + tie_up
    # Sign from `x < 0`, as ModelOpt does: -0.0 gets code 0, a small negative that rounds to 0 gets code 8.
    codes = codes + (x < 0) * 8
    return codes.to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Quantize / dequantize


def quantize_nvfp4(weight: torch.Tensor, weight_scale_2: torch.Tensor | None = None) -> NVFP4Weight:
    """Quantize a float weight [N, K] (or stacked experts [E, N, K]) to NVFP4, K a multiple of 16.

    `weight_scale_2` (fp32; 0-d for 2D, [E] for 3D) defaults to amax / (6 * 448) per tensor / per expert.
    Follows ModelOpt's NVFP4QTensor.quantize step for step, so the bytes match its export.
    """
    _check_weight(weight)
    n_experts = weight.shape[0] if weight.ndim == 3 else None
    w = weight.float()  # fp16/bf16 -> fp32 is exact; ModelOpt's arithmetic is fp32 too
    reduce_dims = (-2, -1)
    amax = w.abs().amax(dim=reduce_dims)  # 0-d or [E]
    if weight_scale_2 is None:
        ws2 = amax / (E2M1_MAX * E4M3_MAX)
        # An all-zero tensor would give 0 here and 0/0 block scales downstream (ModelOpt writes NaN scales).
        # Any positive value decodes to exact zeros; 1.0 marks it as a placeholder.
        ws2 = torch.where(ws2 > 0, ws2, torch.ones_like(ws2))
    else:
        ws2 = _check_global_scale("weight_scale_2", weight_scale_2, n_experts, weight.device)
        ws2 = ws2.reshape(amax.shape)
        top_block_scale = amax / (E2M1_MAX * ws2)
        if bool((top_block_scale >= _E4M3_OVERFLOW).any()):
            raise ValueError(
                "weight_scale_2 is too small for this weight: amax / (6 * weight_scale_2) = "
                f"{top_block_scale.max().item():.6g} overflows the E4M3 block scale (max {E4M3_MAX:g}); "
                "use at least amax / (6 * 448)"
            )

    ws2_b = ws2.reshape(*ws2.shape, 1, 1)  # broadcasts over [.., N, K/16]
    blocks = w.unflatten(-1, (-1, BLOCK_SIZE))  # [..., N, K/16, 16]
    block_amax = blocks.abs().amax(dim=-1)
    ideal_scale = block_amax / (E2M1_MAX * ws2_b)
    # A zero block would divide 0 by 0 below; ModelOpt stores scale 1.0 for it, so its codes are all 0.
    ideal_scale = torch.where(ideal_scale == 0, torch.ones_like(ideal_scale), ideal_scale)
    scale = ideal_scale.to(torch.float8_e4m3fn)

    denom = (scale.float() * ws2_b).unsqueeze(-1)
    scaled = blocks / denom
    codes = _round_to_e2m1_codes(scaled)
    # A non-zero block far below the tensor's amax (block_amax / amax < ~2e-6) gets an E4M3 scale that
    # underflows to 0: it decodes to zeros whatever its codes. Write code 0 rather than divide by zero.
    # (ModelOpt divides by zero there and writes +-6 codes; the decoded values are the same zeros.)
    codes = torch.where(denom == 0, torch.zeros_like(codes), codes)

    packed = pack_e2m1(codes.flatten(-2))
    return NVFP4Weight(packed=packed, scale=scale, weight_scale_2=ws2.to(torch.float32))


def dequantize_nvfp4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode NVFP4 (packed uint8 [..., N, K/2], scale E4M3 [..., N, K/16], fp32 global scale) to [..., N, K]."""
    _require_tensor("packed", packed)
    _require_dtype("packed", packed, (torch.uint8,))
    _require_tensor("scale", scale)
    _require_dtype("scale", scale, (torch.float8_e4m3fn,))
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    if packed.ndim not in (2, 3) or packed.numel() == 0:
        raise ValueError(
            f"packed must be a non-empty 2D [N, K/2] or 3D [E, N, K/2] tensor, got shape {tuple(packed.shape)}"
        )
    expected_scale_shape = (*packed.shape[:-1], packed.shape[-1] * 2 // BLOCK_SIZE)
    if packed.shape[-1] % (BLOCK_SIZE // 2) != 0 or tuple(scale.shape) != expected_scale_shape:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not agree with packed shape {tuple(packed.shape)}: "
            f"expected packed [..., N, K/2] with K a multiple of {BLOCK_SIZE} and scale [..., N, K/{BLOCK_SIZE}]"
        )
    if scale.device != packed.device:
        raise ValueError(f"scale is on {scale.device} but packed is on {packed.device}")
    scale_f = scale.float()
    if not bool(torch.isfinite(scale_f).all()) or bool((scale_f < 0).any()):
        raise ValueError("scale must hold finite, non-negative E4M3 values (found NaN or a negative scale)")
    n_experts = packed.shape[0] if packed.ndim == 3 else None
    ws2 = _check_global_scale("weight_scale_2", weight_scale_2, n_experts, packed.device)

    # Same order of fp32 operations as ModelOpt: (scale * weight_scale_2) first, then times the E2M1 value.
    block_scale = scale_f * ws2.reshape(*([-1] if n_experts else []), 1, 1)
    values = E2M1_VALUES.to(packed.device)[unpack_e2m1(packed).long()]
    out = values.unflatten(-1, (-1, BLOCK_SIZE)) * block_scale.unsqueeze(-1)
    return out.flatten(-2).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Global-scale conventions


def global_scale_from_compressed_tensors(weight_global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors `weight_global_scale` -> ModelOpt `weight_scale_2` (the fp32 reciprocal, same shape)."""
    _check_global_scale_any_shape("weight_global_scale", weight_global_scale)
    return _finite_reciprocal("weight_global_scale", weight_global_scale)


def global_scale_to_compressed_tensors(weight_scale_2: torch.Tensor) -> torch.Tensor:
    """ModelOpt `weight_scale_2` -> compressed-tensors `weight_global_scale` (the fp32 reciprocal, same shape)."""
    _check_global_scale_any_shape("weight_scale_2", weight_scale_2)
    return _finite_reciprocal("weight_scale_2", weight_scale_2)


def _check_global_scale_any_shape(name: str, value) -> None:
    # Scalar (0-d / [1]) or per-expert [E]; the shape against a weight is checked where the weight is known.
    _require_tensor(name, value)
    if value.ndim > 1 or value.numel() == 0:
        raise ValueError(f"{name} must be a scalar or a 1D per-expert tensor, got shape {tuple(value.shape)}")
    _check_global_scale(name, value, None if value.ndim == 0 else value.shape[0], None)


def _finite_reciprocal(name: str, value: torch.Tensor) -> torch.Tensor:
    result = torch.reciprocal(value)
    # 1/x overflows fp32 for x below ~2.9e-39 (subnormal); such a scale is unusable in either convention.
    if not bool(torch.isfinite(result).all()):
        raise ValueError(f"{name} is so small that its reciprocal overflows float32: {value.tolist()}")
    return result


# ----------------------------------------------------------------------------------------------------------------
# The Triton kernels' layout (dgemma_hf.kernels.moe)
#
# The MoE kernels put the weights on the A side of Hopper's warpgroup MMA, in registers: a thread owns rows g and
# g + 8 of each 16-row group and, in each 32-element block of K, the elements 16 half + 8 h + 2 t + w (half, h and
# w in 0..1, t its lane in the quad). So the codes are stored per 16 rows x 32 K elements as 64 int32 words in
# [g 8][t 4][h 2] order: a thread's two words of a block are adjacent, one 8-byte load. A word holds 8 codes, as
# four pairs (half, row) = (0, g), (0, g + 8), (1, g), (1, g + 8), each pair two K-neighbours (w = 0, 1) that
# become one bf16x2 register. Within the word each code bit sits where one left rotation of the word (per pair
# and bit: KERNEL_ROTATIONS) moves it to its bf16 position: sign at bit 15 and the e e m bits at 8..6 of the
# pair's 16-bit lane, which reads as the E2M1 value * 2^-126 (0.5 is bf16's subnormal 2^-127). Decoding a pair is
# then a rotate and a mask (pair 0: two of each), no byte shuffles. Block scales are stored as bf16 scale *
# 2^119 (exact for every E4M3 value, subnormals included), in [g 8][row g, g + 8][half] order per 16 rows and
# 32 K elements, so one bf16x2 multiply gives value * scale * 2^-7 with no conversion in the kernel.

KERNEL_BLOCK = 32  # K elements per kernel packing unit: two E4M3 scale blocks
KERNEL_ROWS = 16  # rows per packing unit
KERNEL_SCALE_OFFSET = 2.0**119  # kernel-layout scales are the E4M3 scales times this
# Left rotation of the word that brings each code bit (sign, e1, e0, m) of pair 0..3 to its bf16 bit.
KERNEL_ROTATIONS = ((8, 0, 8, 8), (2, 2, 2, 2), (6, 6, 6, 6), (12, 12, 12, 12))
KERNEL_BF16_BITS = (15, 8, 7, 6)  # where a code's sign, e1, e0 and m bits go in a bf16 lane
_CODE_BITS = (3, 2, 1, 0)


def _check_kernel_shape(name: str, tensor, per_column: int) -> None:
    """`tensor` [..., N, K / per_column] with N a multiple of KERNEL_ROWS and K of KERNEL_BLOCK."""
    if tensor.ndim < 2 or tensor.shape[-2] % KERNEL_ROWS or tensor.shape[-1] % (KERNEL_BLOCK // per_column):
        raise ValueError(
            f"{name} must be [..., N, K/{per_column}] with N a multiple of {KERNEL_ROWS} and K a multiple of "
            f"{KERNEL_BLOCK}, got shape {tuple(tensor.shape)}"
        )


def _word_bit(pair: int, lane: int, bit: int) -> int:
    return (KERNEL_BF16_BITS[bit] + 16 * lane - KERNEL_ROTATIONS[pair][bit]) % 32


def _blocks(tensor: torch.Tensor, k_per_block: int) -> torch.Tensor:
    """[..., N, K'] -> [..., N/16, K'/k_per_block, g 8, r8 2, k_per_block] (row = 16 group + 8 r8 + g)."""
    *lead, n, k = tensor.shape
    view = tensor.reshape(*lead, n // KERNEL_ROWS, 2, 8, k // k_per_block, k_per_block)
    return view.movedim(-2, -4).transpose(-3, -2)  # [..., N/16, K'/kb, g, r8, kb]


def _unblocks(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of `_blocks`."""
    *lead, groups, nblocks, _, _, kb = blocks.shape
    return blocks.transpose(-3, -2).movedim(-4, -2).reshape(*lead, groups * KERNEL_ROWS, nblocks * kb)


def _pair_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tables for the words. A pair's two codes are one ModelOpt byte (K-neighbours: low nibble lane 0), so a
    word is the bit permutation of 4 such bytes (pair p's at bits 8p..8p+7, the "natural" word) that puts every
    code bit where `_word_bit` says. `placed[p, byte]`: pair p's byte placed in the word; `natural[i, byte]`: byte
    i of a word sent back to the natural word. int64, so bit 31 needs no care."""
    placed = torch.zeros(4, 256, dtype=torch.int64)
    natural = torch.zeros(4, 256, dtype=torch.int64)
    value = torch.arange(256, dtype=torch.int64)
    for pair in range(4):
        for lane in range(2):
            for bit in range(4):
                source = 4 * lane + _CODE_BITS[bit]  # the bit in the ModelOpt byte
                target = _word_bit(pair, lane, bit)
                placed[pair] |= ((value >> source) & 1) << target
                natural[target // 8] |= ((value >> (target % 8)) & 1) << (8 * pair + source)
    return placed, natural


_PLACED, _NATURAL = _pair_tables()


def to_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt bytes [..., N, K/2] (element 2j low nibble, 2j+1 high) -> the kernels' layout (see above), same
    shape and dtype. N must be a multiple of 16 and K of 32. Done once, at load time."""
    _require_tensor("packed", packed)
    _require_dtype("packed", packed, (torch.uint8,))
    _check_kernel_shape("packed", packed, 2)
    *lead, n, half_k = packed.shape
    # Bytes as [..., G, r8, g, B, half, h, t] (row 16 G + 8 r8 + g, byte of the block 8 half + 4 h + t) -> the
    # words' order [..., G, B, g, t, h] with the 4 pairs (half, r8) last.
    pairs = packed.reshape(*lead, n // KERNEL_ROWS, 2, 8, half_k * 2 // KERNEL_BLOCK, 2, 2, 4)
    depth = len(lead)
    pairs = pairs.permute(*range(depth), depth, depth + 3, depth + 2, depth + 6, depth + 5, depth + 4, depth + 1)
    pairs = pairs.reshape(*pairs.shape[:-2], 4).long()
    table = _PLACED.to(packed.device)
    words = table[0][pairs[..., 0]] | table[1][pairs[..., 1]] | table[2][pairs[..., 2]] | table[3][pairs[..., 3]]
    return words.to(torch.int32).view(torch.uint8).reshape(packed.shape)  # int64 -> int32 keeps the low 32 bits


def from_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """The kernels' layout -> ModelOpt bytes (exact inverse of `to_kernel_layout`)."""
    _require_tensor("packed", packed)
    _require_dtype("packed", packed, (torch.uint8,))
    _check_kernel_shape("packed", packed, 2)
    *lead, n, half_k = packed.shape
    groups, blocks = n // KERNEL_ROWS, half_k * 2 // KERNEL_BLOCK
    data = packed.reshape(*lead, groups, blocks, 8, 4, 2, 4).long()  # [..., G, B, g, t, h, word byte]
    table = _NATURAL.to(packed.device)
    natural = table[0][data[..., 0]] | table[1][data[..., 1]] | table[2][data[..., 2]] | table[3][data[..., 3]]
    pairs = torch.stack([(natural >> (8 * pair)) & 0xFF for pair in range(4)], dim=-1).to(torch.uint8)
    pairs = pairs.unflatten(-1, (2, 2))  # [..., G, B, g, t, h, half, r8]
    depth = len(lead)
    pairs = pairs.permute(*range(depth), depth, depth + 6, depth + 2, depth + 1, depth + 5, depth + 4, depth + 3)
    return pairs.reshape(packed.shape)


def scales_to_kernel_layout(scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales [..., N, K/16] (ModelOpt order) -> the kernels' bf16 scales (scale * 2^119, reordered, same
    shape; see above). Exact for every finite E4M3 value; NaN stays NaN."""
    _require_tensor("scale", scale)
    _require_dtype("scale", scale, (torch.float8_e4m3fn,))
    _check_kernel_shape("scale", scale, 16)
    offset = (scale.to(torch.float32) * KERNEL_SCALE_OFFSET).to(torch.bfloat16)
    return _blocks(offset, 2).reshape(scale.shape).contiguous()


def scales_from_kernel_layout(scale: torch.Tensor) -> torch.Tensor:
    """The kernels' bf16 scales -> E4M3 block scales in ModelOpt order: the inverse of `scales_to_kernel_layout`,
    byte for byte except NaN (0x7F comes back as 0xFF)."""
    _require_tensor("scale", scale)
    _require_dtype("scale", scale, (torch.bfloat16,))
    _check_kernel_shape("scale", scale, 16)
    *lead, n, k16 = scale.shape
    blocks = scale.reshape(*lead, n // KERNEL_ROWS, k16 // 2, 8, 2, 2)
    return (_unblocks(blocks).to(torch.float32) / KERNEL_SCALE_OFFSET).to(torch.float8_e4m3fn)
