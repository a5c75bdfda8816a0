"""Everything `import dgemma_hf` registers with transformers, in one place, once."""

from transformers import AutoModel, AutoModelForImageTextToText, DiffusionGemmaConfig

from .attention import register_attention
from .experts import register_experts
from .modeling import DiffusionGemmaForMaskedGeneration
from .pipelines import register_pipelines
from .quantization import register_quantizers


def register() -> None:
    register_experts()
    register_attention()
    register_quantizers()
    # exist_ok: the config class is transformers' own, already mapped to upstream's classes.
    for auto_class in (AutoModel, AutoModelForImageTextToText):
        auto_class.register(DiffusionGemmaConfig, DiffusionGemmaForMaskedGeneration, exist_ok=True)
    register_pipelines()
