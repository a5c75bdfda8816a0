"""Puts `NVFP4TextExperts` in place of upstream's experts in a DiffusionGemma model, before its weights load.

Encoder and decoder run the same text layers (upstream ties every text weight of the encoder to the
decoder's). Here each decoder layer gets one `NVFP4TextExperts`, and the encoder layer of the same index points
to that same module object without registering it: there is one copy of the packed weights, one entry per
buffer in `state_dict()` (under the decoder, as in the checkpoints), and moving or casting the model moves it
once. Upstream's tie rules for `gate_up_proj` / `down_proj` are dropped on the instance (those parameters no
longer exist) and the model's expanded tie map is recomputed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaModel

from .nvfp4_experts import NVFP4TextExperts

_UPSTREAM_EXPERT_TENSORS = ("gate_up_proj", "down_proj")


def find_moe_layers(model: nn.Module) -> tuple[str, list[tuple[nn.Module, nn.Module | None]], DiffusionGemmaModel]:
    """(name of the decoder's layer list, [(decoder layer, encoder layer of the same index)], the base model)."""
    for name, module in model.named_modules():
        if isinstance(module, DiffusionGemmaModel):
            decoder_layers = module.decoder.layers
            encoder_layers = module.encoder.language_model.layers
            if len(encoder_layers) != len(decoder_layers):
                raise ValueError(
                    f"encoder ({len(encoder_layers)}) and decoder ({len(decoder_layers)}) text layer counts differ"
                )
            layers_name = f"{name}.decoder.layers" if name else "decoder.layers"
            return layers_name, list(zip(decoder_layers, encoder_layers)), module
    raise ValueError(
        f"{type(model).__name__} is not a DiffusionGemma model: dgemma_hf's NVFP4 quantizers replace the routed "
        "experts of DiffusionGemma only (load other models in a process that does not import dgemma_hf, or "
        "without this quantization_config)"
    )


def share_module(layer: nn.Module, name: str, module: nn.Module) -> None:
    """`layer.<name>` becomes `module` without registering it as a child of `layer` (its owner is elsewhere)."""
    layer._modules.pop(name, None)
    layer.__dict__[name] = module


def swap_in_nvfp4_experts(model: PreTrainedModel, input_scales: bool) -> list[str]:
    """Replaces every MoE layer's experts (on the meta device, before loading); returns the modules' names."""
    layers_name, pairs, base = find_moe_layers(model)
    names = []
    for index, (decoder_layer, encoder_layer) in enumerate(pairs):
        config = decoder_layer.experts.config
        with torch.device("meta"):
            experts = NVFP4TextExperts(config, input_scales=input_scales)
        decoder_layer.experts = experts
        share_module(encoder_layer, "experts", experts)
        names.append(f"{layers_name}.{index}.experts")
    base._tied_weights_keys = {
        target: source
        for target, source in (base._tied_weights_keys or {}).items()
        if not target.endswith(_UPSTREAM_EXPERT_TENSORS)
    }
    for _, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            module.all_tied_weights_keys = module.get_expanded_tied_weights_keys(all_submodels=True)
    return names


def nvfp4_experts_modules(model: nn.Module) -> dict[str, NVFP4TextExperts]:
    """Name -> module of every (registered, so decoder-side) `NVFP4TextExperts` of the model."""
    return {name: module for name, module in model.named_modules() if isinstance(module, NVFP4TextExperts)}
