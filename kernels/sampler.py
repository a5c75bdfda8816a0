"""Fused token sampler: one pass over each row of logits gives everything a denoising step needs.

For each row r of `logits` [R, V] (fp32) at inverse temperature `inv_temperature` (a device scalar, so a
captured CUDA graph can change it between replays), with x = logits[r] * inv_temperature (with `softcap` c, the
logits are the LM head's raw output, of any float dtype, and x = c * tanh(logits[r] / c) * inv_temperature: the
final logit softcap is applied as the row is read, instead of in a pass that writes fp32 logits):

- `sampled[r]`: a sample from softmax(x), by Gumbel-max with a counter-based generator: token i takes word i % 4
  of Philox-4x32-10 keyed by the row's seed at counter (stream_lo, stream_hi, 0, i // 4), the 64-bit stream being
  `counter` * rows_per_seed + the row's position among the rows of its seed. So the same (seed, counter, position)
  gives the same tokens whatever ran before, whatever other rows are in the batch and however the work is split;
- `argmax[r]`: the first index of max(x);
- `entropy[r]`: H(softmax(x)) = log(s) - sum(e * (x - m)) / s, with m the max, e = exp(x - m), s = sum(e);
- `max_prob[r]`: softmax(x)[argmax];
- `log_norm[r]`: m + log(s), so softmax(x) = exp(x - log_norm) can be rebuilt chunk by chunk later;
- `noise[r]`: a uniform random token in [0, V) for renoising (word 0 of Philox at counter (stream_lo, stream_hi, 1, 0)).

Two kernels, so that enough programs stream the logits to fill the GPU:
1. `_partial_kernel`, grid (R, splits): each program reads one contiguous slice of a row (a multiple of BLOCK_V),
   once, block by block with an online softmax, and writes the slice's max, s, sum(e * (x - m)), first argmax,
   best Gumbel score and its index to a small workspace (`token_partials`);
2. `_combine_kernel`, BLOCK_R rows per program: merges a row's slices in a fixed order (deterministic; ties go to
   the earliest index) and writes the outputs (`combine_partials`).
Both work in base 2 (x scaled by log2(e)): exp2 and log2 are single instructions on the GPU.

With the vocabulary split over ranks, each rank runs `token_partials` on its own columns (token ids and random
words are those of the whole vocabulary, from `vocab_offset`), the ranks gather their small workspaces, and
`combine_partials` merges them all in vocabulary order: the same tokens as one pass over the whole row, with no
[R, V] logits ever gathered (`dgemma_hf.distributed.sample_tokens_over_ranks`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Many waves of programs on a 132-SM GPU (about 5 resident per SM), so the last, partial wave costs little.
_TARGET_PROGRAMS = 8192
MAX_SPLITS = 1024  # the combine holds a row's slices in one tile of 32 rows x splits
_BLOCK_R = 32  # rows per combining program


class TokenStats(NamedTuple):
    sampled: torch.Tensor  # int64 [R]
    argmax: torch.Tensor  # int64 [R]
    entropy: torch.Tensor  # fp32 [R]
    max_prob: torch.Tensor  # fp32 [R]
    log_norm: torch.Tensor  # fp32 [R]
    noise: torch.Tensor  # int64 [R]


@triton.jit
def _log2(x, LIBDEVICE: tl.constexpr):
    # lg2.approx on the GPU; Triton's CPU interpreter has no libdevice.
    if LIBDEVICE:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _softcap(logit, cap, two_log2e_over_cap):
    """cap * tanh(logit / cap) in fp32 (upstream's final logit softcap), tanh as 1 - 2 / (2^(2 y log2 e) + 1): a
    few instructions (libdevice's tanh made the sampler compute-bound, 1.5x slower at batch 8 on an H200), within
    about 2e-7 of tanh in absolute terms (6e-6 in the logits at cap 30, far below the bf16 LM head's rounding; near
    0 that is a large relative error, harmless to a softmax); +-inf give +-cap, NaN stays NaN. The program computes
    2 log2(e) / cap once: dividing each element by the cap cost the loop a multiply per element more (ptxas had
    hoisted the cap's reciprocal; 984 against 928 sm_90 instructions a block)."""
    return (1.0 - 2.0 / (tl.exp2(logit.to(tl.float32) * two_log2e_over_cap) + 1.0)) * cap


@triton.jit
def _gumbel2(bits, LIBDEVICE: tl.constexpr):
    """Gumbel noise in base-2 units, -log2(E) with E = -log2(1 - w) (an exponential variable times log2(e), which
    shifts the noise by a constant and leaves the argmax alone), from 32 random bits (w =
    (bits + 1/2) / 2^32 in (0, 1)). The large noise that decides samples comes from small w, where 1 - w rounds and
    lg2.approx has only absolute accuracy: there a series in w; elsewhere 1 - w = (~bits + 1/2) / 2^32, which
    does not cancel."""
    small = bits < 2**25  # w < 2^-7: the series' next term is below 2^-23 relative
    q = tl.fma(tl.where(small, bits, ~bits).to(tl.float32), 2.0**-32, 2.0**-33)
    series = tl.fma(tl.fma(q, LOG2E / 3, LOG2E / 2), q, LOG2E) * q
    return -_log2(tl.where(small, series, -_log2(q, LIBDEVICE)), LIBDEVICE)  # finite: in [-5.1, 32.5]


@triton.jit
def _partial_kernel(
    logits_ptr, stride_row, inv_temperature_ptr, seed_ptr, counter_ptr, stats_ptr, index_ptr,
    V, CHUNK, ROWS_PER_SEED, VOCAB_OFFSET, softcap, BLOCK_V: tl.constexpr, EVEN_V: tl.constexpr,
    SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    # x = logits * scale in base 2. Maxima and argmaxes are taken on the logits themselves (scale > 0 keeps their
    # order), so x is only ever needed inside an fma.
    scale = tl.load(inv_temperature_ptr) * LOG2E
    two_log2e_over_cap = (2.0 * LOG2E) / softcap
    seed = tl.load(seed_ptr + row // ROWS_PER_SEED)
    stream = tl.load(counter_ptr) * ROWS_PER_SEED + row % ROWS_PER_SEED
    stream_lo = stream.to(tl.uint32)
    stream_hi = (stream >> 32).to(tl.uint32)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    m = -float("inf")  # max logit so far
    ref = 0.0  # m * scale, or 0 while m = -inf: what x is taken relative to
    s = 0.0  # sum of e = exp2(x - ref)
    t = 0.0  # sum of e * (x - ref): no term cancels another, nor in the entropy log2(s) - t / s
    best_idx = 0
    gumbel_best = -float("inf")
    gumbel_idx = 0
    start = split * CHUNK
    for v0 in range(start, tl.minimum(start + CHUNK, V), BLOCK_V):
        idx = v0 + tl.arange(0, BLOCK_V)
        if EVEN_V:  # no mask to build and apply
            logit = tl.load(row_ptr + idx)
        else:
            logit = tl.load(row_ptr + idx, mask=idx < V, other=-float("inf"))
        if SOFTCAP:  # raw logits (any float dtype): softcapped here, not in a pass of their own
            logit = _softcap(logit, softcap, two_log2e_over_cap)
            if not EVEN_V:
                logit = tl.where(idx < V, logit, -float("inf"))
        # One Philox call per 4 tokens, word j to token 4k + j (token ids of the whole vocabulary: VOCAB_OFFSET
        # is a multiple of 4). The token group is the last counter word: the first rounds mix only the row's
        # uniform words, computed once per program.
        group = ((VOCAB_OFFSET + v0) // 4 + tl.arange(0, BLOCK_V // 4)).to(tl.uint32)
        zero = group * 0
        w0, w1, w2, w3 = tl.philox(seed, zero + stream_lo, zero + stream_hi, zero, group)
        bits = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
        g = tl.fma(logit, scale, _gumbel2(bits, LIBDEVICE))
        block_max = tl.max(logit, axis=0)
        g_max = tl.max(g, axis=0)
        # Rare after the first blocks; strict '>' keeps the earliest block on ties.
        if block_max > m:
            best_idx = tl.min(tl.where(logit == block_max, idx, V), axis=0)
        if g_max > gumbel_best:
            gumbel_idx = tl.min(tl.where(g == g_max, idx, V), axis=0)
            gumbel_best = g_max
        m_new = tl.maximum(m, block_max)
        # Filtered tokens are -inf (top-k, top-p ...): a finite reference keeps exp2() free of inf - inf.
        ref_new = tl.where(m_new == -float("inf"), 0.0, m_new) * scale
        d = tl.fma(logit, scale, -ref_new)
        e = tl.exp2(d)
        rescale = tl.exp2(m * scale - ref_new)
        # e = 0 on -inf tokens: e * d is 0 there, not 0 * -inf.
        t = (t + s * (ref - ref_new)) * rescale + tl.sum(e * tl.maximum(d, -3.0e38), axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
        ref = ref_new
    # Workspace planes of [R, splits]: stats (max logit, s, t, best Gumbel score), indices (argmax, sample).
    plane = tl.num_programs(0) * tl.num_programs(1)
    slot = row * tl.num_programs(1) + split
    tl.store(stats_ptr + slot, m)
    tl.store(stats_ptr + plane + slot, s)
    tl.store(stats_ptr + 2 * plane + slot, t)
    tl.store(stats_ptr + 3 * plane + slot, gumbel_best)
    tl.store(index_ptr + slot, best_idx + VOCAB_OFFSET)
    tl.store(index_ptr + plane + slot, gumbel_idx + VOCAB_OFFSET)


@triton.jit
def _combine_kernel(
    stats_ptr, index_ptr, inv_temperature_ptr, seed_ptr, counter_ptr,
    sampled_ptr, argmax_ptr, entropy_ptr, max_prob_ptr, log_norm_ptr, noise_ptr,
    R, V, SPLITS, RANK_SPLITS, RANK_STRIDE, ROWS_PER_SEED, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Slice j of a row is slice j % RANK_SPLITS of rank j // RANK_SPLITS's workspace (RANK_STRIDE elements apart).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    splits = tl.arange(0, BLOCK_S)
    ok = row_ok[:, None] & (splits < SPLITS)[None, :]
    rank_base = (splits // RANK_SPLITS) * RANK_STRIDE + splits % RANK_SPLITS
    slot = rank_base[None, :] + rows[:, None] * RANK_SPLITS
    plane = R * RANK_SPLITS
    m = tl.load(stats_ptr + slot, mask=ok, other=-float("inf"))
    s = tl.load(stats_ptr + plane + slot, mask=ok, other=0.0)
    t = tl.load(stats_ptr + 2 * plane + slot, mask=ok, other=0.0)
    g = tl.load(stats_ptr + 3 * plane + slot, mask=ok, other=-float("inf"))
    best_idx = tl.load(index_ptr + slot, mask=ok, other=V)
    gumbel_idx = tl.load(index_ptr + plane + slot, mask=ok, other=V)
    scale = tl.load(inv_temperature_ptr) * LOG2E
    row_max = tl.max(m, axis=1)
    # A slice's sums are relative to its own reference (as the partial kernel rounded it); move them to the row's.
    ref = tl.where(m == -float("inf"), 0.0, m) * scale
    row_ref = tl.where(row_max == -float("inf"), 0.0, row_max) * scale
    weight = tl.exp2(m * scale - row_ref[:, None])  # 0 for slices of filtered tokens only
    s_row = tl.sum(s * weight, axis=1)
    t_row = tl.sum((t + s * (ref - row_ref[:, None])) * weight, axis=1)
    # Slices are in vocabulary order, each holding its first index: the smallest index among the best is the first.
    argmax = tl.min(tl.where(m == row_max[:, None], best_idx, V), axis=1)
    g_row = tl.max(g, axis=1)
    sampled = tl.min(tl.where(g == g_row[:, None], gumbel_idx, V), axis=1)
    log2_s = tl.log2(s_row)
    seed = tl.load(seed_ptr + rows // ROWS_PER_SEED, mask=row_ok, other=0)
    stream = tl.load(counter_ptr) * ROWS_PER_SEED + rows % ROWS_PER_SEED
    zero = rows.to(tl.uint32) * 0
    noise, _, _, _ = tl.philox(seed, stream.to(tl.uint32), (stream >> 32).to(tl.uint32), zero + 1, zero)
    tl.store(sampled_ptr + rows, sampled.to(tl.int64), mask=row_ok)
    tl.store(argmax_ptr + rows, argmax.to(tl.int64), mask=row_ok)
    tl.store(entropy_ptr + rows, (log2_s - t_row / s_row) * LN2, mask=row_ok)
    # The max token's e, as the partial kernel computed it (the fma keeps logit * scale unrounded): 1, to rounding,
    # when alone.
    tl.store(max_prob_ptr + rows, tl.exp2(tl.fma(row_max, scale, -row_ref)) / s_row, mask=row_ok)
    tl.store(log_norm_ptr + rows, (row_ref + log2_s) * LN2, mask=row_ok)
    tl.store(noise_ptr + rows, noise.to(tl.int64) % V, mask=row_ok)


def _check_scalars(data, inv_temperature, seeds, counter, rows: int) -> None:
    """The arguments beside the logits (or workspaces) `data`, which has `rows` rows."""
    for name, tensor, dtype in (("inv_temperature", inv_temperature, torch.float32),
                                ("counter", counter, torch.int64)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.numel() != 1:
            raise TypeError(f"{name} must be a one-element {dtype} tensor")
        if tensor.device != data.device:
            raise ValueError(f"{name} is on {tensor.device}, logits on {data.device}")
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.ndim != 1 or not seeds.numel():
        raise TypeError("seeds must be a 1-D torch.int64 tensor [number of seeds]")
    if rows % seeds.numel() or seeds.device != data.device:
        raise ValueError(f"seeds ({seeds.numel()} on {seeds.device}) must divide the {rows} rows, on {data.device}")


def _check_logits(logits, softcap) -> None:
    """fp32 logits [rows, vocab], or with a softcap (a positive finite number) raw ones of any float dtype."""
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    dtypes = (torch.float32,) if softcap is None else (torch.float32, torch.bfloat16, torch.float16)
    if not isinstance(logits, torch.Tensor) or logits.dtype not in dtypes or logits.ndim != 2:
        kinds = "float32" if softcap is None else "float32, bfloat16 or float16 (with softcap)"
        raise TypeError(f"logits must be a {kinds} torch.Tensor [rows, vocab]")


def token_partials(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor,
    seeds: torch.Tensor,
    counter: torch.Tensor,
    vocab_offset: int = 0,
    block_v: int = 2048,
    splits: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The first kernel on `logits` [R, V] (rows contiguous): columns `vocab_offset` .. `vocab_offset` + V of
    the vocabulary, `vocab_offset` a multiple of 4 (tokens take their random words in fours). Returns the
    workspace, fp32 [6, R, splits]: max, s, t and best Gumbel score per slice, then (int32 bits) the argmax and
    the sample. See `sample_tokens` for the other arguments."""
    _check_logits(logits, softcap)
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    rows, vocab = logits.shape
    _check_scalars(logits, inv_temperature, seeds, counter, rows)
    if splits is not None and not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in [1, {MAX_SPLITS}], got {splits}")
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if vocab_offset < 0 or vocab_offset % 4:
        raise ValueError(f"vocab_offset must be a multiple of 4 and >= 0, got {vocab_offset}")
    if not rows or not vocab:
        return torch.empty(6, rows, 0, dtype=torch.float32, device=logits.device)
    # Tokens come 4 per Philox call, so blocks of at least 4.
    block_v = max(4, min(block_v, triton.next_power_of_2(vocab)))
    blocks = triton.cdiv(vocab, block_v)
    splits = min(blocks, splits or triton.cdiv(_TARGET_PROGRAMS, rows), MAX_SPLITS)
    chunk = triton.cdiv(blocks, splits) * block_v
    splits = triton.cdiv(vocab, chunk)  # no empty slice
    workspace = torch.empty(6, rows, splits, dtype=torch.float32, device=logits.device)
    libdevice = logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
    _partial_kernel[(rows, splits)](
        logits, logits.stride(0), inv_temperature, seeds, counter, workspace, workspace[4:].view(torch.int32),
        vocab, chunk, rows // seeds.numel(), vocab_offset, float(softcap or 1.0),
        BLOCK_V=block_v, EVEN_V=vocab % block_v == 0, SOFTCAP=softcap is not None, LIBDEVICE=libdevice,
    )
    return workspace


def combine_partials(
    workspaces: torch.Tensor,
    inv_temperature: torch.Tensor,
    seeds: torch.Tensor,
    counter: torch.Tensor,
    vocab_size: int,
    out: TokenStats | None = None,
) -> TokenStats:
    """The second kernel: merges `workspaces` [N, 6, R, S] (`token_partials` of N consecutive vocabulary ranges,
    in order; together `vocab_size` tokens) into the outputs. Given the same logits, the sampled, argmax and noise
    tokens are those of one pass over whole rows; the statistics round differently (other slice boundaries)."""
    if not isinstance(workspaces, torch.Tensor) or workspaces.dtype != torch.float32:
        raise TypeError("workspaces must be a float32 torch.Tensor (token_partials' output, stacked)")
    if workspaces.ndim != 4 or workspaces.shape[1] != 6 or not workspaces.is_contiguous():
        raise ValueError(f"workspaces must be contiguous [ranks, 6, rows, splits], got {tuple(workspaces.shape)}")
    ranks, _, rows, rank_splits = workspaces.shape
    _check_scalars(workspaces, inv_temperature, seeds, counter, rows)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    if ranks * rank_splits > MAX_SPLITS:
        raise ValueError(f"at most {MAX_SPLITS} slices a row, got {ranks} x {rank_splits}")
    device = workspaces.device
    if out is None:
        out = TokenStats(
            sampled=torch.empty(rows, dtype=torch.int64, device=device),
            argmax=torch.empty(rows, dtype=torch.int64, device=device),
            entropy=torch.empty(rows, dtype=torch.float32, device=device),
            max_prob=torch.empty(rows, dtype=torch.float32, device=device),
            log_norm=torch.empty(rows, dtype=torch.float32, device=device),
            noise=torch.empty(rows, dtype=torch.int64, device=device),
        )
    if not rows or not rank_splits:
        return out
    _combine_kernel[(triton.cdiv(rows, _BLOCK_R),)](
        workspaces, workspaces[:, 4:].view(torch.int32), inv_temperature, seeds, counter, *out,
        rows, vocab_size, ranks * rank_splits, rank_splits, 6 * rows * rank_splits, rows // seeds.numel(),
        BLOCK_R=_BLOCK_R, BLOCK_S=triton.next_power_of_2(ranks * rank_splits),
    )
    return out


def sample_tokens(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor,
    seeds: torch.Tensor,
    counter: torch.Tensor,
    out: TokenStats | None = None,
    block_v: int = 2048,
    splits: int | None = None,
    softcap: float | None = None,
) -> TokenStats:
    """Runs the fused sampler on `logits` [R, V] fp32 (rows contiguous), or with `softcap` on raw logits of any
    float dtype, softcapped as they are read (see the module's docstring). `inv_temperature` (fp32) and `counter`
    (int64) are one-element device tensors; `seeds` (int64 [S], S dividing R) gives consecutive groups of
    R / S rows their own seed (one per sequence of a batch); `out`, optional, holds preallocated outputs.
    `block_v` (a power of two) is the vocabulary block a program reads at a time; `splits` (at most
    `MAX_SPLITS`), by default a function of R and V that fills the GPU, the number of programs sharing a row.
    Neither changes the sampled tokens. A row whose logits are all -inf has no distribution: its outputs are
    undefined (NaN statistics, token 0); with `softcap` such a row is uniform at -softcap, as upstream's
    softcapped logits are."""
    workspace = token_partials(logits, inv_temperature, seeds, counter, block_v=block_v, splits=splits,
                               softcap=softcap)
    return combine_partials(workspace[None], inv_temperature, seeds, counter, logits.shape[1], out)
