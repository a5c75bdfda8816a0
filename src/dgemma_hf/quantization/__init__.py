"""NVFP4 checkpoints of DiffusionGemma through ordinary transformers loading and saving.

- `AutoModel.from_pretrained(path)` loads NVIDIA ModelOpt NVFP4 checkpoints (`quant_method: "modelopt"`) and
  compressed-tensors "nvfp4-pack-quantized" ones; `quantization_config=NVFP4Config()` quantizes a bf16
  checkpoint's experts while loading it.
- The routed experts become `NVFP4TextExperts` (packed weights, Triton W4A16 kernels on CUDA, a torch
  reference elsewhere); everything else stays as stored.
- `save_pretrained` writes ModelOpt's layout (and a model card); loading it back is bit-exact.

Modules: `layout` (decoding the kernels' layout in torch), `nvfp4_experts` (the module and its experts backends),
`formats` (tensor names per checkpoint format), `configs`, `validation` (header checks), `swap` (module
replacement, encoder/decoder sharing), `loading` (weight converters), `quantizer`, `export`, `registration`.
"""

from .configs import CompressedTensorsNVFP4Config, ModelOptNVFP4Config, NVFP4Config
from .nvfp4_experts import ALL_NVFP4_EXPERTS_FUNCTIONS, NVFP4TextExperts
from .registration import register_quantizers

__all__ = [
    "ALL_NVFP4_EXPERTS_FUNCTIONS",
    "CompressedTensorsNVFP4Config",
    "ModelOptNVFP4Config",
    "NVFP4Config",
    "NVFP4TextExperts",
    "register_quantizers",
]
