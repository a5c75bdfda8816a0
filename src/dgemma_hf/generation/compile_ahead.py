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
CUDA graph capture. A process launches each distinct call once: a later engine (another prompt length, batch or
setting) launches only what is new to it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers.cache_utils import StaticSlidingWindowLayer
from transformers.utils import logging

from .. import attention as attention_backends
from .. import experts as experts_backends
from ..distributed import tensor_parallel_group
from ..fused_layers import FusedDecoderLayer, call_attention, router_top_k, sliding_window_update
from .masks import one_row

logger = logging.get_logger(__name__)

_OUR_EXPERTS = (experts_backends.AUTO, experts_backends.TRITON)  # the NVFP4 experts take the same names
# (device, job key) of the launches this process has made: Triton keeps what they compiled for the process, so a
# later engine (another prompt length, batch or settings) launches only what is new.
_WARMED: set = set()


def compile_kernels(engine, prompt_length: int, prompt_kwargs=None, workers: int | None = None) -> int:
    """Launches once each kernel variant that `engine`'s call with prompts of `prompt_length` tokens (and
    `prompt_kwargs`, e.g. pixel_values) will launch and this process has not launched yet, `workers` at a time
    (default: one per usable CPU core on CUDA, else 1, which runs them in this thread), then waits for the device.
    Call it after the engine has its cache (`make_cache`) and before the call's first pass. Returns the number of
    launches. A launch that runs out of memory is left to the first pass (with a warning). A model split over
    ranks warms nothing: its experts and sampler launch collectives."""
    model, device = engine.model, engine.device
    split = engine.vocab_shard is not None or tensor_parallel_group(model) is not None or any(
        hasattr(layer.experts, "_dgemma_expert_shard") for layer in model.model.decoder.layers)
    if split:
        return 0
    jobs = {key: job for key, job in _jobs(engine, prompt_length, prompt_kwargs).items()
            if (device, key) not in _WARMED}
    if not jobs:
        return 0
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if device.type == "cuda" and hasattr(os, "sched_getaffinity") else 1
    workers = min(len(jobs), workers)

    def run(key, job):
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(), torch.no_grad():
                job()
        except torch.cuda.OutOfMemoryError:
            logger.warning(f"compile_kernels: {key} ran out of GPU memory; the first pass compiles it instead")
            return
        _WARMED.add((device, key))

    if workers <= 1:
        for key, job in jobs.items():
            run(key, job)
    else:
        _make_kernel_caches(device)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="dgemma_compile")
        try:
            for future in [pool.submit(run, key, job) for key, job in jobs.items()]:
                future.result()
        finally:  # on an error (or Ctrl-C), queued launches are dropped
            pool.shutdown(cancel_futures=True)
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


def _jobs(engine, prompt_length: int, prompt_kwargs=None) -> dict:
    """{launch key: launch} for the engine's next call. The keys hold every shape and setting a launch depends
    on, so equal keys are the same launch."""
    model, batch, canvas = engine.model, engine.batch_size, engine.canvas_length
    dtype, device = model.dtype, engine.device
    text = model.config.get_text_config(decoder=True)
    decoder_layers = model.model.decoder.layers
    encoder_layers = model.model.encoder.language_model.layers
    passes = _encoder_passes(engine, prompt_length, prompt_kwargs)
    jobs = {}
    for tokens in sorted({q for q, _ in passes} | {canvas}):
        for layer in decoder_layers:
            experts = layer.experts
            if experts.config._experts_implementation not in _OUR_EXPERTS:
                continue
            key = ("experts", type(experts), experts.config._experts_implementation, dtype, batch * tokens,
                   text.hidden_size, text.moe_intermediate_size, text.num_experts, text.top_k_experts)
            jobs.setdefault(key, functools.partial(
                _experts, experts, batch * tokens, text.hidden_size, text.top_k_experts, dtype, device))
    if any(isinstance(layer, FusedDecoderLayer) for layer in decoder_layers):
        router = decoder_layers[0].router
        jobs[("top_k", batch * canvas, text.num_experts, text.top_k_experts)] = functools.partial(
            _top_k, router.per_expert_scale, batch * canvas, text.top_k_experts)
    for index, (decoder_layer, encoder_layer) in enumerate(zip(decoder_layers, encoder_layers)):
        cache_length = engine.cache.layers[index].max_cache_len
        attn = decoder_layer.self_attn
        if attn.config._attn_implementation not in attention_backends.NAMES:
            continue
        shape = (attn.config._attn_implementation, dtype, batch, attn.head_dim, attn.config.num_attention_heads,
                 attn.num_key_value_groups)
        jobs.setdefault(("decoder", *shape, canvas, cache_length + canvas), functools.partial(
            _attention, attn, batch, canvas, cache_length + canvas, "decoder", dtype, device))
        for q_len, kv_lengths in passes:
            for kind in ("mask", "causal"):
                jobs.setdefault((kind, *shape, q_len, kv_lengths[index]), functools.partial(
                    _attention, encoder_layer.self_attn, batch, q_len, kv_lengths[index], kind, dtype, device))
    if engine.sampling == "fused":
        vocab = model.lm_head.weight.shape[0]
        jobs[("sampler", batch, canvas, vocab, engine.sampler_logits_dtype, engine.read_softcap)] = functools.partial(
            _sampler, batch, canvas, vocab, engine.sampler_logits_dtype, engine.read_softcap, device)
    return jobs


def _encoder_passes(engine, prompt_length: int, prompt_kwargs=None) -> list[tuple[int, list[int]]]:
    """(new tokens, key length of each cache layer) of the call's encoder passes: the prompt's (as
    `engine.prompt_chunks` cuts it), then one commit per canvas after the first. The key lengths are those of the
    keys transformers' static cache layers return from `update`."""
    lengths = [end - start for start, end in engine.prompt_chunks(prompt_length, prompt_kwargs)]
    lengths += [engine.canvas_length] * (engine.canvases - 1)
    filled = [getattr(layer, "cumulative_length_int", 0) for layer in engine.cache.layers]
    passes = []
    for new in lengths:
        kv_lengths = []
        for i, layer in enumerate(engine.cache.layers):
            window = layer.max_cache_len
            branch = "room"
            if isinstance(layer, StaticSlidingWindowLayer):
                branch = sliding_window_update(filled[i], new, window)
            kv_lengths.append({"room": window, "fills": filled[i] + new, "full": window - 1 + new}[branch])
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
    the decoder's mask one row expanded over the queries (`masks.one_row`), an encoder pass's a whole boolean
    one, or none (causal)."""
    heads = attn.config.num_attention_heads
    kv_heads = heads // attn.num_key_value_groups
    query = torch.zeros(batch, q_len, heads, attn.head_dim, dtype=dtype, device=device).transpose(1, 2)
    key = torch.zeros(batch, kv_heads, kv_len, attn.head_dim, dtype=dtype, device=device)
    value = torch.zeros_like(key)
    mask = None if kind == "causal" else torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if kind == "decoder":
        mask = one_row(mask)
    call_attention(attn, query, key, value, mask)


def _sampler(batch: int, canvas: int, vocab: int, dtype, softcap, device) -> None:
    from ..kernels.sampler import sample_tokens

    logits = torch.zeros(batch * canvas, vocab, dtype=dtype, device=device)
    sample_tokens(logits, torch.ones(1, device=device), torch.zeros(batch, dtype=torch.long, device=device),
                  torch.zeros(1, dtype=torch.long, device=device), softcap=softcap)
