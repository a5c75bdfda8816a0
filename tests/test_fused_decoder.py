"""The fused decoder layer (fused_decoder.py) computes upstream's decoder layer."""

import pytest
import torch
from transformers import StaticCache
from transformers.models.diffusion_gemma import modeling_diffusion_gemma as upstream

from conftest import TINY_VARIANTS, build_pair, left_padded_batch, variant_config
from dgemma_hf.fused_decoder import FusedDecoderLayer


def _decoder_inputs(model, config, tokenizer, batch, seed):
    """Encoder prefill into a static cache, then the decoder's per-layer inputs for a random canvas."""
    prompts = ["Why is the sky blue?", "Tom has 3 apples and buys 5 more.", "Hi"][:batch]
    input_ids, attention_mask = left_padded_batch(tokenizer, prompts)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    length = config.canvas_length
    cache = StaticCache(config=config.get_text_config(decoder=True), max_cache_len=input_ids.shape[1] + length)
    model.model.encoder(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                        position_ids=torch.arange(input_ids.shape[1], device=device)[None])
    generator = torch.Generator().manual_seed(seed)
    canvas = torch.randint(config.text_config.vocab_size, (batch, length), generator=generator).to(device)
    decoder = model.model.decoder
    hidden = decoder.embed_tokens(canvas)
    hidden = hidden + 0.5 * torch.randn(hidden.shape, generator=generator).to(hidden)
    positions = torch.arange(input_ids.shape[1], input_ids.shape[1] + length, device=device)[None]
    masks = decoder.create_diffusion_decoder_attention_mask(
        config=model.config, inputs_embeds=hidden, past_key_values=cache,
        decoder_attention_mask=torch.nn.functional.pad(attention_mask, (0, length), value=True).bool(),
    )
    rotary = {kind: decoder.rotary_emb(hidden, positions, kind) for kind in decoder.unique_layer_types}
    return hidden, cache, masks, rotary, positions


def _layer_kwargs(config, index, cache, masks, rotary, positions):
    kind = config.text_config.layer_types[index]
    return dict(position_embeddings=rotary[kind], attention_mask=masks[kind], position_ids=positions,
                past_key_values=cache)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_fused_layers_equal_upstream_layers_exactly(variant, tokenizer):
    """On the CPU the regions run eagerly: the same ops as upstream's forward, so identical bits (fp32)."""
    config = variant_config(variant)
    model = build_pair(config, tokenizer, seed=3)[0]
    assert all(type(layer) is FusedDecoderLayer for layer in model.model.decoder.layers)
    with torch.no_grad():
        hidden, cache, masks, rotary, positions = _decoder_inputs(model, config, tokenizer, batch=3, seed=1)
        for index, layer in enumerate(model.model.decoder.layers):
            kwargs = _layer_kwargs(config, index, cache, masks, rotary, positions)
            got = layer(hidden, **kwargs)
            want = upstream.DiffusionGemmaDecoderTextLayer.forward(layer, hidden.clone(), **kwargs)
            assert torch.equal(got, want), f"layer {index}"
            hidden = got


def test_training_takes_upstreams_forward(tokenizer):
    """With gradients on, the layer is upstream's (checkpointing, hooks): gradients reach every weight used."""
    config = variant_config("default")
    model = build_pair(config, tokenizer, seed=4)[0].train()
    hidden, cache, masks, rotary, positions = _decoder_inputs(model, config, tokenizer, batch=2, seed=2)
    layer = model.model.decoder.layers[0]
    out = layer(hidden.detach().requires_grad_(), **_layer_kwargs(config, 0, cache, masks, rotary, positions))
    out.square().mean().backward()
    assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layer.router.proj.weight.grad.abs().sum() > 0


@pytest.mark.gpu
def test_compiled_regions_match_eager_regions_on_cuda(tokenizer):
    """On CUDA the regions are compiled (inductor fuses, so bf16 roundings differ): close to the eager layer,
    and each region compiles once per attention type, not once per layer."""
    torch._dynamo.reset()
    config = variant_config("mha_no_k_eq_v")
    model = build_pair(config, tokenizer, seed=6)[0].to("cuda", torch.bfloat16)
    with torch.no_grad():
        hidden, cache, masks, rotary, positions = _decoder_inputs(model, config, tokenizer, batch=2, seed=3)
        for index, layer in enumerate(model.model.decoder.layers):
            kwargs = _layer_kwargs(config, index, cache, masks, rotary, positions)
            got = layer(hidden, **kwargs).float()
            want = upstream.DiffusionGemmaDecoderTextLayer.forward(layer, hidden.clone(), **kwargs).float()
            assert ((got - want).norm() / want.norm()).item() < 2e-2, f"layer {index}"
    from torch._dynamo.utils import counters

    # Three regions, all compiled; the attention-input region differs between sliding and full layers.
    assert 3 <= counters["stats"]["unique_graphs"] <= 4


def test_upstream_decoder_layers_context_restores_the_fused_layers(tokenizer):
    from dgemma_hf.fused_decoder import upstream_decoder_layers

    model = build_pair(variant_config("default"), tokenizer)[0]
    with upstream_decoder_layers(model):
        assert all(type(layer) is upstream.DiffusionGemmaDecoderTextLayer for layer in model.model.decoder.layers)
    assert all(type(layer) is FusedDecoderLayer for layer in model.model.decoder.layers)
