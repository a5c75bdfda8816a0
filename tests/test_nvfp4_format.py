"""NVFP4 format utilities (dgemma_hf.kernels.nvfp4): hand-computed vectors, conventions, round trips, errors.

Expected bytes below are worked out by hand from the format rules (E2M1 codes, low nibble first, E4M3 scale
bytes, ModelOpt's scale recipe), never by calling the code under test.
"""

import pytest
import torch

from dgemma_hf.kernels.nvfp4 import (
    E2M1_VALUES,
    NVFP4Weight,
    dequantize_nvfp4,
    global_scale_from_compressed_tensors,
    global_scale_to_compressed_tensors,
    pack_e2m1,
    quantize_nvfp4,
    unpack_e2m1,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Deterministic and fast on shared CI runners; restore the caller's setting afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _u8(t: torch.Tensor) -> list:
    return t.view(torch.uint8).tolist()


def _e2m1_half_gap(mag: torch.Tensor) -> torch.Tensor:
    """Largest round-to-nearest error for an E2M1 magnitude (in units of the block scale), clamp included."""
    half_gap = torch.where(mag <= 2, 0.25, torch.where(mag <= 4, 0.5, 1.0))
    return torch.where(mag > 6, mag - 6, half_gap)


# ----------------------------------------------------------------------------------------------------------------
# Code table and nibble packing


def test_e2m1_table_has_all_sixteen_codes():
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert E2M1_VALUES.dtype == torch.float32
    assert E2M1_VALUES.tolist() == expected
    # Code 8 is negative zero: bit 3 is the sign.
    assert torch.signbit(E2M1_VALUES[8]) and E2M1_VALUES[8] == 0
    assert not torch.signbit(E2M1_VALUES[0])
    assert E2M1_VALUES[1] == 0.5 and E2M1_VALUES[7] == 6.0 and E2M1_VALUES[15] == -6.0


def test_pack_nibble_order_on_explicit_bytes():
    assert pack_e2m1(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    codes = torch.arange(16, dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert unpack_e2m1(torch.tensor([0x21, 0x8F, 0x07], dtype=torch.uint8)).tolist() == [1, 2, 15, 8, 7, 0]
    assert torch.equal(unpack_e2m1(packed), codes)


def test_pack_unpack_round_trip_keeps_leading_dims():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 5, 48), generator=g, dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.shape == (3, 5, 24)
    assert torch.equal(unpack_e2m1(packed), codes)
    # Byte-level check of one element: low nibble = even element.
    assert packed[1, 2, 3].item() == codes[1, 2, 6].item() | (codes[1, 2, 7].item() << 4)


# ----------------------------------------------------------------------------------------------------------------
# A hand-built [2, 32] weight


def test_hand_built_weight_bytes():
    # amax 10.5 -> weight_scale_2 = 10.5 / 2688 = 2**-8 exactly. A block with amax 10.5 gets scale
    # 10.5 / (6 * 2**-8) = 448 (E4M3 byte 0x7E), so its elements are divided by 448 * 2**-8 = 1.75.
    row0_block0 = [0.0, 0.875, 1.75, 2.625, 3.5, 5.25, 7.0, 10.5,  # codes 0..7 (x = value * 1.75)
                   -0.1, -0.875, -1.75, -2.625, -3.5, -5.25, -7.0, -10.5]  # -0.1 -> -0.057 -> -0 (code 8); 9..15
    # Ties exactly halfway between E2M1 values (midpoint * 1.75) go to the even code; 10.5 keeps the scale 448.
    row0_block1 = [0.4375, 1.3125, 2.1875, 3.0625, 4.375, 6.125, 8.75, 10.5,  # 0.25 .75 1.25 1.75 2.5 3.5 5, 6
                   -0.4375, -1.3125, -2.1875, -3.0625, -4.375, -6.125, -8.75, -0.0]
    # All-zero block: ModelOpt stores scale 1.0 (E4M3 byte 0x38) and zero codes.
    row1_block0 = [0.0] * 16
    # Block amax 1.0: ideal scale 1.0 / (6 * 2**-8) = 42.67, not in E4M3 (step 4 in [32, 64)) -> 44 (byte 0x63:
    # exponent 5 + bias 7 = 0b1100, mantissa 0.375 * 8 = 0b011). Divisor 44 * 2**-8 = 0.171875:
    # 1.0 -> 5.82 -> 6 (code 7); -0.5 -> -2.91 -> -3 (code 13); 0.25 -> 1.45 -> 1.5 (code 3); 0.1 -> 0.58 -> 0.5 (1).
    row1_block1 = [1.0, -0.5, 0.25, 0.1] + [0.0] * 12
    weight = torch.tensor([row0_block0 + row0_block1, row1_block0 + row1_block1], dtype=torch.float32)

    q = quantize_nvfp4(weight)

    assert isinstance(q, NVFP4Weight)
    assert q.weight_scale_2.dtype == torch.float32 and q.weight_scale_2.shape == ()
    assert q.weight_scale_2.item() == 2.0**-8
    assert q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (2, 2)
    assert _u8(q.scale) == [[0x7E, 0x7E], [0x38, 0x63]]
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (2, 16)
    assert q.packed.tolist() == [
        [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE,  # codes 0..15
         0x20, 0x42, 0x64, 0x76, 0xA8, 0xCA, 0xEC, 0x0E],  # ties: 0 2 2 4 4 6 6 7 | 8 10 10 12 12 14 14 0
        [0x00] * 8 + [0xD7, 0x13] + [0x00] * 6,
    ]

    expected = torch.tensor(
        [[0.0, 0.875, 1.75, 2.625, 3.5, 5.25, 7.0, 10.5, -0.0, -0.875, -1.75, -2.625, -3.5, -5.25, -7.0, -10.5,
          0.0, 1.75, 1.75, 3.5, 3.5, 7.0, 7.0, 10.5, -0.0, -1.75, -1.75, -3.5, -3.5, -7.0, -7.0, 0.0],
         [0.0] * 16 + [1.03125, -0.515625, 0.2578125, 0.0859375] + [0.0] * 12],
        dtype=torch.float32,
    )
    assert torch.equal(dequantize_nvfp4(*q), expected)


# ----------------------------------------------------------------------------------------------------------------
# E4M3 scale rounding


def test_block_scale_not_representable_in_e4m3():
    g = torch.Generator().manual_seed(1)
    ws2 = torch.tensor(2.0**-6)
    block = torch.rand(16, generator=g) * 2 - 1
    block = block / block.abs().max() * (100.0 / 3.0 * 6 * 2.0**-6)  # block amax -> ideal scale 33.33...
    weight = block.reshape(1, 16)
    ideal = (block.abs().max() / (6 * ws2)).item()
    assert ideal == pytest.approx(100.0 / 3.0, rel=1e-6)

    q = quantize_nvfp4(weight, ws2)

    stored = q.scale.float().item()
    assert stored == torch.tensor(ideal).to(torch.float8_e4m3fn).float().item()
    assert stored == 32.0 and stored != ideal  # E4M3 step is 4 in [32, 64): 33.33 rounds down to 32
    deq = dequantize_nvfp4(*q)
    divisor = stored * ws2.item()
    err = (deq - weight).abs()
    # Each element is within half an E2M1 step of its scaled value (scale rounded down: the top may clamp at 6).
    assert torch.all(err <= _e2m1_half_gap(weight.abs() / divisor) * divisor + divisor * 1e-5)
    assert err.max().item() <= divisor * 1.0 + 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Global-scale conventions


def test_compressed_tensors_convention_matches_modelopt():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 64, generator=g)
    q = quantize_nvfp4(weight)
    global_scale = global_scale_to_compressed_tensors(q.weight_scale_2)
    assert global_scale.dtype == torch.float32 and global_scale.shape == q.weight_scale_2.shape
    assert global_scale.item() == pytest.approx(6 * 448 / weight.abs().max().item(), rel=1e-6)

    # A compressed-tensors reader computes value * weight_scale / weight_global_scale.
    values = E2M1_VALUES[unpack_e2m1(q.packed).long()].reshape(4, 4, 16)
    ct_dequant = (values * (q.scale.float() / global_scale).unsqueeze(-1)).reshape(4, 64)
    ours = dequantize_nvfp4(q.packed, q.scale, global_scale_from_compressed_tensors(global_scale))
    torch.testing.assert_close(ours, ct_dequant, rtol=2e-7, atol=0)
    torch.testing.assert_close(ours, dequantize_nvfp4(*q), rtol=2e-7, atol=0)


def test_compressed_tensors_power_of_two_global_scale_is_exact():
    # A checkpoint written in the compressed-tensors convention (weight_packed, weight_scale, weight_global_scale):
    weight_packed = torch.tensor([[0x21, 0xF7] + [0x00] * 6], dtype=torch.uint8)  # codes 1 2 7 15 0 ...
    weight_scale = torch.tensor([[3.0]]).to(torch.float8_e4m3fn)
    weight_global_scale = torch.tensor([512.0])  # compressed-tensors stores shape [1]
    ws2 = global_scale_from_compressed_tensors(weight_global_scale)
    assert ws2.tolist() == [2.0**-9]
    assert global_scale_to_compressed_tensors(ws2).tolist() == [512.0]
    out = dequantize_nvfp4(weight_packed, weight_scale, ws2)
    step = 3.0 / 512.0
    assert out.tolist() == [[0.5 * step, 1.0 * step, 6.0 * step, -6.0 * step] + [0.0] * 12]


# ----------------------------------------------------------------------------------------------------------------
# Round trips on random inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,seed", [((1, 16), 3), ((7, 48), 4), ((16, 256), 5), ((33, 80), 6)])
def test_round_trip_error_and_idempotence(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    w32 = weight.float()

    q = quantize_nvfp4(weight)
    n, k = shape
    assert q.packed.shape == (n, k // 2) and q.scale.shape == (n, k // 16)
    assert q.weight_scale_2.item() == pytest.approx(w32.abs().max().item() / 2688, rel=1e-6)
    # fp16/bf16 -> fp32 is exact, so the input dtype must not change a single byte.
    q32 = quantize_nvfp4(w32)
    assert torch.equal(q.packed, q32.packed) and _u8(q.scale) == _u8(q32.scale)

    deq = dequantize_nvfp4(*q)
    assert deq.dtype == torch.float32 and deq.shape == shape and torch.isfinite(deq).all()
    divisor = (q.scale.float() * q.weight_scale_2).repeat_interleave(16, dim=-1)
    bound = _e2m1_half_gap(w32.abs() / divisor) * divisor
    # Slack of 1e-5 of the divisor for fp32 rounding in x / divisor and q * divisor.
    assert torch.all((deq - w32).abs() <= bound + divisor * 1e-5)
    # Per block: error at most one E2M1 half-step at the top (<= scale, which is ~block_amax / 6).
    block_err = (deq - w32).abs().reshape(n, -1, 16).amax(-1)
    block_amax = w32.abs().reshape(n, -1, 16).amax(-1)
    assert torch.all(block_err <= block_amax * (1.0 / 6) * (17.0 / 16) + 1e-30)
    assert dequantize_nvfp4(*q, dtype=dtype).dtype == dtype

    # Idempotence. ModelOpt takes the sign from x < 0, so -0 (code 8) comes back as +0 (code 0); all else is
    # byte-identical. With the default global scale, amax of the decoded tensor may move weight_scale_2 by an ulp.
    expected_codes = unpack_e2m1(q.packed)
    expected_codes = torch.where(expected_codes == 8, 0, expected_codes)
    q_same = quantize_nvfp4(deq, q.weight_scale_2)
    assert torch.equal(unpack_e2m1(q_same.packed), expected_codes) and _u8(q_same.scale) == _u8(q.scale)
    assert torch.equal(q_same.weight_scale_2, q.weight_scale_2)
    assert torch.equal(dequantize_nvfp4(*q_same), deq)
    q_default = quantize_nvfp4(deq)
    assert torch.equal(unpack_e2m1(q_default.packed), expected_codes) and _u8(q_default.scale) == _u8(q.scale)
    torch.testing.assert_close(q_default.weight_scale_2, q.weight_scale_2, rtol=2.4e-7, atol=0)
    torch.testing.assert_close(dequantize_nvfp4(*q_default), deq, rtol=4.8e-7, atol=0)


def test_zero_blocks_give_exact_zeros_without_nan():
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(4, 64, generator=g)
    weight[1] = 0.0
    weight[2, 16:32] = -0.0
    q = quantize_nvfp4(weight)
    assert _u8(q.scale[1]) == [0x38] * 4 and q.scale[2, 1].float().item() == 1.0
    assert q.packed[1].eq(0).all() and q.packed[2, 8:16].eq(0).all()
    deq = dequantize_nvfp4(*q)
    assert not deq.isnan().any()
    assert deq[1].eq(0).all() and deq[2, 16:32].eq(0).all()

    # An all-zero tensor has amax 0; its global scale must stay positive so nothing divides by zero.
    qz = quantize_nvfp4(torch.zeros(2, 32, dtype=torch.bfloat16))
    assert qz.weight_scale_2.item() > 0 and qz.packed.eq(0).all()
    assert _u8(qz.scale) == [[0x38, 0x38], [0x38, 0x38]]
    assert torch.equal(dequantize_nvfp4(*qz), torch.zeros(2, 32))


def test_rows_of_very_different_magnitudes():
    g = torch.Generator().manual_seed(8)
    magnitudes = torch.tensor([1e-2, 1.0, 30.0, 3e-3]).unsqueeze(1)
    weight = torch.randn(4, 128, generator=g) * magnitudes
    q = quantize_nvfp4(weight)
    deq = dequantize_nvfp4(*q)
    # Each row keeps its own precision: the per-block scales absorb the 1e4 spread.
    row_rel = (deq - weight).abs().amax(1) / weight.abs().amax(1)
    assert torch.all(row_rel <= 0.2)
    rms_rel = ((deq - weight).pow(2).mean(1) / weight.pow(2).mean(1)).sqrt()
    assert torch.all(rms_rel < 0.12)

    # A block below ~2e-6 of the tensor's amax gets an E4M3 scale that underflows to 0: zeros, never NaN.
    tiny = torch.cat([torch.full((1, 16), 1e-7), torch.full((1, 16), 1.0)])
    qt = quantize_nvfp4(tiny)
    assert qt.scale[0, 0].float().item() == 0.0
    assert qt.packed[0].eq(0).all()
    out = dequantize_nvfp4(*qt)
    assert out[0].eq(0).all() and out[1].eq(1.0).all() and not out.isnan().any()


def test_stacked_experts_match_per_expert_quantization():
    g = torch.Generator().manual_seed(9)
    weight = torch.randn(3, 8, 32, generator=g) * torch.tensor([0.1, 1.0, 10.0]).reshape(3, 1, 1)
    q = quantize_nvfp4(weight)
    assert q.packed.shape == (3, 8, 16) and q.scale.shape == (3, 8, 2) and q.weight_scale_2.shape == (3,)
    for e in range(3):
        qe = quantize_nvfp4(weight[e])
        assert torch.equal(q.packed[e], qe.packed) and _u8(q.scale[e]) == _u8(qe.scale)
        assert q.weight_scale_2[e].item() == qe.weight_scale_2.item()
        assert torch.equal(dequantize_nvfp4(*q)[e], dequantize_nvfp4(*qe))
    # Explicit per-expert scales, and their compressed-tensors reciprocals, keep the [E] shape.
    q_explicit = quantize_nvfp4(weight, q.weight_scale_2.clone())
    assert torch.equal(q_explicit.packed, q.packed)
    assert global_scale_to_compressed_tensors(q.weight_scale_2).shape == (3,)


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def _good():
    return quantize_nvfp4(torch.ones(2, 32))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: quantize_nvfp4([[1.0] * 16]), TypeError, "weight must be a torch.Tensor"),
        (lambda: quantize_nvfp4(torch.ones(2, 16, dtype=torch.float64)), TypeError, "weight must have dtype"),
        (lambda: quantize_nvfp4(torch.ones(2, 16, dtype=torch.int32)), TypeError, "weight must have dtype"),
        (lambda: quantize_nvfp4(torch.ones(2, 24)), ValueError,
         "weight's last dimension K must be a multiple of 16"),
        (lambda: quantize_nvfp4(torch.ones(32)), ValueError, "weight must be 2D"),
        (lambda: quantize_nvfp4(torch.ones(2, 2, 2, 16)), ValueError, "weight must be 2D"),
        (lambda: quantize_nvfp4(torch.ones(0, 16)), ValueError, "weight must be non-empty"),
        (lambda: quantize_nvfp4(torch.tensor([[float("nan")] + [0.0] * 15])), ValueError,
         "weight must be finite"),
        (lambda: quantize_nvfp4(torch.tensor([[float("inf")] + [0.0] * 15])), ValueError,
         "weight must be finite"),
        (lambda: quantize_nvfp4(torch.ones(2, 16), 0.5), TypeError, "weight_scale_2 must be a torch.Tensor"),
        (lambda: quantize_nvfp4(torch.ones(2, 16), torch.tensor(1.0, dtype=torch.float64)), TypeError,
         "weight_scale_2 must have dtype torch.float32"),
        (lambda: quantize_nvfp4(torch.ones(2, 16), torch.tensor(0.0)), ValueError,
         "weight_scale_2 must be finite and > 0"),
        (lambda: quantize_nvfp4(torch.ones(2, 16), torch.tensor(-1.0)), ValueError,
         "weight_scale_2 must be finite and > 0"),
        (lambda: quantize_nvfp4(torch.ones(2, 16), torch.tensor(float("inf"))), ValueError,
         "weight_scale_2 must be finite"),
        (lambda: quantize_nvfp4(torch.ones(2, 16), torch.ones(2)), ValueError, "weight_scale_2 must be a scalar"),
        (lambda: quantize_nvfp4(torch.ones(3, 2, 16), torch.tensor(1.0)), ValueError,
         r"weight_scale_2 must have shape \[3\]"),
        (lambda: quantize_nvfp4(torch.full((2, 16), 100.0), torch.tensor(2.0**-10)), ValueError,
         "weight_scale_2 is too small"),
        (lambda: pack_e2m1(torch.tensor([1, 2], dtype=torch.int64)), TypeError, "codes must have dtype torch.uint8"),
        (lambda: pack_e2m1(torch.tensor([1, 2, 3], dtype=torch.uint8)), ValueError,
         "codes must have an even last dimension"),
        (lambda: pack_e2m1(torch.tensor([1, 16], dtype=torch.uint8)), ValueError, "codes must hold 4-bit values"),
        (lambda: pack_e2m1([1, 2]), TypeError, "codes must be a torch.Tensor"),
        (lambda: unpack_e2m1(torch.tensor([1], dtype=torch.int8)), TypeError, "packed must have dtype torch.uint8"),
        (lambda: unpack_e2m1(torch.tensor(1, dtype=torch.uint8)), ValueError,
         "packed must have at least one dimension"),
        (lambda: dequantize_nvfp4(_good().packed.to(torch.int8), _good().scale, _good().weight_scale_2), TypeError,
         "packed must have dtype torch.uint8"),
        (lambda: dequantize_nvfp4(_good().packed, _good().scale.float(), _good().weight_scale_2), TypeError,
         "scale must have dtype torch.float8_e4m3fn"),
        (lambda: dequantize_nvfp4(_good().packed, _good().scale[:, :1], _good().weight_scale_2), ValueError,
         "scale shape .* does not agree with packed shape"),
        (lambda: dequantize_nvfp4(_good().packed[:, :12], _good().scale, _good().weight_scale_2), ValueError,
         "scale shape .* does not agree with packed shape"),
        (lambda: dequantize_nvfp4(_good().packed[:1], _good().scale, _good().weight_scale_2), ValueError,
         "scale shape .* does not agree with packed shape"),
        (lambda: dequantize_nvfp4(_good().packed[0], _good().scale[0], _good().weight_scale_2), ValueError,
         "packed must be a non-empty 2D"),
        (lambda: dequantize_nvfp4(_good().packed, torch.full((2, 2), float("nan")).to(torch.float8_e4m3fn),
                                  _good().weight_scale_2), ValueError, "scale must hold finite, non-negative"),
        (lambda: dequantize_nvfp4(_good().packed, torch.full((2, 2), -1.0).to(torch.float8_e4m3fn),
                                  _good().weight_scale_2), ValueError, "scale must hold finite, non-negative"),
        (lambda: dequantize_nvfp4(_good().packed, _good().scale, torch.tensor(-2.0)), ValueError,
         "weight_scale_2 must be finite and > 0"),
        (lambda: dequantize_nvfp4(_good().packed, _good().scale, torch.ones(2, 1)), ValueError,
         "weight_scale_2 must be a scalar"),
        (lambda: dequantize_nvfp4(_good().packed.expand(3, 2, 16), _good().scale.expand(3, 2, 2), torch.ones(2)),
         ValueError, r"weight_scale_2 must have shape \[3\]"),
        (lambda: dequantize_nvfp4(*_good(), dtype=torch.int8), TypeError, "dtype must be torch.float32"),
        (lambda: global_scale_from_compressed_tensors(torch.tensor(0.0)), ValueError,
         "weight_global_scale must be finite and > 0"),
        (lambda: global_scale_from_compressed_tensors(torch.tensor(float("nan"))), ValueError,
         "weight_global_scale must be finite and > 0"),
        (lambda: global_scale_from_compressed_tensors(2.0), TypeError, "weight_global_scale must be a torch.Tensor"),
        (lambda: global_scale_from_compressed_tensors(torch.tensor(2, dtype=torch.int32)), TypeError,
         "weight_global_scale must have dtype torch.float32"),
        (lambda: global_scale_from_compressed_tensors(torch.ones(2, 2)), ValueError,
         "weight_global_scale must be a scalar or a 1D"),
        (lambda: global_scale_from_compressed_tensors(torch.tensor(1e-40)), ValueError,
         "weight_global_scale is so small that its reciprocal overflows"),
        (lambda: global_scale_to_compressed_tensors(torch.tensor([-1.0])), ValueError,
         "weight_scale_2 must be finite and > 0"),
    ],
)
def test_input_checks_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_checks_run_before_any_work():
    # A bad global scale is rejected even though the weight alone would quantize fine, and the weight is untouched.
    weight = torch.randn(2, 32)
    before = weight.clone()
    with pytest.raises(ValueError, match="weight_scale_2"):
        quantize_nvfp4(weight, torch.tensor(0.0))
    assert torch.equal(weight, before)
