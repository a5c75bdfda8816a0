"""A tiny random autoregressive Gemma 3 checkpoint: the AR side of smoke runs and tests.

It shares the tiny DiffusionGemma's tokenizer (`dgemma_hf.tiny.build_tokenizer`, vocabulary 512, Gemma's
special tokens and chat template), so both sides of a smoke run see the same prompt tokens. Its weights are
random: scores from it mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

from dgemma_hf.tiny import TINY_VOCAB_SIZE, build_tokenizer


def make_tiny_ar_checkpoint(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    tokenizer = build_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=16,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
