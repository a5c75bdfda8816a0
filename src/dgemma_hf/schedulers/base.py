"""The scheduler API: which tokens of a denoised canvas to accept, at which temperature.

A DiffusionGemma denoising step samples a candidate token for every canvas position from the temperature-scaled
logits, accepts some of them and renoises the others with uniformly random tokens. A scheduler decides the
temperature of each step and which candidates to accept. It is a diffusers scheduler (`ConfigMixin`,
`SchedulerMixin`, saved as scheduler_config.json, swapped with `X.from_config(other.config)`) with two faces:

- `temperatures()` and `accept()`: tensor functions without host synchronisation, which dgemma_hf's
  engine calls inside its captured CUDA-graph step (fed by the fused sampler's per-token statistics);
- `step(model_output, timestep, sample)`: the diffusers-style reference step on full logits, with torch's RNG
  (multinomial, then randint for the renoise, as upstream does), used by the engine's reference mode and by
  loops written the diffusers way.

Timesteps count the steps remaining, N .. 1, as upstream's generate does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class TextDiffusionSchedulerOutput(BaseOutput):
    """One denoising step.

    prev_sample: the next canvas [B, L] (accepted candidates, the rest renoised).
    pred_original_sample: the argmax canvas [B, L] of the temperature-scaled logits (the draft).
    accepted: bool [B, L], the positions whose candidate was accepted.
    pred_logits: the temperature-scaled logits [B, L, V] (what the next step self-conditions on).
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor
    accepted: torch.BoolTensor
    pred_logits: torch.Tensor


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def check_temperatures(t_min: float, t_max: float) -> None:
    for name, value in (("t_min", t_min), ("t_max", t_max)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"`{name}` must be a float > 0, got {value!r}")
    if t_max < t_min:
        raise ValueError(f"`t_max` must be >= `t_min`, got t_max={t_max!r} < t_min={t_min!r}")


class TextDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Base class. Subclasses set their config with `@register_to_config` (it must hold `num_inference_steps`,
    `t_min` and `t_max`) and implement `accept`."""

    config_name = "scheduler_config.json"
    order = 1

    def set_timesteps(self, num_inference_steps: int | None = None, device=None) -> None:
        steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        _check_positive_int("num_inference_steps", steps)
        self.num_inference_steps = steps
        self.timesteps = torch.arange(steps, 0, -1, device=device)

    @property
    def steps(self) -> int:
        return getattr(self, "num_inference_steps", self.config.num_inference_steps)

    def temperatures(self, device=None) -> torch.Tensor:
        """The temperature of each step, in step order: linear from t_max (first step) to t_min (last) over the
        steps remaining, computed in float32 with the operations of upstream's
        LinearTemperatureScheduleLogitsProcessor, so the reference step divides by the very same values."""
        remaining = torch.arange(self.steps, 0, -1, dtype=torch.int32, device=device)
        return self.config.t_min + (self.config.t_max - self.config.t_min) * (remaining / self.steps)

    def accept(self, entropy: torch.Tensor, max_prob: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """Which candidates to accept: bool [B, L] from per-token entropy and top probability [B, L] (of the
        temperature-scaled distribution) and the 0-based step index (a device tensor). No host syncs."""
        raise NotImplementedError

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.LongTensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """The reference step on raw logits [B, L, V]; `timestep` is the number of steps remaining (N .. 1)."""
        remaining = int(timestep)
        if not 1 <= remaining <= self.steps:
            raise ValueError(f"`timestep` (steps remaining) must be in [1, {self.steps}], got {remaining}")
        step_index = torch.tensor(self.steps - remaining, device=model_output.device)
        pred_logits = model_output / self.temperatures(model_output.device)[self.steps - remaining]
        batch, length, vocab = pred_logits.shape
        probs = torch.softmax(pred_logits, dim=-1, dtype=torch.float32)
        candidates = torch.multinomial(probs.view(-1, vocab), 1, generator=generator).view(batch, length)
        entropy = torch.distributions.Categorical(logits=pred_logits).entropy()
        accepted = self.accept(entropy, probs.max(dim=-1).values, step_index)
        noise = torch.randint(0, vocab, sample.shape, device=sample.device, generator=generator)
        output = TextDiffusionSchedulerOutput(
            prev_sample=torch.where(accepted, candidates, noise),
            pred_original_sample=pred_logits.argmax(dim=-1),
            accepted=accepted,
            pred_logits=pred_logits,
        )
        return output if return_dict else output.to_tuple()

    def cache_key(self) -> str:
        """What a captured step depends on: the class and its config."""
        return f"{type(self).__name__}{sorted(self.config.items())}"
