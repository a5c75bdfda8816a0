"""Mixture-of-experts forward in Triton: routing, two grouped GEMMs, a deterministic combine.

    out[t] = sum_k w[t, k] * down[e] @ (gelu_tanh(gate[e] @ x[t]) * (up[e] @ x[t])),   e = idx[t, k]

Weights are either bf16/fp16 (`gate_up` [E, 2I, H] with gate rows 0..I-1 and up rows I..2I-1, `down`
[E, H, I], transformers' layout) or NVFP4 (uint8 codes [E, N, K/2] in `nvfp4.to_kernel_layout`'s order, E4M3 scales
[E, N, K/16] passed as uint8, fp32 global scales [E]) dequantized in registers (W4A16: Hopper has no FP4
tensor cores). Activations are bf16/fp16 (or fp32, as TF32 on the tensor cores); accumulation is fp32.

Steps, all on the device with shapes fixed by (tokens, top_k, experts), so they can be captured in a CUDA
graph: `route` (routing.py, one launch) sorts the token-expert pairs by expert and builds a tile schedule;
`_gate_up_kernel` gathers each tile's token rows and writes gelu_tanh(gate) * up in expert-sorted order;
`_down_kernel` applies the routing weight and writes one row per pair; `_combine_kernel` sums each token's top_k
rows in a fixed order (no float atomics, so results are bitwise reproducible), skipping pairs routed to the
sentinel expert id E (expert parallelism: another rank's expert).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .routing import route

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
# NVFP4 weights, with swap_ab last (weights on the MMA's M side): the best of `python -m eval.kernels --sweep
# --formats nvfp4` on an H200 (2026-11-28, third session's kernel) at 256 and 2048 tokens; the first row is the
# previous sweep's (128 tokens were not swept again).
_NVFP4_CONFIGS = (
    (8, 16, 64, 128, 4, 3, False),
    (24, 32, 64, 128, 4, 3, True),
    (float("inf"), 64, 128, 64, 8, 3, True),
)


# float32 runs the tensor cores in TF32 (Triton's default for a float32 dot).
_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def pick_config(num_pairs: int, num_experts: int, nvfp4: bool = False) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), plus swap_ab for NVFP4, by mean pairs per expert."""
    mean = num_pairs / num_experts
    for limit, *config in _NVFP4_CONFIGS if nvfp4 else _CONFIGS:
        if mean <= limit:
            return tuple(config)
    raise AssertionError("unreachable: the last config has no limit")


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


# Dequantized NVFP4 weights come out as e2m1 * scale * 2^-7 (exact in bf16, fp16 and fp32 for every code and
# scale); the accumulator gets 2^7 back together with the fp32 global scale. bf16 needs the offset so the scale's
# range fits (see _decode_bf16); the other dtypes use it too so one epilogue serves all.
_NVFP4_OFFSET = tl.constexpr(128.0)
_TWO_POW_119 = tl.constexpr(2.0**119)


def _decode_pair_ptx(out: str, src: str, sign_shift: int, scale: str) -> str:
    """PTX for one bf16x2 output of `_decode_bf16`: in each 16-bit lane of `src`, shifting left by `sign_shift`
    puts the nibble's sign on bit 15 and by `sign_shift - 6` its e e m bits on 8..6; then the scale's fma."""
    return f"""
        shl.b32 a, {src}, {sign_shift};
        shl.b32 b, {src}, {sign_shift - 6};
        and.b32 a, a, 0x80008000;
        and.b32 b, b, 0x01C001C0;
        or.b32 a, a, b;
        fma.rn.bf16x2 {out}, a, {scale}, neg0;"""


# $4: four packed bytes; prmt spreads bytes 0, 1 (t0) and 2, 3 (t1) over 16-bit lanes. Low nibbles need shifts
# of 12 (sign) and 6 (e e m), high nibbles 8 and 2. Outputs $0..$3, scales $5, $6 (low), $7, $8 (high).
_DECODE_BF16_PTX = tl.constexpr(
    """
        {
        .reg .b32 t0, t1, a, b, neg0;
        mov.b32 neg0, 0x80008000;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;"""
    + _decode_pair_ptx("$0", "t0", 12, "$5")
    + _decode_pair_ptx("$1", "t1", 12, "$6")
    + _decode_pair_ptx("$2", "t0", 8, "$7")
    + _decode_pair_ptx("$3", "t1", 8, "$8")
    + """
        }
        """
)


@triton.jit
def _decode_bf16(packed, scale_low, scale_high):
    """bf16 fast path, 8 weights per asm block: packed [..] uint8 (byte j: low nibble element j, high nibble element
    j + 16), scales bf16 holding scale * 2^119 broadcast to packed's shape -> (low, high) bf16 weights.

    A nibble s e e m moved to bf16 bits 15 (sign) and 8..6 (e e m) reads as the E2M1 value * 2^-126, subnormals
    included (code 1 = 0.5 lands on bf16's subnormal 2^-127), so a decode is two shifts and two masks per pair
    of weights and one bf16x2 fma applies the scale: value * 2^-126 * scale * 2^119 = value * scale * 2^-7."""
    return tl.inline_asm_elementwise(
        asm=_DECODE_BF16_PTX,
        constraints="=r,=r,=r,=r,r,r,r,r,r",
        args=[packed, scale_low, scale_high],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _e4m3_pairs_bf16(pairs):
    """uint16 holding two E4M3 scales (low byte first) -> (low, high) bf16 scale * 2^119, for `_decode_bf16`.
    Hopper converts an E4M3 pair to fp16 in one instruction (exact, subnormals included); fp32 scales it exactly;
    bf16 holds the result exactly (4 significant bits, normal for every E4M3 value). About a third of the
    instructions of `_e4m3_to_float`'s integer route, measured on the compiled loop."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 h2;
        .reg .b16 lo16, hi16;
        .reg .f32 a, b;
        cvt.rn.f16x2.e4m3x2 h2, $2;
        mov.b32 {lo16, hi16}, h2;
        cvt.f32.f16 a, lo16;
        cvt.f32.f16 b, hi16;
        mul.f32 a, a, 0f7B000000;
        mul.f32 b, b, 0f7B000000;
        cvt.rn.bf16x2.f32 h2, b, a;
        mov.b32 {$0, $1}, h2;
        }
        """,
        constraints="=h,=h,h",
        args=[pairs],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=1,
    )


@triton.jit
def _nvfp4_tile(packed_ptr, scale_ptr, rows, n_mask, k0, K, compute_dtype: tl.constexpr, NB: tl.constexpr,
                BLOCK_N: tl.constexpr, FAST_BF16: tl.constexpr, E4M3_CVT: tl.constexpr):
    """Dequantizes weight rows `rows` [BLOCK_N] over the NB blocks of 32 K elements from k0 (kernel layout, see
    `to_kernel_layout`) into two [BLOCK_N, NB * 16] tiles: column 16 b + j of `low` is element k0 + 32 b + j and
    of `high` element k0 + 32 b + 16 + j (the activations are loaded in the same order). Blocks past K are zero."""
    b = tl.arange(0, NB)
    j = tl.arange(0, 16)
    block_ok = k0 + 32 * b < K  # K is a multiple of 32 (checked by the wrapper)
    byte_offsets = rows[:, None, None] * (K // 2) + k0 // 2 + 16 * b[None, :, None] + j[None, None, :]
    packed = tl.load(packed_ptr + byte_offsets, mask=n_mask[:, None, None] & block_ok[None, :, None], other=0)
    scale_mask = n_mask[:, None] & block_ok[None, :]
    if E4M3_CVT:
        # The two scales of a 32-block are adjacent bytes: one uint16 load and one conversion per block.
        pair_offsets = rows[:, None] * (K // 32) + k0 // 32 + b[None, :]  # [BLOCK_N, NB]
        pairs = tl.load(scale_ptr.to(tl.pointer_type(tl.uint16)) + pair_offsets, mask=scale_mask, other=0)
        scale_low, scale_high = _e4m3_pairs_bf16(pairs)
    else:
        scale_offsets = rows[:, None] * (K // 16) + k0 // 16 + 2 * b[None, :]  # [BLOCK_N, NB]
        scale_low = _e4m3_to_float(tl.load(scale_ptr + scale_offsets, mask=scale_mask, other=0).to(tl.int32))
        scale_high = _e4m3_to_float(tl.load(scale_ptr + scale_offsets + 1, mask=scale_mask, other=0).to(tl.int32))
    if FAST_BF16:
        if not E4M3_CVT:  # scale * 2^119 is a normal bf16 for every E4M3 scale (2^-9 .. 448)
            scale_low = (scale_low * _TWO_POW_119).to(tl.bfloat16)
            scale_high = (scale_high * _TWO_POW_119).to(tl.bfloat16)
        scale_low = tl.broadcast_to(scale_low[:, :, None], (BLOCK_N, NB, 16))
        scale_high = tl.broadcast_to(scale_high[:, :, None], (BLOCK_N, NB, 16))
        low, high = _decode_bf16(packed, scale_low, scale_high)
    else:
        packed = packed.to(tl.int32)
        # _e2m1_scaled is value * 2^-14; * 2^7 more leaves value * scale * 2^-7.
        low = (_e2m1_scaled(packed & 15) * (scale_low * 128.0)[:, :, None]).to(compute_dtype)
        high = (_e2m1_scaled(packed >> 4) * (scale_high * 128.0)[:, :, None]).to(compute_dtype)
    return tl.reshape(low, (BLOCK_N, NB * 16)), tl.reshape(high, (BLOCK_N, NB * 16))


@triton.jit
def _nvfp4_activations(a_row_ptrs, row_mask, k0, K, NB: tl.constexpr, SWAP_AB: tl.constexpr):
    """The activations [BLOCK_M rows at a_row_ptrs] of one K step (NB blocks of 32) in `_nvfp4_tile`'s column
    order, as (low, high) halves; transposed ([NB * 16, BLOCK_M]) with SWAP_AB."""
    r = tl.arange(0, NB * 16)
    ks = k0 + 32 * (r // 16) + r % 16  # `_nvfp4_tile`'s column order; the high half is 16 further
    k_ok = ks < K
    if SWAP_AB:
        a_low = tl.load(a_row_ptrs[None, :] + ks[:, None], mask=k_ok[:, None] & row_mask[None, :], other=0.0)
        a_high = tl.load(a_row_ptrs[None, :] + 16 + ks[:, None], mask=k_ok[:, None] & row_mask[None, :], other=0.0)
    else:
        a_low = tl.load(a_row_ptrs[:, None] + ks[None, :], mask=row_mask[:, None] & k_ok[None, :], other=0.0)
        a_high = tl.load(a_row_ptrs[:, None] + 16 + ks[None, :], mask=row_mask[:, None] & k_ok[None, :], other=0.0)
    return a_low, a_high


@triton.jit
def _nvfp4_dot(acc, a_low, a_high, packed_ptr, scale_ptr, w_rows, col_mask, k0, K,
               NB: tl.constexpr, BLOCK_N: tl.constexpr, FAST_BF16: tl.constexpr, E4M3_CVT: tl.constexpr,
               SWAP_AB: tl.constexpr):
    """One K step of activations (`_nvfp4_activations`) x NVFP4 weights [BLOCK_N rows]. acc is [BLOCK_M,
    BLOCK_N], or with SWAP_AB its transpose [BLOCK_N, BLOCK_M]: the weights become the MMA's M side, so a tile of
    few tokens still fills Hopper's 64-row warpgroup MMA."""
    low, high = _nvfp4_tile(packed_ptr, scale_ptr, w_rows, col_mask, k0, K, a_low.dtype, NB, BLOCK_N, FAST_BF16,
                            E4M3_CVT)
    if SWAP_AB:
        acc = tl.dot(low, a_low, acc)
        acc = tl.dot(high, a_high, acc)
    else:
        acc = tl.dot(a_low, tl.trans(low), acc)
        acc = tl.dot(a_high, tl.trans(high), acc)
    return acc


@triton.jit
def _gate_up_kernel(
    x_ptr, sorted_pairs_ptr, expert_offsets_ptr, tile_expert_ptr, tile_start_ptr,
    w_ptr, w_scale_ptr, gate_scale2_ptr, up_scale2_ptr, act_ptr,
    H, I, TOP_K,
    NVFP4: tl.constexpr, FAST_BF16: tl.constexpr, E4M3_CVT: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    if NVFP4:
        NB: tl.constexpr = BLOCK_K // 32
        if SWAP_AB:
            acc_gate = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            a_low, a_high = _nvfp4_activations(x_ptr + tokens * H, row_mask, k0, H, NB, SWAP_AB)  # gate and up's
            acc_gate = _nvfp4_dot(acc_gate, a_low, a_high, w_ptr, w_scale_ptr, gate_rows, col_mask, k0, H, NB,
                                  BLOCK_N, FAST_BF16, E4M3_CVT, SWAP_AB)
            acc_up = _nvfp4_dot(acc_up, a_low, a_high, w_ptr, w_scale_ptr, up_rows, col_mask, k0, H, NB, BLOCK_N,
                                FAST_BF16, E4M3_CVT, SWAP_AB)
        if SWAP_AB:
            acc_gate = tl.trans(acc_gate)
            acc_up = tl.trans(acc_up)
        # Gate and up keep their own global scales (a shared one is a known engine bug).
        acc_gate = acc_gate * (tl.load(gate_scale2_ptr + expert) * _NVFP4_OFFSET)
        acc_up = acc_up * (tl.load(up_scale2_ptr + expert) * _NVFP4_OFFSET)
    else:
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_rows = x_ptr + tokens[:, None] * H
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
    NVFP4: tl.constexpr, FAST_BF16: tl.constexpr, E4M3_CVT: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    if NVFP4:
        NB: tl.constexpr = BLOCK_K // 32
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            a_low, a_high = _nvfp4_activations(act_ptr + rows * I, row_mask, k0, I, NB, SWAP_AB)
            acc = _nvfp4_dot(acc, a_low, a_high, w_ptr, w_scale_ptr, w_rows, col_mask, k0, I, NB, BLOCK_N,
                             FAST_BF16, E4M3_CVT, SWAP_AB)
        if SWAP_AB:
            acc = tl.trans(acc)
        acc = acc * (tl.load(down_scale2_ptr + expert) * _NVFP4_OFFSET)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_rows = act_ptr + rows[:, None] * I
        for k0 in range(0, I, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < I
            a = tl.load(a_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptr + w_rows[None, :] * I + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, w, acc)
    weight = tl.load(top_k_weights_ptr + pairs, mask=row_mask, other=0.0)
    acc = acc * weight[:, None]
    # int64: pairs * H passes 2^31 from ~95K tokens at 26B-A4B's shape (a long prompt's prefill).
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _combine_kernel(pair_out_ptr, index_ptr, out_ptr, H, num_experts, stride_token, stride_k,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum over k of pair row t * TOP_K + k, in k order, in fp32 (deterministic, no atomics). Pairs whose
    expert is outside [0, num_experts) were never computed (expert parallelism's sentinel) and count as zero."""
    token = tl.program_id(0).to(tl.int64)  # the pair rows' offsets pass 2^31 for long prompts
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        expert = tl.load(index_ptr + token * stride_token + k * stride_k) + tl.zeros_like(cols)  # a row of it
        routed = col_mask & (expert >= 0) & (expert < num_experts)
        row = tl.load(pair_out_ptr + (token * TOP_K + k) * H + cols, mask=routed, other=0.0)
        acc += row.to(tl.float32)
    tl.store(out_ptr + token * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


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


def _check_config(config, nvfp4: bool) -> None:
    """A benchmark's block sizes, checked before Triton would fail on them with an obscure compile error."""
    _check(isinstance(config, (tuple, list)) and len(config) in (5, 6) and all(isinstance(v, int) for v in config),
           f"config must be (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, swap_ab]) of ints, got {config!r}")
    block_m, block_n, block_k = config[:3]
    for name, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k)):
        _check(value >= 16 and value & (value - 1) == 0, f"config's {name} must be a power of two >= 16, got {value}")
    _check(not nvfp4 or block_k >= 32, f"config's BLOCK_K must be a multiple of 32 for NVFP4 weights, got {block_k}")
    _check(len(config) == 5 or nvfp4, "config's sixth entry (swap_ab) applies to NVFP4 weights only")


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
    if config is not None:
        _check_config(config, nvfp4)
    block_m, block_n, block_k, num_warps, num_stages, *swap = config or pick_config(num_pairs, num_experts, nvfp4)
    if config is None and hidden_states.dtype == torch.float32:
        block_k //= 2  # the table is sized for 2-byte tiles; fp32 ones would overflow shared memory
    routing = route(top_k_index, num_experts, block_m)
    max_tiles = routing.tile_expert.numel()
    act = torch.empty(num_pairs, intermediate, dtype=hidden_states.dtype, device=hidden_states.device)
    pair_out = torch.empty(num_pairs, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
    # The bf16 decode is inline PTX, which Triton's CPU interpreter cannot run; its E4M3 pair conversion needs
    # sm_89 or newer (Ada, Hopper), older GPUs convert the scales with integer ops.
    fast_bf16 = (nvfp4 and hidden_states.dtype == torch.bfloat16 and hidden_states.is_cuda
                 and os.environ.get("TRITON_INTERPRET") != "1")
    e4m3_cvt = fast_bf16 and torch.cuda.get_device_capability(hidden_states.device) >= (8, 9)
    common = dict(NVFP4=nvfp4, FAST_BF16=fast_bf16, E4M3_CVT=e4m3_cvt, SWAP_AB=nvfp4 and bool(swap and swap[0]),
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    _gate_up_kernel[(max_tiles, triton.cdiv(intermediate, block_n))](
        hidden_states, routing.sorted_pairs, routing.expert_offsets, routing.tile_expert, routing.tile_start,
        *gate_up_args, act, hidden, intermediate, top_k, **common,
    )
    _down_kernel[(max_tiles, triton.cdiv(hidden, block_n))](
        act, routing.sorted_pairs, routing.expert_offsets, routing.tile_expert, routing.tile_start,
        top_k_weights, *down_args, pair_out, hidden, intermediate, **common,
    )
    block_h = min(triton.next_power_of_2(hidden), 1024)
    _combine_kernel[(tokens, triton.cdiv(hidden, block_h))](
        pair_out, top_k_index, out, hidden, num_experts, top_k_index.stride(0), top_k_index.stride(1),
        TOP_K=top_k, BLOCK_H=block_h,
    )
    return out


def moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, out=None, config=None):
    """MoE experts with bf16/fp16 weights: gate_up_proj [E, 2I, H], down_proj [E, H, I] (hidden's dtype).

    hidden_states [T, H] bf16/fp16; top_k_index [T, K] int, values in [0, E] (not checked: that would sync); E is
    the sentinel of expert parallelism (another rank's expert): such a pair costs nothing and adds zero;
    top_k_weights [T, K] fp32; `out` [T, H], optional, is written in full. `config` (BLOCK_M, BLOCK_N,
    BLOCK_K, num_warps, num_stages[, swap_ab]) overrides the tuned table, for benchmarks (swap_ab: NVFP4 only).
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
    for name in ("gate_up_scale", "down_scale"):  # read as uint16 pairs of scales
        _check(getattr(weights, name).data_ptr() % 2 == 0, f"{name} must start at an even address")
    return _run(hidden_states, top_k_index, top_k_weights, experts, intermediate,
                (packed, weights.gate_up_scale, weights.gate_scale2, weights.up_scale2),
                (weights.down_packed, weights.down_scale, weights.down_scale2), nvfp4=True, out=out, config=config)
