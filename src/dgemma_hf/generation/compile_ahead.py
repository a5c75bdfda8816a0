"""Compiles the Triton kernels a generate() call will launch, in parallel threads, before its first pass.

A cold process compiles each kernel variant the first time it launches it. On an H200, the first generate()
(batch 1, prompt 512, NVFP4 experts) compiled 17 of dgemma_hf's variants one after another (17.1 s) and built
their launcher stubs with the C compiler (3.0 s), out of 37.8 s. Triton's compiler spends most of that in native
code with the GIL released (MLIR passes, LLVM, ptxas, the C compiler), so threads overlap it: with this module
the same call took 20.8 s, its kernels compiled in about 5 s by 16 threads (eval/results/2026-11-28-session10/).

`compile_kernels` launches once every variant the call will launch, on placeholder inputs, from a pool of
threads, and waits for them all. The launches go through the functions the model calls: the layers' attention
implementation and experts module (where they are dgemma_hf's), the router's top-k and the fused sampler. Their
inputs have the shapes, dtypes and layouts of the engine's passes, so Triton specialises them as it will the real
launches: by dtypes, 16-byte alignment, integers divisible by 16 or equal to 1, and the constexprs the wrappers
derive from shapes.

The encoder's passes are simulated from the cache's state: the prompt (in chunks with `prefill_chunk_size`),
then one commit per canvas after the first. That gives each attention layer's key length per pass, as
transformers' StaticCache and StaticSlidingWindowLayer return the keys. Each pass warms both a masked and a causal
variant: transformers decides on the host, from the padding, which one a prompt takes.

The placeholders are zeros: attention masks that allow nothing (the kernels skip every key) and every expert pair
routed to expert 0. The threads launch on the device's default stream while the calling thread waits, before any
CUDA graph capture.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers.cache_utils import StaticSlidingWindowLayer
from transformers.models.diffusion_gemma import modeling_diffusion_gemma as upstream

from .. import attention as attention_backends
from .. import experts as experts_backends
from ..fused_layers import FusedDecoderLayer, router_top_k

_OUR_EXPERTS = (experts_backends.AUTO, experts_backends.TRITON)  # the NVFP4 experts take the same names


def compile_kernels(engine, prompt_length: int, workers: int | None = None) -> int:
    """Launches once each kernel variant that `engine`'s call with prompts of `prompt_length` tokens will launch,
    `workers` at a time (default: one per CPU core; 1 runs them in this thread), then waits for the device.
    Call it after the engine has its cache (`make_cache`) and before the call's first pass. Returns the number of
    launches. A model split over ranks warms nothing: its experts and sampler launch collectives."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        return 0
    jobs = list(_jobs(engine, prompt_length).values())
    device = engine.device

    def run(job):
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(), torch.no_grad():
            job()

    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers <= 1:
        for job in jobs:
            run(job)
    else:
        _make_kernel_caches(device)
        with ThreadPoolExecutor(workers, thread_name_prefix="dgemma_compile") as pool:
            for future in [pool.submit(run, job) for job in jobs]:
                future.result()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(jobs)


def _make_kernel_caches(device: torch.device) -> None:
    """Each kernel's per-device cache, made in this thread. Triton makes it on a kernel's first launch (a
    defaultdict entry); two threads launching one kernel for the first time could each make one, and the kernels
    compiled into the cache that loses would be compiled again by the first pass."""
    if device.type != "cuda":
        return
    import triton

    from ..kernels import attention, moe, routing, sampler

    with torch.cuda.device(device):
        index = triton.runtime.driver.active.get_current_device()
        for module in (attention, moe, routing, sampler):
            for value in vars(module).values():
                if isinstance(value, triton.runtime.JITFunction) and hasattr(value, "device_caches"):
                    value.device_caches[index]


def _jobs(engine, prompt_length: int) -> dict:
    """{variant key: launch} for the engine's next call; keys merge launches Triton would compile alike."""
    model, batch, canvas = engine.model, engine.batch_size, engine.canvas_length
    dtype, device = model.dtype, engine.device
    text = model.config.get_text_config(decoder=True)
    decoder_layers = model.model.decoder.layers
    encoder_layers = model.model.encoder.language_model.layers
    passes = _encoder_passes(engine, prompt_length)
    jobs = {}
    for tokens in sorted({q for q, _ in passes} | {canvas}):
        for layer in decoder_layers:
            if layer.experts.config._experts_implementation not in _OUR_EXPERTS:
                continue
            key = ("experts", type(layer.experts), batch * tokens)
            jobs.setdefault(key, functools.partial(
                _experts, layer.experts, batch * tokens, text.hidden_size, text.top_k_experts, dtype, device))
    if any(isinstance(layer, FusedDecoderLayer) for layer in decoder_layers):
        router = decoder_layers[0].router
        jobs[("top_k", batch * canvas)] = functools.partial(
            _top_k, router.per_expert_scale, batch * canvas, text.top_k_experts)
    for index, (decoder_layer, encoder_layer) in enumerate(zip(decoder_layers, encoder_layers)):
        cache_length = engine.cache.layers[index].max_cache_len
        attn = decoder_layer.self_attn
        if attn.config._attn_implementation not in attention_backends.NAMES:
            continue
        shape = (attn.config._attn_implementation, attn.head_dim, attn.config.num_attention_heads,
                 attn.config.num_attention_heads // attn.num_key_value_groups)
        jobs.setdefault(("decoder", *shape, *_lengths_class(canvas, cache_length + canvas)), functools.partial(
            _attention, attn, batch, canvas, cache_length + canvas, "decoder", dtype, device))
        for q_len, kv_lengths in passes:
            kv_len = kv_lengths[index]
            for kind in ("mask", "causal"):
                jobs.setdefault((kind, *shape, *_lengths_class(q_len, kv_len)), functools.partial(
                    _attention, encoder_layer.self_attn, batch, q_len, kv_len, kind, dtype, device))
    if engine.sampling == "fused" and engine.vocab_shard is None:
        vocab = model.lm_head.weight.shape[0]
        logits_dtype = model.lm_head.weight.dtype if engine.read_softcap is not None else torch.float32
        jobs[("sampler",)] = functools.partial(_sampler, batch, canvas, vocab, logits_dtype, engine.read_softcap,
                                               device)
    return jobs


def _lengths_class(q_len: int, kv_len: int) -> tuple:
    """What Triton specialises an attention launch's lengths on, and the mask's strides (q_len * kv_len, kv_len):
    each integer's divisibility by 16 and equality to 1."""
    return tuple((value % 16 == 0, value == 1) for value in (q_len, kv_len, q_len * kv_len))


def _encoder_passes(engine, prompt_length: int) -> list[tuple[int, list[int]]]:
    """(new tokens, key length of each cache layer) of the call's encoder passes: the prompt's (chunked as
    `_encode_prompt` chunks it), then one commit per canvas after the first. The key lengths are those of the
    keys transformers' static cache layers return from `update`."""
    chunk = engine.settings.prefill_chunk_size
    if chunk is None or prompt_length <= chunk:
        lengths = [prompt_length]
    else:
        lengths = [min(chunk, prompt_length - start) for start in range(0, prompt_length, chunk)]
    lengths += [engine.canvas_length] * (engine.canvases - 1)
    filled = [getattr(layer, "cumulative_length_int", 0) for layer in engine.cache.layers]
    passes = []
    for new in lengths:
        kv_lengths = []
        for i, layer in enumerate(engine.cache.layers):
            window = layer.max_cache_len
            if not isinstance(layer, StaticSlidingWindowLayer):
                kv_lengths.append(window)
            elif filled[i] >= window:  # full: the last window - 1 tokens, then the new ones
                kv_lengths.append(window - 1 + new)
            elif filled[i] + new > window:  # filling up: what it held, then the new ones
                kv_lengths.append(filled[i] + new)
            else:
                kv_lengths.append(window)
            filled[i] += new
        passes.append((new, kv_lengths))
    return passes


def _experts(experts, tokens: int, hidden: int, top_k: int, dtype, device) -> None:
    hidden_states = torch.zeros(tokens, hidden, dtype=dtype, device=device)
    index = torch.zeros(tokens, top_k, dtype=torch.long, device=device)
    weights = torch.zeros(tokens, top_k, dtype=torch.float32, device=device)
    experts(hidden_states, index, weights)


def _top_k(per_expert_scale, tokens: int, top_k: int) -> None:
    probs = torch.zeros(tokens, per_expert_scale.shape[0], dtype=torch.float32, device=per_expert_scale.device)
    router_top_k(probs, top_k, per_expert_scale)


def _attention(attn, batch: int, q_len: int, kv_len: int, kind: str, dtype, device) -> None:
    """One attention call as the layers make it: queries a transposed view of [batch, q_len, heads, head_dim];
    the decoder's mask one row expanded over the queries (as the engine's `_one_row` makes it), an encoder pass's
    a whole boolean one, or none (causal)."""
    heads = attn.config.num_attention_heads
    kv_heads = heads // attn.num_key_value_groups
    query = torch.zeros(batch, q_len, heads, attn.head_dim, dtype=dtype, device=device).transpose(1, 2)
    key = torch.zeros(batch, kv_heads, kv_len, attn.head_dim, dtype=dtype, device=device)
    value = torch.zeros_like(key)
    mask = None if kind == "causal" else torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if kind == "decoder":
        from .engine import _one_row  # (the engine imports this module)

        mask = _one_row(mask)  # its strides, too: at batch 1 the row stays a view of the whole mask
    attention = upstream.ALL_ATTENTION_FUNCTIONS.get_interface(
        attn.config._attn_implementation, upstream.eager_attention_forward)
    attention(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling, sliding_window=attn.sliding_window,
              is_causal=attn.is_causal)


def _sampler(batch: int, canvas: int, vocab: int, dtype, softcap, device) -> None:
    from ..kernels.sampler import sample_tokens

    logits = torch.zeros(batch * canvas, vocab, dtype=dtype, device=device)
    sample_tokens(logits, torch.ones(1, device=device), torch.zeros(batch, dtype=torch.long, device=device),
                  torch.zeros(1, dtype=torch.long, device=device), softcap=softcap)
