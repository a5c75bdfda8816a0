"""Mixture-of-experts forward in Triton: routing, two grouped GEMMs, a deterministic combine.

    out[t] = sum_k w[t, k] * down[e] @ (gelu_tanh(gate[e] @ x[t]) * (up[e] @ x[t])),   e = idx[t, k]

Weights are either bf16/fp16 (`gate_up` [E, 2I, H] with gate rows 0..I-1 and up rows I..2I-1, `down`
[E, H, I], transformers' layout) or NVFP4 (uint8 codes [E, N, K/2] in `nvfp4.to_kernel_layout`'s order, E4M3 scales
[E, N, K/16] passed as uint8, fp32 global scales [E]) dequantized in registers (W4A16: Hopper has no FP4
tensor cores). Activations are bf16/fp16 (or fp32, as TF32 on the tensor cores); accumulation is fp32.

Steps, all on the device with shapes fixed by (tokens, top_k, experts), so they can be captured in a CUDA
graph: `route` sorts the token-expert pairs by expert and builds a tile schedule; `_gate_up_kernel` gathers
each tile's token rows and writes gelu_tanh(gate) * up in expert-sorted order; `_down_kernel` applies the
routing weight and writes one row per pair; the combine sums each token's top_k rows in a fixed order (no
float atomics, so results are bitwise reproducible).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Block sizes per shape class, kept as data. Chosen by the mean number of pairs per expert.
# BLOCK_M: pair rows per tile; BLOCK_N / BLOCK_K: output columns / reduction chunk (bf16 weights; NVFP4
# weights always reduce over blocks of 32, their packing unit).
_CONFIGS = (
    # (max mean pairs per expert, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (8, 16, 64, 128, 4, 4),
    (24, 32, 64, 128, 4, 4),
    (96, 64, 128, 64, 4, 4),
    (float("inf"), 128, 128, 64, 8, 3),
)


# float32 runs the tensor cores in TF32 (Triton's default for a float32 dot).
_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Routing(NamedTuple):
    """Expert-sorted pair list and tile schedule (device tensors)."""

    sorted_pairs: torch.Tensor  # int32 [P]: pair ids p = t * top_k + k, grouped by expert, stable
    expert_offsets: torch.Tensor  # int32 [E + 1]: expert e owns sorted rows offsets[e]:offsets[e+1]
    tile_expert: torch.Tensor  # int32 [max_tiles]: expert of each tile, -1 past the last tile
    tile_start: torch.Tensor  # int32 [max_tiles]: first sorted row of each tile
    block_m: int


def pick_config(num_pairs: int, num_experts: int) -> tuple[int, int, int, int, int]:
    mean = num_pairs / num_experts
    for limit, *config in _CONFIGS:
        if mean <= limit:
            return tuple(config)
    raise AssertionError("unreachable: the last config has no limit")


def route(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    """Sorts the pairs by expert and tiles each expert's rows in blocks of `block_m`; no host sync."""
    num_pairs = top_k_index.numel()
    device = top_k_index.device
    flat = top_k_index.reshape(-1)
    # Stable: pairs of one expert keep token order, so the schedule (and the result) is deterministic.
    sorted_expert, sorted_pairs = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32))
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    expert_offsets[1:] = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    # Every non-empty expert has at least one tile, and there are at most ceil(P / block_m) + E tiles.
    max_tiles = min(num_pairs, triton.cdiv(num_pairs, block_m) + num_experts)
    tile_ids = torch.arange(max_tiles, dtype=torch.int32, device=device)
    tile_expert = torch.searchsorted(tile_end, tile_ids, right=True).to(torch.int32)
    valid = tile_expert < num_experts
    expert = tile_expert.clamp(max=num_experts - 1)
    first_tile = (tile_end - tiles)[expert]
    tile_start = expert_offsets[expert] + (tile_ids - first_tile) * block_m
    return Routing(
        sorted_pairs=sorted_pairs.to(torch.int32),
        expert_offsets=expert_offsets,
        tile_expert=torch.where(valid, tile_expert, -1),
        tile_start=tile_start.to(torch.int32),
        block_m=block_m,
    )


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(u) = 2 sigmoid(2u) - 1.
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * inner)


@triton.jit
def _e2m1_scaled(code):
    """4-bit E2M1 codes (int32 0..15) -> fp32 value * 2^-14. Shifting the 3 magnitude bits to fp16's exponent /
    mantissa boundary gives exactly value * 2^-14 for every code (code 1 lands on fp16's subnormal 2^-15);
    bit 3 is the sign. A few integer ops, no table, no branch."""
    bits = ((code & 8) << 12) | ((code & 7) << 9)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e4m3_to_float(byte):
    """FP8 E4M3 (fn) bits (int32 0..255) -> fp32; read as bytes so the CPU interpreter needs no fp8 type.
    Same trick: the 7 low bits moved to fp16's boundary give value * 2^-8 exactly, subnormals included."""
    bits = ((byte & 128) << 8) | ((byte & 127) << 7)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _nvfp4_block(packed_ptr, scale_ptr, rows, n_mask, k0, K, compute_dtype: tl.constexpr):
    """Dequantizes weight rows `rows` [BLOCK_N] over the 32 K elements k0 .. k0 + 31 (kernel layout, see
    `to_kernel_layout`) into two [16, BLOCK_N] tiles: elements k0 .. k0 + 15 (low nibbles) and k0 + 16 ..
    k0 + 31 (high nibbles), each half under one E4M3 scale per row. E2M1 x E4M3 products are exact in fp16 and
    bf16, so the tiles are exact; the fp32 global scale is applied to the accumulator."""
    # K is a multiple of 32 (checked by the wrapper): only the rows need masks.
    byte_offsets = rows[None, :] * (K // 2) + k0 // 2 + tl.arange(0, 16)[:, None]
    packed = tl.load(packed_ptr + byte_offsets, mask=n_mask[None, :], other=0).to(tl.int32)
    scale_offsets = rows * (K // 16) + k0 // 16
    scale_low = tl.load(scale_ptr + scale_offsets, mask=n_mask, other=0).to(tl.int32)
    scale_high = tl.load(scale_ptr + scale_offsets + 1, mask=n_mask, other=0).to(tl.int32)
    # 2^14 undoes _e2m1_scaled's factor; applied to the [BLOCK_N] scales, not to every element.
    scale_low = _e4m3_to_float(scale_low) * 16384.0
    scale_high = _e4m3_to_float(scale_high) * 16384.0
    low = (_e2m1_scaled(packed & 15) * scale_low[None, :]).to(compute_dtype)
    high = (_e2m1_scaled(packed >> 4) * scale_high[None, :]).to(compute_dtype)
    return low, high


@triton.jit
def _gate_up_kernel(
    x_ptr, sorted_pairs_ptr, expert_offsets_ptr, tile_expert_ptr, tile_start_ptr,
    w_ptr, w_scale_ptr, gate_scale2_ptr, up_scale2_ptr, act_ptr,
    H, I, TOP_K,
    NVFP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    row_start = tl.load(tile_start_ptr + tile)
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0) // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    gate_rows = expert * 2 * I + cols  # row of gate_up [E * 2I, ...]
    up_rows = gate_rows + I
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + tokens[:, None] * H
    if NVFP4:
        half = tl.arange(0, 16)
        for k0 in range(0, H, 32):
            a_low = tl.load(x_rows + k0 + half[None, :], mask=row_mask[:, None], other=0.0)
            a_high = tl.load(x_rows + k0 + 16 + half[None, :], mask=row_mask[:, None], other=0.0)
            g_low, g_high = _nvfp4_block(w_ptr, w_scale_ptr, gate_rows, col_mask, k0, H, a_low.dtype)
            acc_gate = tl.dot(a_low, g_low, acc_gate)
            acc_gate = tl.dot(a_high, g_high, acc_gate)
            u_low, u_high = _nvfp4_block(w_ptr, w_scale_ptr, up_rows, col_mask, k0, H, a_low.dtype)
            acc_up = tl.dot(a_low, u_low, acc_up)
            acc_up = tl.dot(a_high, u_high, acc_up)
        # Gate and up keep their own global scales (a shared one is a known engine bug).
        acc_gate = acc_gate * tl.load(gate_scale2_ptr + expert)
        acc_up = acc_up * tl.load(up_scale2_ptr + expert)
    else:
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            a = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & col_mask[None, :]
            w_gate = tl.load(w_ptr + gate_rows[None, :] * H + ks[:, None], mask=w_mask, other=0.0)
            w_up = tl.load(w_ptr + up_rows[None, :] * H + ks[:, None], mask=w_mask, other=0.0)
            acc_gate = tl.dot(a, w_gate, acc_gate)
            acc_up = tl.dot(a, w_up, acc_up)
    act = _gelu_tanh(acc_gate) * acc_up
    out_ptrs = act_ptr + rows[:, None] * I + cols[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_kernel(
    act_ptr, sorted_pairs_ptr, expert_offsets_ptr, tile_expert_ptr, tile_start_ptr, top_k_weights_ptr,
    w_ptr, w_scale_ptr, down_scale2_ptr, out_ptr,
    H, I,
    NVFP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    row_start = tl.load(tile_start_ptr + tile)
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    w_rows = expert * H + cols  # row of down [E * H, ...]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_rows = act_ptr + rows[:, None] * I
    if NVFP4:
        half = tl.arange(0, 16)
        for k0 in range(0, I, 32):
            a_low = tl.load(a_rows + k0 + half[None, :], mask=row_mask[:, None], other=0.0)
            a_high = tl.load(a_rows + k0 + 16 + half[None, :], mask=row_mask[:, None], other=0.0)
            low, high = _nvfp4_block(w_ptr, w_scale_ptr, w_rows, col_mask, k0, I, a_low.dtype)
            acc = tl.dot(a_low, low, acc)
            acc = tl.dot(a_high, high, acc)
        acc = acc * tl.load(down_scale2_ptr + expert)
    else:
        for k0 in range(0, I, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < I
            a = tl.load(a_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptr + w_rows[None, :] * I + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, w, acc)
    weight = tl.load(top_k_weights_ptr + pairs, mask=row_mask, other=0.0)
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + pairs[:, None] * H + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


class NVFP4Experts(NamedTuple):
    """Expert weights in NVFP4 as the kernels read them: codes in `nvfp4.to_kernel_layout`'s byte order,
    scales as ModelOpt's."""

    gate_up_packed: torch.Tensor  # uint8 [E, 2I, H/2], kernel layout
    gate_up_scale: torch.Tensor  # uint8 (E4M3 bits) [E, 2I, H/16]
    gate_scale2: torch.Tensor  # fp32 [E]
    up_scale2: torch.Tensor  # fp32 [E]
    down_packed: torch.Tensor  # uint8 [E, H, I/2], kernel layout
    down_scale: torch.Tensor  # uint8 (E4M3 bits) [E, H, I/16]
    down_scale2: torch.Tensor  # fp32 [E]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_tensor(name: str, tensor: torch.Tensor, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {tensor.dtype}")
    _check(tuple(tensor.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    _check(tensor.device == device, f"{name} is on {tensor.device}, expected {device}")
    _check(tensor.is_contiguous(), f"{name} must be contiguous")


def _check_routing_inputs(hidden_states, top_k_index, top_k_weights) -> None:
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dtype not in _ACTIVATION_DTYPES:
        raise TypeError("hidden_states must be a bfloat16, float16 or float32 torch.Tensor [tokens, hidden]")
    _check(hidden_states.ndim == 2, f"hidden_states must be 2D [tokens, hidden], got {tuple(hidden_states.shape)}")
    _check(hidden_states.is_contiguous(), "hidden_states must be contiguous")
    tokens = hidden_states.shape[0]
    _check(top_k_index.ndim == 2 and top_k_index.shape[0] == tokens,
           f"top_k_index must have shape [{tokens}, top_k], got {tuple(top_k_index.shape)}")
    if top_k_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"top_k_index must be int32 or int64, got {top_k_index.dtype}")
    _check_tensor("top_k_weights", top_k_weights, tuple(top_k_index.shape), (torch.float32,), hidden_states.device)


def _run(hidden_states, top_k_index, top_k_weights, num_experts, intermediate, gate_up_args, down_args, nvfp4, out,
         config):
    tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[1]
    if out is None:
        out = torch.empty_like(hidden_states)
    else:
        _check_tensor("out", out, tuple(hidden_states.shape), (hidden_states.dtype,), hidden_states.device)
    if tokens == 0:
        return out
    num_pairs = tokens * top_k
    block_m, block_n, block_k, num_warps, num_stages = config or pick_config(num_pairs, num_experts)
    if config is None and hidden_states.dtype == torch.float32:
        block_k //= 2  # the table is sized for 2-byte tiles; fp32 ones would overflow shared memory
    routing = route(top_k_index, num_experts, block_m)
    max_tiles = routing.tile_expert.numel()
    act = torch.empty(num_pairs, intermediate, dtype=hidden_states.dtype, device=hidden_states.device)
    pair_out = torch.empty(num_pairs, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
    common = dict(NVFP4=nvfp4, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                  num_warps=num_warps, num_stages=num_stages)
    _gate_up_kernel[(max_tiles, triton.cdiv(intermediate, block_n))](
        hidden_states, routing.sorted_pairs, routing.expert_offsets, routing.tile_expert, routing.tile_start,
        *gate_up_args, act, hidden, intermediate, top_k, **common,
    )
    _down_kernel[(max_tiles, triton.cdiv(hidden, block_n))](
        act, routing.sorted_pairs, routing.expert_offsets, routing.tile_expert, routing.tile_start,
        top_k_weights, *down_args, pair_out, hidden, intermediate, **common,
    )
    # Fixed-order sum over top_k, accumulated in fp32: deterministic, no atomics.
    out.copy_(pair_out.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32))
    return out


def moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, out=None, config=None):
    """MoE experts with bf16/fp16 weights: gate_up_proj [E, 2I, H], down_proj [E, H, I] (hidden's dtype).

    hidden_states [T, H] bf16/fp16; top_k_index [T, K] int (values in [0, E), not checked: that would sync);
    top_k_weights [T, K] fp32; `out` [T, H], optional, is written in full. `config` (BLOCK_M, BLOCK_N,
    BLOCK_K, num_warps, num_stages) overrides the tuned table, for benchmarks.
    """
    _check_routing_inputs(hidden_states, top_k_index, top_k_weights)
    hidden = hidden_states.shape[1]
    _check(gate_up_proj.ndim == 3, f"gate_up_proj must be 3D [E, 2I, H], got {tuple(gate_up_proj.shape)}")
    experts, two_i, _ = gate_up_proj.shape
    _check(two_i % 2 == 0, f"gate_up_proj's second dimension must be even (gate and up halves), got {two_i}")
    intermediate = two_i // 2
    dtype, device = (hidden_states.dtype,), hidden_states.device
    _check_tensor("gate_up_proj", gate_up_proj, (experts, two_i, hidden), dtype, device)
    _check_tensor("down_proj", down_proj, (experts, hidden, intermediate), dtype, device)
    return _run(hidden_states, top_k_index, top_k_weights, experts, intermediate,
                (gate_up_proj, gate_up_proj, gate_up_proj, gate_up_proj), (down_proj, down_proj, down_proj),
                nvfp4=False, out=out, config=config)


def moe_experts_nvfp4(hidden_states, top_k_index, top_k_weights, weights: NVFP4Experts, out=None, config=None):
    """MoE experts with NVFP4 weights (W4A16): the weights are dequantized in registers, bf16/fp16 MMA.
    Arguments as for `moe_experts`."""
    _check_routing_inputs(hidden_states, top_k_index, top_k_weights)
    hidden = hidden_states.shape[1]
    _check(hidden % 32 == 0, f"hidden size must be a multiple of 32 for NVFP4, got {hidden}")
    packed = weights.gate_up_packed
    _check(isinstance(packed, torch.Tensor) and packed.ndim == 3,
           "gate_up_packed must be a 3D uint8 tensor [E, 2I, H/2]")
    experts, two_i, _ = packed.shape
    intermediate = two_i // 2
    _check(two_i % 2 == 0 and intermediate % 32 == 0,
           f"gate_up_packed's second dimension must be 2I with I a multiple of 32, got {two_i}")
    device, u8, f32 = hidden_states.device, (torch.uint8,), (torch.float32,)
    _check_tensor("gate_up_packed", packed, (experts, two_i, hidden // 2), u8, device)
    _check_tensor("gate_up_scale", weights.gate_up_scale, (experts, two_i, hidden // 16), u8, device)
    _check_tensor("gate_scale2", weights.gate_scale2, (experts,), f32, device)
    _check_tensor("up_scale2", weights.up_scale2, (experts,), f32, device)
    _check_tensor("down_packed", weights.down_packed, (experts, hidden, intermediate // 2), u8, device)
    _check_tensor("down_scale", weights.down_scale, (experts, hidden, intermediate // 16), u8, device)
    _check_tensor("down_scale2", weights.down_scale2, (experts,), f32, device)
    return _run(hidden_states, top_k_index, top_k_weights, experts, intermediate,
                (packed, weights.gate_up_scale, weights.gate_scale2, weights.up_scale2),
                (weights.down_packed, weights.down_scale, weights.down_scale2), nvfp4=True, out=out, config=config)
