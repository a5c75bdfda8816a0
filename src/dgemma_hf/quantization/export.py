"""Saving an NVFP4 DiffusionGemma in NVIDIA ModelOpt's checkpoint layout.

`save_pretrained` of a model loaded through one of dgemma_hf's NVFP4 quantizers writes:
- the weights: everything but the routed experts as the model holds them; each expert projection split out as
  ModelOpt stores it (`{layers}.{L}.experts.{e}.{gate_proj,up_proj,down_proj}.weight` uint8 [out, in/2] in
  ModelOpt's byte order, `.weight_scale` float8_e4m3fn [out, in/16], `.weight_scale_2` float32 [], and
  `.input_scale` float32 [] when the model carries W4A4 activation scales), plus carried tensors such as
  ModelOpt's KV-cache scales;
- config.json with the ModelOpt `quantization_config` (the one read, for a ModelOpt checkpoint);
- hf_quant_config.json (ModelOpt's own file, which older engines look for) and a README.md model card
  rendered from `model_cards/nvfp4.md`.
Loading the result gives back the same buffers bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model_cards import render_model_card
from ..kernels.nvfp4 import from_kernel_layout, scales_from_kernel_layout
from .nvfp4_experts import NVFP4TextExperts
from .swap import nvfp4_experts_modules

MODEL_CARD_TEMPLATE = "nvfp4.md"
HF_QUANT_CONFIG_NAME = "hf_quant_config.json"


def modelopt_expert_tensors(name: str, experts: NVFP4TextExperts) -> dict[str, torch.Tensor]:
    """The ModelOpt tensors of one experts module named `name` (e.g. "model.decoder.layers.0.experts"), as
    CPU tensors that own their storage (safetensors refuses views that share one)."""
    i = experts.intermediate_dim
    gate_up = from_kernel_layout(experts.gate_up_packed).cpu()
    down = from_kernel_layout(experts.down_packed).cpu()
    gate_up_scale = scales_from_kernel_layout(experts.gate_up_scale).cpu()
    down_scale = scales_from_kernel_layout(experts.down_scale).cpu()
    scale2 = {proj: getattr(experts, f"{proj}_scale2").cpu() for proj in ("gate", "up", "down")}
    input_scale = (
        {proj: getattr(experts, f"{proj}_input_scale").cpu() for proj in ("gate", "up", "down")}
        if experts.has_input_scales
        else None
    )
    tensors = {}
    for expert in range(experts.num_experts):
        parts = {
            "gate": (gate_up[expert, :i], gate_up_scale[expert, :i]),
            "up": (gate_up[expert, i:], gate_up_scale[expert, i:]),
            "down": (down[expert], down_scale[expert]),
        }
        for proj, (packed, scale) in parts.items():
            prefix = f"{name}.{expert}.{proj}_proj"
            tensors[f"{prefix}.weight"] = packed.clone()
            tensors[f"{prefix}.weight_scale"] = scale.clone()
            tensors[f"{prefix}.weight_scale_2"] = scale2[proj][expert].clone()
            if input_scale is not None:
                tensors[f"{prefix}.input_scale"] = input_scale[proj][expert].clone()
    return tensors


def modelopt_state_dict(model, passthrough: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every `NVFP4TextExperts` replaced by its ModelOpt tensors."""
    modules = nvfp4_experts_modules(model)
    state = {
        key: value
        for key, value in model.state_dict().items()
        if not any(key.startswith(name + ".") for name in modules)
    }
    for name, experts in modules.items():
        state.update(modelopt_expert_tensors(name, experts))
    for key, value in (passthrough or {}).items():
        state[key] = value.detach().cpu().clone()
    return state


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.1f} KiB"


def model_card(model) -> str:
    modules = list(nvfp4_experts_modules(model).values())
    first = modules[0]
    quantization = model.config.quantization_config
    # The checkpoint's size: its block scales are E4M3 (one byte), the bf16 in memory is the kernels' layout.
    nvfp4_bytes = sum(
        buffer.numel() * (1 if name in ("gate_up_scale", "down_scale") else buffer.element_size())
        for m in modules for name, buffer in m.named_buffers()
    )
    bf16_bytes = sum(3 * m.num_experts * m.hidden_dim * m.intermediate_dim * 2 for m in modules)
    if first.has_input_scales:
        activations = (
            "the checkpoint carries W4A4 activation scales (`input_scale`) for engines that quantize "
            "activations; dgemma_hf runs W4A16 and does not use them"
        )
    else:
        activations = "none (weight-only, W4A16: activations stay bf16/fp16)"
    return render_model_card(
        MODEL_CARD_TEMPLATE,
        source=str(getattr(model.config, "_name_or_path", "") or "a DiffusionGemma checkpoint"),
        quant_algo=quantization.quant_algo,
        num_layers=len(modules),
        num_experts=first.num_experts,
        hidden=first.hidden_dim,
        intermediate=first.intermediate_dim,
        nvfp4_size=_mib(nvfp4_bytes),
        bf16_size=_mib(bf16_bytes),
        ratio=f"{bf16_bytes / nvfp4_bytes:.2f}",
        activation_scales=activations,
        version=_version(),
    )


def _version() -> str:
    from .. import __version__

    return __version__


def write_export_files(model, save_directory) -> None:
    """hf_quant_config.json and README.md next to the weights and config written by save_pretrained."""
    folder = Path(save_directory)
    hf_quant_config = model.config.quantization_config.to_hf_quant_config()
    (folder / HF_QUANT_CONFIG_NAME).write_text(json.dumps(hf_quant_config, indent=4) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(model_card(model), encoding="utf-8")


def check_save_arguments(kwargs) -> None:
    if kwargs.get("push_to_hub"):
        raise ValueError(
            "save_pretrained(push_to_hub=True) of an NVFP4 model: save to a folder first (the model card and "
            "hf_quant_config.json are written after the weights), then upload the folder"
        )
