"""Fused token sampler: one pass over each row of logits gives everything a denoising step needs.

For each row r of `logits` [R, V] (fp32) at inverse temperature `inv_temperature` (a device scalar, so a
captured CUDA graph can change it between replays), with x = logits[r] * inv_temperature:

- `sampled[r]`: a sample from softmax(x), by Gumbel-max with a counter-based generator (Philox keyed by the
  row's seed, `counter` and the row's position among the rows of its seed): the same (seed, counter, position)
  gives the same tokens whatever ran before and whatever other rows are in the batch;
- `argmax[r]`: the first index of max(x);
- `entropy[r]`: H(softmax(x)) = m + log(s) - sum(e * x) / s, with m the max, e = exp(x - m), s = sum(e);
- `max_prob[r]`: softmax(x)[argmax];
- `log_norm[r]`: m + log(s), so softmax(x) = exp(x - log_norm) can be rebuilt chunk by chunk later;
- `noise[r]`: a uniform random token in [0, V) for renoising.

Online softmax over blocks of BLOCK_V, so the logits are read once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class TokenStats(NamedTuple):
    sampled: torch.Tensor  # int64 [R]
    argmax: torch.Tensor  # int64 [R]
    entropy: torch.Tensor  # fp32 [R]
    max_prob: torch.Tensor  # fp32 [R]
    log_norm: torch.Tensor  # fp32 [R]
    noise: torch.Tensor  # int64 [R]


@triton.jit
def _sampler_kernel(
    logits_ptr, stride_row, inv_temperature_ptr, seed_ptr, counter_ptr,
    sampled_ptr, argmax_ptr, entropy_ptr, max_prob_ptr, log_norm_ptr, noise_ptr,
    V, ROWS_PER_SEED, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    inv_t = tl.load(inv_temperature_ptr)
    seed = tl.load(seed_ptr + row // ROWS_PER_SEED)
    # One Philox stream per (seed, counter, position): offsets index the vocabulary, the last one feeds the noise.
    stream = tl.load(counter_ptr) * ROWS_PER_SEED + row % ROWS_PER_SEED
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    m = -float("inf")
    s = 0.0
    t = 0.0
    best = -float("inf")
    best_idx = 0
    gumbel_best = -float("inf")
    gumbel_idx = 0
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + tl.arange(0, BLOCK_V)
        valid = idx < V
        x = tl.load(row_ptr + idx, mask=valid, other=-float("inf")) * inv_t
        block_max = tl.max(x, axis=0)
        m_new = tl.maximum(m, block_max)
        # Filtered tokens are -inf (top-k, top-p ...): a finite reference keeps exp() free of inf - inf.
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        rescale = tl.exp(m - m_ref)
        e = tl.where(valid, tl.exp(x - m_ref), 0.0)
        s = s * rescale + tl.sum(e, axis=0)
        t = t * rescale + tl.sum(tl.where(e > 0, e * x, 0.0), axis=0)
        m = m_new
        # First index of the block's max; strict '>' keeps the earliest block on ties.
        block_idx = tl.min(tl.where(x == block_max, idx, V), axis=0)
        best_idx = tl.where(block_max > best, block_idx, best_idx)
        best = tl.maximum(best, block_max)
        u = tl.rand(seed, stream.to(tl.int64) * (V + 1) + idx)
        g = tl.where(valid, x - tl.log(-tl.log(u)), -float("inf"))
        g_max = tl.max(g, axis=0)
        g_idx = tl.min(tl.where(g == g_max, idx, V), axis=0)
        gumbel_idx = tl.where(g_max > gumbel_best, g_idx, gumbel_idx)
        gumbel_best = tl.maximum(gumbel_best, g_max)
    log_s = tl.log(s)
    tl.store(sampled_ptr + row, gumbel_idx.to(tl.int64))
    tl.store(argmax_ptr + row, best_idx.to(tl.int64))
    tl.store(entropy_ptr + row, m + log_s - t / s)
    tl.store(max_prob_ptr + row, tl.exp(best - m) / s)
    tl.store(log_norm_ptr + row, m + log_s)
    noise = tl.randint(seed, stream.to(tl.int64) * (V + 1) + V)
    tl.store(noise_ptr + row, noise.to(tl.int64) % V)


def sample_tokens(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor,
    seeds: torch.Tensor,
    counter: torch.Tensor,
    out: TokenStats | None = None,
    block_v: int = 2048,
) -> TokenStats:
    """Runs the fused sampler on `logits` [R, V] fp32 (rows contiguous). `inv_temperature` (fp32) and `counter`
    (int64) are one-element device tensors; `seeds` (int64 [S], S dividing R) gives consecutive groups of
    R / S rows their own seed (one per sequence of a batch); `out`, optional, holds preallocated outputs."""
    if not isinstance(logits, torch.Tensor) or logits.dtype != torch.float32 or logits.ndim != 2:
        raise TypeError("logits must be a float32 torch.Tensor [rows, vocab]")
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    rows, vocab = logits.shape
    for name, tensor, dtype in (("inv_temperature", inv_temperature, torch.float32),
                                ("counter", counter, torch.int64)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.numel() != 1:
            raise TypeError(f"{name} must be a one-element {dtype} tensor")
        if tensor.device != logits.device:
            raise ValueError(f"{name} is on {tensor.device}, logits on {logits.device}")
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.ndim != 1 or not seeds.numel():
        raise TypeError("seeds must be a 1-D torch.int64 tensor [number of seeds]")
    if rows % seeds.numel() or seeds.device != logits.device:
        raise ValueError(f"seeds ({seeds.numel()} on {seeds.device}) must divide the {rows} rows, on {logits.device}")
    if out is None:
        device = logits.device
        out = TokenStats(
            sampled=torch.empty(rows, dtype=torch.int64, device=device),
            argmax=torch.empty(rows, dtype=torch.int64, device=device),
            entropy=torch.empty(rows, dtype=torch.float32, device=device),
            max_prob=torch.empty(rows, dtype=torch.float32, device=device),
            log_norm=torch.empty(rows, dtype=torch.float32, device=device),
            noise=torch.empty(rows, dtype=torch.int64, device=device),
        )
    if rows:
        _sampler_kernel[(rows,)](
            logits, logits.stride(0), inv_temperature, seeds, counter,
            *out, vocab, rows // seeds.numel(), BLOCK_V=min(block_v, triton.next_power_of_2(vocab)),
        )
    return out
