"""Tiny random DiffusionGemma checkpoints with a real (small, trained) tokenizer.

Used by `dgemma-hf make-tiny`, by the CLI's default model until a trained default ships, and by the tests.
The architecture is the real one (sliding + global layers, head_dim doubling, K-as-V, MoE with top-k,
self-conditioning, vision tower); only the sizes are scaled down.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DiffusionGemmaConfig, PreTrainedTokenizerFast
from transformers.models.diffusion_gemma import DiffusionGemmaGenerationConfig

# Gemma's special tokens, in Gemma's order for the first three (pad 0, eos 1, bos 2).
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# Same shape of conversation as Gemma's template: turns wrapped in <start_of_turn>/<end_of_turn>, the
# assistant role called "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

TINY_VOCAB_SIZE = 512

# Scaled-down 26B-A4B: sliding layers then a global one, global head_dim twice the sliding one with fewer
# kv heads (K doubles as V there), MoE on every layer beside the dense MLP.
TINY_TEXT_CONFIG = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 32,
    "num_global_key_value_heads": 1,
    "attention_k_eq_v": True,
    "sliding_window": 16,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
    "num_experts": 4,
    "top_k_experts": 2,
    "moe_intermediate_size": 32,
    "max_position_embeddings": 2048,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}

TINY_VISION_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "position_embedding_size": 64,
}


def build_tokenizer(
    lines: list[str] | None = None,
    vocab_size: int = TINY_VOCAB_SIZE,
    split_digits: bool = False,
    model_max_length: int = TINY_TEXT_CONFIG["max_position_embeddings"],
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE with Gemma's special tokens and chat template; deterministic, well under a second.
    By default on the packaged corpus (vocabulary 512); `lines` trains it on other text, `split_digits` makes
    every digit its own token (for arithmetic)."""
    if lines is None:
        corpus = resources.files("dgemma_hf").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")
        lines = corpus.splitlines(keepends=True)
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer=trainer)
    if backend.get_vocab_size() > vocab_size:
        raise RuntimeError(f"the tokenizer grew to {backend.get_vocab_size()} tokens (> {vocab_size})")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=model_max_length,
    )


def tiny_config(canvas_length: int = 16, **text_overrides) -> DiffusionGemmaConfig:
    """A tiny DiffusionGemmaConfig; `text_overrides` replace entries of TINY_TEXT_CONFIG."""
    unknown = set(text_overrides) - set(TINY_TEXT_CONFIG)
    if unknown:
        raise TypeError(f"tiny_config: unknown text config overrides {sorted(unknown)}")
    text_config = {**copy.deepcopy(TINY_TEXT_CONFIG), **text_overrides}
    vocab = text_config["vocab_size"]
    special = {name: SPECIAL_TOKENS.index(name) for name in SPECIAL_TOKENS}
    return DiffusionGemmaConfig(
        text_config=text_config,
        vision_config=dict(TINY_VISION_CONFIG),
        canvas_length=canvas_length,
        # Keep the multimodal ids inside a tiny vocabulary; they point at the tokenizer's image tokens.
        boi_token_id=special["<start_of_image>"] % vocab,
        eoi_token_id=special["<end_of_image>"] % vocab,
        image_token_id=special["<image_soft_token>"] % vocab,
    )


def tiny_generation_config(tokenizer: PreTrainedTokenizerFast) -> DiffusionGemmaGenerationConfig:
    """The released checkpoint's generation defaults, with the tiny tokenizer's special-token ids."""
    return DiffusionGemmaGenerationConfig(
        max_new_tokens=64,
        max_denoising_steps=16,
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
    )


def make_tiny_checkpoint(path: str | Path, seed: int = 0, canvas_length: int = 16, **text_overrides) -> Path:
    """Writes a tiny random DiffusionGemma checkpoint (weights, config, tokenizer, generation config, card)."""
    from .model_cards import render_model_card
    from .modeling import DiffusionGemmaForMaskedGeneration

    path = Path(path)
    torch.manual_seed(seed)
    config = tiny_config(canvas_length=canvas_length, **text_overrides)
    model = DiffusionGemmaForMaskedGeneration(config).eval()
    tokenizer = build_tokenizer()
    model.generation_config = tiny_generation_config(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    card = render_model_card(
        "tiny_random.md",
        seed=seed,
        num_parameters=f"{model.num_parameters():,}",
        canvas_length=canvas_length,
    )
    (path / "README.md").write_text(card, encoding="utf-8")
    return path
