"""diffusers' own DiffusionGemma schedulers inside dgemma_hf's generate.

diffusers 0.42 ships EntropyBoundScheduler, BlockRefinementScheduler and DiscreteDDIMScheduler for
DiffusionGemma's uniform-noise canvases. Their steps keep Python-side state and read values back to the host, so
they run in the engine's reference mode (no CUDA graph), one `step` per denoising step, with their own timestep
conventions.
"""

from __future__ import annotations

import torch
from diffusers import BlockRefinementScheduler, DiscreteDDIMScheduler, EntropyBoundScheduler

from .base import TextDiffusionSchedulerOutput

DIFFUSERS_SCHEDULERS = (EntropyBoundScheduler, BlockRefinementScheduler, DiscreteDDIMScheduler)


class DiffusersSchedulerAdapter:
    """Gives a diffusers DiffusionGemma scheduler the engine's reference-step interface."""

    def __init__(self, scheduler):
        if not isinstance(scheduler, DIFFUSERS_SCHEDULERS):
            names = ", ".join(cls.__name__ for cls in DIFFUSERS_SCHEDULERS)
            raise TypeError(f"expected one of diffusers' {names}, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.steps = scheduler.config.num_inference_steps

    def cache_key(self) -> str:
        return f"diffusers.{type(self.scheduler).__name__}{sorted(self.scheduler.config.items())}"

    def start_canvas(self, canvas_length: int, device) -> None:
        if isinstance(self.scheduler, BlockRefinementScheduler):  # also resets its committed positions
            self.scheduler.set_timesteps(self.steps, device=device, block_length=canvas_length)
        else:
            self.scheduler.set_timesteps(self.steps, device=device)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.LongTensor):
        """`timestep` counts the steps remaining (N .. 1), as for dgemma_hf's schedulers; mapped to the
        wrapped scheduler's own timestep."""
        timestep = self.scheduler.timesteps[self.steps - int(timestep)]
        if isinstance(self.scheduler, EntropyBoundScheduler):
            out = self.scheduler.step(model_output, timestep, sample)
            pred_logits, accepted = out.pred_logits, out.accepted_index
        elif isinstance(self.scheduler, BlockRefinementScheduler):
            out = self.scheduler.step(model_output, timestep, sample)
            pred_logits, accepted = model_output, out.transfer_index | out.editing_transfer_index
        else:
            out = self.scheduler.step(model_output, timestep, sample)
            pred_logits, accepted = model_output, out.prev_sample == sample
        return TextDiffusionSchedulerOutput(
            prev_sample=out.prev_sample,
            pred_original_sample=pred_logits.argmax(dim=-1),
            accepted=accepted,
            pred_logits=pred_logits,
        )
