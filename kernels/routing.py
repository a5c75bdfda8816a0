"""MoE routing in one Triton launch: the expert-sorted pair list and the tile schedule of the grouped GEMMs.

`route` replaces a dozen small torch ops (sort, scatter_add, cumsum, searchsorted, ...) whose launches dominated a
CUDA-graph-captured decoder step. One program per expert; each program re-counts every pair's expert (a few KiB
read from L2) so that no program waits on another: no atomics in global memory, no inter-program sync, and the
result is deterministic. Output shapes depend only on (pairs, experts, block_m), so the launch can be captured.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Pairs read per loop step, and the warps of each program. Bigger steps mean fewer serial iterations in each
# program; 4096 int64 ids are 16 a thread at 8 warps. On an H200 at 16K pairs (2048 tokens, top-8) this took the
# launch from 34 us (2048 pairs, 4 warps) to 24 us; at 2K pairs, from 5.9 to 5.0 us.
_MAX_PAIRS_BLOCK = 4096
_ROUTE_WARPS = 8
# Tile-schedule entries written per loop step.
_TILES_BLOCK = 128


class Routing(NamedTuple):
    """Expert-sorted pair list and tile schedule (device tensors)."""

    sorted_pairs: torch.Tensor  # int32 [P]: pair ids p = t * top_k + k, grouped by expert, stable
    expert_offsets: torch.Tensor  # int32 [E + 1]: expert e owns sorted rows offsets[e]:offsets[e+1]
    tile_expert: torch.Tensor  # int32 [max_tiles]: expert of each tile, -1 past the last tile
    tile_start: torch.Tensor  # int32 [max_tiles]: first sorted row of each tile
    block_m: int


@triton.jit
def _load_experts(index_ptr, pairs, valid, top_k, stride_token, stride_k):
    # Pair p is top_k_index[p // top_k, p % top_k]: strided reads, so the caller's view needs no copy.
    offsets = (pairs // top_k) * stride_token + (pairs % top_k) * stride_k
    return tl.load(index_ptr + offsets, mask=valid, other=0).to(tl.int32)


@triton.jit
def _route_kernel(
    index_ptr, stride_token, stride_k, top_k, num_pairs, num_experts, max_tiles,
    sorted_pairs_ptr, expert_offsets_ptr, tile_expert_ptr, tile_start_ptr,
    BLOCK_M: tl.constexpr, EXPERTS_BLOCK: tl.constexpr, PAIRS_BLOCK: tl.constexpr, TILES_BLOCK: tl.constexpr,
):
    expert = tl.program_id(0)
    lanes = tl.arange(0, PAIRS_BLOCK)

    # 1. Pairs per expert, over all pairs (every program computes the same histogram).
    counts = tl.zeros((EXPERTS_BLOCK,), dtype=tl.int32)
    for start in range(0, num_pairs, PAIRS_BLOCK):
        pairs = start + lanes
        valid = pairs < num_pairs
        experts = _load_experts(index_ptr, pairs, valid, top_k, stride_token, stride_k)
        # Lanes past the end count in the spare last bin (>= num_experts, never read): no histogram mask,
        # which older Triton releases lack.
        counts += tl.histogram(tl.where(valid, experts, EXPERTS_BLOCK - 1), EXPERTS_BLOCK)

    # 2. This expert's rows and tiles: exclusive prefix sums, as masked sums over the experts before it.
    bins = tl.arange(0, EXPERTS_BLOCK)
    before = bins < expert
    row_start = tl.sum(tl.where(before, counts, 0))
    count = tl.sum(tl.where(bins == expert, counts, 0))
    first_tile = tl.sum(tl.where(before, (counts + BLOCK_M - 1) // BLOCK_M, 0))
    tile_end = first_tile + (count + BLOCK_M - 1) // BLOCK_M
    last = expert == num_experts - 1
    tl.store(expert_offsets_ptr + expert, row_start)
    tl.store(expert_offsets_ptr + num_experts, row_start + count, mask=last)

    # 3. This expert's tiles. The last expert's program also fills the unused tail with -1; the tail's tile_start
    # continues the last expert's arithmetic, as the torch version's clamp did (bitwise-equal outputs).
    schedule_end = tl.where(last, max_tiles, tile_end)
    for tile0 in range(first_tile, schedule_end, TILES_BLOCK):
        tiles = tile0 + tl.arange(0, TILES_BLOCK)
        in_range = tiles < schedule_end
        tl.store(tile_expert_ptr + tiles, tl.where(tiles < tile_end, expert, -1), mask=in_range)
        tl.store(tile_start_ptr + tiles, row_start + (tiles - first_tile) * BLOCK_M, mask=in_range)

    # 4. This expert's pairs in ascending pair id (a stable sort): row = row_start + earlier pairs of this expert.
    row = row_start
    scan_end = tl.where(count > 0, num_pairs, 0)  # an idle expert skips the pass
    for start in range(0, scan_end, PAIRS_BLOCK):
        pairs = start + lanes
        valid = pairs < num_pairs
        mine = valid & (_load_experts(index_ptr, pairs, valid, top_k, stride_token, stride_k) == expert)
        mine = mine.to(tl.int32)
        rank = tl.cumsum(mine, 0)  # inclusive: 1 for this chunk's first pair of the expert
        tl.store(sorted_pairs_ptr + row + rank - 1, pairs, mask=mine != 0)
        row += tl.sum(mine)


def _int_arg(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def route(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    """Sorts the pairs by expert (stable) and tiles each expert's rows in blocks of `block_m`: one kernel launch,
    no host sync. top_k_index [tokens, top_k] int32/int64 with values in [0, num_experts] (not checked: that
    would sync); the value num_experts (expert parallelism's sentinel: another rank's expert) leaves the pair out
    of every expert (it lands in the histogram's spare bin). block_m a power of two >= 16."""
    if not isinstance(top_k_index, torch.Tensor):
        raise TypeError(f"top_k_index must be a torch.Tensor, got {type(top_k_index).__name__}")
    if top_k_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"top_k_index must be int32 or int64, got {top_k_index.dtype}")
    if top_k_index.ndim != 2:
        raise ValueError(f"top_k_index must be 2D [tokens, top_k], got shape {tuple(top_k_index.shape)}")
    num_experts = _int_arg("num_experts", num_experts)
    block_m = _int_arg("block_m", block_m)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    tokens, top_k = top_k_index.shape
    num_pairs = tokens * top_k
    if num_pairs >= 2**31:
        raise ValueError(f"top_k_index has {num_pairs} pairs; pair ids must fit in int32")

    device = top_k_index.device
    # Every non-empty expert has at least one tile, and there are at most ceil(P / block_m) + E tiles.
    max_tiles = min(num_pairs, triton.cdiv(num_pairs, block_m) + num_experts)
    sorted_pairs = torch.empty(num_pairs, dtype=torch.int32, device=device)
    expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=device)
    tile_start = torch.empty(max_tiles, dtype=torch.int32, device=device)
    # Small blocks (>= 16 lanes) keep decode-sized calls cheap; one bin more than the experts (the spare).
    pairs_block = min(max(triton.next_power_of_2(num_pairs), 16), _MAX_PAIRS_BLOCK)
    experts_block = max(triton.next_power_of_2(num_experts + 1), 16)
    _route_kernel[(num_experts,)](
        top_k_index, top_k_index.stride(0), top_k_index.stride(1), max(top_k, 1), num_pairs, num_experts, max_tiles,
        sorted_pairs, expert_offsets, tile_expert, tile_start,
        BLOCK_M=block_m, EXPERTS_BLOCK=experts_block, PAIRS_BLOCK=pairs_block, TILES_BLOCK=_TILES_BLOCK,
        num_warps=_ROUTE_WARPS,
    )
    return Routing(sorted_pairs, expert_offsets, tile_expert, tile_start, block_m)


@triton.jit
def _take_largest(rank, probs, taken, cols, EXPERTS_BLOCK: tl.constexpr):
    # The largest rank among the experts not taken yet, the lowest expert among equals; its probability.
    candidates = tl.where(taken, -float("inf"), rank)
    best = tl.max(candidates, axis=1)
    chosen = tl.min(tl.where((candidates == best[:, None]) & ~taken, cols[None, :], EXPERTS_BLOCK), axis=1)
    hit = cols[None, :] == chosen[:, None]
    return chosen, tl.sum(tl.where(hit, probs, 0.0), axis=1), taken | hit


@triton.jit
def _top_k_kernel(
    probs_ptr, scale_ptr, weights_ptr, index_ptr, tokens, num_experts, stride_token,
    TOP_K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, EXPERTS_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, EXPERTS_BLOCK)
    row_valid = rows < tokens
    valid = row_valid[:, None] & (cols[None, :] < num_experts)
    probs = tl.load(probs_ptr + rows[:, None].to(tl.int64) * stride_token + cols[None, :], mask=valid, other=0.0)
    rank = tl.where(probs != probs, float("inf"), probs)  # NaN ranks highest, as in torch.topk
    # One selection sweep; the k-th choice goes to column k of small [BLOCK_T, K_BLOCK] tiles, and the chosen
    # probabilities are summed in choice order for the renormalisation. Padding columns start out taken.
    slots = tl.arange(0, K_BLOCK)
    chosen_values = tl.zeros((BLOCK_T, K_BLOCK), dtype=tl.float32)
    chosen_experts = tl.zeros((BLOCK_T, K_BLOCK), dtype=tl.int32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    taken = ~valid
    for k in tl.static_range(TOP_K):
        chosen, value, taken = _take_largest(rank, probs, taken, cols, EXPERTS_BLOCK)
        total += value
        slot = slots[None, :] == k
        chosen_values = tl.where(slot, value[:, None], chosen_values)
        chosen_experts = tl.where(slot, chosen[:, None], chosen_experts)
    store = row_valid[:, None] & (slots[None, :] < TOP_K)
    scale = tl.load(scale_ptr + chosen_experts, mask=store, other=0.0).to(tl.float32)
    out = rows[:, None].to(tl.int64) * TOP_K + slots[None, :]
    tl.store(weights_ptr + out, chosen_values / total[:, None] * scale, mask=store)
    tl.store(index_ptr + out, chosen_experts.to(tl.int64), mask=store)


def top_k_weights(probs: torch.Tensor, top_k: int, per_expert_scale: torch.Tensor):
    """Upstream's router after its softmax (DiffusionGemmaTextRouter.forward: torch.topk, renormalise, times
    each chosen expert's scale) in one launch; torch.topk sorts every row (two kernels, most of the router's
    time). probs [tokens, experts] fp32 with contiguous rows, per_expert_scale [experts] on the same device.
    Returns (weights fp32, index int64) [tokens, top_k]. NaN ranks highest, as in torch.topk. Among equal
    probabilities the lower expert comes first (torch.topk leaves that order unspecified), and the sum of the
    chosen ones is taken in choice order, so weights may differ from torch's in the last bit."""
    if probs.ndim != 2 or probs.dtype != torch.float32 or probs.stride(1) != 1:
        raise ValueError(f"probs must be a 2D float32 tensor with contiguous rows, got {probs.dtype} "
                         f"{tuple(probs.shape)} strides {tuple(probs.stride())}")
    tokens, experts = probs.shape
    top_k = _int_arg("top_k", top_k)
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, {experts}] (the experts), got {top_k}")
    if per_expert_scale.shape != (experts,) or per_expert_scale.device != probs.device:
        raise ValueError(f"per_expert_scale must have shape ({experts},) on {probs.device}, got "
                         f"{tuple(per_expert_scale.shape)} on {per_expert_scale.device}")
    per_expert_scale = per_expert_scale.contiguous()
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=probs.device)
    index = torch.empty(tokens, top_k, dtype=torch.int64, device=probs.device)
    if tokens:
        experts_block = max(triton.next_power_of_2(experts), 16)
        block_t = max(1, min(16, 4096 // experts_block))
        _top_k_kernel[(triton.cdiv(tokens, block_t),)](
            probs, per_expert_scale, weights, index, tokens, experts, probs.stride(0),
            TOP_K=top_k, K_BLOCK=triton.next_power_of_2(top_k), BLOCK_T=block_t, EXPERTS_BLOCK=experts_block,
        )
    return weights, index
