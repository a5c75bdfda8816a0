"""DiffusionGemmaForMaskedGeneration computes exactly what upstream's DiffusionGemmaForBlockDiffusion does."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from conftest import TINY_VARIANTS, build_pair, left_padded_batch, variant_config

PROMPTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "Why is the sky blue?",
    "The river runs past the old mill, under the stone bridge",
]


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _forward_steps(model, config, input_ids, attention_mask, canvases, sc_logits):
    """Encoder prefill + a first decoder pass, then decoder steps without and with self-conditioning."""
    canvas_length = config.canvas_length
    decoder_attention_mask = F.pad(attention_mask, (0, canvas_length), value=1)
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    prefill = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        decoder_input_ids=canvases[0],
        decoder_attention_mask=decoder_attention_mask,
    )
    plain = model(past_key_values=cache, decoder_input_ids=canvases[1], decoder_attention_mask=decoder_attention_mask)
    conditioned = model(
        past_key_values=cache,
        decoder_input_ids=canvases[1],
        self_conditioning_logits=sc_logits,
        decoder_attention_mask=decoder_attention_mask,
    )
    keys = torch.cat([layer.keys.flatten() for layer in cache.layers])
    return prefill.logits, prefill.encoder_last_hidden_state, keys, plain.logits, conditioned.logits


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_logits_match_upstream(variant, batch, tokenizer):
    config = variant_config(variant)
    ours, upstream = build_pair(config, tokenizer, seed=batch)
    input_ids, attention_mask = left_padded_batch(tokenizer, PROMPTS[:batch])
    if batch > 1:
        assert not attention_mask.all(), "the batch must exercise left padding"
    generator = torch.Generator().manual_seed(7)
    vocab, canvas_length = config.text_config.vocab_size, config.canvas_length
    canvases = [torch.randint(vocab, (batch, canvas_length), generator=generator) for _ in range(2)]
    sc_logits = 3 * torch.randn(batch, canvas_length, vocab, generator=generator)

    with torch.no_grad():
        got = _forward_steps(ours, config, input_ids, attention_mask, canvases, sc_logits)
        want = _forward_steps(upstream, config, input_ids, attention_mask, canvases, sc_logits)
    for name, a, b in zip(("prefill logits", "encoder hidden", "cache keys", "step", "step+sc"), got, want):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert _max_diff(a, b) <= 1e-5, name
    # The comparison is not vacuous: self-conditioning changes the logits.
    assert _max_diff(got[3], got[4]) > 1e-3


def _generate_both(ours, upstream, input_ids, seed, **kwargs):
    outputs = []
    for model in (ours, upstream):
        torch.manual_seed(seed)
        outputs.append(model.generate(input_ids, **kwargs))
    return outputs


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_matches_upstream_over_several_canvases(variant, batch, tokenizer):
    config = variant_config(variant)
    ours, upstream = build_pair(config, tokenizer, seed=10 + batch)
    input_ids, attention_mask = left_padded_batch(tokenizer, PROMPTS[:batch])
    canvases = 3
    got, want = _generate_both(
        ours,
        upstream,
        input_ids,
        seed=99,
        attention_mask=attention_mask,
        max_new_tokens=canvases * config.canvas_length,
        max_denoising_steps=4,
        eos_token_id=None,  # random weights may sample eos early; this test wants every canvas
    )
    assert got.sequences.shape == (batch, input_ids.shape[1] + canvases * config.canvas_length)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.tokens_per_forward, want.tokens_per_forward)
    assert (got.tokens_per_forward >= config.canvas_length / 4).all()  # at most 4 steps per canvas


def test_generate_matches_upstream_with_eos_and_adaptive_stopping(tokenizer):
    config = variant_config("mha_no_k_eq_v")
    ours, upstream = build_pair(config, tokenizer, seed=3)
    input_ids, attention_mask = left_padded_batch(tokenizer, PROMPTS)
    # eos = the most frequent token ids of a greedy-ish run, so some rows stop early and get padded.
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=6 * config.canvas_length, max_denoising_steps=6)
    probe = _generate_both(ours, upstream, input_ids, seed=5, eos_token_id=None, **kwargs)[0].sequences
    new_tokens = probe[:, input_ids.shape[1] :]
    eos = torch.bincount(new_tokens.flatten()).argmax().item()
    got, want = _generate_both(ours, upstream, input_ids, seed=5, eos_token_id=[eos], pad_token_id=0, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.tokens_per_forward, want.tokens_per_forward)
    assert got.sequences.shape[1] < probe.shape[1] or (got.sequences[:, input_ids.shape[1] :] == 0).any()


def test_generate_with_given_starting_canvas_matches_upstream(tokenizer):
    config = variant_config("default")
    ours, upstream = build_pair(config, tokenizer, seed=4)
    input_ids, _ = left_padded_batch(tokenizer, PROMPTS[:1])
    generator = torch.Generator().manual_seed(1)
    canvas = torch.randint(config.text_config.vocab_size, (1, config.canvas_length), generator=generator)
    kwargs = dict(max_new_tokens=2 * config.canvas_length, max_denoising_steps=1, eos_token_id=None)
    got, want = _generate_both(ours, upstream, input_ids, seed=8, decoder_input_ids=canvas, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    without_canvas = _generate_both(ours, upstream, input_ids, seed=8, **kwargs)[0]
    # With one step per canvas, the given canvas decides the first canvas's input: results must differ.
    assert not torch.equal(got.sequences, without_canvas.sequences)
