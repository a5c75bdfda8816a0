"""Checks of `generate()` inputs, run before any model work.

Upstream's own validation accepts an empty prompt, never compares the prompt with the context, and for some
bad values fails while formatting its message (it names `entropy_bound` where it means another field); these
checks name the argument, the value and the allowed range.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from transformers.models.diffusion_gemma import DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig

# Fields checked here; each resolves as upstream does: generate kwarg > generation_config > model's > default.
_CHECKED_FIELDS = (
    "max_new_tokens",
    "max_length",
    "max_denoising_steps",
    "prefill_chunk_size",
    "t_min",
    "t_max",
    "stability_threshold",
    "confidence_threshold",
    "sampler_config",
)


def resolve_generation_fields(
    model_generation_config: DiffusionGemmaGenerationConfig | None,
    generation_config: DiffusionGemmaGenerationConfig | None,
    kwargs: dict,
) -> dict:
    defaults = DiffusionGemmaGenerationConfig._get_default_generation_params()
    resolved = {}
    for field in _CHECKED_FIELDS:
        value = kwargs.get(field)
        for source in (generation_config, model_generation_config):
            if value is None and source is not None:
                value = getattr(source, field, None)
        resolved[field] = defaults.get(field) if value is None else value
    return resolved


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def check_generation_fields(fields: dict) -> None:
    _positive_int("max_new_tokens", fields["max_new_tokens"])
    if fields["max_length"] is not None:
        _positive_int("max_length", fields["max_length"])
    _positive_int("max_denoising_steps", fields["max_denoising_steps"])
    if fields["prefill_chunk_size"] is not None:
        _positive_int("prefill_chunk_size", fields["prefill_chunk_size"])
    t_min, t_max = fields["t_min"], fields["t_max"]
    for name, value in (("t_min", t_min), ("t_max", t_max)):
        if value is not None and (not isinstance(value, Real) or not math.isfinite(value) or value < 0):
            raise ValueError(f"`{name}` must be a finite float >= 0, got {value!r}")
    if t_min is not None and t_max is not None and t_max <= t_min:
        raise ValueError(f"`t_max` must be greater than `t_min`, got t_max={t_max!r} <= t_min={t_min!r}")
    stability = fields["stability_threshold"]
    if stability is not None and (isinstance(stability, bool) or not isinstance(stability, Integral) or stability < 0):
        raise ValueError(f"`stability_threshold` must be an integer >= 0, got {stability!r}")
    confidence = fields["confidence_threshold"]
    if confidence is not None and (not isinstance(confidence, float) or not confidence > 0):
        raise ValueError(f"`confidence_threshold` must be a float > 0, got {confidence!r}")
    sampler_config = fields["sampler_config"]
    if sampler_config is not None and not isinstance(sampler_config, EntropyBoundSamplerConfig):
        raise TypeError(f"`sampler_config` must be an EntropyBoundSamplerConfig, got {type(sampler_config).__name__}")


def check_prompt(input_ids, attention_mask, past_length: int) -> None:
    if input_ids is None:
        raise ValueError("`input_ids` is required: generate() continues a prompt of token ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("`input_ids` must be an integer torch.Tensor of shape [batch, prompt_length]")
    if input_ids.ndim != 2:
        raise ValueError(f"`input_ids` must have shape [batch, prompt_length], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError("`input_ids` is an empty batch")
    if input_ids.shape[1] == 0 and past_length == 0:
        raise ValueError("the prompt is empty: `input_ids` has no tokens and there is no cache to continue")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (input_ids.shape[0], input_ids.shape[1] + past_length):
            raise ValueError(
                f"`attention_mask` must have shape {(input_ids.shape[0], input_ids.shape[1] + past_length)} "
                f"(batch, cached + new tokens), got {tuple(attention_mask.shape)}"
            )
        empty_rows = (~attention_mask.bool().any(dim=-1)).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(f"the prompt of batch row(s) {empty_rows} is empty: `attention_mask` is all zeros there")


def check_context(prompt_length: int, max_new_tokens: int, canvas_length: int, max_positions: int) -> None:
    """Generation writes whole canvases, so the last one must end inside the model's positions."""
    canvases = math.ceil(max_new_tokens / canvas_length)
    needed = prompt_length + canvases * canvas_length
    if needed > max_positions:
        raise ValueError(
            f"prompt of {prompt_length} tokens + {canvases} canvas(es) of {canvas_length} tokens for "
            f"max_new_tokens={max_new_tokens} needs {needed} positions, more than the model's context of "
            f"{max_positions} (text_config.max_position_embeddings)"
        )


def check_canvas_tensor(name: str, canvas, batch_size: int, canvas_length: int) -> None:
    """A [batch, canvas_length] integer tensor of token ids (a starting canvas, training labels)."""
    if not isinstance(canvas, torch.Tensor) or canvas.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`{name}` must be an integer torch.Tensor of shape [batch, canvas_length]")
    if tuple(canvas.shape) != (batch_size, canvas_length):
        raise ValueError(
            f"`{name}` must have shape {(batch_size, canvas_length)} (batch, config.canvas_length), "
            f"got {tuple(canvas.shape)}"
        )


def check_canvas(decoder_input_ids, batch_size: int, canvas_length: int, vocab_size: int) -> None:
    if decoder_input_ids is None:
        return
    check_canvas_tensor("decoder_input_ids", decoder_input_ids, batch_size, canvas_length)
    if decoder_input_ids.numel() and (decoder_input_ids.min() < 0 or decoder_input_ids.max() >= vocab_size):
        raise ValueError(f"`decoder_input_ids` must hold token ids in [0, {vocab_size})")
