"""dgemma_hf: fast DiffusionGemma inside the Hugging Face stack.

`import dgemma_hf` makes `AutoModel.from_pretrained(...)` (and `AutoModelForImageTextToText`) return
`DiffusionGemmaForMaskedGeneration` for DiffusionGemma checkpoints, registers the experts backends, the NVFP4
quantizers and `pipeline("text-diffusion")`.
"""

from .checkpoint import CheckpointError
from .modeling import DiffusionGemmaForMaskedGeneration
from .pipelines import (
    DiffusionTextStreamer,
    StreamEvent,
    TextDiffusionGenerationPipeline,
    TextDiffusionIteratorStreamer,
)
from .quantization import NVFP4Config
from .registration import register

__version__ = "0.1.0"

register()


def __getattr__(name):
    # The diffusers pipeline loads lazily: importing diffusers' pipeline machinery costs about half a second.
    if name in ("TextDiffusionPipeline", "TextDiffusionPipelineOutput"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "DiffusionGemmaForMaskedGeneration",
    "DiffusionTextStreamer",
    "NVFP4Config",
    "StreamEvent",
    "TextDiffusionGenerationPipeline",
    "TextDiffusionIteratorStreamer",
    "TextDiffusionPipeline",
    "TextDiffusionPipelineOutput",
    "__version__",
]
