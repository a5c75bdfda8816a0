"""Mixture-of-experts forward in Triton: routing, two grouped GEMMs, a deterministic combine.

    out[t] = sum_k w[t, k] * down[e] @ (gelu_tanh(gate[e] @ x[t]) * (up[e] @ x[t])),   e = idx[t, k]

Weights are either bf16/fp16 (`gate_up` [E, 2I, H] with gate rows 0..I-1 and up rows I..2I-1, `down`
[E, H, I], transformers' layout) or NVFP4 (uint8 codes [E, N, K/2] and bf16 block scales [E, N, K/16] in
`nvfp4.to_kernel_layout`'s and `nvfp4.scales_to_kernel_layout`'s layouts, fp32 global scales [E]) dequantized in
registers (W4A16: Hopper has no FP4 tensor cores). Activations are bf16/fp16 (or fp32, as TF32 on the tensor
cores); accumulation is fp32.

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

from .nvfp4 import KERNEL_BF16_BITS, KERNEL_ROTATIONS
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
# NVFP4 weights, with swap_ab (weights on the MMA's M side, in registers) and the down kernel's own BLOCK_N last: the
# best of per-kernel sweeps on an H200 (2026-11-28, eighth session, after the coalesced weight loads) at 256, 1024
# and 2048 tokens. BLOCK_K is the K step of the pipelined loop; the MMAs take 32 elements at a time. Down reduces
# over only 704 elements, so wider weight tiles (fewer programs re-reading the activations) pay off there.
_NVFP4_CONFIGS = (
    (24, 32, 128, 64, 4, 4, True, 256),
    (96, 64, 128, 64, 4, 3, True, 128),
    (float("inf"), 128, 64, 64, 4, 3, True, 128),
)


# float32 runs the tensor cores in TF32 (Triton's default for a float32 dot).
_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def pick_config(num_pairs: int, num_experts: int, nvfp4: bool = False) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), plus swap_ab and the down kernel's BLOCK_N for NVFP4, by
    mean pairs per expert."""
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


# Dequantized NVFP4 weights come out as e2m1 * scale * 2^-7: a pair's code bits placed where bf16 has them read as
# the E2M1 value * 2^-126, and the kernel-layout scales are scale * 2^119 (`nvfp4.scales_to_kernel_layout`); exact
# in bf16, fp16 and fp32 for every code and scale. The accumulator gets 2^7 back together with the fp32 global scale.
_NVFP4_OFFSET = tl.constexpr(128.0)


def _role_mask(bit: int) -> int:
    """A code bit's place in both bf16 lanes of a word."""
    return (1 << KERNEL_BF16_BITS[bit]) | (1 << (KERNEL_BF16_BITS[bit] + 16))


def _pair_ptx(outputs: str, rotations: tuple, scale: str) -> str:
    """PTX for one bf16x2 pair of `_decode_word`: rotate the word ($8) by each of the pair's rotations, keep the
    bits that rotation brings home, and multiply by the pair's scale (one bf16, broadcast)."""
    masks = {}
    for bit, rotation in enumerate(rotations):
        masks[rotation] = masks.get(rotation, 0) | _role_mask(bit)
    lines = []
    for index, (rotation, mask) in enumerate(sorted(masks.items())):
        target = "a" if index == 0 else "r"
        if rotation:
            lines.append(f"shf.l.wrap.b32 {target}, $8, $8, {rotation};")
            lines.append(f"and.b32 {target}, {target}, {mask:#010x};")
        else:
            lines.append(f"and.b32 {target}, $8, {mask:#010x};")
        if index:
            lines.append("or.b32 a, a, r;")
    lines += [f"mov.b32 s, {{{scale}, {scale}}};", "fma.rn.bf16x2 o, a, s, neg0;", f"mov.b32 {{{outputs}}}, o;"]
    return "".join("\n        " + line for line in lines)


# Outputs $0..$7: the word's pairs in `nvfp4.KERNEL_ROTATIONS` order (half 0 rows g, g + 8; half 1 rows g, g + 8),
# two K-neighbours each; $8 the word; $9 and $10 the scales of rows g and g + 8 (bf16 pairs: half 0, half 1).
_DECODE_WORD_PTX = tl.constexpr(
    "{\n        .reg .b32 r, a, s, o, neg0;\n        .reg .b16 g0, g1, e0, e1;\n        mov.b32 neg0, 0x80008000;"
    "\n        mov.b32 {g0, g1}, $9;\n        mov.b32 {e0, e1}, $10;"
    + "".join(_pair_ptx(f"${2 * p}, ${2 * p + 1}", KERNEL_ROTATIONS[p], ("g0", "e0", "g1", "e1")[p]) for p in range(4))
    + "\n        }"
)
_ROTATIONS = tl.constexpr(KERNEL_ROTATIONS)
_ROLE_MASKS = tl.constexpr(tuple(_role_mask(bit) for bit in range(4)))


@triton.jit
def _decode_word(words, scales_g, scales_g8):
    """bf16 fast path: int32 words (kernel layout) and the int32 scale words of their rows g and g + 8 (two bf16
    kernel-layout scales each: half 0, half 1) -> the 8 weights e2m1 * scale * 2^-7 in bf16, in
    `_DECODE_WORD_PTX`'s order."""
    return tl.inline_asm_elementwise(
        asm=_DECODE_WORD_PTX, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", args=[words, scales_g, scales_g8],
        dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)


@triton.jit
def _rotate_left(word, D: tl.constexpr):
    if D == 0:
        return word
    else:
        return (word << D) | (word >> (32 - D))


@triton.jit
def _e2m1_scaled(code):
    """4-bit E2M1 codes (int32 0..15) -> fp32 value * 2^-14. Shifting the 3 magnitude bits to fp16's exponent /
    mantissa boundary gives exactly value * 2^-14 for every code (code 1 lands on fp16's subnormal 2^-15, which
    converts to a normal fp32); bit 3 is the sign."""
    bits = ((code & 8) << 12) | ((code & 7) << 9)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale_value(scale_words, HALF: tl.constexpr):
    """One bf16 kernel-layout scale of an int32 pair (HALF 0: low bits) -> the block scale * 2^7 in fp32."""
    bits = (scale_words.to(tl.uint32, bitcast=True) >> (16 * HALF)) & 0xFFFF
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True).to(tl.float32) * 2.0**-112


@triton.jit
def _pair_values(word, scale, PAIR: tl.constexpr):
    """The portable decode of one pair (CPU interpreter, fp16/fp32 activations): the PTX's rotations, then each
    lane's code to its value in fp32 without denormals. word uint32 [...], scale fp32 = scale * 2^7 -> (K-neighbour
    0, 1) fp32 value * scale * 2^-7, as the PTX computes it."""
    rotations = _ROTATIONS[PAIR]
    bits = (_rotate_left(word, rotations[0]) & _ROLE_MASKS[0]) | (_rotate_left(word, rotations[1]) & _ROLE_MASKS[1])
    bits |= (_rotate_left(word, rotations[2]) & _ROLE_MASKS[2]) | (_rotate_left(word, rotations[3]) & _ROLE_MASKS[3])
    first = (((bits >> 12) & 8) | ((bits >> 6) & 7)).to(tl.int32)
    second = (((bits >> 28) & 8) | ((bits >> 22) & 7)).to(tl.int32)
    return _e2m1_scaled(first) * scale, _e2m1_scaled(second) * scale


@triton.jit
def _join_tile(p0, p1, p2, p3, p4, p5, p6, p7, BLOCK_N: tl.constexpr):
    """The 8 values of each word ([G, g 8, t 4, h 2] each, in `_DECODE_WORD_PTX`'s output order) -> the weight tile
    [BLOCK_N, 32]: row 16 G + 8 r8 + g, column 16 half + 8 h + 2 t + w (K order)."""
    low = tl.join(tl.join(p0, p1), tl.join(p2, p3))  # [G, g, t, h, w, r8]
    high = tl.join(tl.join(p4, p5), tl.join(p6, p7))
    tile = tl.permute(tl.join(low, high), (0, 5, 1, 6, 3, 2, 4))  # [G, r8, g, half, h, t, w]
    return tl.reshape(tile, (BLOCK_N, 32))


@triton.jit
def _nvfp4_tile(packed_ptr, scale_ptr, row0, rows_left, k0, K, compute_dtype: tl.constexpr,
                BLOCK_N: tl.constexpr, FAST_BF16: tl.constexpr):
    """Dequantizes the weight rows row0 .. row0 + BLOCK_N (16-aligned; rows_left of them exist) over the 32 K
    elements from k0 (kernel layout, `nvfp4.to_kernel_layout`) into a [BLOCK_N, 32] tile in K order."""
    G: tl.constexpr = BLOCK_N // 16
    group = row0 // 16 + tl.arange(0, G)
    ok = (16 * tl.arange(0, G) < rows_left) & (k0 + tl.zeros((G,), tl.int32) < K)
    # Per 16 rows and 32 K elements: 64 contiguous int32 words [g][t][h] of codes ...
    words = (group * (2 * K) + 2 * k0)[:, None] + tl.arange(0, 64)[None, :]
    words = tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + words, mask=ok[:, None], other=0)
    # ... and 32 bf16 scales [g][r8][half]: one int32 word (half 0, half 1) per row, loaded as words so that the
    # load is wide enough for Triton to pipeline it (cp.async takes 4 bytes or more). Both loads are 2D with a
    # contiguous last axis so that Triton gives a warp consecutive words (a [G, g, t, h] load had its lanes
    # stride across groups: uncoalesced, and the scales were loaded by every warp).
    scales = (group * (K // 2) + k0 // 2)[:, None] + tl.arange(0, 16)[None, :]
    scales = tl.load(scale_ptr.to(tl.pointer_type(tl.int32)) + scales, mask=ok[:, None], other=0)
    words = tl.reshape(words, (G, 8, 4, 2))
    scales_g, scales_g8 = tl.split(tl.reshape(scales, (G, 8, 2)))  # [G, g]
    shape: tl.constexpr = (G, 8, 4, 2)
    scales_g = tl.broadcast_to(scales_g[:, :, None, None], shape)
    scales_g8 = tl.broadcast_to(scales_g8[:, :, None, None], shape)
    if FAST_BF16:
        p0, p1, p2, p3, p4, p5, p6, p7 = _decode_word(words, scales_g, scales_g8)
    else:
        words = words.to(tl.uint32, bitcast=True)
        p0, p1 = _pair_values(words, _scale_value(scales_g, 0), 0)
        p2, p3 = _pair_values(words, _scale_value(scales_g8, 0), 1)
        p4, p5 = _pair_values(words, _scale_value(scales_g, 1), 2)
        p6, p7 = _pair_values(words, _scale_value(scales_g8, 1), 3)
    tile = _join_tile(p0, p1, p2, p3, p4, p5, p6, p7, BLOCK_N)
    return tile.to(compute_dtype)


@triton.jit
def _nvfp4_dot(acc, a_rows, a_mask, packed_ptr, scale_ptr, row0, rows_left, k0, K,
               BLOCK_N: tl.constexpr, FAST_BF16: tl.constexpr, SWAP_AB: tl.constexpr):
    """acc += activations [rows at a_rows, K elements k0 .. k0 + 32] x NVFP4 weights [BLOCK_N rows from row0]^T.
    acc is [BLOCK_M, BLOCK_N], or with SWAP_AB its transpose [BLOCK_N, BLOCK_M]: the weights become the MMA's M side
    (in registers), so a tile of few tokens still fills Hopper's 64-row warpgroup MMA. One 32-element step per dot:
    longer register-operand dots made ptxas serialise the warpgroup MMAs."""
    ks = k0 + tl.arange(0, 32)
    k_ok = ks < K
    if SWAP_AB:
        a = tl.load(a_rows[None, :] + ks[:, None], mask=k_ok[:, None] & a_mask[None, :], other=0.0)
    else:
        a = tl.load(a_rows[:, None] + ks[None, :], mask=a_mask[:, None] & k_ok[None, :], other=0.0)
    w = _nvfp4_tile(packed_ptr, scale_ptr, row0, rows_left, k0, K, a.dtype, BLOCK_N, FAST_BF16)
    if SWAP_AB:
        acc = tl.dot(w, a, acc)
    else:
        acc = tl.dot(a, tl.trans(w), acc)
    return acc


@triton.jit
def _gate_up_kernel(
    x_ptr, sorted_pairs_ptr, expert_offsets_ptr, tile_expert_ptr, tile_start_ptr,
    w_ptr, w_scale_ptr, gate_scale2_ptr, up_scale2_ptr, act_ptr,
    H, I, TOP_K,
    NVFP4: tl.constexpr, FAST_BF16: tl.constexpr, SWAP_AB: tl.constexpr,
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
    if NVFP4:
        if SWAP_AB:
            acc_gate = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        gate_row0 = expert * 2 * I + pid_n * BLOCK_N
        x_rows = x_ptr + tokens * H
        for k0 in range(0, H, BLOCK_K):
            for step in tl.static_range(0, BLOCK_K, 32):
                acc_gate = _nvfp4_dot(acc_gate, x_rows, row_mask, w_ptr, w_scale_ptr, gate_row0, I - pid_n * BLOCK_N,
                                      k0 + step, H, BLOCK_N, FAST_BF16, SWAP_AB)
                acc_up = _nvfp4_dot(acc_up, x_rows, row_mask, w_ptr, w_scale_ptr, gate_row0 + I, I - pid_n * BLOCK_N,
                                    k0 + step, H, BLOCK_N, FAST_BF16, SWAP_AB)
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
        gate_rows = expert * 2 * I + cols  # row of gate_up [E * 2I, ...]
        up_rows = gate_rows + I
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
    NVFP4: tl.constexpr, FAST_BF16: tl.constexpr, SWAP_AB: tl.constexpr,
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
    if NVFP4:
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            for step in tl.static_range(0, BLOCK_K, 32):
                acc = _nvfp4_dot(acc, act_ptr + rows * I, row_mask, w_ptr, w_scale_ptr, expert * H + pid_n * BLOCK_N,
                                 H - pid_n * BLOCK_N, k0 + step, I, BLOCK_N, FAST_BF16, SWAP_AB)
        if SWAP_AB:
            acc = tl.trans(acc)
        acc = acc * (tl.load(down_scale2_ptr + expert) * _NVFP4_OFFSET)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_rows = act_ptr + rows[:, None] * I
        w_rows = expert * H + cols  # row of down [E * H, ...]
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
    """Expert weights in NVFP4 as the kernels read them: codes and block scales in the kernels' layouts
    (`nvfp4.to_kernel_layout`, `nvfp4.scales_to_kernel_layout`)."""

    gate_up_packed: torch.Tensor  # uint8 [E, 2I, H/2], kernel layout
    gate_up_scale: torch.Tensor  # bf16 [E, 2I, H/16], kernel layout (scale * 2^119)
    gate_scale2: torch.Tensor  # fp32 [E]
    up_scale2: torch.Tensor  # fp32 [E]
    down_packed: torch.Tensor  # uint8 [E, H, I/2], kernel layout
    down_scale: torch.Tensor  # bf16 [E, H, I/16], kernel layout
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
    _check(isinstance(config, (tuple, list)) and len(config) in (5, 6, 7) and all(isinstance(v, int) for v in config),
           "config must be (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, swap_ab[, down BLOCK_N]]) of ints, "
           f"got {config!r}")
    sizes = dict(BLOCK_M=config[0], BLOCK_N=config[1], BLOCK_K=config[2])
    if len(config) == 7:
        sizes["down BLOCK_N"] = config[6]
    for name, value in sizes.items():
        _check(value >= 16 and value & (value - 1) == 0, f"config's {name} must be a power of two >= 16, got {value}")
    _check(not nvfp4 or config[2] >= 32,
           f"config's BLOCK_K must be a multiple of 32 for NVFP4 weights, got {config[2]}")
    _check(len(config) == 5 or nvfp4, "config's sixth and seventh entries (swap_ab, down BLOCK_N) apply to NVFP4 "
           "weights only")


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
    block_m, block_n, block_k, num_warps, num_stages, *extra = config or pick_config(num_pairs, num_experts, nvfp4)
    swap_ab = bool(extra and extra[0])
    down_block_n = extra[1] if len(extra) > 1 else block_n
    if config is None and hidden_states.dtype == torch.float32:
        block_k //= 2  # the table is sized for 2-byte tiles; fp32 ones would overflow shared memory
    routing = route(top_k_index, num_experts, block_m)
    max_tiles = routing.tile_expert.numel()
    act = torch.empty(num_pairs, intermediate, dtype=hidden_states.dtype, device=hidden_states.device)
    pair_out = torch.empty(num_pairs, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
    # The bf16 decode is inline PTX, which Triton's CPU interpreter cannot run.
    fast_bf16 = (nvfp4 and hidden_states.dtype == torch.bfloat16 and hidden_states.is_cuda
                 and os.environ.get("TRITON_INTERPRET") != "1")
    common = dict(NVFP4=nvfp4, FAST_BF16=fast_bf16, SWAP_AB=nvfp4 and swap_ab, BLOCK_M=block_m, BLOCK_K=block_k,
                  num_warps=num_warps, num_stages=num_stages)
    _gate_up_kernel[(max_tiles, triton.cdiv(intermediate, block_n))](
        hidden_states, routing.sorted_pairs, routing.expert_offsets, routing.tile_expert, routing.tile_start,
        *gate_up_args, act, hidden, intermediate, top_k, BLOCK_N=block_n, **common,
    )
    _down_kernel[(max_tiles, triton.cdiv(hidden, down_block_n))](
        act, routing.sorted_pairs, routing.expert_offsets, routing.tile_expert, routing.tile_start,
        top_k_weights, *down_args, pair_out, hidden, intermediate, BLOCK_N=down_block_n, **common,
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
    BLOCK_K, num_warps, num_stages[, swap_ab[, down BLOCK_N]]) overrides the tuned table, for benchmarks (the last
    two: NVFP4 only; the down kernel takes BLOCK_N unless given its own).
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
    device, u8, bf16, f32 = hidden_states.device, (torch.uint8,), (torch.bfloat16,), (torch.float32,)
    _check_tensor("gate_up_packed", packed, (experts, two_i, hidden // 2), u8, device)
    _check_tensor("gate_up_scale", weights.gate_up_scale, (experts, two_i, hidden // 16), bf16, device)
    _check_tensor("gate_scale2", weights.gate_scale2, (experts,), f32, device)
    _check_tensor("up_scale2", weights.up_scale2, (experts,), f32, device)
    _check_tensor("down_packed", weights.down_packed, (experts, hidden, intermediate // 2), u8, device)
    _check_tensor("down_scale", weights.down_scale, (experts, hidden, intermediate // 16), bf16, device)
    _check_tensor("down_scale2", weights.down_scale2, (experts,), f32, device)
    for name in ("gate_up_packed", "gate_up_scale", "down_packed", "down_scale"):  # read as int32 words
        _check(getattr(weights, name).data_ptr() % 4 == 0, f"{name} must start at a 4-byte aligned address")
    return _run(hidden_states, top_k_index, top_k_weights, experts, intermediate,
                (packed, weights.gate_up_scale, weights.gate_scale2, weights.up_scale2),
                (weights.down_packed, weights.down_scale, weights.down_scale2), nvfp4=True, out=out, config=config)
