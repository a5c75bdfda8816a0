"""The acceptance rules: entropy bound (upstream's default), confidence threshold, top-k per step."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config

from .base import TextDiffusionScheduler, _check_positive_int, check_temperatures


def _at_least_one_per_row(accepted: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Adds each row's highest-scoring position, so every step makes progress."""
    best = torch.zeros_like(accepted).scatter(-1, score.argmax(dim=-1, keepdim=True), True)
    return accepted | best


class EntropyBoundDiffusionScheduler(TextDiffusionScheduler):
    """Accepts, per row, the k lowest-entropy candidates with sum(entropy) - max(entropy) <= entropy_bound (an
    upper bound on their joint mutual information, https://arxiv.org/abs/2505.24857); the released checkpoint's
    sampler and upstream generate's. With the checkpoint's settings it reproduces upstream generate exactly."""

    @register_to_config
    def __init__(self, num_inference_steps: int = 48, entropy_bound: float = 0.1, t_min: float = 0.4,
                 t_max: float = 0.8):
        _check_positive_int("num_inference_steps", num_inference_steps)
        check_temperatures(t_min, t_max)
        if not isinstance(entropy_bound, (int, float)) or not entropy_bound > 0:
            raise ValueError(f"`entropy_bound` must be a float > 0, got {entropy_bound!r}")
        self.set_timesteps(num_inference_steps)

    def accept(self, entropy, max_prob, step_index):
        sorted_entropy, order = torch.sort(entropy, dim=-1)
        # Sorted ascending, so each prefix's max is its last element; the first token always passes (0 <= bound).
        selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= self.config.entropy_bound
        return torch.zeros_like(selected).scatter(-1, order, selected)


class ConfidenceThresholdScheduler(TextDiffusionScheduler):
    """Accepts every candidate whose top probability exceeds `threshold`, and at least the most confident one
    per row (Fast-dLLM's parallel decoding rule, https://arxiv.org/abs/2505.22618)."""

    @register_to_config
    def __init__(self, num_inference_steps: int = 48, threshold: float = 0.9, t_min: float = 0.4, t_max: float = 0.8):
        _check_positive_int("num_inference_steps", num_inference_steps)
        check_temperatures(t_min, t_max)
        if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise ValueError(f"`threshold` must be a float in (0, 1), got {threshold!r}")
        self.set_timesteps(num_inference_steps)

    def accept(self, entropy, max_prob, step_index):
        return _at_least_one_per_row(max_prob > self.config.threshold, max_prob)


class TopKPerStepScheduler(TextDiffusionScheduler):
    """Accepts the k most confident candidates, k growing linearly with the step so that the last step accepts
    the whole canvas: k = ceil(canvas_length * (step + 1) / num_inference_steps). A fixed-cost schedule: the
    canvas completes in exactly num_inference_steps steps."""

    @register_to_config
    def __init__(self, num_inference_steps: int = 16, t_min: float = 0.4, t_max: float = 0.8):
        _check_positive_int("num_inference_steps", num_inference_steps)
        check_temperatures(t_min, t_max)
        self.set_timesteps(num_inference_steps)

    def accept(self, entropy, max_prob, step_index):
        length = max_prob.shape[-1]
        # k from the device-side step index: ceil(L * (s + 1) / N) in integer arithmetic.
        k = (length * (step_index + 1) + self.steps - 1) // self.steps
        rank = torch.argsort(torch.argsort(max_prob, dim=-1, descending=True, stable=True), dim=-1)
        return rank < k

    def tokens_per_step(self, length: int) -> list[int]:
        """How many tokens each step accepts (for documentation and tests)."""
        return [math.ceil(length * (s + 1) / self.steps) for s in range(self.steps)]
