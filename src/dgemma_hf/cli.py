"""`dgemma-hf` (also `python -m dgemma_hf`): generate text, or write a tiny random checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text from a prompt")
    generate.add_argument("prompt", help="the prompt (a user message when the tokenizer has a chat template)")
    generate.add_argument("--model", help="checkpoint folder or hub id (default: dgemma_hf's built-in small "
                          "DiffusionGemma, trained on arithmetic only)")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=None, help="default: the model's config")
    generate.add_argument("--steps", type=_positive_int, default=None, help="max denoising steps per canvas")
    generate.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    generate.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: checkpoint's)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")

    make_tiny = commands.add_parser("make-tiny", help="write a tiny random DiffusionGemma checkpoint")
    make_tiny.add_argument("path", type=Path)
    make_tiny.add_argument("--seed", type=int, default=0)
    return parser


def run_generate(args: argparse.Namespace) -> str:
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    from .default_model import DEFAULT_MODEL_DESCRIPTION, default_model_path

    logging.disable_progress_bar()  # stdout/stderr carry the answer and the notes, not loading bars

    model_path = args.model
    if model_path is None:
        model_path = default_model_path()
        print(f"note: no --model given, so this runs {DEFAULT_MODEL_DESCRIPTION} ({model_path})", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path, dtype=dtype).to(device).eval()
    if tokenizer.chat_template and not args.no_chat_template:
        messages = [{"role": "user", "content": args.prompt}]
        input_ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    generate_kwargs = {}
    if args.max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    if args.steps is not None:
        generate_kwargs["max_denoising_steps"] = args.steps
    output = model.generate(input_ids.to(device), **generate_kwargs)
    new_tokens = output.sequences[0, input_ids.shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-tiny":
        from .tiny import make_tiny_checkpoint

        path = make_tiny_checkpoint(args.path, seed=args.seed)
        print(f"wrote a tiny DiffusionGemma with RANDOM weights to {path}")
        return 0
    print(run_generate(args))
    return 0
