"""The generation engine: fused sampler, acceptance/stop rules against upstream's, the fused mode end to end."""


import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    StableAndConfidentStoppingCriteria,
)

from conftest import build_pair, left_padded_batch, variant_config
from dgemma_hf.generation import engine as engine_module
from dgemma_hf.generation.stopping import stable_and_confident
from dgemma_hf.kernels.sampler import combine_partials, sample_tokens, token_partials

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _scalars(inv_temperature, seed, counter):
    return (torch.tensor([inv_temperature], device=DEVICE), torch.tensor([seed], device=DEVICE),
            torch.tensor([counter], device=DEVICE))


@pytest.mark.parametrize("rows, vocab, block_v", [(5, 1000, 256), (3, 4096, 1024), (7, 300, 512)])
def test_sampler_exact_statistics(rows, vocab, block_v):
    generator = torch.Generator().manual_seed(rows * vocab)
    logits = (4 * torch.randn(rows, vocab, generator=generator)).to(DEVICE)
    logits[0, 17] = logits[0, vocab - 3] = logits[0].max() + 1  # a tie: the first index wins
    stats = sample_tokens(logits, *_scalars(1 / 0.7, 1, 0), block_v=block_v)
    x = (logits / 0.7).double().cpu()
    assert stats.argmax.tolist() == x.argmax(-1).tolist()
    assert stats.argmax[0].item() == 17
    entropy = torch.distributions.Categorical(logits=x).entropy()
    assert torch.allclose(stats.entropy.cpu().double(), entropy, atol=1e-4)
    assert torch.allclose(stats.max_prob.cpu().double(), x.softmax(-1).max(-1).values, atol=1e-5)
    assert torch.allclose(stats.log_norm.cpu().double(), torch.logsumexp(x, -1), atol=1e-4)
    assert ((0 <= stats.sampled) & (stats.sampled < vocab)).all() and ((0 <= stats.noise) & (stats.noise < vocab)).all()


def test_sampler_frequencies_match_softmax_chi_square():
    """Gumbel-max samples follow softmax(logits * inv_temperature): chi-square over 800 draws (one per row;
    rows are slow in the CPU interpreter)."""
    vocab, rows = 5, 800
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 1.5
    stats = sample_tokens(logits.repeat(rows, 1).to(DEVICE), *_scalars(1 / 0.8, 1234, 5), block_v=8)
    observed = torch.bincount(stats.sampled.cpu(), minlength=vocab).double()
    expected = (logits / 0.8).double().softmax(-1) * rows
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.47  # 4 degrees of freedom, p = 0.001
    noise = torch.bincount(stats.noise.cpu(), minlength=vocab).double()
    assert ((noise - rows / vocab) ** 2 / (rows / vocab)).sum().item() < 18.47  # renoise tokens: uniform


def test_sampler_is_counter_based():
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    a = sample_tokens(logits, *_scalars(1.0, 7, 3))
    torch.randn(10)  # other RNG use in between changes nothing
    b = sample_tokens(logits, *_scalars(1.0, 7, 3))
    c = sample_tokens(logits, *_scalars(1.0, 7, 4))
    assert torch.equal(a.sampled, b.sampled) and torch.equal(a.noise, b.noise)
    assert not torch.equal(a.sampled, c.sampled)


def test_sampler_split_and_block_size_change_nothing():
    """A token's random number depends on (seed, stream, token) only and slices merge exactly: any split of the
    vocabulary over programs and any block size give the same tokens, and the same statistics up to rounding. The
    vocabulary is no multiple of the blocks and holds filtered (-inf) tokens, whole blocks of them in row 2."""
    generator = torch.Generator().manual_seed(8)
    rows, vocab = 6, 1000
    logits = 3 * torch.randn(rows, vocab, generator=generator)
    logits[torch.rand(rows, vocab, generator=generator) < 0.3] = float("-inf")
    logits[2, 100:700] = float("-inf")
    lone = torch.randint(0, vocab, (), generator=generator).item()
    logits[1] = float("-inf")
    logits[1, lone] = -7.0  # the only token left: always drawn
    logits = logits.to(DEVICE)
    scalars = _scalars(1.25, 11, 2)
    whole = sample_tokens(logits, *scalars, block_v=1024, splits=1)
    for block_v, splits in [(64, None), (128, 3), (16, 64)]:
        split = sample_tokens(logits, *scalars, block_v=block_v, splits=splits)
        for name in ("sampled", "argmax", "noise"):
            assert torch.equal(getattr(split, name), getattr(whole, name)), (name, block_v, splits)
        # On CUDA exp2 and log2 are the approximate instructions; slices round their sums differently.
        tolerance = 1e-6 if DEVICE == "cpu" else 1e-5
        for name in ("entropy", "max_prob", "log_norm"):
            torch.testing.assert_close(getattr(split, name), getattr(whole, name), rtol=tolerance, atol=tolerance)
    x = (logits * 1.25).double().cpu()
    assert torch.isfinite(x.gather(1, whole.sampled.cpu()[:, None])).all()  # never a filtered token
    assert whole.sampled[1].item() == whole.argmax[1].item() == lone and abs(whole.max_prob[1].item() - 1.0) < 1e-6
    assert whole.argmax.tolist() == x.argmax(-1).tolist()
    entropy = torch.distributions.Categorical(logits=x).entropy()
    assert torch.allclose(whole.entropy.cpu().double(), entropy, atol=1e-4)
    assert torch.allclose(whole.log_norm.cpu().double(), torch.logsumexp(x, -1), atol=1e-4)


@pytest.mark.parametrize("ranges, rows, seeds", [
    ((0, 500, 1000), 5, 1),
    ((0, 8, 16, 1000), 5, 5),
    ((0, 992, 1000), 5, 1),
    ((0, 256, 512, 768, 1024), 36, 4),  # several merging programs (32 rows each), a seed per 9 rows
])
def test_sampler_over_vocabulary_ranges_equals_whole_rows(ranges, rows, seeds):
    """The split-vocabulary road: `token_partials` on consecutive column ranges (each rank's, with its offset),
    stacked and merged by `combine_partials`, gives the tokens of one pass over whole rows, the statistics up to
    rounding; a range of filtered tokens only (row 2 in the first case) contributes nothing."""
    generator = torch.Generator().manual_seed(len(ranges))
    vocab = ranges[-1]
    logits = 3 * torch.randn(rows, vocab, generator=generator)
    logits[torch.rand(rows, vocab, generator=generator) < 0.2] = float("-inf")
    logits[2, :500] = float("-inf")
    logits = logits.to(DEVICE)
    inv_temperature, _, counter = _scalars(1.4, 0, 9)
    scalars = (inv_temperature, torch.randint(0, 2**40, (seeds,), generator=generator).to(DEVICE), counter)
    whole = sample_tokens(logits, *scalars, block_v=64)
    # Every range yields the same number of slices, as ranks of equal shares do.
    parts = [token_partials(logits[:, a:b].contiguous(), *scalars, vocab_offset=a, block_v=4, splits=2)
             for a, b in zip(ranges, ranges[1:])]
    merged = combine_partials(torch.stack(parts), *scalars, vocab)
    for name in ("sampled", "argmax", "noise"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    # On CUDA exp2 and log2 are the approximate instructions: 4-token blocks rescale their sums many more times
    # than 64-token ones (an H200 differed by up to 8.6e-5).
    tolerance = 1e-5 if DEVICE == "cpu" else 2e-4
    for name in ("entropy", "max_prob", "log_norm"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="vocab_offset must be a multiple of 4"):
        token_partials(logits[:, 6:], *scalars, vocab_offset=6)
    with pytest.raises(ValueError, match="workspaces must be contiguous"):
        combine_partials(parts[0], *scalars, vocab)
    with pytest.raises(TypeError, match="workspaces must be a float32"):
        combine_partials(torch.stack(parts).double(), *scalars, vocab)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1"):
        combine_partials(torch.stack(parts), *scalars, 0)
    with pytest.raises(ValueError, match=f"must divide the {rows} rows"):
        combine_partials(torch.stack(parts), scalars[0], torch.zeros(rows + 1, dtype=torch.long, device=DEVICE),
                         scalars[2], vocab)


def test_sampler_draws_the_tail_as_often_as_it_should():
    """One token holds half the probability and 4095 others share the rest: those win through the largest Gumbel
    noise of thousands of draws (the generator's tail), together as often as the one token."""
    vocab, rows = 4096, 600
    generator = torch.Generator().manual_seed(9)
    heavy = torch.randint(0, vocab, (), generator=generator).item()
    logits = torch.zeros(rows, vocab)
    logits[:, heavy] = torch.tensor(vocab - 1.0).log()
    stats = sample_tokens(logits.to(DEVICE), *_scalars(1.0, torch.randint(0, 2**40, (), generator=generator).item(), 0))
    share = (stats.sampled == heavy).double().mean().item()
    assert abs(share - 0.5) < 4 * (0.25 / rows) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_sampler_softcaps_raw_logits_as_it_reads_them(dtype):
    """With `softcap`, the sampler reads the LM head's raw output (any float dtype) and gives the tokens it gives
    on upstream's softcapped fp32 logits, the statistics up to the tanh's rounding; out-of-range columns of the
    last block stay out (vocabulary no multiple of the block), infinite logits cap like upstream's."""
    generator = torch.Generator().manual_seed(21)
    rows, vocab, cap = 9, 1000, 30.0
    raw = (40 * torch.randn(rows, vocab, generator=generator)).to(dtype)
    raw[3, 5], raw[4, 7] = float("inf"), float("-inf")
    raw = raw.to(DEVICE)
    capped = torch.tanh(raw.float() / cap) * cap
    # At inverse temperature 0.01 the distribution is nearly flat: columns past the vocabulary, were they not
    # masked after the softcap (-cap, not -inf), would weigh like real tokens.
    for inv_temperature in (1 / 0.7, 0.01):
        scalars = _scalars(inv_temperature, 5, 2)
        for block_v, splits in [(256, None), (64, 3)]:
            got = sample_tokens(raw, *scalars, block_v=block_v, splits=splits, softcap=cap)
            want = sample_tokens(capped, *scalars, block_v=block_v, splits=splits)
            for name in ("sampled", "argmax", "noise"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (name, block_v)
            for name in ("entropy", "max_prob", "log_norm"):
                torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
            assert (got.sampled < vocab).all() and got.argmax[3].item() == 5


def test_sampler_checks_inputs():
    logits = torch.randn(2, 10)
    with pytest.raises(TypeError, match="logits must be a float32"):
        sample_tokens(logits.half(), *_scalars(1.0, 0, 0))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        sample_tokens(logits.double(), *_scalars(1.0, 0, 0), softcap=30.0)
    for softcap in (0.0, -1.0, float("inf"), True, "30"):
        with pytest.raises(ValueError, match="softcap must be None or a positive finite number"):
            sample_tokens(logits.to(DEVICE), *_scalars(1.0, 0, 0), softcap=softcap)
    with pytest.raises(TypeError, match="seeds must be a 1-D torch.int64 tensor"):
        sample_tokens(logits.to(DEVICE), torch.tensor([1.0], device=DEVICE), torch.tensor([1.0], device=DEVICE),
                      torch.tensor([0], device=DEVICE))
    for splits in (0, 1025):
        with pytest.raises(ValueError, match=r"splits must be in \[1, 1024\]"):
            sample_tokens(logits.to(DEVICE), *_scalars(1.0, 0, 0), splits=splits)
    with pytest.raises(ValueError, match="block_v must be a power of two"):
        sample_tokens(logits.to(DEVICE), *_scalars(1.0, 0, 0), block_v=48)


@pytest.mark.parametrize("stability", [0, 1, 2])
def test_stop_decisions_match_upstream(stability):
    generator = torch.Generator().manual_seed(stability)
    upstream = StableAndConfidentStoppingCriteria(stability_threshold=stability, confidence_threshold=1.5)
    history = torch.full((max(stability, 1), 4, 6), -1, dtype=torch.long)
    argmax = torch.randint(0, 3, (4, 6), generator=generator)
    for step in range(8):
        if step % 3:  # sometimes repeat the canvas so stability can trigger
            flips = torch.rand(4, 6, generator=generator) < 0.2
            argmax = torch.where(flips, torch.randint(0, 3, (4, 6), generator=generator), argmax)
        logits = torch.randn(4, 6, 9, generator=generator) * (step + 1)
        entropy = torch.distributions.Categorical(logits=logits).entropy()
        want = upstream(argmax.clone(), logits)
        got = stable_and_confident(argmax, entropy, history, stability, 1.5)
        assert torch.equal(got, want), step


def _fused(model, input_ids, **kwargs):
    return model.generate(input_ids, sampling="fused", **kwargs)


def _on_device(model, *tensors):
    return (model.to(DEVICE), *(t.to(DEVICE) for t in tensors))


def test_fused_batch_rows_equal_their_prompts_alone(tokenizer):
    """A sequence's randomness is keyed by its own seed, canvas, step and position: a batch gives each row what its
    prompt gives alone with the same seed (global-attention variant: left padding changes nothing there)."""
    config = variant_config("global_only")
    prompts = ["Why is the sky blue?", "Tom has 3 apples.", "The river runs past the old mill"]
    model, input_ids, attention_mask = _on_device(build_pair(config, tokenizer, seed=6)[0],
                                                  *left_padded_batch(tokenizer, prompts))
    kwargs = dict(sampling="fused", max_new_tokens=2 * config.canvas_length, max_denoising_steps=3,
                  eos_token_id=None)
    batch = model.generate(input_ids, attention_mask=attention_mask, seed=[5, 17, 3], **kwargs)
    for row, (prompt, seed) in enumerate(zip(prompts, [5, 17, 3])):
        alone_ids = tokenizer([prompt], return_tensors="pt")["input_ids"].to(DEVICE)
        alone = model.generate(alone_ids, seed=seed, **kwargs)
        assert torch.equal(batch.sequences[row, input_ids.shape[1]:], alone.sequences[0, alone_ids.shape[1]:]), row
        assert batch.tokens_per_forward[row].item() == alone.tokens_per_forward[0].item()
    shifted = model.generate(input_ids, attention_mask=attention_mask, seed=5, **kwargs)  # rows get 5, 6, 7
    assert torch.equal(shifted.sequences[0], batch.sequences[0])
    assert not torch.equal(shifted.sequences[1], batch.sequences[1])
    with pytest.raises(ValueError, match="must hold 3 integers"):
        model.generate(input_ids, attention_mask=attention_mask, seed=[1, 2], **kwargs)


def test_fused_generate_is_repeatable_and_seeded(tokenizer):
    config = variant_config("default")
    model, input_ids, attention_mask = _on_device(
        build_pair(config, tokenizer, seed=1)[0],
        *left_padded_batch(tokenizer, ["Why is the sky blue?", "Tom has 3 apples."]),
    )
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=2 * config.canvas_length, max_denoising_steps=3,
                  eos_token_id=None)
    a = _fused(model, input_ids, seed=11, **kwargs)
    b = _fused(model, input_ids, seed=11, **kwargs)
    c = _fused(model, input_ids, seed=12, **kwargs)
    assert a.sequences.shape == (2, input_ids.shape[1] + 2 * config.canvas_length)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    assert torch.equal(a.sequences[:, : input_ids.shape[1]], input_ids)


def test_fused_step_logits_and_soft_embedding_equal_upstreams_math(tokenizer, monkeypatch):
    """The fused engine's own road to a step's logits (decoder, LM head; the softcap left to the sampler and the
    soft embedding, or in one region when logits processors need it first) gives upstream's forward's logits (bit
    for bit on the CPU), and its chunked soft embedding, from the raw or the softcapped logits, equals softmax @
    embedding whole, in one chunk (the tiny vocabulary) or in several, the last one partial."""
    config = variant_config("default")
    model, input_ids, attention_mask = _on_device(
        build_pair(config, tokenizer, seed=2)[0], *left_padded_batch(tokenizer, ["Why is the sky blue?", "Hi"]))
    model.generate(input_ids, attention_mask=attention_mask, sampling="fused", seed=3, eos_token_id=None,
                   max_new_tokens=2 * config.canvas_length, max_denoising_steps=2)
    engine = model._dgemma_engine
    cap = model.final_logit_softcapping
    assert engine.read_softcap == cap
    generator = torch.Generator().manual_seed(4)
    engine.canvas.copy_(torch.randint(config.text_config.vocab_size, engine.canvas.shape, generator=generator))
    engine.soft.copy_(torch.randn(engine.soft.shape, generator=generator))
    with torch.no_grad(), engine.self_conditioning_input():
        raw = engine._decoder_logits(engine.position_ids)
        engine.read_softcap = None  # as with logits processors: softcapped in the region
        got = engine._decoder_logits(engine.position_ids)
        want = model(decoder_input_ids=engine.canvas, decoder_attention_mask=engine.mask_mapping,
                     past_key_values=engine.cache, decoder_position_ids=engine.position_ids).logits
    if DEVICE == "cpu":
        assert torch.equal(got, want) and torch.equal(torch.tanh(raw.float() / cap) * cap, want)
    else:  # the softcap region is compiled there (inductor's tanh may round differently in the last bit)
        torch.testing.assert_close(got, want)

    inv_temperature = torch.tensor([0.7], device=DEVICE)
    log_norm = torch.logsumexp(got * inv_temperature, dim=-1).view(-1)
    embed = model.model.decoder.embed_tokens
    whole = (torch.softmax(got * inv_temperature, dim=-1) @ embed.weight.float() * embed.embed_scale).to(embed.weight)
    torch.testing.assert_close(engine._soft_embedding(got, inv_temperature, log_norm), whole)
    engine.read_softcap = cap
    torch.testing.assert_close(engine._soft_embedding(raw, inv_temperature, log_norm), whole)
    # An element budget of 100 probabilities a row with 48-column units: chunks of 96 columns, 6 over 512.
    monkeypatch.setattr(engine_module, "_SOFT_CHUNK", 48)
    monkeypatch.setattr(engine_module, "_SOFT_CHUNK_ELEMENTS", 100 * got.shape[0] * got.shape[1])
    torch.testing.assert_close(engine._soft_embedding(raw, inv_temperature, log_norm), whole)


@pytest.mark.parametrize("sampling", ["reference", "fused"])
def test_rows_that_stop_early_count_fewer_forwards(sampling, tokenizer):
    """A confidence threshold nothing can miss stops every row after one step (stability 0): one decoder pass
    per canvas, in both modes."""
    config = variant_config("mha_no_k_eq_v")
    model, input_ids, attention_mask = _on_device(
        build_pair(config, tokenizer, seed=2)[0],
        *left_padded_batch(tokenizer, ["Why is the sky blue?", "Tom has 3 apples."]),
    )
    out = model.generate(
        input_ids, attention_mask=attention_mask, sampling=sampling, max_new_tokens=3 * config.canvas_length,
        max_denoising_steps=5, stability_threshold=0, confidence_threshold=1e9, eos_token_id=None, seed=3,
    )
    assert out.tokens_per_forward.tolist() == [float(config.canvas_length)] * 2


@pytest.mark.parametrize("sampling", ["reference", "fused"])
def test_finished_sequences_are_padded(sampling, tokenizer):
    config = variant_config("default")
    model, input_ids, attention_mask = _on_device(
        build_pair(config, tokenizer, seed=3)[0],
        *left_padded_batch(tokenizer, ["Why is the sky blue?", "Tom has 3 apples.", "Hi"]),
    )
    kwargs = dict(attention_mask=attention_mask, sampling=sampling, max_new_tokens=4 * config.canvas_length,
                  max_denoising_steps=2, seed=4)
    probe = model.generate(input_ids, eos_token_id=None, **kwargs).sequences[:, input_ids.shape[1]:]
    eos = torch.bincount(probe.flatten()).argmax().item()  # frequent enough that rows finish at different canvases
    out = model.generate(input_ids, eos_token_id=[eos], pad_token_id=0, **kwargs)
    new = out.sequences[:, input_ids.shape[1]:]
    for row in new:
        hits = (row == eos).nonzero().flatten()
        if len(hits):
            assert (row[hits[0] + 1 :] == 0).all()  # everything after the first eos is padding
    assert (out.tokens_per_forward > 0).all()


def test_engine_input_errors(tokenizer, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the CPU model may take the fused path
    config = variant_config("default")
    model = build_pair(config, tokenizer)[0]
    input_ids = tokenizer(["Hi"], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="`sampling` must be one of"):
        model.generate(input_ids, sampling="greedy")
    with pytest.raises(ValueError, match="needs sampling='reference'"):
        model.generate(input_ids, sampling="fused", cache_implementation="dynamic")
    with pytest.raises(ValueError, match="`logits_processor` and `stopping_criteria` are not supported"):
        model.generate(input_ids, logits_processor=[])


def test_fused_sampling_on_cpu_without_interpreter_is_refused(monkeypatch, tokenizer):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = build_pair(variant_config("default"), tokenizer)[0]
    with pytest.raises(ValueError, match="sampling='fused' runs Triton kernels: the model must be on CUDA"):
        model.generate(tokenizer(["Hi"], return_tensors="pt")["input_ids"], sampling="fused")


@pytest.mark.gpu
def test_cuda_graph_replay_computes_the_eager_step(tokenizer):
    """From one engine state, a replay of the captured step and an eager step give the same step (bf16: the
    captured cuBLAS kernels may differ from the eager ones in the last bits, so closeness, not identity)."""
    config = variant_config("default")
    model = build_pair(config, tokenizer, seed=5)[0].to("cuda", torch.bfloat16)
    # Random routers score experts nearly alike, so a last-bit difference flips a token's experts; wide margins
    # keep the comparison about the graph, not about ties.
    for layer in model.model.decoder.layers:
        layer.router.proj.weight.data *= 30
    input_ids, attention_mask = left_padded_batch(tokenizer, ["Why is the sky blue?", "Tom has 3 apples."])
    kwargs = dict(attention_mask=attention_mask.cuda(), max_new_tokens=3 * config.canvas_length,
                  max_denoising_steps=6, seed=9, sampling="fused")
    first = model.generate(input_ids.cuda(), **kwargs)
    engine = model._dgemma_engine
    assert engine.use_graphs and hasattr(engine, "_captured")
    again = model.generate(input_ids.cuda(), **kwargs)  # every step a replay now
    assert again.sequences.shape == first.sequences.shape
    names = ("canvas", "argmax", "soft", "finished_denoising", "history", "step_index", "counter", "forward_passes")
    state = {name: getattr(engine, name).clone() for name in names}

    def run(step):
        for name in names:
            getattr(engine, name).copy_(state[name])
        engine.step_index.zero_()
        step()
        return engine.soft.float().clone(), engine.argmax.clone(), engine.counter.clone()

    with torch.no_grad(), engine.self_conditioning_input():  # as inside generate() (fused layers, soft input)
        soft_eager, argmax_eager, counter_eager = run(lambda: engine.step(engine.position_ids))
    soft_graph, argmax_graph, counter_graph = run(engine._captured.replay)
    assert torch.equal(counter_eager, counter_graph)
    assert ((soft_graph - soft_eager).norm() / soft_eager.norm()).item() < 2e-2
    assert (argmax_graph == argmax_eager).float().mean().item() > 0.9


@pytest.mark.gpu
def test_captured_commit_replays_the_eager_commit(tokenizer):
    """An encoder pass is captured the second time its cache state comes (the first runs eagerly): from one
    cache state, the replay writes the cache as the eager pass does, reads the new canvas (not the captured one)
    and advances the host-side counters the same way; a reused engine replays its prompt too."""
    config = variant_config("default")  # window 16 = canvas 16: commits find room, fill and full windows
    model = build_pair(config, tokenizer, seed=5)[0].to("cuda", torch.bfloat16)
    input_ids, attention_mask = left_padded_batch(tokenizer, ["Why is the sky blue?", "Tom has 3 apples."])
    input_ids, attention_mask = input_ids.cuda(), attention_mask.cuda().bool()
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4 * config.canvas_length,
                         max_denoising_steps=3, seed=9, sampling="fused", eos_token_id=None)
    engine = model._dgemma_engine
    assert len(engine._encoder_graphs) >= 1  # the commits into full windows, from the second on
    again = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4 * config.canvas_length,
                           max_denoising_steps=3, seed=9, sampling="fused", eos_token_id=None)
    assert model._dgemma_engine is engine
    assert any(key[0] == input_ids.shape[1] for key in engine._encoder_graphs)  # the prompt's pass
    # Every pass of this call was replayed: the same generation (bf16 graph kernels may flip a rare token).
    assert (again.sequences == out.sequences).float().mean().item() > 0.9
    cache, length = engine.cache, config.canvas_length
    sequences = out.sequences  # the last canvas is not committed: commit it here
    cached = sequences.shape[1] - length
    mask = torch.nn.functional.pad(attention_mask, (0, sequences.shape[1] - attention_mask.shape[1]), value=True)
    positions = torch.arange(cached, cached + length, device="cuda")[None]

    def snapshot():
        return [(layer.keys.clone(), layer.values.clone(), layer.cumulative_length.clone(),
                 getattr(layer, "cumulative_length_int", None)) for layer in cache.layers]

    def restore(state):
        for layer, (keys, values, tensor_length, int_length) in zip(cache.layers, state):
            layer.keys.copy_(keys)
            layer.values.copy_(values)
            layer.cumulative_length.copy_(tensor_length)
            if int_length is not None:
                layer.cumulative_length_int = int_length

    def commit(ids, graphs=True):
        engine.use_graphs = graphs
        with torch.no_grad():
            engine._encode(ids, mask, positions, is_prefill=False)
        engine.use_graphs = True
        torch.cuda.synchronize()
        return snapshot()

    def close(a, b):
        for (ka, va, ta, ia), (kb, vb, tb, ib) in zip(a, b):
            assert torch.equal(ta, tb) and ia == ib
            for x, y in ((ka, kb), (va, vb)):
                assert ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-6)).item() < 2e-2

    start = snapshot()
    eager = commit(sequences, graphs=False)
    for _ in range(2):  # eager, captured or replayed as this state has come before; replayed the second time
        restore(start)
        close(commit(sequences), eager)
    other = sequences.clone()
    other[:, -length:] = torch.randint(3, config.text_config.vocab_size, (2, length), device="cuda")
    restore(start)
    replayed = commit(other)
    restore(start)
    close(replayed, commit(other, graphs=False))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(replayed, eager))  # the replay read the new canvas


def test_sampler_handles_filtered_tokens():
    """-inf logits (top-k / top-p filters), even whole blocks of them, give finite statistics and are never drawn."""
    logits = torch.randn(40, 300, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    logits[:, :256] = float("-inf")  # the first block entirely filtered
    logits[:, 290:] = float("-inf")
    stats = sample_tokens(logits, *_scalars(1.3, 5, 1), block_v=128)
    x = (logits * 1.3).double().cpu()
    assert torch.isfinite(stats.entropy).all() and torch.isfinite(stats.log_norm).all()
    assert torch.allclose(stats.entropy.cpu().double(), torch.distributions.Categorical(logits=x).entropy(), atol=1e-4)
    assert ((stats.sampled >= 256) & (stats.sampled < 290)).all()
    assert stats.argmax.tolist() == x.argmax(-1).tolist()


@pytest.mark.parametrize("variant", ["default", "mha_no_k_eq_v", "global_only"])
@pytest.mark.parametrize("sampling", ["reference", "fused"])
def test_chunked_prefill_generates_what_one_prefill_does(variant, sampling, tokenizer):
    """`prefill_chunk_size` (transformers' field) sends a long prompt through the encoder in chunks, each
    attending to the cache so far; the sliding-window variants' windows (16, 8) are shorter than the prompt."""
    config = variant_config(variant)
    model, input_ids, attention_mask = _on_device(
        build_pair(config, tokenizer, seed=12)[0],
        *left_padded_batch(tokenizer, ["The river runs past the old mill, under the stone bridge", "Hi there"]),
    )
    assert input_ids.shape[1] > 2 * 7
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=2 * config.canvas_length, max_denoising_steps=3,
                  eos_token_id=None, sampling=sampling, seed=4)
    outputs, passes = [], []
    hook = model.model.encoder.register_forward_pre_hook(lambda module, args: passes.append(1))
    for chunk in (None, 7):
        torch.manual_seed(0)
        passes.clear()
        outputs.append(model.generate(input_ids, prefill_chunk_size=chunk, **kwargs))
    hook.remove()
    assert len(passes) == -(-input_ids.shape[1] // 7) + 1  # the prompt's chunks, then one commit
    whole, chunked = outputs
    assert torch.equal(whole.sequences, chunked.sequences)
    # Chunks change the GPU's reduction orders (fp32 GEMMs of other shapes), not the CPU's.
    tolerance = 1e-5 if DEVICE == "cpu" else 2e-3
    for a, b in zip(whole.past_key_values.layers, chunked.past_key_values.layers):
        assert (a.keys - b.keys).abs().max().item() < tolerance
    with pytest.raises(ValueError, match="`prefill_chunk_size` must be a positive integer"):
        model.generate(input_ids, prefill_chunk_size=0, **kwargs)


def test_decoder_masks_are_one_row_expanded(tokenizer):
    """The engine hands the decoder its padding masks as one row per batch element expanded over the canvas
    (query stride 0: the attention kernel reads a vector a key tile), equal to the masks upstream builds."""
    model = build_pair(variant_config("default"), tokenizer, seed=2)[0]
    input_ids, attention_mask = left_padded_batch(tokenizer, ["Why is the sky blue?", "Tom has 3 apples."])
    with torch.no_grad():
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, max_denoising_steps=2, seed=3,
                       sampling="fused", eos_token_id=None)
    engine = model._dgemma_engine
    decoder_mask = torch.nn.functional.pad(attention_mask.bool(), (0, 32), value=True)
    upstream = model.model.decoder.create_diffusion_decoder_attention_mask(
        config=model.config, inputs_embeds=torch.zeros(2, 16, 1), past_key_values=engine.cache,
        decoder_attention_mask=decoder_mask)
    for kind, mask in engine.mask_mapping.items():
        assert mask.shape[2] == 16 and mask.stride(2) == 0
        assert torch.equal(mask, upstream[kind])
        assert not mask[1, 0, 0].all()  # the padded row's mask is not all True


def test_static_mask_buffers_keep_a_query_broadcast_mask_broadcast():
    """A captured graph's copy of the decoder's mask (expanded over the queries) stays one row, so the attention
    kernel keeps reading one row; refreshing it from a new mask updates every query."""
    from dgemma_hf.generation.masks import mask_shapes, one_row, static_copy, stored_rows

    row = torch.tensor([[False, True, True, False], [True, True, True, False]])[:, None, None, :]
    mask = row.expand(2, 1, 5, 4)
    static = static_copy(mask)
    assert static.stride(2) == 0 and torch.equal(static, mask) and static.data_ptr() != mask.data_ptr()
    other = (~row).expand(2, 1, 5, 4)
    stored_rows(static).copy_(stored_rows(other))
    assert torch.equal(static, other)
    full = mask.contiguous()  # a mask with rows of its own is copied whole
    assert static_copy(full).stride(2) == 4
    assert mask_shapes({"a": mask}) != mask_shapes({"a": full})  # a graph is never reused across the two
    # The engine's one-row mask and its graph buffer have the same strides (Triton specialises on them: a new
    # stride would compile a kernel inside the capture), also for a key length that is not a multiple of 16.
    decoder = torch.ones(2, 1, 5, 21, dtype=torch.bool)
    decoder[1, :, :, :3] = False
    eager = one_row(decoder)
    assert eager.stride() == static_copy(eager).stride() == (21, 21, 0, 1) and torch.equal(eager, decoder)
    two_d = decoder[:, 0, 0]  # a 2D mask (flash attention's) and no mask pass as they are
    assert one_row(two_d) is two_d and one_row(None) is None
