import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# eval/ is run from the repository root (`python -m eval.quality`), not installed. Appended, not prepended:
# the root's other folders (kernels/) must not shadow installed distributions.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

# Tests never reach the hub (CI has no network but package registries): offline before transformers loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from transformers import DiffusionGemmaForBlockDiffusion

from dgemma_hf import DiffusionGemmaForMaskedGeneration
from dgemma_hf.tiny import build_tokenizer, tiny_config, tiny_generation_config

# On 2-core CI machines torch's default thread count oversubscribes: the same tiny generate took 1.9 s or 90 s.
torch.set_num_threads(1)

# Tiny configs covering the architecture's variations (layer patterns, kv heads, head dims, K-as-V,
# canvas lengths, experts / top-k, sliding window shorter than the prompts).
TINY_VARIANTS = {
    "default": dict(),
    "mha_no_k_eq_v": dict(
        canvas_length=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_hidden_layers=4,
        num_key_value_heads=4,
        global_head_dim=16,
        attention_k_eq_v=False,
        num_experts=8,
        top_k_experts=3,
        sliding_window=8,
    ),
    "global_only": dict(
        canvas_length=32,
        layer_types=["full_attention", "full_attention"],
        num_hidden_layers=2,
        num_key_value_heads=1,
        global_head_dim=64,
        num_global_key_value_heads=2,
        num_experts=2,
        top_k_experts=1,
    ),
}


def variant_config(name: str):
    overrides = dict(TINY_VARIANTS[name])
    canvas_length = overrides.pop("canvas_length", 16)
    return tiny_config(canvas_length=canvas_length, **overrides)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def build_pair(config, tokenizer, seed: int = 0):
    """Our model and upstream's, holding the same random weights (fp32, eval)."""
    torch.manual_seed(seed)
    ours = DiffusionGemmaForMaskedGeneration(config).eval()
    upstream = DiffusionGemmaForBlockDiffusion(config).eval()
    upstream.load_state_dict(ours.state_dict())
    for model in (ours, upstream):
        model.generation_config = tiny_generation_config(tokenizer)
    return ours, upstream


def left_padded_batch(tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]
