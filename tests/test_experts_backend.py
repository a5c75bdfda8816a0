"""The experts backends registered by dgemma_hf, at the level of a whole (tiny) model."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from conftest import build_pair, left_padded_batch, variant_config
from dgemma_hf.experts import triton_applies


def _logits(model, input_ids, attention_mask, canvas):
    config = model.config
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    with torch.no_grad():
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            decoder_input_ids=canvas,
            decoder_attention_mask=F.pad(attention_mask, (0, config.canvas_length), value=1),
        ).logits


def test_default_backend_is_dgemma_everywhere(tokenizer):
    ours, _ = build_pair(variant_config("default"), tokenizer)
    assert ours.config._experts_implementation == "dgemma"
    assert ours.model.decoder.layers[0].experts.config._experts_implementation == "dgemma"


@pytest.mark.parametrize("variant", ["default", "mha_no_k_eq_v"])
def test_triton_experts_model_matches_eager(variant, tokenizer):
    """Triton experts (fp16; interpreted on the CPU) against upstream's eager experts in fp32."""
    config = variant_config(variant)
    ours, reference = build_pair(config, tokenizer, seed=5)
    input_ids, attention_mask = left_padded_batch(tokenizer, ["Why is the sky blue?", "Tom has 3 apples."])
    generator = torch.Generator().manual_seed(2)
    canvas = torch.randint(config.text_config.vocab_size, (2, config.canvas_length), generator=generator)
    reference.set_experts_implementation("eager")
    want = _logits(reference, input_ids, attention_mask, canvas)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = ours.to(device=device, dtype=torch.float16)
    ours.set_experts_implementation("dgemma_triton")
    got = _logits(ours, input_ids.to(device), attention_mask.to(device), canvas.to(device)).float().cpu()
    assert torch.isfinite(got).all()
    assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_dgemma_backend_on_cpu_is_upstream_grouped_mm(tokenizer):
    config = variant_config("default")
    ours, upstream = build_pair(config, tokenizer, seed=6)
    upstream.set_experts_implementation("grouped_mm")
    input_ids, attention_mask = left_padded_batch(tokenizer, ["Why is the sky blue?"])
    canvas = torch.randint(config.text_config.vocab_size, (1, config.canvas_length))
    assert torch.equal(_logits(ours, input_ids, attention_mask, canvas),
                       _logits(upstream, input_ids, attention_mask, canvas))


def test_triton_applies_only_to_inference_on_cuda():
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    w = torch.randn(4, 4, dtype=torch.bfloat16)
    assert not triton_applies(x, w)  # CPU tensors
    if torch.cuda.is_available():
        x, w = x.cuda(), w.cuda()
        assert triton_applies(x, w) and triton_applies(x.float(), w.float())
        assert not triton_applies(x, w.float())  # mixed dtypes
        assert not triton_applies(x, w.requires_grad_())
