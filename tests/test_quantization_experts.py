"""`NVFP4TextExperts` on its own: byte layouts, decoding, and its experts backends (the Triton kernel runs on the
CPU under TRITON_INTERPRET=1 with fp16 activations) against the torch reference."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import variant_config
from dgemma_hf.kernels.nvfp4 import (
    E2M1_VALUES,
    KERNEL_ROTATIONS,
    dequantize_nvfp4,
    from_kernel_layout,
    quantize_nvfp4,
    scales_from_kernel_layout,
    scales_to_kernel_layout,
    to_kernel_layout,
    unpack_e2m1,
)
from dgemma_hf.quantization import NVFP4TextExperts
from dgemma_hf.quantization.layout import dequantize_kernel_layout


def test_kernel_layout_inverts():
    generator = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8, generator=generator)
    kernel = to_kernel_layout(packed)
    assert kernel.shape == packed.shape and not torch.equal(kernel, packed)
    assert torch.equal(from_kernel_layout(kernel), packed)
    with pytest.raises(ValueError, match="K a multiple of 32"):
        from_kernel_layout(packed[..., :8])
    with pytest.raises(ValueError, match="N a multiple of 16"):
        to_kernel_layout(packed[:, :8])


def test_kernel_scales_invert_for_every_e4m3_value():
    scale = torch.arange(256, dtype=torch.uint8).reshape(16, 16).view(torch.float8_e4m3fn)  # NaN: 0x7F, 0xFF
    kernel = scales_to_kernel_layout(scale)
    assert kernel.dtype == torch.bfloat16 and kernel.shape == scale.shape
    back = scales_from_kernel_layout(kernel)
    finite = scale.float().isfinite()
    assert torch.equal(back.view(torch.uint8)[finite], scale.view(torch.uint8)[finite])
    assert back.float()[~finite].isnan().all()
    # The values are the scales times 2^119 (exact), only reordered within each 16 rows x 32 K elements.
    values = kernel.float().flatten()
    assert torch.equal(values[values.isfinite()].sort().values, (scale.float()[finite] * 2.0**119).sort().values)
    with pytest.raises(TypeError, match="scale"):
        scales_to_kernel_layout(scale.float())


def test_kernel_layout_bits_land_where_bf16_reads_them():
    """What the kernel's PTX relies on: in each int32 word (per 16 rows x 32 K: [g 8][t 4][h 2]), rotating left by
    KERNEL_ROTATIONS[pair][bit] puts every code bit of pair (half, row) = (0, g), (0, g + 8), (1, g), (1, g + 8)
    at bf16's sign / e e m bits of its lane (K-neighbour w), where the lane reads as the E2M1 value * 2^-126."""
    generator = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, (32, 64), dtype=torch.uint8, generator=generator)  # N 32, K 128
    codes = unpack_e2m1(packed)
    words = to_kernel_layout(packed).reshape(2, 4, 8, 4, 2, 4).contiguous().view(torch.int32).squeeze(-1)
    masks = (0x8000, 0x0100, 0x0080, 0x0040)  # sign, e1, e0, m in a bf16 lane
    for group, block, g, t, h in [(0, 0, 0, 0, 0), (1, 3, 7, 3, 1), (0, 2, 5, 1, 0), (1, 1, 2, 2, 1)]:
        word = int(words[group, block, g, t, h]) & 0xFFFFFFFF
        for pair, rotations in enumerate(KERNEL_ROTATIONS):
            half, r8 = divmod(pair, 2)
            bits = 0
            for rotation, mask in zip(rotations, masks):
                rotated = ((word << rotation) | (word >> (32 - rotation))) & 0xFFFFFFFF if rotation else word
                bits |= rotated & (mask | mask << 16)
            for w in range(2):
                lane = torch.tensor([(bits >> (16 * w)) & 0xFFFF], dtype=torch.int32).to(torch.int16)
                value = lane.view(torch.bfloat16).double().item() * 2.0**126
                row, k = 16 * group + 8 * r8 + g, 32 * block + 16 * half + 8 * h + 2 * t + w
                assert value == E2M1_VALUES[int(codes[row, k])].item()


def test_kernel_layout_decodes_bitwise_like_modelopt_bytes():
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    q = quantize_nvfp4(weight)
    want = dequantize_nvfp4(q.packed, q.scale, q.weight_scale_2)
    got = dequantize_kernel_layout(to_kernel_layout(q.packed), scales_to_kernel_layout(q.scale), q.weight_scale_2,
                                   torch.float32)
    assert torch.equal(got, want)
    assert (got - weight).abs().max() < 0.2 * weight.abs().max()  # it decodes the weight, not something else


def _experts(implementation, seed=0):
    """An NVFP4TextExperts of the tiny config filled from random weights; returns (module, dense gate_up, down)."""
    config = copy.deepcopy(variant_config("default").text_config)
    config._experts_implementation = implementation
    experts = NVFP4TextExperts(config)
    e, h, i = experts.num_experts, experts.hidden_dim, experts.intermediate_dim
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(e, 2 * i, h, generator=generator) / h**0.5
    down = torch.randn(e, h, i, generator=generator) / i**0.5
    gate, up, dn = quantize_nvfp4(gate_up[:, :i]), quantize_nvfp4(gate_up[:, i:]), quantize_nvfp4(down)
    with torch.no_grad():
        experts.gate_up_packed.copy_(to_kernel_layout(torch.cat((gate.packed, up.packed), dim=1)))
        experts.gate_up_scale.copy_(scales_to_kernel_layout(torch.cat((gate.scale, up.scale), dim=1)))
        experts.gate_scale2.copy_(gate.weight_scale_2)
        experts.up_scale2.copy_(up.weight_scale_2)
        experts.down_packed.copy_(to_kernel_layout(dn.packed))
        experts.down_scale.copy_(scales_to_kernel_layout(dn.scale))
        experts.down_scale2.copy_(dn.weight_scale_2)
    decoded = (
        torch.cat((dequantize_nvfp4(gate.packed, gate.scale, gate.weight_scale_2),
                   dequantize_nvfp4(up.packed, up.scale, up.weight_scale_2)), dim=1),
        dequantize_nvfp4(dn.packed, dn.scale, dn.weight_scale_2),
    )
    return experts, decoded


def _routing(tokens, experts, top_k, seed=2):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 64, generator=generator)
    index = torch.rand(tokens, experts, generator=generator).topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, generator=generator) + 0.1
    return hidden, index, weights / weights.sum(-1, keepdim=True)


def _dense_reference(hidden, index, weights, gate_up, down):
    """fp64 math on the decoded weights, one (token, expert) pair at a time."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    i = down.shape[-1]
    for t in range(hidden.shape[0]):
        for k in range(index.shape[1]):
            e = int(index[t, k])
            h = gate_up[e].double() @ hidden[t].double()
            act = torch.nn.functional.gelu(h[:i], approximate="tanh") * h[i:]
            out[t] += float(weights[t, k]) * (down[e].double() @ act)
    return out


def test_decoding_one_expert_or_all_gives_the_modelopt_weights():
    experts, (gate_up, down) = _experts("eager")
    all_gate_up, all_down = experts.dequantize_all(torch.float32)
    assert torch.equal(all_gate_up, gate_up) and torch.equal(all_down, down)
    one_gate_up, one_down = experts.dequantize_expert(3, torch.float32)
    assert torch.equal(one_gate_up, gate_up[3]) and torch.equal(one_down, down[3])


@pytest.mark.parametrize("implementation", ["eager", "dgemma", "grouped_mm", "batched_mm"])
def test_torch_paths_match_fp64_math_on_decoded_weights(implementation):
    experts, decoded = _experts(implementation)
    hidden, index, weights = _routing(9, experts.num_experts, 2)
    want = _dense_reference(hidden, index, weights, *decoded)
    got = experts(hidden, index, weights)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("implementation", ["eager", "dgemma", "grouped_mm", "batched_mm", "dgemma_triton"])
def test_expert_parallel_sentinel_routes_are_skipped(implementation):
    """Split over ranks (dgemma_hf.distributed), a route to another rank's expert has the id num_experts and
    weight 0: every NVFP4 path skips it (transformers' functions see the module as expert-parallel)."""
    experts, decoded = _experts(implementation)
    experts._is_expert_parallel = True
    hidden, index, weights = _routing(9, experts.num_experts, 2)
    sentinel = torch.rand(index.shape, generator=torch.Generator().manual_seed(3)) < 0.4
    index, weights = index.masked_fill(sentinel, experts.num_experts), weights.masked_fill(sentinel, 0.0)
    kept = ~sentinel
    want = _dense_reference(hidden, index.masked_fill(sentinel, 0), weights * kept, *decoded)
    if implementation == "dgemma_triton":  # the kernel: on the GPU where there is one, else interpreted
        device = "cuda" if torch.cuda.is_available() else "cpu"
        experts, hidden = experts.to(device), hidden.half().to(device)
        index, weights = index.to(device), weights.to(device)
    got = experts(hidden, index, weights).cpu()
    assert torch.isfinite(got).all()
    assert ((got.double() - want).norm() / want.norm()).item() < (1e-2 if implementation == "dgemma_triton" else 1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter and the CPU default; on a GPU, "
                    "test_quantization.py's gpu test covers the kernel path")
def test_triton_kernel_path_matches_the_reference_in_fp16():
    triton_experts, decoded = _experts("dgemma_triton")
    hidden, index, weights = _routing(12, triton_experts.num_experts, 2)
    want = _dense_reference(hidden.half().float(), index, weights, *decoded)
    got = triton_experts(hidden.half(), index, weights)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
    # It is the kernel that ran: fp32 accumulation differs in the last bits from the fp16 torch reference.
    reference_experts, _ = _experts("eager")
    assert not torch.equal(got, reference_experts(hidden.half(), index, weights))
    # Off CUDA the default backend takes the torch reference, not the kernel.
    auto_experts, _ = _experts("dgemma")
    assert torch.equal(auto_experts(hidden.half(), index, weights), reference_experts(hidden.half(), index, weights))


def test_backends_without_nvfp4_version_are_refused_by_name():
    experts, _ = _experts("sonicmoe")
    hidden, index, weights = _routing(4, experts.num_experts, 2)
    with pytest.raises(KeyError, match="sonicmoe"):
        experts(hidden, index, weights)


def test_sizes_the_kernels_cannot_tile_are_refused():
    config = copy.deepcopy(variant_config("default").text_config)
    config.moe_intermediate_size = 48
    with pytest.raises(ValueError, match="moe_intermediate_size to be a multiple of 32, got 48"):
        NVFP4TextExperts(config)


def test_compressed_tensors_nvfp4_of_another_model_is_refused_by_name(tmp_path):
    llama = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(llama).save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    args = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args}},
    }
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForCausalLM is not a DiffusionGemma model"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
