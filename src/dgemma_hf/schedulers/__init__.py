"""Schedulers for DiffusionGemma's denoising steps (diffusers-compatible); see base.py for the API."""

from .acceptance import ConfidenceThresholdScheduler, EntropyBoundDiffusionScheduler, TopKPerStepScheduler
from .base import TextDiffusionScheduler, TextDiffusionSchedulerOutput
from .diffusers_adapter import DIFFUSERS_SCHEDULERS, DiffusersSchedulerAdapter

SCHEDULERS = {
    "entropy_bound": EntropyBoundDiffusionScheduler,
    "confidence_threshold": ConfidenceThresholdScheduler,
    "top_k_per_step": TopKPerStepScheduler,
}

__all__ = [
    "ConfidenceThresholdScheduler",
    "DIFFUSERS_SCHEDULERS",
    "DiffusersSchedulerAdapter",
    "EntropyBoundDiffusionScheduler",
    "SCHEDULERS",
    "TextDiffusionScheduler",
    "TextDiffusionSchedulerOutput",
    "TopKPerStepScheduler",
]
