"""Decoding kernel-layout NVFP4 codes in torch: the experts' reference path off CUDA.

Checkpoints store ModelOpt's layout; the model keeps only the kernels' (`dgemma_hf.kernels.nvfp4`'s
`to_kernel_layout` / `scales_to_kernel_layout` at load, their inverses at save), so no second copy exists.
Pure torch (no triton import), so checkpoints load and export where Triton is not installed.
"""

from __future__ import annotations

import torch

from ..kernels.nvfp4 import BLOCK_SIZE, E2M1_VALUES, from_kernel_layout, scales_from_kernel_layout, unpack_e2m1


def dequantize_kernel_layout(
    packed: torch.Tensor, scale: torch.Tensor, weight_scale_2: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Decode kernel-layout codes [..., N, K/2] with kernel-layout bf16 scales [..., N, K/16] and fp32 global scales
    (broadcastable to the scales: 0-d for one matrix, [E, 1, 1] for stacked experts) to [..., N, K].

    Same fp32 arithmetic, in the same order, as `dgemma_hf.kernels.nvfp4.dequantize_nvfp4` (ModelOpt's:
    scale * weight_scale_2 first, then times the E2M1 value), so the result is bitwise equal to decoding the
    ModelOpt bytes. Its checks read no values back (this runs in forward passes); the loader validated the
    tensors once.
    """
    values = E2M1_VALUES.to(packed.device)[unpack_e2m1(from_kernel_layout(packed)).long()]  # [..., N, K] fp32
    block_scale = scales_from_kernel_layout(scale).float() * weight_scale_2.float()  # [..., N, K/16]
    out = values.unflatten(-1, (-1, BLOCK_SIZE)) * block_scale.unsqueeze(-1)
    return out.flatten(-2).to(dtype)
