"""The fused text layers (fused_layers.py) compute upstream's layers."""

import pytest
import torch
import torch.nn.functional as F
from transformers import StaticCache
from transformers.models.diffusion_gemma import modeling_diffusion_gemma as upstream

from conftest import TINY_VARIANTS, build_pair, left_padded_batch, variant_config
from dgemma_hf import fused_layers
from dgemma_hf.fused_layers import FusedDecoderLayer, FusedEncoderLayer


@pytest.fixture
def region_calls(monkeypatch):
    """Counts the fused forwards that run (one feed_forward region per fused layer call)."""
    calls = []
    original = fused_layers.feed_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_layers, "feed_forward", counted)
    return calls


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


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_fused_layers_equal_upstream_layers_exactly(variant, packed, tokenizer, region_calls):
    """On the CPU the regions run eagerly: the same ops as upstream's forward, so identical bits (fp32), whether
    the q/k/v and gate/up weights are packed (one GEMM a group) or not."""
    config = variant_config(variant)
    model = build_pair(config, tokenizer, seed=3)[0]
    assert all(type(layer) is FusedDecoderLayer for layer in model.model.decoder.layers)
    if packed:
        fused_layers.pack_projections(model)
    with torch.no_grad():
        for layer in model.model.decoder.layers:  # what the regions get: one tensor per group when packed
            grouped = fused_layers.fused_projections(layer, torch.zeros(1), {})
            assert len(grouped["qkv"]) == (1 if packed else len(grouped["qkv_sizes"]))
            assert len(grouped["gate_up"]) == (1 if packed else 2)
    with torch.no_grad():
        hidden, cache, masks, rotary, positions = _decoder_inputs(model, config, tokenizer, batch=3, seed=1)
        for index, layer in enumerate(model.model.decoder.layers):
            kwargs = _layer_kwargs(config, index, cache, masks, rotary, positions)
            got = layer(hidden, **kwargs)
            # Upstream's layer forward; both read the cache through the layer's DecoderAttention.
            want = upstream.DiffusionGemmaDecoderTextLayer.forward(layer, hidden.clone(), **kwargs)
            assert torch.equal(got, want), f"layer {index}"
            hidden = got
    assert len(region_calls) == len(model.model.decoder.layers)  # the fused path ran, once per layer


def test_training_takes_upstreams_forward(tokenizer, region_calls):
    """With gradients on, the layer is upstream's (checkpointing, hooks): gradients reach every weight used."""
    config = variant_config("default")
    model = build_pair(config, tokenizer, seed=4)[0].train()
    hidden, cache, masks, rotary, positions = _decoder_inputs(model, config, tokenizer, batch=2, seed=2)
    layer = model.model.decoder.layers[0]
    out = layer(hidden.detach().requires_grad_(), **_layer_kwargs(config, 0, cache, masks, rotary, positions))
    out.square().mean().backward()
    assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layer.router.proj.weight.grad.abs().sum() > 0
    assert not region_calls


def _decoder_logits(model, tokenizer, **kwargs):
    from transformers import DynamicCache

    config = model.config
    input_ids, attention_mask = left_padded_batch(tokenizer, ["Why is the sky blue?", "Hi"])
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    canvas = torch.randint(config.text_config.vocab_size, (2, config.canvas_length),
                           generator=torch.Generator().manual_seed(2))
    mask = torch.nn.functional.pad(attention_mask, (0, config.canvas_length), value=1)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, decoder_input_ids=canvas,
              decoder_attention_mask=mask)
        return model(past_key_values=cache, decoder_input_ids=canvas, decoder_attention_mask=mask, **kwargs)


def test_hooks_and_wrapped_projections_take_upstreams_forward(tokenizer, region_calls):
    """The regions call F.linear on the weights: a hook on a submodule, or a LoRA-wrapped projection, would be
    skipped, so such layers run upstream's forward, and the hook fires / the adapter acts."""
    from peft import LoraConfig, get_peft_model

    config = variant_config("default")
    ours, upstream_model = build_pair(config, tokenizer, seed=8)
    fired = []
    ours.model.decoder.layers[0].mlp.register_forward_hook(lambda module, args, output: fired.append(1))
    got = _decoder_logits(ours, tokenizer).logits
    # Two decoder passes (prefill, step): the hooked layer took upstream's forward in both, the others fused.
    assert len(fired) == 2 and len(region_calls) == 2 * (len(ours.model.decoder.layers) - 1)
    assert (got - _decoder_logits(upstream_model, tokenizer).logits).abs().max().item() < 1e-5

    region_calls.clear()
    targets = r".*(language_model|decoder)\.layers\.\d+\.(self_attn\.q_proj|mlp\.gate_proj)"
    lora = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    peft_ours = get_peft_model(build_pair(config, tokenizer, seed=8)[0], lora).eval()
    peft_upstream = get_peft_model(build_pair(config, tokenizer, seed=8)[1], lora).eval()
    peft_upstream.load_state_dict(peft_ours.state_dict())
    got = _decoder_logits(peft_ours, tokenizer).logits
    assert not region_calls
    assert (got - _decoder_logits(peft_upstream, tokenizer).logits).abs().max().item() < 1e-5



def test_a_projection_with_its_own_forward_takes_upstreams_forward(tokenizer, region_calls):
    """A projection whose instance forward was replaced (tensor parallelism computes a slice of its rows) is not
    the F.linear of its weight the regions would compute: that layer runs upstream's forward, which calls it."""
    config = variant_config("default")
    ours, upstream_model = build_pair(config, tokenizer, seed=8)
    up_proj = ours.model.decoder.layers[0].mlp.up_proj
    calls = []

    def forward(x):  # the same function, through the instance attribute
        calls.append(1)
        return F.linear(x, up_proj.weight)

    up_proj.forward = forward
    got = _decoder_logits(ours, tokenizer).logits
    assert len(calls) == 2 and len(region_calls) == 2 * (len(ours.model.decoder.layers) - 1)
    assert (got - _decoder_logits(upstream_model, tokenizer).logits).abs().max().item() < 1e-5

def test_recording_router_logits_takes_upstreams_forward(tokenizer, region_calls):
    model = build_pair(variant_config("default"), tokenizer, seed=9)[0]
    decoder = model.model.decoder
    from transformers import DynamicCache

    config = model.config
    input_ids, attention_mask = left_padded_batch(tokenizer, ["Why is the sky blue?"])
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    canvas = torch.randint(config.text_config.vocab_size, (1, config.canvas_length))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, decoder_input_ids=canvas)
        region_calls.clear()
        out = decoder(decoder_input_ids=canvas, past_key_values=cache, output_router_logits=True)
    assert len(out.router_logits) == len(decoder.layers) and not region_calls
    with torch.no_grad():
        decoder(decoder_input_ids=canvas, past_key_values=cache)
    assert len(region_calls) == len(decoder.layers)  # not recording: fused again


@pytest.mark.gpu
def test_a_region_compiles_past_dynamos_default_limit_and_leaves_it_as_it_was():
    """A process serving several batch sizes and models needs more than dynamo's 8 graphs per function: a region
    keeps compiling (not falling back to eager) up to its own limit, and the global limit is untouched."""
    from torch._dynamo.utils import counters

    def double_plus_one(x):
        return x * 2 + 1

    limit = torch._dynamo.config.recompile_limit
    region = fused_layers.compiled_region(double_plus_one, torch.device("cuda"))
    counters.clear()
    for size in range(1, limit + 4):
        x = torch.arange(size, device="cuda", dtype=torch.float32)
        assert torch.equal(region(x), x * 2 + 1)
    assert counters["stats"]["unique_graphs"] == limit + 3
    assert torch._dynamo.config.recompile_limit == limit


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_compiled_regions_match_eager_regions_on_cuda(packed, tokenizer):
    """On CUDA the regions are compiled (inductor fuses, so bf16 roundings differ): close to the eager layer,
    and each region compiles once per attention type, not once per layer."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # graphs compiled by earlier tests in this process do not count
    config = variant_config("mha_no_k_eq_v")
    model = build_pair(config, tokenizer, seed=6)[0].to("cuda", torch.bfloat16)
    if packed:
        fused_layers.pack_projections(model)
    with torch.no_grad():
        hidden, cache, masks, rotary, positions = _decoder_inputs(model, config, tokenizer, batch=2, seed=3)
        for index, layer in enumerate(model.model.decoder.layers):
            kwargs = _layer_kwargs(config, index, cache, masks, rotary, positions)
            got = layer(hidden, **kwargs).float()
            want = upstream.DiffusionGemmaDecoderTextLayer.forward(layer, hidden.clone(), **kwargs).float()
            assert ((got - want).norm() / want.norm()).item() < 2e-2, f"layer {index}"
    # Three regions, all compiled; the attention-input region differs between sliding and full layers.
    assert 3 <= counters["stats"]["unique_graphs"] <= 4


def test_upstream_layers_context_restores_the_fused_layers(tokenizer):
    from dgemma_hf.fused_layers import upstream_layers

    model = build_pair(variant_config("default"), tokenizer)[0]
    with upstream_layers(model):
        assert all(type(layer) is upstream.DiffusionGemmaDecoderTextLayer for layer in model.model.decoder.layers)
    assert all(type(layer) is FusedDecoderLayer for layer in model.model.decoder.layers)


@pytest.mark.parametrize("prompts", [["Hi", "Tom"], ["Why is the sky blue?", "Hi"]])
def test_decoder_reads_a_static_cache_in_place_with_upstreams_values(prompts, tokenizer):
    """Upstream's append_to_cache copies the whole static cache into new tensors every step; DecoderAttention
    writes the canvas into the cache's (padded) buffers and returns them: the same values, every layer, over two
    steps, including a sliding layer whose window the canvas runs past (short prompt) and one already filled
    past the window by the prompt (long prompt; read the DynamicCache way, see the next test)."""
    config = variant_config("mha_no_k_eq_v")  # window 8, canvas 8, sliding and global layers
    model = build_pair(config, tokenizer, seed=21)[0]
    input_ids, attention_mask = left_padded_batch(tokenizer, prompts)
    length, canvas_length = input_ids.shape[1], config.canvas_length
    cache = StaticCache(config=config.get_text_config(decoder=True), max_cache_len=length + 2 * canvas_length)
    with torch.no_grad():
        model.model.encoder(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                            position_ids=torch.arange(length)[None])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    generator = torch.Generator().manual_seed(5)
    in_place = 0
    for step in range(2):
        for index, layer in enumerate(model.model.decoder.layers):
            attention = layer.self_attn
            heads = cache.layers[index].keys.shape[1]
            shape = (2, heads, canvas_length, cache.layers[index].keys.shape[-1])
            key, value = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
            want = upstream.DiffusionGemmaDecoderTextAttention.append_to_cache(attention, cache, key, value)
            got = attention.append_to_cache(cache, key, value)
            if not fused_layers.full_sliding_window(cache.layers[index]):  # (a full window: the test below)
                assert all(torch.equal(g, w) for g, w in zip(got, want)), f"step {step}, layer {index}"
                assert got[0].data_ptr() == cache.layers[index].keys.data_ptr()  # the cache's memory, no copy
                in_place += 1
            # Only the canvas's columns of the cache were written (the commit pass fills them next).
            start = cache.layers[index].cumulative_length.item()
            for now, then in zip((cache.layers[index].keys, cache.layers[index].values), before[index]):
                assert torch.equal(now[:, :, :start], then[:, :, :start])
    assert in_place >= len(model.model.decoder.layers)  # the global layers at least, both steps
    # Keys that need gradients take upstream's out-of-place version (backward keeps what it saved).
    layer = next(i for i, cache_layer in enumerate(cache.layers) if not fused_layers.full_sliding_window(cache_layer))
    shape = (2, *cache.layers[layer].keys.shape[1:2], canvas_length, cache.layers[layer].keys.shape[-1])
    key = torch.randn(shape, generator=generator).requires_grad_()
    got = model.model.decoder.layers[layer].self_attn.append_to_cache(cache, key, key)
    assert got[0].data_ptr() != cache.layers[layer].keys.data_ptr() and got[0].requires_grad


@pytest.mark.parametrize("variant", ["default", "mha_no_k_eq_v"])
def test_a_full_sliding_window_static_cache_reads_like_a_dynamic_cache(variant, tokenizer):
    """Prompts longer than the sliding window (16 and 8 here): upstream's decoder over a StaticCache writes the
    canvas over the latest prefix tokens; DecoderAttention reads the window as a DynamicCache presents it, so one
    decoder step's logits agree (left-padded batch)."""
    from transformers import DynamicCache

    config = variant_config(variant)
    model = build_pair(config, tokenizer, seed=12)[0]
    input_ids, attention_mask = left_padded_batch(
        tokenizer, ["The river runs past the old mill, under the stone bridge", "Hi there, how is it going today"])
    length, canvas_length = input_ids.shape[1], config.canvas_length
    assert length > config.text_config.sliding_window
    canvas = torch.randint(config.text_config.vocab_size, (2, canvas_length),
                           generator=torch.Generator().manual_seed(0))
    decoder_mask = torch.nn.functional.pad(attention_mask.bool(), (0, canvas_length), value=True)

    def step_logits(cache):
        with torch.no_grad():
            ids, masks = model._prepare_encoder_inputs(
                input_ids=input_ids, attention_mask=attention_mask.bool(),
                encoder_position_ids=torch.arange(length)[None],
                past_key_values=cache, is_prefill=True, canvas_length=canvas_length, batch_size=2)
            model.model.encoder(input_ids=ids, attention_mask=masks, past_key_values=cache,
                                position_ids=torch.arange(length)[None])
            mask_mapping = model.model.decoder.create_diffusion_decoder_attention_mask(
                config=model.config, inputs_embeds=canvas.unsqueeze(-1), past_key_values=cache,
                decoder_attention_mask=decoder_mask)
            return model(past_key_values=cache, decoder_input_ids=canvas, decoder_attention_mask=mask_mapping,
                         decoder_position_ids=torch.arange(length, length + canvas_length)[None]).logits

    text_config = config.get_text_config(decoder=True)
    dynamic = step_logits(DynamicCache(config=text_config))
    static = lambda: StaticCache(config=text_config, max_cache_len=length + 2 * canvas_length)  # noqa: E731
    assert (step_logits(static()) - dynamic).abs().max().item() < 1e-5
    with fused_layers.upstream_layers(model):  # upstream as it ships overwrites the window's tail
        assert (step_logits(static()) - dynamic).abs().max().item() > 0.1


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_encoder_commits_are_fused_and_equal_upstream_exactly(variant, tokenizer, region_calls):
    """A canvas commit (canvas_length tokens) runs the encoder's fused layers, bit-identical to upstream's on the
    CPU; a prompt of another length takes upstream's forward (no compilation per prompt length)."""
    from transformers import DynamicCache

    config = variant_config(variant)
    ours, upstream_model = build_pair(config, tokenizer, seed=13)
    assert all(type(layer) is FusedEncoderLayer for layer in ours.model.encoder.language_model.layers)
    input_ids, attention_mask = left_padded_batch(
        tokenizer, ["The river runs past the old mill, under the stone bridge", "Tom has 3 apples."])
    length, canvas_length = input_ids.shape[1], config.canvas_length
    assert length != canvas_length
    canvas = torch.randint(config.text_config.vocab_size, (2, canvas_length),
                           generator=torch.Generator().manual_seed(1))
    mask = torch.nn.functional.pad(attention_mask.bool(), (0, canvas_length), value=True)
    states, counts = [], []
    for model in (ours, upstream_model):
        cache = DynamicCache(config=config.get_text_config(decoder=True))
        with torch.no_grad():
            region_calls.clear()
            for ids, attention, positions in ((input_ids, attention_mask.bool(), torch.arange(length)),
                                               (canvas, mask, torch.arange(length, length + canvas_length))):
                ids, masks = model._prepare_encoder_inputs(
                    input_ids=ids, attention_mask=attention, encoder_position_ids=positions[None],
                    past_key_values=cache, is_prefill=True, canvas_length=canvas_length, batch_size=2)
                hidden = model.model.encoder(input_ids=ids, attention_mask=masks, past_key_values=cache,
                                             position_ids=positions[None]).last_hidden_state
                counts.append(len(region_calls))
        states.append((hidden, [layer.keys for layer in cache.layers]))
    assert torch.equal(states[0][0], states[1][0])
    assert all(torch.equal(a, b) for a, b in zip(states[0][1], states[1][1]))
    layers = len(ours.model.encoder.language_model.layers)
    assert counts == [0, layers, 0, 0]  # ours: prompt upstream's way, commit fused; upstream: never fused


def _group_weights(model):
    """Every text layer's q/k/v and gate/up weight parameters, per group."""
    groups = []
    for layer in [*model.model.encoder.language_model.layers, *model.model.decoder.layers]:
        attn, mlp = layer.self_attn, layer.mlp
        groups.append([linear.weight for linear in (attn.q_proj, attn.k_proj, attn.v_proj) if linear is not None])
        groups.append([mlp.gate_proj.weight, mlp.up_proj.weight])
    return groups


@pytest.mark.parametrize("variant", ["default", "mha_no_k_eq_v"])
def test_packing_keeps_parameters_values_ties_and_checkpoints(variant, tokenizer, tmp_path):
    """pack_projections moves storage only: the same parameter objects (encoder and decoder still share them)
    with the same values, one tensor per group; save_pretrained writes them as separate tensors that load back
    equal; a dtype change unpacks (the regions then run the GEMMs one by one) and packing again works."""
    config = variant_config(variant)
    model = build_pair(config, tokenizer, seed=5)[0]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    groups = _group_weights(model)
    assert all(fused_layers.packed_weight(group) is None for group in groups)
    fused_layers.pack_projections(model)
    fused_layers.pack_projections(model)  # already packed: nothing moves
    assert [[id(weight) for weight in group] for group in _group_weights(model)] == [
        [id(weight) for weight in group] for group in groups]
    assert all(fused_layers.packed_weight(group) is not None for group in groups)
    encoder, decoder = model.model.encoder.language_model.layers[0], model.model.decoder.layers[0]
    assert encoder.self_attn.q_proj.weight is decoder.self_attn.q_proj.weight
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert all(torch.equal(tensor, state[name]) for name, tensor in loaded.state_dict().items())

    model.to(torch.bfloat16)
    assert all(fused_layers.packed_weight(group) is None for group in _group_weights(model))
    with torch.no_grad():
        hidden, cache, masks, rotary, positions = _decoder_inputs(model, config, tokenizer, batch=2, seed=2)
        separate = model.model.decoder.layers[0](hidden, **_layer_kwargs(config, 0, cache, masks, rotary, positions))
        fused_layers.pack_projections(model)
        assert all(fused_layers.packed_weight(group) is not None for group in _group_weights(model))
        packed = model.model.decoder.layers[0](hidden, **_layer_kwargs(config, 0, cache, masks, rotary, positions))
    assert packed.dtype == torch.bfloat16 and torch.equal(packed, separate)


def test_generate_packs_the_projections(tokenizer):
    """The engine packs the groups before it runs (and before any graph captures the weights' addresses); when a
    later engine has to pack again (the weights were replaced), the kept engine, whose graphs would hold the old
    addresses, is dropped."""
    model = build_pair(variant_config("default"), tokenizer, seed=2)[0]
    input_ids, attention_mask = left_padded_batch(tokenizer, ["Hi"])
    model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, sampling="fused", seed=0)
    assert all(fused_layers.packed_weight(group) is not None for group in _group_weights(model))
    assert model._dgemma_engine is not None
    model.load_state_dict({name: tensor.clone() for name, tensor in model.state_dict().items()}, assign=True)
    assert all(fused_layers.packed_weight(group) is None for group in _group_weights(model))
    model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, sampling="reference")
    assert all(fused_layers.packed_weight(group) is not None for group in _group_weights(model))
    assert model._dgemma_engine is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [256, 6])
def test_copy_rows_equals_index_copy(dtype, head_dim):
    """The canvas's keys/values written into a padded cache buffer (as the decoder does, from the region's transposed
    output) as 8-byte words, or element by element where the head dim does not split into words: the same bits as
    index_copy_, NaN payloads and negative zeros included."""
    generator = torch.Generator().manual_seed(head_dim)
    whole = torch.randn(2, 3, 50, head_dim, generator=generator).to(dtype)  # a padded buffer: cache + canvas
    src = torch.randn(2, 9, 3, head_dim, generator=generator).to(dtype).transpose(1, 2)
    src[0, 0, 0, :2] = torch.tensor([float("nan"), -0.0])
    want = whole.clone().index_copy_(2, torch.arange(9) + 31, src)
    fused_layers.copy_rows(whole, torch.arange(9) + 31, src)
    assert torch.equal(whole.view(torch.uint8), want.view(torch.uint8))
    words = fused_layers.as_words(whole, src)[0]  # whole words where the rows hold them (all but bf16/fp16 x 6)
    assert words.dtype == (torch.int64 if head_dim * whole.element_size() % 8 == 0 else dtype)


def test_packing_leaves_tensor_subclass_weights_alone(tokenizer):
    """Weights that are tensor subclasses (torchao's quantized ones are) have no storage to view: packing skips
    their group (the regions then run its GEMMs one by one) and packs the others."""
    from torch.testing._internal.two_tensor import TwoTensor

    model = build_pair(variant_config("default"), tokenizer, seed=4)[0]
    attn = model.model.decoder.layers[0].self_attn
    weight = attn.q_proj.weight.detach()
    attn.q_proj.weight = torch.nn.Parameter(TwoTensor(weight, weight.clone()), requires_grad=False)
    assert fused_layers.pack_projections(model)
    for group in _group_weights(model):
        holds_subclass = any(weight is attn.q_proj.weight for weight in group)
        assert (fused_layers.packed_weight(group) is None) == holds_subclass
    assert not fused_layers.pack_projections(model)  # nothing left to move
