"""Flash-attention forward in Triton, for head dims up to 512 and grouped-query attention.

    out[b, h, i] = sum_j softmax_j(scaling * q[b, h, i] . k[b, h // G, j] + mask[b, i, j]) v[b, h // G, j]

q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] (G = Hq / Hkv query heads share a kv head), D a power of two from
16 to 512 (DiffusionGemma: 256 on sliding layers, 512 on global ones, which FlashAttention and PyTorch's
flash/cuDNN SDPA kernels do not take). bf16/fp16 inputs (fp32 too, exact IEEE dots, for tests), fp32
softmax statistics and accumulator, one pass over the keys with an online softmax.

- Grouped-query attention without repeated kv heads: a program owns one (batch, kv head) and a block of
  BLOCK_M "packed" rows, row r = (query position r // G, query head r % G of the group), so each K/V tile it
  loads serves all G query heads at once.
- K doubling as V (`v is k`, or the same storage and strides): with DV_SPLIT = 1 the loaded K tile
  feeds both products and V is never loaded; with DV_SPLIT > 1 a program re-reads its column slice of the K
  rows it has just loaded (an L1/L2 hit, not a second pass over HBM).
- D = 512: the [BLOCK_M, D] fp32 accumulator is the register hog. `DV_SPLIT` programs share one (rows,
  kv head) and each accumulates D / DV_SPLIT output columns (QK^T is recomputed per program, the extra
  programs also fill the GPU at batch 1); the K tile of the full D feeds the QK^T dot, whose reduction
  Triton splits into MMA steps. The table below runs D = 512 at DV_SPLIT = 2; the sweep of
  `eval.attention` measures 1, 2 and 4.
- Masks: a boolean (True = attend) or additive float mask broadcastable to [B, 1, Lq, Lk], any strides
  (an expanded one is read as is); an additive entry at or below the dtype's lowest finite value (what
  transformers' eager masks use) or -inf counts as masked. Optional causal masking, query i at absolute
  position i + q_offset attending keys j <= i + q_offset, and a sliding window (keys j > i + q_offset -
  window). A row with no key left gets zeros (no NaN), as PyTorch's SDPA does with boolean or -inf masks.
  A mask broadcast over the queries (query stride 0, as the engine passes the decoder's padding mask) is
  read as one row, a [BLOCK_N] vector per key tile. A [BLOCK_M, BLOCK_N] tile costs far more than its
  bytes: Triton moves it into the MMA's register layout through shuffles (at D 256 the compiled key loop
  has 1618 instructions with tiles, 886 with the row, for sm_90).
- Work skipping: with causal/window masking the key loop covers only the blocks the rows can see; with a
  mask, each program first scans its query rows' mask (1 byte per (query, key), against 2 * D bytes per key
  for K) for the first and last allowed key, so left padding and unused static-cache slots cost no MMA.
- Split keys (flash-decoding): when the grid has fewer programs than the GPU has SMs (batch 1 with a
  256-token canvas: 32 programs at D 256, 64 at D 512), kv_splits programs share one block of rows, each
  taking an equal share of the key blocks left after the bounds above. They write unnormalised fp32
  partials with their row max and sum, and `_combine_splits_kernel` merges them in split order
  (deterministic, no atomics).

The host wrapper reads shapes, strides, dtypes and the device's SM count, and allocates the split keys' fp32
scratch (from the graph's pool under capture): no host synchronisation, so it can be captured in a CUDA graph
(compile the kernel once outside the capture, with the same strides: Triton specialises integer arguments
on divisibility by 16).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256, 512)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MASK_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1
_PREPASS_TILE = 4096  # elements per mask-scan tile (query rows x keys); bytes, so wide tiles are cheap
# Split keys only while the grid has fewer programs than SMs, and give each split at least this many keys:
# below that the partials' round trip costs more than the extra programs win.
_MIN_KEYS_PER_SPLIT = 256
_MAX_KV_SPLITS = 16

# Tile sizes per head dim, kept as data: (BLOCK_M packed rows, BLOCK_N keys, DV_SPLIT, num_warps, num_stages).
# bf16/fp16, D 256 and 512: the best of `python -m eval.attention --sweep` on an H200 (2026-11-28, fifth
# session, decoder mask read as one row) at kv 32768 and at batch 4 with kv 1280; BLOCK_M 128 gives each of
# the 8 warps' two warpgroups 64 whole rows, so the softmax needs no cross-warp reduction. The other head dims:
# first guesses that compile for sm_90 without register spills (Triton's compiler and ptxas -v).
_CONFIGS = {
    16: (64, 64, 1, 4, 2),
    32: (64, 64, 1, 4, 2),
    64: (128, 64, 1, 4, 3),
    128: (128, 64, 1, 8, 3),
    256: (128, 64, 1, 8, 2),
    512: (128, 32, 2, 8, 1),
}
# float32 runs exact IEEE dots on the CUDA cores (for tests and references, not for speed): small tiles.
_FP32_CONFIGS = {
    16: (32, 16, 1, 4, 1),
    32: (32, 16, 1, 4, 1),
    64: (32, 16, 1, 8, 1),
    128: (32, 16, 1, 8, 1),
    256: (32, 16, 2, 8, 1),
    512: (32, 16, 2, 8, 1),
}


def pick_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    return (_FP32_CONFIGS if dtype == torch.float32 else _CONFIGS)[head_dim]


def mask_scan_tile(block_m: int, group: int, key_mask: bool) -> tuple[int, int]:
    """(PRE_M, PRE_N): the mask scan reads the program's distinct query rows (one more when a block starts
    mid-group; one row for a key mask) and as many keys as make a tile of about _PREPASS_TILE bytes."""
    pre_m = 1 if key_mask else triton.next_power_of_2(triton.cdiv(block_m, group) + (block_m % group != 0))
    return pre_m, max(16, min(512, _PREPASS_TILE // pre_m))


@triton.jit
def _mask_tile(mask_ptr, offsets, valid, MASK_KIND: tl.constexpr, mask_floor):
    """(allowed, additive bias in log2 units) of one mask tile; `valid` entries outside the tensor are masked."""
    if MASK_KIND == 1:
        allowed = (tl.load(mask_ptr + offsets, mask=valid, other=0) != 0) & valid
        bias = tl.zeros(allowed.shape, dtype=tl.float32)
    else:
        values = tl.load(mask_ptr + offsets, mask=valid, other=-float("inf")).to(tl.float32)
        allowed = (values > mask_floor) & valid
        bias = tl.where(allowed, values, 0.0) * 1.4426950408889634
    return allowed, bias


# kv_splits is a runtime argument (never specialised, not even at 1): one compiled kernel serves every split
# count, so a cold first generate() compiles no extra variants for the decoder's, prefill's and commit's grids.
@triton.jit(do_not_specialize=["kv_splits"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, stats_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    num_kv_heads, Lq, Lk, q_offset, window, qk_scale, mask_floor, kv_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRE_M: tl.constexpr, PRE_N: tl.constexpr,
    MASK_KIND: tl.constexpr, KEY_MASK: tl.constexpr, BOUND_BY_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr, V_IS_K: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    DV_SPLIT: tl.constexpr = HEAD_DIM // BLOCK_DV
    pid_d = tl.program_id(2) % DV_SPLIT
    pid_s = tl.program_id(2) // DV_SPLIT
    batch = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads

    # Packed rows: row r of this (batch, kv head) is query position r // GROUP of query head
    # kv_head * GROUP + r % GROUP.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_valid = q_pos < Lq
    dims = tl.arange(0, HEAD_DIM)
    out_dims = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)

    q_base = q_ptr + batch.to(tl.int64) * stride_qb
    q_offsets = heads[:, None].to(tl.int64) * stride_qh + q_pos[:, None] * stride_qm + dims[None, :]
    q = tl.load(q_base + q_offsets, mask=row_valid[:, None], other=0.0)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    m_base = mask_ptr + batch.to(tl.int64) * stride_mb

    # Key range [lo, hi) this program has to visit.
    first_q = (pid_m * BLOCK_M) // GROUP
    last_q = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, Lq - 1)
    lo = 0
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(hi, last_q + q_offset + 1)
    if WINDOWED:
        lo = tl.maximum(lo, first_q + q_offset - window + 1)
    if BOUND_BY_MASK:
        # Scan this program's distinct query rows for the first and last allowed key.
        scan_rows = first_q + tl.arange(0, PRE_M)
        scan_valid = scan_rows <= last_q
        first_key = pid_m * 0 + Lk  # int32 tensors from the start (Lk may be specialised to a constant)
        last_key = pid_m * 0 - 1
        for start in range(lo, hi, PRE_N):
            cols = start + tl.arange(0, PRE_N)
            valid = scan_valid[:, None] & (cols < hi)[None, :]
            offsets = scan_rows[:, None] * stride_mm + cols[None, :] * stride_mn
            allowed, _ = _mask_tile(m_base, offsets, valid, MASK_KIND, mask_floor)
            first_key = tl.minimum(first_key, tl.min(tl.where(allowed, cols[None, :], Lk)))
            last_key = tl.maximum(last_key, tl.max(tl.where(allowed, cols[None, :], -1)))
        lo = tl.maximum(lo, first_key)
        hi = tl.minimum(hi, last_key + 1)
    lo = (lo // BLOCK_N) * BLOCK_N  # aligned tiles; keys before the true start are masked below
    # This program's equal share of the key blocks (all of them at kv_splits 1). No branch on kv_splits: Triton
    # 3.6 loses lo's alignment through an `if`, and then pipelines 1-byte mask loads it cannot lower.
    share = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), kv_splits) * BLOCK_N
    lo = lo + pid_s * share
    hi = tl.minimum(hi, lo + share)

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    abs_pos = q_pos + q_offset
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_valid = cols < Lk
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :], mask=col_valid[:, None], other=0.0)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # log2 units
        allowed = col_valid[None, :] & row_valid[:, None]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= abs_pos[:, None])
        if WINDOWED:
            allowed = allowed & (cols[None, :] > abs_pos[:, None] - window)
        if KEY_MASK:  # one mask row serves every query: a vector a tile, no [rows, keys] tile to load
            key_allowed, key_bias = _mask_tile(m_base, cols * stride_mn, col_valid, MASK_KIND, mask_floor)
            allowed = allowed & key_allowed[None, :]
            if MASK_KIND == 2:
                s = s + key_bias[None, :]
        elif MASK_KIND != 0:
            offsets = q_pos[:, None] * stride_mm + cols[None, :] * stride_mn
            mask_allowed, bias = _mask_tile(m_base, offsets, allowed, MASK_KIND, mask_floor)
            allowed = mask_allowed
            if MASK_KIND == 2:
                s = s + bias
        s = tl.where(allowed, s, -float("inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing allowed yet keeps m = -inf; a finite reference keeps exp2() free of inf - inf.
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if V_IS_K and BLOCK_DV == HEAD_DIM:
            v = k
        else:
            v = tl.load(v_base + cols[:, None] * stride_vn + out_dims[None, :], mask=col_valid[:, None], other=0.0)
        if IEEE_DOT:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    if kv_splits == 1:
        # Rows that saw no allowed key have l = 0 and acc = 0: they store zeros.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_base = out_ptr + batch.to(tl.int64) * stride_ob
        o_offsets = heads[:, None].to(tl.int64) * stride_oh + q_pos[:, None] * stride_om + out_dims[None, :]
        tl.store(o_base + o_offsets, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        # Partials [kv_splits, packed rows of all (batch, kv head), HEAD_DIM]; stats [kv_splits, 2, rows].
        total_rows = tl.num_programs(1).to(tl.int64) * Lq * GROUP  # int64: times the split index below
        part_rows = pid_s * total_rows + pid_bh * Lq * GROUP + rows
        tl.store(part_ptr + part_rows[:, None] * HEAD_DIM + out_dims[None, :], acc, mask=row_valid[:, None])
        stats_rows = pid_s * 2 * total_rows + pid_bh * Lq * GROUP + rows
        if pid_d == 0:  # every output-column program has the same statistics
            tl.store(stats_ptr + stats_rows, m_i, mask=row_valid)
            tl.store(stats_ptr + stats_rows + total_rows, l_i, mask=row_valid)


@triton.jit(do_not_specialize=["total_rows", "kv_splits"])  # runtime ints (total_rows is cast to int64 below)
def _combine_splits_kernel(
    part_ptr, stats_ptr, out_ptr, stride_ob, stride_oh, stride_om, num_kv_heads, Lq, total_rows, kv_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s over the splits, in split order; zeros where no
    split saw an allowed key."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # packed rows of all (batch, kv head)
    row_valid = rows < total_rows
    total_rows = total_rows.to(tl.int64)  # times the split index below
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_R], -float("inf"), dtype=tl.float32)
    for s in range(kv_splits):
        m = tl.maximum(m, tl.load(stats_ptr + s * 2 * total_rows + rows, mask=row_valid, other=-float("inf")))
    m_ref = tl.where(m == -float("inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(kv_splits):
        weight = tl.math.exp2(tl.load(stats_ptr + s * 2 * total_rows + rows, mask=row_valid, other=-float("inf"))
                              - m_ref)
        l_sum += weight * tl.load(stats_ptr + (s * 2 + 1) * total_rows + rows, mask=row_valid, other=0.0)
        part_rows = s * total_rows + rows
        part = tl.load(part_ptr + part_rows[:, None] * HEAD_DIM + dims[None, :], mask=row_valid[:, None], other=0.0)
        acc += weight[:, None] * part
    out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]
    per_bh = Lq * GROUP
    bh = rows // per_bh
    batch = bh // num_kv_heads
    heads = (bh % num_kv_heads) * GROUP + (rows % per_bh) % GROUP
    q_pos = (rows % per_bh) // GROUP
    offsets = (batch.to(tl.int64) * stride_ob + heads.to(tl.int64) * stride_oh + q_pos * stride_om)
    tl.store(out_ptr + offsets[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_qkv(name: str, tensor, dtype=None, device=None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    _check(tensor.ndim == 4, f"{name} must be 4D [batch, heads, length, head_dim], got shape {tuple(tensor.shape)}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {tensor.dtype}; the attention kernel takes "
                        "torch.bfloat16, torch.float16 or torch.float32")
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of q ({dtype}), got {tensor.dtype}")
    _check(device is None or tensor.device == device, f"{name} is on {tensor.device}, expected {device} (q's device)")
    _check(tensor.shape[-1] <= 1 or tensor.stride(-1) == 1,
           f"{name} must have unit stride in its last (head_dim) dimension, got strides {tuple(tensor.stride())}")


def check_head_dim(head_dim: int) -> None:
    """Raises a ValueError naming `head_dim` unless the kernel supports it."""
    _check(head_dim in SUPPORTED_HEAD_DIMS,
           f"unsupported head_dim {head_dim}: the attention kernel takes head dims {SUPPORTED_HEAD_DIMS}")


def _check_config(config, head_dim: int) -> tuple[int, int, int, int, int]:
    _check(isinstance(config, (tuple, list)) and len(config) == 5,
           f"config must be (BLOCK_M, BLOCK_N, DV_SPLIT, num_warps, num_stages), got {config!r}")
    block_m, block_n, dv_split, num_warps, num_stages = (int(c) for c in config)
    for name, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
        _check(value >= 16 and value & (value - 1) == 0, f"config {name} must be a power of two >= 16, got {value}")
    _check(dv_split >= 1 and head_dim % dv_split == 0 and head_dim // dv_split >= 16
           and (head_dim // dv_split) & (head_dim // dv_split - 1) == 0,
           f"config DV_SPLIT must divide head_dim {head_dim} into power-of-two chunks >= 16, got {dv_split}")
    _check(num_warps in (1, 2, 4, 8, 16) and num_stages >= 1, f"bad num_warps/num_stages in config {config!r}")
    return block_m, block_n, dv_split, num_warps, num_stages


def auto_kv_splits(programs: int, kv_len: int, sm_count: int) -> int:
    """Key splits that let a grid of `programs` fill `sm_count` SMs, with at least _MIN_KEYS_PER_SPLIT of the
    `kv_len` keys a split (the keys a program visits after its mask and causal bounds can be fewer: a split
    may get one block, or none). sm_count 0, off CUDA: no split."""
    return max(1, min(sm_count // max(programs, 1), kv_len // _MIN_KEYS_PER_SPLIT, _MAX_KV_SPLITS))


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    causal: bool = False,
    q_offset: int = 0,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    config: tuple | None = None,
    bound_by_mask: bool = True,
    kv_splits: int | None = None,
) -> torch.Tensor:
    """Attention of q [B, Hq, Lq, D] over k, v [B, Hkv, Lk, D]; returns [B, Hq, Lq, D] (`out` if given).

    mask: None, or bool (True = attend) / additive float, broadcastable to [B, 1, Lq, Lk] (4D, any strides).
    scaling: multiplies q . k (default 1 / sqrt(D)). causal: query i (absolute position i + q_offset) sees keys
    j <= i + q_offset; sliding_window (with causal only) also drops keys j <= i + q_offset - sliding_window.
    out: optional [B, Hq, Lq, D] tensor of q's dtype with unit last-dim stride (e.g. a transposed view of a
    [B, Lq, Hq, D] buffer), written in full; it must not overlap q, k, v or mask. config: (BLOCK_M, BLOCK_N,
    DV_SPLIT, num_warps, num_stages) overrides the tuned table; bound_by_mask=False skips the mask scan (for
    benchmarks). kv_splits: programs sharing one block of rows, each over an equal share of its keys, merged by a
    second kernel (None: `auto_kv_splits`, which splits only grids smaller than the GPU).
    Pass the same tensor as k and v when K doubles as V: it is then read once.
    """
    _check_qkv("q", q)
    _check_qkv("k", k, q.dtype, q.device)
    _check_qkv("v", v, q.dtype, q.device)
    batch, q_heads, q_len, head_dim = q.shape
    _, kv_heads, kv_len, _ = k.shape
    check_head_dim(head_dim)
    _check(k.shape[0] == batch and k.shape[-1] == head_dim,
           f"k must have shape [{batch}, kv_heads, kv_len, {head_dim}] (q is {tuple(q.shape)}), got {tuple(k.shape)}")
    _check(tuple(v.shape) == tuple(k.shape), f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    _check(kv_heads >= 1 and q_heads % kv_heads == 0,
           f"q heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    group = q_heads // kv_heads
    if scaling is None:
        scaling = 1.0 / math.sqrt(head_dim)
    _check(isinstance(scaling, (int, float)) and math.isfinite(scaling),
           f"scaling must be a finite float, got {scaling!r}")
    _check(isinstance(causal, bool), f"causal must be a bool, got {causal!r}")
    _check(isinstance(q_offset, int) and not isinstance(q_offset, bool), f"q_offset must be an int, got {q_offset!r}")
    _check(kv_splits is None or (isinstance(kv_splits, int) and not isinstance(kv_splits, bool)
                                 and 1 <= kv_splits <= _MAX_KV_SPLITS),
           f"kv_splits must be None or an int from 1 to {_MAX_KV_SPLITS}, got {kv_splits!r}")
    if sliding_window is not None:
        _check(isinstance(sliding_window, int) and sliding_window >= 1,
               f"sliding_window must be a positive int or None, got {sliding_window!r}")
        _check(causal, "sliding_window needs causal=True (the window is the causal one, keys i - window < j <= i)")

    mask_kind, mask_floor, mask_arg, mask_strides = 0, 0.0, q, (0, 0, 0)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and mask.dtype not in _MASK_FLOAT_DTYPES:
            raise TypeError(f"mask must be bool or a float dtype (bfloat16, float16, float32), got {mask.dtype}")
        _check(mask.ndim == 4 and mask.shape[0] in (1, batch) and mask.shape[1] == 1
               and mask.shape[2] in (1, q_len) and mask.shape[3] == kv_len,
               f"mask must have shape [{batch} or 1, 1, {q_len} or 1, {kv_len}], got {tuple(mask.shape)}")
        _check(mask.device == q.device, f"mask is on {mask.device}, expected {q.device} (q's device)")
        expanded = mask.expand(batch, 1, q_len, kv_len)
        mask_strides = (expanded.stride(0), expanded.stride(2), expanded.stride(3))
        if mask.dtype == torch.bool:
            mask_kind, mask_arg = 1, mask.view(torch.uint8)
        else:
            mask_kind, mask_arg, mask_floor = 2, mask, float(torch.finfo(mask.dtype).min)

    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        _check_qkv("out", out, q.dtype, q.device)
        _check(tuple(out.shape) == tuple(q.shape), f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    # In-head offsets are 32-bit in the kernel (batch and head offsets are 64-bit).
    for name, tensor, length in (("q", q, q_len), ("k", k, kv_len), ("v", v, kv_len), ("out", out, q_len)):
        _check(length * tensor.stride(2) + head_dim <= _INT32_MAX, f"{name} is too long for 32-bit in-head offsets")
    _check(q_len * mask_strides[1] + kv_len * mask_strides[2] <= _INT32_MAX, "mask is too large for 32-bit offsets")
    if q_len == 0 or batch == 0 or q_heads == 0:
        return out

    block_m, block_n, dv_split, num_warps, num_stages = (
        pick_config(head_dim, q.dtype) if config is None else _check_config(config, head_dim))
    v_is_k = v is k or (v.data_ptr() == k.data_ptr() and v.stride() == k.stride())
    key_mask = bool(mask_kind) and mask_strides[1] == 0  # one row for every query (e.g. the decoder's padding)
    pre_m, pre_n = mask_scan_tile(block_m, group, key_mask)
    grid = (triton.cdiv(q_len * group, block_m), batch * kv_heads, dv_split)
    if kv_splits is None:
        sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 0
        kv_splits = auto_kv_splits(grid[0] * grid[1] * grid[2], kv_len, sm_count)
    total_rows = batch * kv_heads * q_len * group
    # fp32 scratch for split keys; unread without splits (a one-element stand-in of the same pointer type).
    scratch_rows = total_rows if kv_splits > 1 else 0
    part = torch.empty(max(kv_splits * scratch_rows * head_dim, 1), dtype=torch.float32, device=q.device)
    stats = torch.empty(max(kv_splits * 2 * scratch_rows, 1), dtype=torch.float32, device=q.device)
    _attention_kernel[grid[:2] + (dv_split * kv_splits,)](
        q, k, v, mask_arg, out, part, stats,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *mask_strides,
        out.stride(0), out.stride(1), out.stride(2),
        kv_heads, q_len, kv_len, q_offset, sliding_window or 0, float(scaling) * _LOG2E, mask_floor, kv_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_DV=head_dim // dv_split,
        BLOCK_M=block_m, BLOCK_N=block_n, PRE_M=pre_m, PRE_N=pre_n,
        MASK_KIND=mask_kind, KEY_MASK=key_mask, BOUND_BY_MASK=bool(mask_kind and bound_by_mask), CAUSAL=causal,
        WINDOWED=sliding_window is not None, V_IS_K=v_is_k, IEEE_DOT=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    if kv_splits > 1:
        block_r, block_d = 32, min(head_dim, 128)
        _combine_splits_kernel[(triton.cdiv(total_rows, block_r), head_dim // block_d)](
            part, stats, out, out.stride(0), out.stride(1), out.stride(2), kv_heads, q_len, total_rows, kv_splits,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return out
