"""Which scheduler a generate() call runs: the caller's, or upstream's sampler rebuilt from the generation config."""

from __future__ import annotations

from ..schedulers import DIFFUSERS_SCHEDULERS, DiffusersSchedulerAdapter, EntropyBoundDiffusionScheduler
from ..schedulers import TextDiffusionScheduler


def resolve_scheduler(scheduler, generation_config, steps_given: bool):
    steps = generation_config.max_denoising_steps
    if scheduler is None:
        # Upstream applies no temperature when t_min / t_max are unset: a constant 1.0 divides exactly.
        t_min = generation_config.t_min if generation_config.t_min is not None else 1.0
        t_max = generation_config.t_max if generation_config.t_max is not None else 1.0
        return EntropyBoundDiffusionScheduler(
            num_inference_steps=steps,
            entropy_bound=generation_config.sampler_config.entropy_bound,
            t_min=t_min,
            t_max=t_max,
        )
    if isinstance(scheduler, DIFFUSERS_SCHEDULERS):
        scheduler = DiffusersSchedulerAdapter(scheduler)
    elif not isinstance(scheduler, TextDiffusionScheduler):
        raise TypeError(
            "`scheduler` must be a dgemma_hf.schedulers scheduler or one of diffusers' "
            f"{', '.join(cls.__name__ for cls in DIFFUSERS_SCHEDULERS)}, got {type(scheduler).__name__}"
        )
    if steps_given and steps != scheduler.steps:
        raise ValueError(
            f"`max_denoising_steps`={steps} disagrees with the scheduler's num_inference_steps={scheduler.steps}; "
            "set the steps on the scheduler"
        )
    return scheduler
