"""dgemma_hf: fast DiffusionGemma inside the Hugging Face stack.

`import dgemma_hf` makes `AutoModel.from_pretrained(...)` (and `AutoModelForImageTextToText`) return
`DiffusionGemmaForMaskedGeneration` for DiffusionGemma checkpoints.
"""

from .checkpoint import CheckpointError
from .modeling import DiffusionGemmaForMaskedGeneration
from .quantization import NVFP4Config
from .registration import register

__version__ = "0.1.0"

register()

__all__ = ["CheckpointError", "DiffusionGemmaForMaskedGeneration", "NVFP4Config", "__version__"]
