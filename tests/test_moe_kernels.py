"""Triton MoE kernels (routing, grouped GEMMs, combine) against a float32 torch reference.

On the CPU the kernels run under TRITON_INTERPRET=1 with fp16 activations (the interpreter gets bf16 wrong);
on a GPU the same tests run in bf16 too.
"""

import math

import pytest
import torch

from dgemma_hf.kernels.moe import NVFP4Experts, moe_experts, moe_experts_nvfp4, route
from dgemma_hf.kernels.nvfp4 import dequantize_nvfp4, quantize_nvfp4, scales_to_kernel_layout, to_kernel_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def reference_moe(x, top_k_index, top_k_weights, gate_up, down):
    """fp32 math, one (token, expert) pair at a time."""
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    intermediate = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            if e == gate_up.shape[0]:  # expert parallelism's sentinel: another rank's expert
                continue
            gate = gate_up[e, :intermediate] @ x[t]
            up = gate_up[e, intermediate:] @ x[t]
            act = torch.nn.functional.gelu(gate, approximate="tanh") * up
            out[t] += float(top_k_weights[t, k]) * (down[e] @ act)
    return out


def _rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def _routing(tokens, top_k, experts, case, generator):
    if case == "random":
        scores = torch.rand(tokens, experts, generator=generator)
        index = scores.topk(top_k, dim=-1).indices
    elif case == "one_expert_hot":  # every token picks expert 0 first: one expert holds all tokens
        rest = torch.rand(tokens, experts - 1, generator=generator).topk(top_k - 1, dim=-1).indices + 1
        index = torch.cat([torch.zeros(tokens, 1, dtype=torch.long), rest], dim=1)
    elif case == "few_experts":  # only experts 1 and 2 used; the others get zero tokens
        index = torch.tensor([[1, 2]] * tokens)[:, :top_k]
    else:
        raise ValueError(case)
    weights = torch.rand(tokens, top_k, generator=generator) + 0.1
    return index, weights / weights.sum(-1, keepdim=True)


def _weights(experts, hidden, intermediate, generator, dtype):
    gate_up = torch.randn(experts, 2 * intermediate, hidden, generator=generator) / math.sqrt(hidden)
    down = torch.randn(experts, hidden, intermediate, generator=generator) / math.sqrt(intermediate)
    return gate_up.to(dtype), down.to(dtype)


CASES = [
    # tokens, top_k, experts, hidden, intermediate, routing
    (1, 2, 4, 64, 32, "random"),  # one token
    (37, 2, 8, 64, 96, "random"),  # not a multiple of any tile; I not a multiple of BLOCK_N
    (24, 2, 4, 96, 32, "one_expert_hot"),  # all tokens on one expert
    (9, 2, 6, 64, 32, "few_experts"),  # experts with zero tokens
    (160, 3, 8, 64, 32, "random"),  # more pairs per expert: larger tiles
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, top_k, experts, hidden, intermediate, case", CASES)
def test_bf16_experts_match_reference(tokens, top_k, experts, hidden, intermediate, case, dtype):
    generator = torch.Generator().manual_seed(tokens * 1000 + experts)
    index, weights = _routing(tokens, top_k, experts, case, generator)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    gate_up, down = _weights(experts, hidden, intermediate, generator, dtype)
    want = reference_moe(x, index, weights, gate_up, down)
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype, device=DEVICE)  # poison
    got = moe_experts(x.to(DEVICE), index.to(DEVICE), weights.to(DEVICE), gate_up.to(DEVICE), down.to(DEVICE), out=out)
    assert got is out and torch.isfinite(got).all()
    assert _rel_err(got.cpu(), want) < 1e-2


def _nvfp4_experts(experts, hidden, intermediate, generator):
    gate_up, down = _weights(experts, hidden, intermediate, generator, torch.float32)
    gate = quantize_nvfp4(gate_up[:, :intermediate])
    up = quantize_nvfp4(gate_up[:, intermediate:] * 3)  # a different global scale from gate's
    down_q = quantize_nvfp4(down)
    packed = NVFP4Experts(
        gate_up_packed=to_kernel_layout(torch.cat([gate.packed, up.packed], dim=1)),
        gate_up_scale=scales_to_kernel_layout(torch.cat([gate.scale, up.scale], dim=1)),
        gate_scale2=gate.weight_scale_2,
        up_scale2=up.weight_scale_2,
        down_packed=to_kernel_layout(down_q.packed),
        down_scale=scales_to_kernel_layout(down_q.scale),
        down_scale2=down_q.weight_scale_2,
    )
    dequantized_gate_up = torch.cat([dequantize_nvfp4(*gate), dequantize_nvfp4(*up)], dim=1)
    return packed, dequantized_gate_up, dequantize_nvfp4(*down_q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, top_k, experts, hidden, intermediate, case", CASES)
def test_nvfp4_experts_match_dequantized_reference(tokens, top_k, experts, hidden, intermediate, case, dtype):
    generator = torch.Generator().manual_seed(tokens * 7 + experts)
    index, weights = _routing(tokens, top_k, experts, case, generator)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    packed, gate_up, down = _nvfp4_experts(experts, hidden, intermediate, generator)
    want = reference_moe(x, index, weights, gate_up, down)
    packed = NVFP4Experts(*(t.to(DEVICE) for t in packed))
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype, device=DEVICE)
    got = moe_experts_nvfp4(x.to(DEVICE), index.to(DEVICE), weights.to(DEVICE), packed, out=out)
    assert torch.isfinite(got).all()
    assert _rel_err(got.cpu(), want) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [(16, 32, 64, 4, 2, True), (16, 32, 64, 4, 2, False), (32, 64, 128, 4, 2, True),
                                    (64, 64, 32, 4, 2, False), (16, 32, 64, 4, 2, True, 64),
                                    (32, 64, 128, 4, 2, True, 16)])
def test_nvfp4_tile_orientations_and_k_blocks(config, dtype):
    """Both MMA orientations (weights as B, or transposed as A) and K steps of 1, 2 and 4 blocks of 32, one of
    them past the end of K (hidden 96 = 3 blocks); the down kernel with its own BLOCK_N, wider than hidden's last
    tile (64 on 96 rows) or narrower than gate_up's."""
    generator = torch.Generator().manual_seed(sum(config[:3]))
    index, weights = _routing(29, 2, 4, "random", generator)
    x = torch.randn(29, 96, generator=generator).to(dtype)
    packed, gate_up, down = _nvfp4_experts(4, 96, 64, generator)
    want = reference_moe(x, index, weights, gate_up, down)
    packed = NVFP4Experts(*(t.to(DEVICE) for t in packed))
    got = moe_experts_nvfp4(x.to(DEVICE), index.to(DEVICE), weights.to(DEVICE), packed, config=config)
    assert _rel_err(got.cpu(), want) < 1e-2


@pytest.mark.parametrize("nvfp4", [False, True])
def test_sentinel_pairs_cost_nothing_and_add_zero(nvfp4):
    """Index E (another rank's expert under expert parallelism) is left out of routing and of the combine, even
    where the pair rows hold garbage."""
    generator = torch.Generator().manual_seed(5)
    experts, tokens = 4, 33
    index, weights = _routing(tokens, 2, experts, "random", generator)
    index[torch.rand(index.shape, generator=generator) < 0.4] = experts
    index[0] = experts  # a token with no local expert at all
    x = torch.randn(tokens, 64, generator=generator).half()
    if nvfp4:
        packed, gate_up, down = _nvfp4_experts(experts, 64, 32, generator)
        run = lambda: moe_experts_nvfp4(x.to(DEVICE), index.to(DEVICE), weights.to(DEVICE),  # noqa: E731
                                        NVFP4Experts(*(t.to(DEVICE) for t in packed)))
    else:
        gate_up, down = _weights(experts, 64, 32, generator, torch.float16)
        run = lambda: moe_experts(x.to(DEVICE), index.to(DEVICE), weights.to(DEVICE), gate_up.to(DEVICE),  # noqa: E731
                                  down.to(DEVICE))
    want = reference_moe(x, index, weights, gate_up, down)
    got = run().cpu()
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert _rel_err(got, want) < 1e-2
    routing = route(index.to(DEVICE), num_experts=experts, block_m=16)
    assert routing.expert_offsets[-1].item() == (index < experts).sum().item()


def test_bad_block_configs_are_refused_by_name():
    generator = torch.Generator().manual_seed(1)
    index, weights = _routing(5, 2, 4, "random", generator)
    x = torch.randn(5, 64, generator=generator).half()
    gate_up, down = _weights(4, 64, 32, generator, torch.float16)
    packed, _, _ = _nvfp4_experts(4, 64, 32, generator)
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two >= 16, got 48"):
        moe_experts(x, index, weights, gate_up, down, config=(16, 48, 64, 4, 2))
    with pytest.raises(ValueError, match="BLOCK_K must be a multiple of 32 for NVFP4 weights, got 16"):
        moe_experts_nvfp4(x, index, weights, packed, config=(16, 32, 16, 4, 2, True))
    with pytest.raises(ValueError, match="down BLOCK_N must be a power of two >= 16, got 48"):
        moe_experts_nvfp4(x, index, weights, packed, config=(16, 32, 64, 4, 2, True, 48))
    with pytest.raises(ValueError, match="down BLOCK_N\\) apply to NVFP4 weights only"):
        moe_experts(x, index, weights, gate_up, down, config=(16, 32, 64, 4, 2, True))


def test_route_sorts_stably_and_tiles_every_pair():
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, 5, (40, 3), generator=generator)
    index[:, 0] = 4  # expert 4 gets at least 40 pairs: several tiles of 16
    routing = route(index.to(DEVICE), num_experts=5, block_m=16)
    routing = routing._replace(**{name: getattr(routing, name).cpu() for name in routing._fields[:4]})
    flat = index.flatten()
    pairs = routing.sorted_pairs.long()
    assert sorted(pairs.tolist()) == list(range(flat.numel()))
    assert (flat[pairs].diff() >= 0).all()  # grouped by expert
    offsets = routing.expert_offsets.tolist()
    for e in range(5):
        block = pairs[offsets[e] : offsets[e + 1]]
        assert (flat[block] == e).all() and (block.diff() > 0).all()  # stable: pair order kept
    covered = []
    for expert, start in zip(routing.tile_expert.tolist(), routing.tile_start.tolist()):
        if expert >= 0:
            covered += [r for r in range(start, start + 16) if r < offsets[expert + 1]]
    assert sorted(covered) == list(range(flat.numel()))  # each sorted row in exactly one tile


def test_results_are_bitwise_deterministic():
    generator = torch.Generator().manual_seed(3)
    index, weights = _routing(40, 2, 4, "random", generator)
    x = torch.randn(40, 64, generator=generator).half().to(DEVICE)
    gate_up, down = (w.to(DEVICE) for w in _weights(4, 64, 32, generator, torch.float16))
    args = (x, index.to(DEVICE), weights.to(DEVICE), gate_up, down)
    assert torch.equal(moe_experts(*args), moe_experts(*args))


def test_wrapper_checks_name_the_tensor():
    x = torch.randn(4, 64).half()
    index = torch.zeros(4, 2, dtype=torch.long)
    weights = torch.full((4, 2), 0.5)
    gate_up = torch.randn(3, 64, 64).half()
    down = torch.randn(3, 64, 32).half()
    with pytest.raises(TypeError, match="hidden_states must be a bfloat16, float16 or float32"):
        moe_experts(x.double(), index, weights, gate_up, down)
    with pytest.raises(ValueError, match=r"down_proj must have shape \(3, 64, 32\)"):
        moe_experts(x, index, weights, gate_up, down[:, :, :16].contiguous())
    with pytest.raises(TypeError, match="gate_up_proj must have dtype torch.float16"):
        moe_experts(x, index, weights, gate_up.float(), down)
    with pytest.raises(TypeError, match="top_k_weights must have dtype torch.float32"):
        moe_experts(x, index, weights.half(), gate_up, down)
    with pytest.raises(ValueError, match=r"top_k_index must have shape \[4, top_k\]"):
        moe_experts(x, index[:3], weights, gate_up, down)
    packed, _, _ = _nvfp4_experts(3, 64, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="down_scale must have shape"):
        moe_experts_nvfp4(x, index, weights, packed._replace(down_scale=packed.down_scale[:, :, :1].contiguous()))
    with pytest.raises(TypeError, match="up_scale2 must have dtype torch.float32"):
        moe_experts_nvfp4(x, index, weights, packed._replace(up_scale2=packed.up_scale2.double()))
    with pytest.raises(TypeError, match="down_scale must have dtype torch.bfloat16"):
        moe_experts_nvfp4(x, index, weights, packed._replace(down_scale=packed.down_scale.view(torch.uint8)[..., ::2]))
    odd = torch.empty(packed.down_packed.numel() + 1, dtype=torch.uint8)[1:].view(packed.down_packed.shape)
    odd.copy_(packed.down_packed)  # same bytes, one byte off a 4-byte boundary
    with pytest.raises(ValueError, match="down_packed must start at a 4-byte aligned address"):
        moe_experts_nvfp4(x, index, weights, packed._replace(down_packed=odd))


@pytest.mark.gpu
def test_gpu_bf16_decode_is_exact_for_every_code_and_scale():
    """The GPU-only bf16 path (inline PTX, which the interpreter cannot run): every code in each of a word's 8
    places under every finite E4M3 scale (subnormals included), each pair under its own scale, decodes to exactly
    e2m1 * scale * 2^-7."""
    if DEVICE != "cuda":
        pytest.skip("inline PTX needs a GPU")
    import triton
    import triton.language as tl

    from dgemma_hf.kernels.moe import _decode_word
    from dgemma_hf.kernels.nvfp4 import E2M1_VALUES

    @triton.jit
    def probe(words_ptr, scales_g_ptr, scales_g8_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        p0, p1, p2, p3, p4, p5, p6, p7 = _decode_word(tl.load(words_ptr + i, mask=mask, other=0),
                                                      tl.load(scales_g_ptr + i, mask=mask, other=0),
                                                      tl.load(scales_g8_ptr + i, mask=mask, other=0))
        tl.store(out_ptr + 8 * i, p0, mask=mask)
        tl.store(out_ptr + 8 * i + 1, p1, mask=mask)
        tl.store(out_ptr + 8 * i + 2, p2, mask=mask)
        tl.store(out_ptr + 8 * i + 3, p3, mask=mask)
        tl.store(out_ptr + 8 * i + 4, p4, mask=mask)
        tl.store(out_ptr + 8 * i + 5, p5, mask=mask)
        tl.store(out_ptr + 8 * i + 6, p6, mask=mask)
        tl.store(out_ptr + 8 * i + 7, p7, mask=mask)

    # Sample i: codes (i + place) % 16 in the 8 places of word (g 0, t 0, h 0) of a 16 x 32 block (place = 2 pair +
    # w, pair = 2 half + r8: row 8 r8, column 16 half + w); pair p under E4M3 pattern (i // 16 + 31 p) % 127.
    n = 16 * 127  # E4M3 (fn) patterns 0..126; 127 is NaN
    i = torch.arange(n)
    codes = torch.zeros(n, 16, 32, dtype=torch.uint8)
    for place in range(8):
        pair, w = divmod(place, 2)
        half, r8 = divmod(pair, 2)
        codes[:, 8 * r8, 16 * half + w] = ((i + place) % 16).to(torch.uint8)
    packed = to_kernel_layout(codes[..., 0::2] | (codes[..., 1::2] << 4))
    words = packed.reshape(n, -1).view(torch.int32)[:, 0].contiguous()
    patterns = (i[:, None] // 16 + 31 * torch.arange(4)) % 127  # [n, pair]
    e4m3 = patterns.to(torch.uint8).view(torch.float8_e4m3fn)
    bits = (e4m3.float() * 2.0**119).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF  # kernel scales
    scales_g = bits[:, 0] | (bits[:, 2] << 16)  # row g: half 0 (pair 0), half 1 (pair 2)
    scales_g8 = bits[:, 1] | (bits[:, 3] << 16)  # row g + 8: pairs 1 and 3
    out = torch.empty(n, 8, dtype=torch.bfloat16, device=DEVICE)
    probe[(triton.cdiv(n, 256),)](words.to(DEVICE), scales_g.to(DEVICE), scales_g8.to(DEVICE), out, n, BLOCK=256)
    place_codes = (i[:, None] + torch.arange(8)) % 16
    want = (E2M1_VALUES[place_codes] * e4m3.float().repeat_interleave(2, dim=1) * 2.0**-7).to(torch.bfloat16)
    assert torch.equal(out.cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("nvfp4", [False, True], ids=["bf16", "nvfp4"])
def test_gpu_every_table_config_at_the_real_layer_shape(nvfp4):
    """Each row of the block tables, picked as generate() picks it (by mean pairs per expert), at the model's layer
    shape (hidden 2816, intermediate 704, 128 experts, top-8, bf16 activations) against fp64 math on the
    (dequantized) weights: the configs the benchmarks time are the ones checked here."""
    if DEVICE != "cuda":
        pytest.skip("compiled kernels at the real shape need a GPU")
    from dgemma_hf.kernels.moe import _CONFIGS, _NVFP4_CONFIGS, pick_config

    experts, hidden, intermediate, top_k = 128, 2816, 704, 8
    generator = torch.Generator(device=DEVICE).manual_seed(11)
    gate_up = torch.randn(experts, 2 * intermediate, hidden, generator=generator, device=DEVICE) / math.sqrt(hidden)
    down = torch.randn(experts, hidden, intermediate, generator=generator, device=DEVICE) / math.sqrt(intermediate)
    if nvfp4:
        gate, up = quantize_nvfp4(gate_up[:, :intermediate]), quantize_nvfp4(gate_up[:, intermediate:] * 3)
        down_q = quantize_nvfp4(down)
        weights = NVFP4Experts(
            to_kernel_layout(torch.cat([gate.packed, up.packed], dim=1)),
            scales_to_kernel_layout(torch.cat([gate.scale, up.scale], dim=1)), gate.weight_scale_2,
            up.weight_scale_2, to_kernel_layout(down_q.packed), scales_to_kernel_layout(down_q.scale),
            down_q.weight_scale_2)
        gate_up = torch.cat([dequantize_nvfp4(*gate), dequantize_nvfp4(*up)], dim=1)
        down = dequantize_nvfp4(*down_q)
    else:
        gate_up, down = gate_up.to(torch.bfloat16), down.to(torch.bfloat16)
    picked = set()
    for tokens in (64, 256, 1024, 2048):
        scores = torch.rand(tokens, experts, generator=generator, device=DEVICE)
        index = scores.topk(top_k, dim=-1).indices
        routing = torch.rand(tokens, top_k, generator=generator, device=DEVICE) + 0.1
        routing = routing / routing.sum(-1, keepdim=True)
        x = torch.randn(tokens, hidden, generator=generator, device=DEVICE).to(torch.bfloat16)
        want = torch.zeros(tokens, hidden, dtype=torch.float64, device=DEVICE)
        for e in range(experts):  # fp64, one expert's pairs at a time
            token, slot = (index == e).nonzero(as_tuple=True)
            h = x[token].double() @ gate_up[e].double().T
            act = torch.nn.functional.gelu(h[:, :intermediate], approximate="tanh") * h[:, intermediate:]
            want.index_add_(0, token, (act @ down[e].double().T) * routing[token, slot].double()[:, None])
        if nvfp4:
            got = moe_experts_nvfp4(x, index, routing, weights)
        else:
            got = moe_experts(x, index, routing, gate_up, down)
        picked.add(pick_config(tokens * top_k, experts, nvfp4))
        assert torch.isfinite(got).all() and _rel_err(got, want) < 1e-2, tokens
    assert picked == {tuple(row[1:]) for row in (_NVFP4_CONFIGS if nvfp4 else _CONFIGS)}
