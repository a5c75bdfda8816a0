"""`NVFP4TextExperts`: the routed experts of one DiffusionGemma MoE layer with NVFP4 (W4A16) weights.

It replaces upstream's `DiffusionGemmaTextExperts` (bf16 `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) and
keeps its call signature `(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`.

Storage (persistent buffers, never trainable; the only copy of the expert weights in memory):
    gate_up_packed  uint8 [E, 2I, H/2]   E2M1 codes in the kernels' layout (`dgemma_hf.kernels.nvfp4.to_kernel_layout`),
                                         gate rows 0..I-1, up rows I..2I-1
    gate_up_scale   bfloat16 [E, 2I, H/16]  block scales in the kernels' layout (E4M3 value * 2^119,
                                         `dgemma_hf.kernels.nvfp4.scales_to_kernel_layout`)
    gate_scale2, up_scale2  float32 [E]  per-expert global scales (ModelOpt `weight_scale_2`), gate and up
                                         kept separate
    down_packed     uint8 [E, H, I/2], down_scale bfloat16 [E, H, I/16] (both kernel layout), down_scale2
                                         float32 [E]
    gate_input_scale, up_input_scale, down_input_scale  float32 [E], only for W4A4-calibrated checkpoints:
                                         carried for export, never used here (this module runs W4A16)

Dispatch goes through `ALL_NVFP4_EXPERTS_FUNCTIONS`, an `ExpertsInterface` of its own (the pattern of
transformers' `integrations/finegrained_fp8.py`), keyed by the model's `experts_implementation`:
    "dgemma" (the model's default)  Triton NVFP4 kernel on CUDA with bf16/fp16 activations and no gradient
                                    needed; otherwise the torch reference ("eager")
    "dgemma_triton"                 the Triton kernel, always (CPU too under TRITON_INTERPRET=1, fp16)
    "eager"                         torch reference: per routed expert, decode that expert's weights to the
                                    activation dtype and run gelu-tanh(gate) * up -> down. Cache-free: nothing is
                                    kept between calls, so memory stays at the packed size (plus one expert)
    "grouped_mm", "batched_mm"      decode all experts for this call, then upstream's function of that name
Other upstream names (deepgemm, sonicmoe) have no NVFP4 version and raise a KeyError naming the name.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, use_experts_implementation

from ..experts import AUTO, TRITON
from ..kernels.nvfp4 import KERNEL_BLOCK
from .layout import dequantize_kernel_layout

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)

# Buffer name -> storage dtype. The order is the order of `state_dict()`.
WEIGHT_BUFFERS = {
    "gate_up_packed": torch.uint8,
    "gate_up_scale": torch.bfloat16,
    "gate_scale2": torch.float32,
    "up_scale2": torch.float32,
    "down_packed": torch.uint8,
    "down_scale": torch.bfloat16,
    "down_scale2": torch.float32,
}
INPUT_SCALE_BUFFERS = ("gate_input_scale", "up_input_scale", "down_input_scale")


def reference_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The torch reference (the module's own forward, "eager"): same loop and dtypes as upstream's eager experts,
    with each routed expert's weights decoded to the activation dtype just for this call."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = int(expert_idx[0])
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        gate_up, down = self.dequantize_expert(expert_idx, hidden_states.dtype)
        gate, up = nn.functional.linear(hidden_states[token_idx], gate_up).chunk(2, dim=-1)
        current = nn.functional.linear(self.act_fn(gate) * up, down)
        current = current * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
    return final_hidden_states


def triton_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    from ..kernels.moe import moe_experts_nvfp4  # imports triton; only where the kernel runs

    return moe_experts_nvfp4(
        hidden_states.contiguous(), top_k_index, top_k_weights.float().contiguous(), self.kernel_weights()
    )


def triton_applies(hidden_states: torch.Tensor) -> bool:
    needs_grad = torch.is_grad_enabled() and hidden_states.requires_grad
    return hidden_states.is_cuda and hidden_states.dtype in _KERNEL_DTYPES and not needs_grad


def auto_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    if triton_applies(hidden_states):
        return triton_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return reference_experts_forward(self, hidden_states, top_k_index, top_k_weights)


class _DecodedExperts:
    """What upstream's grouped_mm / batched_mm functions read from an experts module, with decoded weights."""

    has_gate, has_bias, is_transposed, has_post_expert_norm = True, False, False, False

    def __init__(self, experts: NVFP4TextExperts, dtype: torch.dtype):
        self.num_experts = experts.num_experts
        # Split over ranks (dgemma_hf.distributed), other ranks' routes carry the sentinel id num_experts.
        self._is_expert_parallel = getattr(experts, "_is_expert_parallel", False)
        self.act_fn = experts.act_fn
        self.gate_up_proj, self.down_proj = experts.dequantize_all(dtype)

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def _decoded_upstream_forward(name: str):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        decoded = _DecodedExperts(self, hidden_states.dtype)
        return ALL_EXPERTS_FUNCTIONS[name](decoded, hidden_states, top_k_index, top_k_weights)

    forward.__name__ = f"nvfp4_decoded_{name}_experts_forward"
    return forward


class NVFP4ExpertsInterface(ExpertsInterface):
    """Experts implementations for NVFP4 weights (a mapping of its own: upstream's functions expect bf16 weights)."""

    _global_mapping: ClassVar[dict] = {
        AUTO: auto_experts_forward,
        TRITON: triton_experts_forward,
        "grouped_mm": _decoded_upstream_forward("grouped_mm"),
        "batched_mm": _decoded_upstream_forward("batched_mm"),
    }


ALL_NVFP4_EXPERTS_FUNCTIONS = NVFP4ExpertsInterface()


@use_experts_implementation(experts_interface=ALL_NVFP4_EXPERTS_FUNCTIONS)
class NVFP4TextExperts(nn.Module):
    """Routed experts with NVFP4 weights (see the module docstring for the storage and the dispatch)."""

    def __init__(self, config, input_scales: bool = False):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        for name, size in (("hidden_size", self.hidden_dim), ("moe_intermediate_size", self.intermediate_dim)):
            if size % KERNEL_BLOCK != 0:
                raise ValueError(f"NVFP4 experts need {name} to be a multiple of {KERNEL_BLOCK}, got {size}")
        self.act_fn = ACT2FN[config.hidden_activation]
        experts, hidden, intermediate = self.num_experts, self.hidden_dim, self.intermediate_dim
        shapes = {
            "gate_up_packed": (experts, 2 * intermediate, hidden // 2),
            "gate_up_scale": (experts, 2 * intermediate, hidden // 16),
            "gate_scale2": (experts,),
            "up_scale2": (experts,),
            "down_packed": (experts, hidden, intermediate // 2),
            "down_scale": (experts, hidden, intermediate // 16),
            "down_scale2": (experts,),
        }
        for name, dtype in WEIGHT_BUFFERS.items():
            self.register_buffer(name, torch.empty(shapes[name], dtype=dtype))
        if input_scales:
            for name in INPUT_SCALE_BUFFERS:
                self.register_buffer(name, torch.empty(experts, dtype=torch.float32))

    forward = reference_experts_forward

    @property
    def has_input_scales(self) -> bool:
        return "gate_input_scale" in self._buffers

    def kernel_weights(self):
        """The buffers as the Triton kernel takes them (the buffers themselves: they are in its layout)."""
        from ..kernels.moe import NVFP4Experts

        return NVFP4Experts(
            gate_up_packed=self.gate_up_packed,
            gate_up_scale=self.gate_up_scale,
            gate_scale2=self.gate_scale2,
            up_scale2=self.up_scale2,
            down_packed=self.down_packed,
            down_scale=self.down_scale,
            down_scale2=self.down_scale2,
        )

    def dequantize_expert(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's weights decoded to `dtype`: gate_up [2I, H] (gate and up under their own global scales)
        and down [H, I]. Allocated for the caller, not cached."""
        i = self.intermediate_dim
        packed, scale = self.gate_up_packed[expert], self.gate_up_scale[expert]
        gate = dequantize_kernel_layout(packed[:i], scale[:i], self.gate_scale2[expert], dtype)
        up = dequantize_kernel_layout(packed[i:], scale[i:], self.up_scale2[expert], dtype)
        down = dequantize_kernel_layout(
            self.down_packed[expert], self.down_scale[expert], self.down_scale2[expert], dtype
        )
        return torch.cat((gate, up), dim=0), down

    def dequantize_all(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts decoded to `dtype`: gate_up_proj [E, 2I, H], down_proj [E, H, I] (upstream's layout)."""
        i = self.intermediate_dim

        def decode(packed, scale, scale2):
            return dequantize_kernel_layout(packed, scale, scale2[:, None, None], dtype)

        gate = decode(self.gate_up_packed[:, :i], self.gate_up_scale[:, :i], self.gate_scale2)
        up = decode(self.gate_up_packed[:, i:], self.gate_up_scale[:, i:], self.up_scale2)
        return torch.cat((gate, up), dim=1), decode(self.down_packed, self.down_scale, self.down_scale2)

    def _apply(self, fn, recurse=True):
        # The storage dtypes are the format (uint8 codes, bf16 kernel-layout scales, fp32 global scales): a model-wide
        # `.to(dtype)` may move these buffers, never cast them (casting would destroy the codes and round the
        # scales). The cast result is dropped and the original moved instead.
        def move_only(tensor):
            moved = fn(tensor)
            if moved is not None and moved.dtype != tensor.dtype:
                moved = tensor.to(device=moved.device)
            return moved

        return super()._apply(move_only, recurse)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
            f"nvfp4 (W4A16){', input scales carried' if self.has_input_scales else ''}"
        )
