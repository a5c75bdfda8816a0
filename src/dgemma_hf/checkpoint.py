"""Checks a DiffusionGemma checkpoint before transformers loads it, so bad input fails early and by name.

transformers on its own warns and goes on for a checkpoint of another model type, and loads packed bytes as
weights for a `quant_method` nothing registered; a missing shard or a corrupt safetensors file surfaces as a
low-level error mid-load. Each of these becomes a `CheckpointError` (a ValueError) naming what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from transformers import PreTrainedConfig
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

MODEL_TYPE = "diffusion_gemma"


class CheckpointError(ValueError):
    """A DiffusionGemma checkpoint that cannot be loaded as it is."""


def check_config_dict(config: dict, where: str) -> None:
    """Model type and quantization method of a checkpoint's config."""
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{where} is a checkpoint of model type {model_type!r}; DiffusionGemmaForMaskedGeneration loads "
            f"model type {MODEL_TYPE!r} only"
        )
    check_quantization_config(config.get("quantization_config"), where)


def check_quantization_config(quantization_config, where: str) -> None:
    if quantization_config is None:
        return
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    method = getattr(method, "value", method)  # QuantizationMethod enum -> its string
    if method not in AUTO_QUANTIZER_MAPPING:
        raise CheckpointError(
            f"{where}: quantization_config.quant_method={method!r} has no registered quantizer, so its packed "
            f"weights would load as garbage; registered methods: {sorted(AUTO_QUANTIZER_MAPPING)}"
        )


def check_local_weights(folder: Path) -> None:
    """Every shard an index names exists, and every safetensors file has a readable header."""
    index_file = folder / SAFE_WEIGHTS_INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_file} is not a valid safetensors index: {err}") from err
        shards = sorted(set(weight_map.values()))
    elif (folder / SAFE_WEIGHTS_NAME).is_file():
        shards = [SAFE_WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{folder} holds no {SAFE_WEIGHTS_NAME} and no {SAFE_WEIGHTS_INDEX_NAME}")
    for shard in shards:
        shard_path = folder / shard
        if not shard_path.is_file():
            raise CheckpointError(f"missing shard {shard_path} (listed in {index_file.name})")
        try:
            with safe_open(str(shard_path), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error types for each kind of corruption
            raise CheckpointError(f"{shard_path} is not a valid safetensors file: {err}") from err


def check_checkpoint(pretrained_model_name_or_path, config=None, **hub_kwargs) -> None:
    """Checks a local folder fully; for a hub id, checks the config (the hub checks the files it serves)."""
    where = str(pretrained_model_name_or_path)
    folder = Path(pretrained_model_name_or_path)
    subfolder = hub_kwargs.get("subfolder") or ""
    if folder.is_dir():
        folder = folder / subfolder
    if config is None or isinstance(config, (str, Path)):
        config_source = config if config is not None else pretrained_model_name_or_path
        config_dict, _ = PreTrainedConfig.get_config_dict(config_source, **hub_kwargs)
        check_config_dict(config_dict, where)
    else:
        check_config_dict({"model_type": config.model_type}, where)
        check_quantization_config(getattr(config, "quantization_config", None), where)
    if folder.is_dir():
        check_local_weights(folder)
