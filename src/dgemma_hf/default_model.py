"""The default model pair shipped inside the package: a small trained DiffusionGemma and its autoregressive
counterpart (a Gemma 4 text model of about the same size, same data and tokenizer).

Both were trained by `python -m eval.train_default --out src/dgemma_hf/assets/default` (dgemma_hf's repository) on
short integer arithmetic ("Calculate 7 - 2 + 4." -> "7-2=5+4=9"); they know that task only. Their READMEs hold
the held-out accuracy and the DiffusionGemma's tokens per forward.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL_DESCRIPTION = (
    "dgemma_hf's built-in default: a small DiffusionGemma trained on short arithmetic only "
    "(e.g. 'Calculate 7 - 2 + 4.'); pass --model for a real checkpoint"
)


def _asset(name: str) -> Path:
    # The package is installed as plain files (setuptools package-data), so the traversable is a real folder.
    path = Path(str(resources.files("dgemma_hf").joinpath("assets", "default", name)))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the default model {name!r} is missing from the installed package: {path}")
    return path


def default_model_path() -> Path:
    """Folder of the shipped DiffusionGemma (AutoModel.from_pretrained / AutoTokenizer.from_pretrained)."""
    return _asset("dgemma")


def default_ar_model_path() -> Path:
    """Folder of the shipped autoregressive Gemma 4 text model (AutoModelForCausalLM.from_pretrained)."""
    return _asset("ar")
