"""Pipelines and streaming for DiffusionGemma.

- `pipeline("text-diffusion", model=..., tokenizer=...)` (transformers), registered by `register_pipelines()`:
  `TextDiffusionGenerationPipeline`, outputs shaped like "text-generation".
- `TextDiffusionPipeline` (diffusers `DiffusionPipeline`: model, scheduler, tokenizer), loaded lazily because
  diffusers' pipeline machinery is slow to import.
- Streamers: `DiffusionTextStreamer` (per-step drafts and per-canvas commits) and
  `TextDiffusionIteratorStreamer` (an iterator of `StreamEvent(kind, text)` for servers).
"""

from __future__ import annotations

from .streaming import DiffusionTextStreamer, StreamEvent, TextDiffusionIteratorStreamer
from .text_generation import TextDiffusionGenerationPipeline

TASK = "text-diffusion"

__all__ = [
    "TASK",
    "DiffusionTextStreamer",
    "StreamEvent",
    "TextDiffusionGenerationPipeline",
    "TextDiffusionIteratorStreamer",
    "TextDiffusionPipeline",
    "TextDiffusionPipelineOutput",
    "register_pipelines",
]


def register_pipelines() -> None:
    """Registers the "text-diffusion" task with transformers' pipeline registry (idempotent). Models load with
    AutoModel; with no model, `pipeline("text-diffusion")` writes (once) and uses the tiny random checkpoint in the
    CLI's cache folder, with a warning."""
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    from .common import BuiltInDefault

    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is TextDiffusionGenerationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=TextDiffusionGenerationPipeline, pt_model=AutoModel, default=BuiltInDefault(), type="text"
    )


def __getattr__(name):
    if name in ("TextDiffusionPipeline", "TextDiffusionPipelineOutput"):
        from . import diffusion

        return getattr(diffusion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
