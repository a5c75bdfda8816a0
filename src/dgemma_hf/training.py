"""The block-diffusion training objective of DiffusionGemma.

One training example is a prompt (`input_ids`, left padded with `attention_mask`) and the canvas that should
follow it (`labels`, `[batch, config.canvas_length]`, -100 where no loss is wanted). Mirroring generation:

1. the causal encoder reads the prompt into a fresh DynamicCache (with gradients: the decoder's loss trains the
   encoder's keys and values too);
2. each row gets a corruption rate t ~ U(0, 1] (or the given `corruption_rate`); each target token is replaced by
   a uniformly random token with probability t (DiffusionGemma's noise is uniform, it has no mask token); ignored
   positions always hold random tokens, like the undecided positions of a canvas being generated;
3. self-conditioning, per example with probability `self_conditioning_prob`: a first decoder pass without
   self-conditioning runs under `torch.no_grad`, and its logits (detached) feed the second pass as
   `self_conditioning_logits`, with upstream's per-example `self_conditioning_mask`. The loss is on the second
   pass, so gradients reach the self-conditioning block and, through the soft embeddings, the embedding table.
   When no row of the batch is self-conditioned the first pass is skipped (masked rows see zeros either way);
4. the loss is the cross-entropy of the canvas logits (the LM head with the final logit softcap, as upstream)
   against `labels`, a mean over the batch's target tokens; with `encoder_loss_weight > 0` the encoder's
   autoregressive next-token loss on the prompt (its last hidden state through the same head) is added with
   that weight.

The random draws come from `generator` when one is given, on the generator's device, in this order: the
corruption rates (only when `corruption_rate` is not given), the corruption choice per position, the noise
tokens, the self-conditioning choice per row. So a CPU generator gives the same corruption on every device.

`DiffusionGemmaForMaskedGeneration.forward(..., labels=...)` returns `block_diffusion_loss(...)`; without
`labels` the forward is upstream's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaBlockDiffusionOutputWithPast

from .fused_layers import logit_softcap
from .generation.checks import check_canvas_tensor

IGNORE_INDEX = -100
DEFAULT_SELF_CONDITIONING_PROB = 0.5

# Keyword arguments of upstream's forward that the training loss forwards to the encoder.
_ENCODER_KWARGS = ("position_ids", "pixel_values", "image_position_ids", "mm_token_type_ids", "mm_encoder_outputs")
# Keyword arguments of upstream's forward that the training loss builds itself.
_BUILT_BY_THE_LOSS = {
    "past_key_values": "the encoder reads the prompt into a fresh cache",
    "inputs_embeds": "the prompt is given as `input_ids`",
    "decoder_input_ids": "the canvas is `labels`, corrupted by the loss",
    "self_conditioning_logits": "the loss runs its own self-conditioning pass (see `self_conditioning_prob`)",
    "self_conditioning_mask": "the loss draws it from `self_conditioning_prob`",
    "decoder_attention_mask": "the loss builds it from `attention_mask`",
    "decoder_position_ids": "the canvas follows the prompt",
}


@dataclass
class BlockDiffusionOutput(DiffusionGemmaBlockDiffusionOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `()`):
        `diffusion_loss + encoder_loss_weight * encoder_loss`.
    logits (`torch.FloatTensor` of shape `(batch_size, canvas_length, vocab_size)`):
        The canvas logits of the pass the loss is taken on (the self-conditioned one).
    diffusion_loss (`torch.FloatTensor` of shape `()`):
        Cross-entropy of the canvas logits against `labels`, mean over target tokens.
    encoder_loss (`torch.FloatTensor` of shape `()`, *optional*):
        The encoder's next-token loss on the prompt; only computed when `encoder_loss_weight > 0`.
    decoder_input_ids (`torch.LongTensor` of shape `(batch_size, canvas_length)`):
        The corrupted canvas the decoder read.
    corruption_rate (`torch.FloatTensor` of shape `(batch_size,)`):
        Each row's corruption rate.
    self_conditioning_mask (`torch.BoolTensor` of shape `(batch_size,)`):
        Which rows were self-conditioned.
    """

    diffusion_loss: torch.FloatTensor | None = None
    encoder_loss: torch.FloatTensor | None = None
    decoder_input_ids: torch.LongTensor | None = None
    corruption_rate: torch.FloatTensor | None = None
    self_conditioning_mask: torch.BoolTensor | None = None


def block_diffusion_loss(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    labels: torch.LongTensor,
    *,
    corruption_rate: float | torch.Tensor | None = None,
    self_conditioning_prob: float | None = None,
    encoder_loss_weight: float | None = None,
    generator: torch.Generator | None = None,
    return_dict: bool | None = None,
    **kwargs,
) -> BlockDiffusionOutput | tuple:
    """The block-diffusion training loss of `model` (a DiffusionGemmaForBlockDiffusion, or a peft model around one).

    Args:
        input_ids: `[batch, prompt_length]` prompt token ids, left padded.
        attention_mask: `[batch, prompt_length]`, 1 for real tokens; None means no padding.
        labels: `[batch, config.canvas_length]` target canvas; -100 marks positions without loss.
        corruption_rate: None (each row draws t ~ U(0, 1]), a float in (0, 1], or a tensor of shape `[]` or
            `[batch]` with values in (0, 1].
        self_conditioning_prob: probability that a row is self-conditioned, in [0, 1]; None means 0.5.
        encoder_loss_weight: weight (>= 0) of the encoder's next-token loss on the prompt; None or 0 means off.
        generator: the source of every random draw (see the module docstring for their order).
        return_dict: False returns `output.to_tuple()`, as upstream's forward does.
        kwargs: the encoder's extra inputs of upstream's forward (`position_ids`, `pixel_values`,
            `image_position_ids`, `mm_token_type_ids`, `mm_encoder_outputs`); None values are dropped.

    Returns:
        A `BlockDiffusionOutput` (`loss`, `logits` of the loss pass, `encoder_last_hidden_state`, and the parts:
        `diffusion_loss`, `encoder_loss`, the corrupted `decoder_input_ids`, `corruption_rate`,
        `self_conditioning_mask`).
    """
    model = _unwrap(model)
    config = model.config
    vocab_size = config.text_config.vocab_size
    canvas_length = config.canvas_length

    encoder_kwargs = _split_kwargs(kwargs)
    attention_mask = _check_prompt(input_ids, attention_mask)
    batch_size = input_ids.shape[0]
    _check_labels(labels, batch_size, canvas_length, vocab_size)
    self_conditioning_prob = _check_probability(self_conditioning_prob)
    encoder_loss_weight = _check_encoder_loss_weight(encoder_loss_weight)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")

    device = labels.device
    draw_device = generator.device if generator is not None else device
    rates = _corruption_rates(corruption_rate, batch_size, generator, draw_device).to(device)
    decoder_input_ids = corrupt_canvas(labels, rates, vocab_size, generator)
    draws = torch.rand(batch_size, generator=generator, device=draw_device)
    self_conditioned = (draws < self_conditioning_prob).to(device)

    # 1. The prompt, into a fresh cache; the decoder reads it (read-only) in both passes below.
    encoder_outputs = model.model.encoder(input_ids=input_ids, attention_mask=attention_mask, **encoder_kwargs)
    cache = encoder_outputs.past_key_values
    # The canvas attends to the prompt's real tokens and to itself, as in generate().
    decoder_attention_mask = F.pad(attention_mask.bool(), (0, canvas_length), value=True)

    # 2. The self-conditioning signal: a first pass without it, outside the graph.
    self_conditioning_logits = None
    if bool(self_conditioned.any()):
        with torch.no_grad():
            self_conditioning_logits = _decode(model, decoder_input_ids, cache, decoder_attention_mask, None, None)

    # 3. The pass the loss is taken on.
    logits = _decode(
        model,
        decoder_input_ids,
        cache,
        decoder_attention_mask,
        self_conditioning_logits,
        self_conditioned if self_conditioning_logits is not None else None,
    )
    diffusion_loss = F.cross_entropy(
        logits.reshape(-1, vocab_size).float(), labels.reshape(-1).long(), ignore_index=IGNORE_INDEX
    )
    loss = diffusion_loss
    encoder_loss = None
    if encoder_loss_weight > 0:
        encoder_loss = _encoder_next_token_loss(model, encoder_outputs.last_hidden_state, input_ids, attention_mask)
        loss = diffusion_loss + encoder_loss_weight * encoder_loss

    output = BlockDiffusionOutput(
        loss=loss,
        logits=logits,
        encoder_last_hidden_state=encoder_outputs.last_hidden_state,
        diffusion_loss=diffusion_loss,
        encoder_loss=encoder_loss,
        decoder_input_ids=decoder_input_ids,
        corruption_rate=rates,
        self_conditioning_mask=self_conditioned,
    )
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    return output if return_dict else output.to_tuple()


def corrupt_canvas(
    labels: torch.LongTensor,
    corruption_rate: torch.Tensor,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Replaces each target token of `labels` by a uniformly random token with its row's probability
    (`corruption_rate`, shape `[batch]`); positions marked -100 always get random tokens."""
    draw_device = generator.device if generator is not None else labels.device
    shape = tuple(labels.shape)
    chosen = torch.rand(shape, generator=generator, device=draw_device).to(labels.device)
    noise = torch.randint(0, vocab_size, shape, generator=generator, device=draw_device).to(labels.device)
    corrupted = (chosen < corruption_rate.to(labels.device)[:, None]) | (labels == IGNORE_INDEX)
    return torch.where(corrupted, noise, labels.long())


def canvas_logits(model, hidden_states: torch.Tensor) -> torch.Tensor:
    """The LM head with the final logit softcap, in fp32: how upstream's forward turns hidden states into logits."""
    model = _unwrap(model)
    logits = model.lm_head(hidden_states)
    cap = model.config.text_config.final_logit_softcapping
    return logits.to(torch.float32) if cap is None else logit_softcap(logits, cap)


def check_no_training_arguments(**arguments) -> None:
    """Without `labels` the forward is upstream's; refuse the training-only arguments rather than ignore them."""
    given = sorted(name for name, value in arguments.items() if value is not None)
    if given:
        raise ValueError(f"{', '.join(f'`{name}`' for name in given)} only apply to the training loss: pass `labels`")


def _decode(model, canvas, cache, decoder_attention_mask, self_conditioning_logits, self_conditioning_mask):
    outputs = model.model.decoder(
        decoder_input_ids=canvas,
        past_key_values=cache,
        self_conditioning_logits=self_conditioning_logits,
        self_conditioning_mask=self_conditioning_mask,
        decoder_attention_mask=decoder_attention_mask,
    )
    return canvas_logits(model, outputs.last_hidden_state)


def _encoder_next_token_loss(model, hidden_states, input_ids, attention_mask):
    """Next-token cross-entropy of the encoder on the prompt; pairs touching padding are left out."""
    mask = attention_mask.bool()
    targets = input_ids[:, 1:].long().masked_fill(~(mask[:, 1:] & mask[:, :-1]), IGNORE_INDEX)
    if not bool((targets != IGNORE_INDEX).any()):
        raise ValueError(
            "`encoder_loss_weight` > 0 needs a prompt of at least two real tokens in some row; every prompt here "
            "has fewer"
        )
    logits = canvas_logits(model, hidden_states[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def _unwrap(model):
    # A peft model wraps ours (with its adapters injected in place); the loss needs our submodules.
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _split_kwargs(kwargs: dict) -> dict:
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    for name, why in _BUILT_BY_THE_LOSS.items():
        if name in kwargs:
            raise ValueError(f"`{name}` cannot be given with `labels`: {why}")
    unknown = sorted(set(kwargs) - set(_ENCODER_KWARGS))
    if unknown:
        raise TypeError(f"unexpected argument(s) for the training loss: {', '.join(unknown)}")
    return kwargs


def _check_prompt(input_ids, attention_mask) -> torch.Tensor:
    if input_ids is None:
        raise ValueError("`input_ids` (the prompt) is required with `labels`")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("`input_ids` must be an integer torch.Tensor of shape [batch, prompt_length]")
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"`input_ids` must have shape [batch, prompt_length] with both > 0, got {tuple(input_ids.shape)}"
        )
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {shape}")
    empty_rows = (~attention_mask.bool().any(dim=-1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"the prompt of batch row(s) {empty_rows} is empty: `attention_mask` is all zeros there")
    return attention_mask


def _check_labels(labels, batch_size: int, canvas_length: int, vocab_size: int) -> None:
    check_canvas_tensor("labels", labels, batch_size, canvas_length)
    targets = labels != IGNORE_INDEX
    if not bool(targets.any()):
        raise ValueError(f"`labels` has no target: every position is {IGNORE_INDEX} (ignored)")
    values = labels[targets]
    if bool((values < 0).any()) or bool((values >= vocab_size).any()):
        raise ValueError(f"`labels` must hold token ids in [0, {vocab_size}) or {IGNORE_INDEX}")


def _check_probability(value) -> float:
    if value is None:
        return DEFAULT_SELF_CONDITIONING_PROB
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`self_conditioning_prob` must be a float in [0, 1], got {value!r}")
    return float(value)


def _check_encoder_loss_weight(value) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`encoder_loss_weight` must be a finite float >= 0, got {value!r}")
    return float(value)


def _corruption_rates(corruption_rate, batch_size: int, generator, draw_device) -> torch.Tensor:
    if corruption_rate is None:
        # 1 - U[0, 1) is U(0, 1]: never a clean canvas, sometimes pure noise (where generation starts).
        return 1.0 - torch.rand(batch_size, generator=generator, device=draw_device)
    if isinstance(corruption_rate, torch.Tensor):
        if not corruption_rate.is_floating_point() or corruption_rate.shape not in ((), (batch_size,)):
            raise ValueError(
                f"`corruption_rate` must be a float, or a float tensor of shape [] or [{batch_size}] (batch), got "
                f"{corruption_rate.dtype} of shape {tuple(corruption_rate.shape)}"
            )
        rates = corruption_rate.detach().float().expand(batch_size)
    elif isinstance(corruption_rate, Real) and not isinstance(corruption_rate, bool):
        rates = torch.full((batch_size,), float(corruption_rate))
    else:
        raise TypeError(f"`corruption_rate` must be a float in (0, 1] or a tensor of such, got {corruption_rate!r}")
    if not bool(((rates > 0) & (rates <= 1)).all()):
        raise ValueError(f"`corruption_rate` must lie in (0, 1], got {corruption_rate!r}")
    return rates.clone()
