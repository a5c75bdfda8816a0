"""One-launch Triton MoE routing (`kernels/routing.py`) against the plain-torch routing it replaces.

The outputs must be bitwise equal: the grouped GEMMs read the tile schedule, tail included.
"""

import pytest
import torch
import triton

from dgemma_hf.kernels import routing as routing_module
from dgemma_hf.fused_layers import upstream_router_top_k
from dgemma_hf.kernels.routing import route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_route(top_k_index, num_experts, block_m):
    """The torch-op routing `route` replaces (kept here so the test outlives the switch in moe.py)."""
    num_pairs = top_k_index.numel()
    flat = top_k_index.reshape(-1)
    _, sorted_pairs = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32))
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    expert_offsets[1:] = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = min(num_pairs, triton.cdiv(num_pairs, block_m) + num_experts)
    tile_ids = torch.arange(max_tiles, dtype=torch.int32)
    tile_expert = torch.searchsorted(tile_end, tile_ids, right=True).to(torch.int32)
    expert = tile_expert.clamp(max=num_experts - 1)
    tile_start = expert_offsets[expert] + (tile_ids - (tile_end - tiles)[expert]) * block_m
    return (sorted_pairs.to(torch.int32), expert_offsets,
            torch.where(tile_expert < num_experts, tile_expert, -1), tile_start.to(torch.int32))


def _index(tokens, top_k, experts, case, generator):
    if case == "random":  # distinct experts per token, as topk gives
        return torch.rand(tokens, experts, generator=generator).topk(top_k, dim=-1).indices
    if case == "repeats":  # any values, repeats within a token included
        return torch.randint(0, experts, (tokens, top_k), generator=generator)
    if case == "one_expert":  # every pair on the last expert
        return torch.full((tokens, top_k), experts - 1)
    if case == "few_experts":  # experts 1 and 3 only: the others (0 and the tail) get no pair
        return torch.tensor([1, 3]).repeat(tokens, top_k)[:, :top_k]
    raise ValueError(case)


def _check(index, experts, block_m):
    got = route(index.to(DEVICE), experts, block_m)
    want = reference_route(index, experts, block_m)
    assert got.block_m == block_m
    for name, g, w in zip(("sorted_pairs", "expert_offsets", "tile_expert", "tile_start"), got, want):
        assert g.dtype == torch.int32 and g.shape == w.shape, name
        assert torch.equal(g.cpu(), w), name


CASES = [
    # tokens, top_k, experts, routing
    (1, 1, 7, "random"),  # one token
    (1, 8, 128, "random"),
    (0, 2, 4, "random"),  # no tokens: empty outputs, zero offsets
    (37, 3, 7, "repeats"),  # pairs not a multiple of any block_m; experts not a power of two
    (40, 2, 1, "repeats"),  # a single expert
    (50, 4, 6, "few_experts"),  # zero-pair experts, first and last included
    (150, 4, 5, "one_expert"),  # every pair on one expert: many tiles, long -1 tail
    (75, 8, 130, "random"),  # 600 pairs over 130 experts
]


# Every block_m for each case, except the many-expert ones (slow on the interpreter): block_m 16 and 64 only.
BLOCK_M_CASES = [case + (block_m,) for case in CASES for block_m in (16, 32, 64, 128)
                 if case[2] < 100 or block_m in (16, 64)]


@pytest.mark.parametrize("tokens, top_k, experts, case, block_m", BLOCK_M_CASES)
def test_route_matches_torch_reference(tokens, top_k, experts, case, block_m):
    generator = torch.Generator().manual_seed(tokens * 131 + experts * 7 + block_m)
    _check(_index(tokens, top_k, experts, case, generator), experts, block_m)


@pytest.mark.parametrize("experts, case", [(7, "repeats"), (5, "one_expert"), (6, "few_experts")])
def test_route_over_several_chunks(monkeypatch, experts, case):
    # 300 pairs in chunks of 32: the per-expert row cursor carries across chunks.
    monkeypatch.setattr(routing_module, "_MAX_PAIRS_BLOCK", 32)
    generator = torch.Generator().manual_seed(experts)
    _check(_index(100, 3, experts, case, generator), experts, 16)


def test_route_over_two_default_chunks():
    index = torch.randint(0, 3, (1100, 2), generator=torch.Generator().manual_seed(1))  # 2200 pairs > 2048
    _check(index, 3, 128)


def test_route_accepts_int32_and_strided_views():
    index = torch.randint(0, 9, (40, 4), generator=torch.Generator().manual_seed(2))
    _check(index.int(), 9, 16)
    strided = index.t().contiguous().t()  # strides (1, 40)
    assert not strided.is_contiguous()
    _check(strided, 9, 32)
    _check(index[:, ::2], 9, 16)  # strides (4, 2)


def test_route_checks_its_arguments():
    index = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="top_k_index must be a torch.Tensor"):
        route([[0, 1]], 4, 16)
    with pytest.raises(TypeError, match="top_k_index must be int32 or int64, got torch.float32"):
        route(index.float(), 4, 16)
    with pytest.raises(ValueError, match=r"top_k_index must be 2D \[tokens, top_k\], got shape \(8,\)"):
        route(index.flatten(), 4, 16)
    with pytest.raises(ValueError, match="num_experts must be >= 1, got 0"):
        route(index, 0, 16)
    with pytest.raises(TypeError, match="num_experts must be an int, got float"):
        route(index, 4.0, 16)
    for block_m in (8, 48, 0, -16):
        with pytest.raises(ValueError, match=f"block_m must be a power of two >= 16, got {block_m}"):
            route(index, 4, block_m)


@pytest.mark.parametrize("tokens,experts,top_k", [(0, 8, 2), (1, 4, 4), (37, 8, 3), (257, 128, 8), (64, 20, 1)])
def test_top_k_weights_match_upstreams_router(tokens, experts, top_k):
    """The one-launch top-k (interpreted on CPUs) against upstream's topk / renormalise / scale, on fresh random
    softmax outputs: the same experts in the same order, weights within the last bits (another sum order)."""
    generator = torch.Generator().manual_seed(tokens * 1000 + experts)
    probs = torch.softmax(3 * torch.randn(tokens, experts, generator=generator), dim=-1).to(DEVICE)
    scale = (0.5 + torch.rand(experts, generator=generator)).to(torch.bfloat16).to(DEVICE)
    weights, index = routing_module.top_k_weights(probs, top_k, scale)
    want_weights, want_index = upstream_router_top_k(probs, top_k, scale)
    assert index.dtype == want_index.dtype == torch.int64 and weights.dtype == want_weights.dtype == torch.float32
    assert torch.equal(index, want_index)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=0)


def test_top_k_weights_break_ties_toward_the_lower_expert_and_rank_nan_first():
    """Ties (which torch.topk orders as it likes) go to the lower expert, each chosen once, even among -inf; NaN
    ranks highest and poisons the row's weights, as with torch.topk."""
    nan, inf = float("nan"), float("inf")
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.1, 0.4], [-inf, -inf, -inf, 0.5],
                          [0.2, nan, 0.7, 0.1]], device=DEVICE)
    weights, index = routing_module.top_k_weights(probs, 3, torch.ones(4, device=DEVICE))
    assert index.tolist() == [[0, 1, 2], [1, 3, 0], [3, 0, 1], [1, 2, 0]]
    assert index[3].tolist() == torch.topk(probs[3].cpu(), 3).indices.tolist()
    torch.testing.assert_close(weights[0], torch.full((3,), 1 / 3, device=DEVICE))
    assert weights[3].isnan().all()
    assert upstream_router_top_k(probs[3:], 3, torch.ones(4, device=DEVICE))[0].isnan().all()


def test_top_k_weights_refuse_bad_arguments_by_name():
    probs = torch.rand(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="top_k"):
        routing_module.top_k_weights(probs, 9, torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="probs"):
        routing_module.top_k_weights(probs.double(), 2, torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="per_expert_scale"):
        routing_module.top_k_weights(probs, 2, torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match="per_expert_scale"):
        routing_module.top_k_weights(probs, 2, torch.ones(8, device="meta"))
