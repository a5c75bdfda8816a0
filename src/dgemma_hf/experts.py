"""Experts implementations registered in transformers' ExpertsInterface.

- "dgemma_triton": the Triton grouped-GEMM kernels (`dgemma_hf.kernels.moe`), inference only.
- "dgemma": the default of DiffusionGemmaForMaskedGeneration. Triton where it applies (CUDA inference; float32
  runs as TF32), otherwise upstream's "grouped_mm" torch path, so the same model runs everywhere. The Triton
  path never synchronises with the host, so the engine can capture it in a CUDA graph.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

TRITON = "dgemma_triton"
AUTO = "dgemma"
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # float32 as TF32


def triton_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    from .kernels.moe import moe_experts  # imports triton; only where the kernel runs

    return moe_experts(
        hidden_states.contiguous(),
        top_k_index,
        top_k_weights.float().contiguous(),
        self.gate_up_proj,
        self.down_proj,
    )


def triton_applies(hidden_states: torch.Tensor, *weights: torch.Tensor) -> bool:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden_states, *weights))
    return (
        hidden_states.is_cuda
        and hidden_states.dtype in _KERNEL_DTYPES
        and all(w.dtype == hidden_states.dtype for w in weights)
        and not needs_grad
    )


def auto_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    if triton_applies(hidden_states, self.gate_up_proj, self.down_proj):
        return triton_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)


def register_experts() -> None:
    ExpertsInterface.register(TRITON, triton_experts_forward)
    ExpertsInterface.register(AUTO, auto_experts_forward)
