"""Quantization configs of the NVFP4 checkpoints dgemma_hf loads, as transformers' `quantization_config` objects.

- `ModelOptNVFP4Config` (`quant_method: "modelopt"`): what NVIDIA Model Optimizer writes into config.json
  (NVIDIA/Model-Optimizer, modelopt/torch/export/convert_hf_config.py): `quant_algo`, `config_groups`,
  `ignore` (its exclude list), `kv_cache_scheme`, `producer`, and the older hf_quant_config.json fields
  (`group_size`, `exclude_modules`, `kv_cache_quant_algo`, or the whole file nested under `quantization`).
  Every field is kept as read and written back unchanged. NVFP4 checkpoints saved by dgemma_hf use it.
- `CompressedTensorsNVFP4Config` (`quant_method: "compressed-tensors"`, format "nvfp4-pack-quantized").
- `NVFP4Config`: quantize a bf16/fp32 checkpoint's experts to NVFP4 while loading it
  (`from_pretrained(path, quantization_config=NVFP4Config())`); the model then saves as ModelOpt W4A16_NVFP4.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats import GROUP_SIZE, is_compressed_tensors_nvfp4

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
ON_LOAD = "dgemma_nvfp4"

# quant_algo values whose experts this package runs: NVFP4 (weights and, for W4A4 engines, calibrated
# activation scales; dgemma_hf runs it W4A16) and W4A16_NVFP4 (weights only).
SUPPORTED_QUANT_ALGOS = ("NVFP4", "W4A16_NVFP4")

# Modules left in bf16 by an NVFP4 export of DiffusionGemma (only the routed experts are NVFP4), as glob
# patterns in ModelOpt's `ignore` / `exclude_modules` convention. Mirrors the exclusions of NVIDIA's release.
EXPORT_EXCLUDE_MODULES = [
    "lm_head",
    "*embed_tokens*",
    "*embed_vision*",
    "*vision_tower*",
    "*mlp*",
    "*router*",
    "*self_attn*",
    "*self_conditioning*",
]


def _group_size_of_groups(config_groups) -> int | None:
    for group in (config_groups or {}).values():
        size = ((group or {}).get("weights") or {}).get("group_size")
        if size is not None:
            return size
    return None


class ModelOptNVFP4Config(QuantizationConfigMixin):
    """A ModelOpt NVFP4 `quantization_config`; every field read is kept and written back unchanged."""

    def __init__(self, **fields: Any):
        fields = copy.deepcopy(fields)
        fields.pop("quant_method", None)
        # hf_quant_config.json's layout ({"producer": ..., "quantization": {...}}), which vLLM also accepts.
        nested = fields.get("quantization")
        view = nested if isinstance(nested, dict) else fields
        self.quant_method = MODELOPT
        self.quant_algo = str(view.get("quant_algo", ""))
        self.group_size = view.get("group_size", _group_size_of_groups(view.get("config_groups")))
        exclude = view.get("ignore", view.get("exclude_modules"))
        self.exclude_modules = list(exclude or [])
        kv_cache = view.get("kv_cache_quant_algo", view.get("kv_cache_scheme"))
        self.kv_cache_quant_algo = "FP8" if isinstance(kv_cache, dict) and kv_cache.get("num_bits") == 8 else kv_cache
        self._fields = fields
        self.post_init()

    def post_init(self):
        if self.quant_algo.upper() not in SUPPORTED_QUANT_ALGOS:
            raise ValueError(
                f"quantization_config (modelopt): quant_algo={self.quant_algo!r} is not supported; dgemma_hf loads "
                f"ModelOpt checkpoints with NVFP4 routed experts, quant_algo one of {list(SUPPORTED_QUANT_ALGOS)}"
            )
        if self.group_size is not None and self.group_size != GROUP_SIZE:
            raise ValueError(
                f"quantization_config (modelopt): group_size={self.group_size!r}; NVFP4 has one scale per "
                f"{GROUP_SIZE} elements"
            )

    @property
    def has_input_scales(self) -> bool:
        """NVFP4 (W4A4) checkpoints carry an `input_scale` per expert projection; W4A16_NVFP4 ones do not."""
        return self.quant_algo.upper() == "NVFP4"

    @classmethod
    def for_export(cls, quant_algo: str) -> ModelOptNVFP4Config:
        """The config.json entry of a DiffusionGemma export with NVFP4 routed experts, in ModelOpt's layout."""
        from .. import __version__

        args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": GROUP_SIZE}
        group = {"weights": dict(args), "targets": ["Linear"]}
        if quant_algo == "NVFP4":
            group = {"input_activations": dict(args), **group}
        return cls(
            config_groups={"group_0": group},
            ignore=list(EXPORT_EXCLUDE_MODULES),
            quant_algo=quant_algo,
            group_size=GROUP_SIZE,
            producer={"name": "dgemma_hf", "version": __version__},
        )

    def to_dict(self) -> dict[str, Any]:
        return {**copy.deepcopy(self._fields), "quant_method": MODELOPT}

    def to_hf_quant_config(self) -> dict[str, Any]:
        """ModelOpt's hf_quant_config.json (older engines detect ModelOpt checkpoints by this file)."""
        nested = self._fields.get("quantization")
        if isinstance(nested, dict):
            return {key: copy.deepcopy(value) for key, value in self._fields.items()}
        quantization = {
            "quant_algo": self.quant_algo,
            "kv_cache_quant_algo": self.kv_cache_quant_algo,
            "group_size": self.group_size or GROUP_SIZE,
            "exclude_modules": list(self.exclude_modules),
        }
        producer = self._fields.get("producer") or {"name": "dgemma_hf"}
        return {"producer": copy.deepcopy(producer), "quantization": quantization}


class CompressedTensorsNVFP4Config(QuantizationConfigMixin):
    """A compressed-tensors `quantization_config` with "nvfp4-pack-quantized" weights, kept as read."""

    def __init__(self, **fields: Any):
        fields = {**copy.deepcopy(fields), "quant_method": COMPRESSED_TENSORS}
        if not is_compressed_tensors_nvfp4(fields):
            raise ValueError(
                "quantization_config (compressed-tensors): dgemma_hf reads only NVFP4 packed weights "
                "(format 'nvfp4-pack-quantized', 4-bit float weights, group_size 16 in every config group)"
            )
        self.quant_method = COMPRESSED_TENSORS
        self.ignore = list(fields.get("ignore") or [])
        self._fields = fields

    @property
    def has_input_scales(self) -> bool:
        """W4A4 (NVFP4) recipes quantize activations too and store `input_global_scale`; NVFP4A16 ones do not."""
        return any(group.get("input_activations") for group in self._fields["config_groups"].values())

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._fields)


class NVFP4Config(QuantizationConfigMixin):
    """Quantize a DiffusionGemma checkpoint's routed experts to NVFP4 while loading it.

    ```python
    import dgemma_hf
    model = AutoModel.from_pretrained(path, quantization_config=dgemma_hf.quantization.NVFP4Config())
    model.save_pretrained(out)  # a ModelOpt W4A16_NVFP4 checkpoint
    ```
    Each expert projection is quantized with ModelOpt's recipe (per-expert global scale amax / (6 * 448), E4M3
    block scales per 16 elements, round to nearest even), so the bytes match a ModelOpt export of the same
    weights. Only the routed experts are quantized; no activation calibration is done (W4A16).
    """

    def __init__(self, **kwargs: Any):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"NVFP4Config takes no options, got {sorted(kwargs)}")
        self.quant_method = ON_LOAD

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": ON_LOAD}
