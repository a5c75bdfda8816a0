"""Checks of an NVFP4 (or to-be-quantized) checkpoint's tensors from the safetensors headers alone, before any
weight is read: every expert tensor present, with the dtype and shape the model's config implies. A problem
raises `CheckpointError` (a ValueError) naming the tensor, e.g.
`model.decoder.layers.3.experts.7.up_proj.weight_scale_2 is missing`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from safetensors import safe_open

from ..checkpoint import CheckpointError
from .formats import (
    PASSTHROUGH_SUFFIXES,
    PROJECTIONS,
    QUANTIZED_SUFFIXES,
    CheckpointFormat,
    expected_tensor,
    projection_shapes,
)

_DENSE_DTYPES = ("BF16", "F16", "F32")
_MAX_LISTED = 5

# {prefix}.{layer}.experts.{expert}.{projection}.{suffix}
_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.+)\.(?P<layer>\d+)\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj)\.(?P<suffix>\w+)$"
)


@dataclass
class Header:
    dtype: str
    shape: list[int]
    path: str  # the file that holds the tensor


@dataclass
class CheckedLayout:
    """What the checks found out about a checkpoint."""

    layers_prefix: str  # e.g. "model.decoder.layers"
    input_scales: bool = False  # per-expert activation scales present (W4A4 calibration), carried for export
    passthrough: list[str] = field(default_factory=list)  # tensors carried to the export unchanged (KV scales)


@dataclass(frozen=True)
class ExpertsShape:
    num_layers: int
    num_experts: int
    hidden: int
    intermediate: int


def read_headers(checkpoint_files) -> dict[str, Header]:
    """Name -> (dtype, shape) of every tensor in the safetensors files, from their headers (no data read)."""
    headers = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise CheckpointError(f"{path}: NVFP4 checkpoints are read from safetensors files only")
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                headers[key] = Header(tensor_slice.get_dtype(), list(tensor_slice.get_shape()), str(path))
    return headers


def _raise(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED} more problems)" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError("; ".join(problems[:_MAX_LISTED]) + more)


def _layers_prefix(headers: dict[str, Header]) -> str:
    for prefix in ("model.decoder.layers", "decoder.layers"):
        if any(key.startswith(prefix + ".") for key in headers):
            return prefix
    raise CheckpointError("the checkpoint holds no decoder layers (no tensor named model.decoder.layers.*)")


def _check_tensor(problems: list[str], headers: dict[str, Header], key: str, dtypes, shapes) -> bool:
    header = headers.get(key)
    if header is None:
        problems.append(f"{key} is missing")
        return False
    if header.dtype not in dtypes:
        problems.append(f"{key} has dtype {header.dtype}, expected {' or '.join(dtypes)}")
    elif header.shape not in [list(shape) for shape in shapes]:
        expected = " or ".join(str(list(shape)) for shape in shapes)
        problems.append(f"{key} has shape {header.shape}, expected {expected}")
    return True


def check_prequantized(
    headers: dict[str, Header], fmt: CheckpointFormat, shape: ExpertsShape, require_input_scales: bool
) -> CheckedLayout:
    """Checks a pre-quantized NVFP4 checkpoint. Input scales: required when the config says the checkpoint was
    calibrated for W4A4 (`require_input_scales`); otherwise carried if every expert projection has one."""
    prefix = _layers_prefix(headers)
    problems: list[str] = []
    # Quantized tensors outside the routed experts: this package runs bf16 everywhere else.
    for key in sorted(headers):
        if key.endswith(QUANTIZED_SUFFIXES) and not _EXPERT_KEY.match(key):
            module = key.rsplit(".", 1)[0]
            problems.append(
                f"{module} is stored quantized ({key}); dgemma_hf runs NVFP4 routed experts only, every other "
                "weight must be stored unquantized"
            )
    # Expert tensors that the config does not account for.
    for key in sorted(headers):
        match = _EXPERT_KEY.match(key)
        if match and match["prefix"] == prefix:
            layer, expert = int(match["layer"]), int(match["expert"])
            if layer >= shape.num_layers or expert >= shape.num_experts:
                problems.append(
                    f"{key} is outside the model (config: {shape.num_layers} layers, {shape.num_experts} experts)"
                )
    input_scale_keys = [key for key in headers if key.endswith("." + fmt.input_scale) and _EXPERT_KEY.match(key)]
    input_scales = require_input_scales or bool(input_scale_keys)
    suffixes = fmt.suffixes(with_input_scale=input_scales)
    projections = projection_shapes(shape.hidden, shape.intermediate)
    for layer in range(shape.num_layers):
        for expert in range(shape.num_experts):
            for proj in PROJECTIONS:
                out_features, in_features = projections[proj]
                for suffix in suffixes:
                    dtypes, shapes = expected_tensor(fmt, suffix, out_features, in_features)
                    key = f"{prefix}.{layer}.experts.{expert}.{proj}.{suffix}"
                    _check_tensor(problems, headers, key, dtypes, shapes)
    _raise(problems)
    passthrough = sorted(key for key in headers if key.endswith(PASSTHROUGH_SUFFIXES))
    return CheckedLayout(layers_prefix=prefix, input_scales=input_scales, passthrough=passthrough)


def check_dense(headers: dict[str, Header], shape: ExpertsShape) -> CheckedLayout:
    """Checks the bf16/fp16/fp32 experts of a checkpoint that is quantized while loading."""
    prefix = _layers_prefix(headers)
    problems: list[str] = []
    experts, hidden, intermediate = shape.num_experts, shape.hidden, shape.intermediate
    for layer in range(shape.num_layers):
        base = f"{prefix}.{layer}.experts"
        _check_tensor(problems, headers, f"{base}.gate_up_proj", _DENSE_DTYPES, [[experts, 2 * intermediate, hidden]])
        _check_tensor(problems, headers, f"{base}.down_proj", _DENSE_DTYPES, [[experts, hidden, intermediate]])
    quantized = sorted(key for key in headers if key.endswith(QUANTIZED_SUFFIXES))
    if quantized:
        problems.append(
            f"{quantized[0]} is a quantized tensor: this checkpoint is already quantized, load it without a "
            "quantization_config"
        )
    _raise(problems)
    return CheckedLayout(layers_prefix=prefix)
