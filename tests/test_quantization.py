"""NVFP4 DiffusionGemma checkpoints through AutoModel: ModelOpt and compressed-tensors checkpoints written here
byte for byte as those tools lay them out, quantize-on-load, save -> load round trips, encoder/decoder sharing,
and errors naming the bad tensor before any weight is read."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, DynamicCache
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from conftest import variant_config
from dgemma_hf import CheckpointError, DiffusionGemmaForMaskedGeneration
from dgemma_hf.checkpoint import check_quantization_config
from dgemma_hf.kernels.nvfp4 import (
    dequantize_nvfp4,
    global_scale_from_compressed_tensors,
    global_scale_to_compressed_tensors,
    quantize_nvfp4,
)
from dgemma_hf.quantization import NVFP4Config, NVFP4TextExperts
from dgemma_hf.kernels.nvfp4 import scales_from_kernel_layout, to_kernel_layout

PROJ = ("gate_proj", "up_proj", "down_proj")
MODELOPT_GROUP = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
# What NVIDIA Model Optimizer writes into config.json (modelopt/torch/export/convert_hf_config.py).
MODELOPT_CONFIG = {
    "config_groups": {
        "group_0": {"input_activations": dict(MODELOPT_GROUP), "weights": dict(MODELOPT_GROUP), "targets": ["Linear"]}
    },
    "ignore": ["lm_head", "*mlp*", "*router*", "*self_attn*", "*self_conditioning*"],
    "quant_algo": "NVFP4",
    "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
    "producer": {"name": "modelopt", "version": "0.45.0"},
    "quant_method": "modelopt",
}
CT_ARGS = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}
# What llm-compressor / compressed-tensors write for its NVFP4 preset.
CT_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "nvfp4-pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {**CT_ARGS, "dynamic": False},
            "input_activations": {**CT_ARGS, "dynamic": "local"},
            "output_activations": None,
            "format": "nvfp4-pack-quantized",
        }
    },
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp.*", "re:.*router.*"],
    "kv_cache_scheme": None,
}


# Checkpoints --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source():
    """fp32 tiny DiffusionGemma (hidden 64, expert intermediate 32: multiples of 32 for the kernels)."""
    config = variant_config("default")
    assert config.text_config.hidden_size % 32 == 0 and config.text_config.moe_intermediate_size % 32 == 0
    torch.manual_seed(5)
    return DiffusionGemmaForMaskedGeneration(config).eval()


def _split_experts(model):
    """(layer, expert, proj) -> the fp32 weight [out, in] of one expert projection, from the decoder."""
    intermediate = model.config.text_config.moe_intermediate_size
    weights = {}
    for layer, block in enumerate(model.model.decoder.layers):
        gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
        for expert in range(gate_up.shape[0]):
            weights[layer, expert, "gate_proj"] = gate_up[expert, :intermediate]
            weights[layer, expert, "up_proj"] = gate_up[expert, intermediate:]
            weights[layer, expert, "down_proj"] = down[expert]
    return weights


def write_checkpoint(model, folder, fmt, input_scales=True, quant_algo="NVFP4", kv_scales=False):
    """Saves `model` with its experts quantized as ModelOpt ("modelopt") or compressed-tensors ("ct") store them.

    Returns {checkpoint key: tensor} of the expert tensors written.
    """
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    written = {}
    for (layer, expert, proj), weight in _split_experts(model).items():
        state.pop(f"model.decoder.layers.{layer}.experts.gate_up_proj", None)
        state.pop(f"model.decoder.layers.{layer}.experts.down_proj", None)
        q = quantize_nvfp4(weight)
        prefix = f"model.decoder.layers.{layer}.experts.{expert}.{proj}"
        act = torch.tensor(0.01 * (1 + layer + expert), dtype=torch.float32)  # a calibrated amax / (6 * 448)
        if fmt == "modelopt":
            names = {"weight": q.packed, "weight_scale": q.scale, "weight_scale_2": q.weight_scale_2}
            if input_scales:
                names["input_scale"] = act
        else:
            names = {
                "weight_packed": q.packed,
                "weight_scale": q.scale,
                "weight_global_scale": global_scale_to_compressed_tensors(q.weight_scale_2).reshape(1),
            }
            if input_scales:
                names["input_global_scale"] = global_scale_to_compressed_tensors(act).reshape(1)
        for suffix, tensor in names.items():
            written[f"{prefix}.{suffix}"] = tensor
    if kv_scales:
        for layer in range(len(model.model.decoder.layers)):
            written[f"model.decoder.layers.{layer}.self_attn.k_proj.k_scale"] = torch.tensor(0.25 + layer)
    state.update(written)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    if fmt == "modelopt":
        config["quantization_config"] = {**copy.deepcopy(MODELOPT_CONFIG), "quant_algo": quant_algo}
        if not input_scales:
            del config["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    else:
        config["quantization_config"] = copy.deepcopy(CT_CONFIG)
        if not input_scales:
            config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return written


def dequantized_reference(model, written, fmt):
    """A copy of `model` (fp32, upstream experts) holding the dequantized expert weights of the checkpoint."""
    reference = copy.deepcopy(model)
    intermediate = model.config.text_config.moe_intermediate_size
    names = ("weight", "weight_scale", "weight_scale_2") if fmt == "modelopt" else (
        "weight_packed", "weight_scale", "weight_global_scale")
    for layer, block in enumerate(reference.model.decoder.layers):
        for expert in range(block.experts.num_experts):
            for proj in PROJ:
                packed, scale, scale2 = (written[f"model.decoder.layers.{layer}.experts.{expert}.{proj}.{n}"]
                                         for n in names)
                if fmt == "ct":  # compressed-tensors' own reading: e2m1 * (scale / global_scale)
                    values = dequantize_nvfp4(packed, scale, torch.tensor(1.0))
                    weight = values / scale2
                else:
                    weight = dequantize_nvfp4(packed, scale, scale2)
                with torch.no_grad():
                    if proj == "down_proj":
                        block.experts.down_proj[expert].copy_(weight)
                    else:
                        rows = slice(0, intermediate) if proj == "gate_proj" else slice(intermediate, None)
                        block.experts.gate_up_proj[expert, rows].copy_(weight)
    # The encoder's text layers are tied to the decoder's, so they hold the same values.
    assert reference.model.encoder.language_model.layers[0].experts.gate_up_proj is (
        reference.model.decoder.layers[0].experts.gate_up_proj)
    return reference


def logits(model, seed=0):
    """Encoder prefill + decoder pass, then a cached decoder step with self-conditioning (both logits)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    vocab, canvas = config.text_config.vocab_size, config.canvas_length
    input_ids = torch.randint(vocab, (2, 11), generator=generator)
    canvases = [torch.randint(vocab, (2, canvas), generator=generator) for _ in range(2)]
    sc_logits = 3 * torch.randn(2, canvas, vocab, generator=generator)
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    mask = torch.ones(2, 11, dtype=torch.long)
    with torch.no_grad():
        first = model(input_ids=input_ids, attention_mask=mask, past_key_values=cache, decoder_input_ids=canvases[0],
                      decoder_attention_mask=F.pad(mask, (0, canvas), value=1))
        second = model(past_key_values=cache, decoder_input_ids=canvases[1], self_conditioning_logits=sc_logits,
                       decoder_attention_mask=F.pad(mask, (0, canvas), value=1))
    return torch.cat([first.logits.flatten(), second.logits.flatten()])


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _experts(model, layer=0):
    return model.model.decoder.layers[layer].experts


@pytest.fixture(scope="module")
def modelopt_ckpt(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("modelopt")
    return folder, write_checkpoint(source, folder, "modelopt", kv_scales=True)


# Loading ------------------------------------------------------------------------------------------------------


def test_modelopt_checkpoint_loads_and_matches_dequantized_reference(source, modelopt_ckpt):
    folder, written = modelopt_ckpt
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert type(model) is DiffusionGemmaForMaskedGeneration
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.quantization_config.to_dict() == MODELOPT_CONFIG
    assert model.config.text_config._experts_implementation == "dgemma"  # kernels on CUDA, reference here
    intermediate = source.config.text_config.moe_intermediate_size
    for layer, block in enumerate(model.model.decoder.layers):
        experts = block.experts
        assert isinstance(experts, NVFP4TextExperts) and experts.has_input_scales
        key = f"model.decoder.layers.{layer}.experts.{{}}.{{}}.{{}}"
        for e in range(experts.num_experts):
            gate_up = torch.cat([written[key.format(e, p, "weight")] for p in ("gate_proj", "up_proj")])
            assert torch.equal(experts.gate_up_packed[e], to_kernel_layout(gate_up))
            down = written[key.format(e, "down_proj", "weight")]
            assert torch.equal(experts.down_packed[e], to_kernel_layout(down))
            assert torch.equal(scales_from_kernel_layout(experts.gate_up_scale[e, :intermediate]).view(torch.uint8),
                               written[key.format(e, "gate_proj", "weight_scale")].view(torch.uint8))
            for proj, buffer in (("gate_proj", experts.gate_scale2), ("up_proj", experts.up_scale2),
                                 ("down_proj", experts.down_scale2)):
                assert buffer[e] == written[key.format(e, proj, "weight_scale_2")]
            assert experts.up_input_scale[e] == written[key.format(e, "up_proj", "input_scale")]
    # gate and up keep their own global scales
    assert not torch.equal(_experts(model).gate_scale2, _experts(model).up_scale2)

    got = logits(model)
    want = logits(dequantized_reference(source, written, "modelopt"))
    assert torch.isfinite(got).all()
    assert _max_diff(got, want) <= 1e-5
    assert _max_diff(got, logits(source)) > 1e-4  # quantization is visible: the comparison is not vacuous


def test_modelopt_weight_only_checkpoint_has_no_input_scales(source, tmp_path):
    write_checkpoint(source, tmp_path / "w4a16", "modelopt", input_scales=False, quant_algo="W4A16_NVFP4")
    model = AutoModel.from_pretrained(tmp_path / "w4a16")
    assert not _experts(model).has_input_scales
    assert "gate_input_scale" not in dict(_experts(model).named_buffers())
    model.save_pretrained(tmp_path / "out")
    headers = _headers(tmp_path / "out" / "model.safetensors")
    assert headers == _headers(tmp_path / "w4a16" / "model.safetensors")
    assert not [key for key in headers if key.endswith(".input_scale")]
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_algo"] == "W4A16_NVFP4"


def test_compressed_tensors_checkpoint_loads_and_matches_dequantized_reference(source, tmp_path):
    written = write_checkpoint(source, tmp_path, "ct")
    model, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    experts = _experts(model, layer=2)
    key = "model.decoder.layers.2.experts.3.{}.{}"
    down_global = written[key.format("down_proj", "weight_global_scale")]
    gate_input_global = written[key.format("gate_proj", "input_global_scale")]
    assert experts.down_scale2[3] == global_scale_from_compressed_tensors(down_global)
    assert experts.gate_input_scale[3] == global_scale_from_compressed_tensors(gate_input_global)
    got = logits(model)
    assert _max_diff(got, logits(dequantized_reference(source, written, "ct"))) <= 1e-5
    assert _max_diff(got, logits(source)) > 1e-4
    # The model saves as ModelOpt; with activation scales present that is quant_algo NVFP4.
    assert model.config.quantization_config.quant_method == "modelopt"
    assert model.config.quantization_config.quant_algo == "NVFP4"


def test_quantize_on_load_follows_modelopt_recipe(source, tmp_path):
    bf16 = copy.deepcopy(source).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, quantization_config=NVFP4Config(), dtype=torch.float32)
    assert model.config.quantization_config.quant_algo == "W4A16_NVFP4"
    written = {}
    for (layer, expert, proj), weight in _split_experts(bf16).items():  # bf16 weights, as the checkpoint holds
        q = quantize_nvfp4(weight)
        prefix = f"model.decoder.layers.{layer}.experts.{expert}.{proj}"
        written.update({f"{prefix}.weight": q.packed, f"{prefix}.weight_scale": q.scale,
                        f"{prefix}.weight_scale_2": q.weight_scale_2})
    experts = _experts(model, layer=1)
    assert not experts.has_input_scales
    down = written["model.decoder.layers.1.experts.2.down_proj.weight"]
    assert torch.equal(experts.down_packed[2], to_kernel_layout(down))
    assert experts.up_scale2[0] == written["model.decoder.layers.1.experts.0.up_proj.weight_scale_2"]
    reference = dequantized_reference(AutoModel.from_pretrained(tmp_path, dtype=torch.float32), written, "modelopt")
    got = logits(model)
    assert _max_diff(got, logits(reference)) <= 1e-5
    assert _max_diff(got, logits(bf16.float())) > 1e-4


def test_experts_are_one_module_shared_by_encoder_and_decoder(modelopt_ckpt):
    model = AutoModel.from_pretrained(modelopt_ckpt[0])
    encoder_layers = model.model.encoder.language_model.layers
    for encoder_layer, decoder_layer in zip(encoder_layers, model.model.decoder.layers):
        assert encoder_layer.experts is decoder_layer.experts
    state = model.state_dict()
    assert not [key for key in state if "encoder" in key and "experts" in key]
    assert len([key for key in state if key.endswith("experts.gate_up_packed")]) == len(encoder_layers)
    # The rest of the text stack stays tied as upstream ties it.
    assert encoder_layers[1].self_attn.q_proj.weight is model.model.decoder.layers[1].self_attn.q_proj.weight
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    # Casting the model moves the packed buffers but never casts them.
    before = {name: buffer.clone() for name, buffer in _experts(model).named_buffers()}
    model.to(torch.bfloat16)
    assert model.model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    for name, buffer in _experts(model).named_buffers():
        assert _same_bytes(buffer, before[name]), name
    assert encoder_layers[0].experts is model.model.decoder.layers[0].experts
    assert torch.isfinite(logits(model)).all()
    model.tie_weights()  # recomputing upstream's tie map still works without gate_up_proj / down_proj
    assert encoder_layers[2].experts is model.model.decoder.layers[2].experts


def test_experts_implementations_agree(modelopt_ckpt):
    model = AutoModel.from_pretrained(modelopt_ckpt[0], experts_implementation="eager")
    assert model.config.text_config._experts_implementation == "eager"
    want = logits(model)
    for name in ("dgemma", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(name)
        assert model.config.text_config._experts_implementation == name
        assert _max_diff(logits(model), want) <= 1e-5, name


def test_quant_methods_are_registered():
    for method in ("modelopt", "compressed-tensors", "dgemma_nvfp4"):
        assert method in AUTO_QUANTIZER_MAPPING and method in AUTO_QUANTIZATION_CONFIG_MAPPING
        check_quantization_config({"quant_method": method}, "config.json")  # no CheckpointError
    check_quantization_config(NVFP4Config(), "quantization_config argument")
    # compressed-tensors configs other than NVFP4 packed weights still go to transformers' own classes
    # (which need the compressed-tensors package, absent here).
    fp8 = {"quant_method": "compressed-tensors", "format": "float-quantized",
           "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}}}
    with pytest.raises(ImportError, match="compressed-tensors"):
        AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"].from_dict(fp8)


# Saving -------------------------------------------------------------------------------------------------------


def _headers(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: (handle.get_slice(key).get_dtype(), handle.get_slice(key).get_shape()) for key in handle.keys()}


def test_save_writes_modelopt_layout_and_round_trips_bit_exactly(modelopt_ckpt, tmp_path):
    folder, _ = modelopt_ckpt
    model = AutoModel.from_pretrained(folder)
    model.save_pretrained(tmp_path / "a")
    # Same tensor names, dtypes and shapes as the ModelOpt checkpoint, expert bytes unchanged.
    assert _headers(tmp_path / "a" / "model.safetensors") == _headers(folder / "model.safetensors")
    saved = load_file(tmp_path / "a" / "model.safetensors")
    original = load_file(folder / "model.safetensors")
    for key, tensor in original.items():
        assert _same_bytes(saved[key], tensor), key
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization_config"] == MODELOPT_CONFIG
    hf_quant = json.loads((tmp_path / "a" / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"] == {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                                        "exclude_modules": MODELOPT_CONFIG["ignore"]}
    card = (tmp_path / "a" / "README.md").read_text()
    assert "NVFP4" in card and "3 MoE layers x 4 experts" in card and "$" not in card
    expert_bytes = sum(t.numel() * t.element_size() for key, t in saved.items() if ".experts." in key)
    assert f"Expert weights: {expert_bytes / 2**10:.1f} KiB in NVFP4" in card  # the file's size, E4M3 scales
    # Loading what was saved gives the same buffers; saving again gives the same file.
    again = AutoModel.from_pretrained(tmp_path / "a")
    for (name, a), (_, b) in zip(model.named_buffers(), again.named_buffers()):
        assert _same_bytes(a, b), name
    again.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert _max_diff(logits(model), logits(again)) == 0
    # Sharded (as NVIDIA's release is), loaded in bf16 with a device_map: same packed buffers.
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    sharded = AutoModel.from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16, device_map="cpu")
    assert sharded.model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(model.named_buffers(), sharded.named_buffers()):
        if "experts" in name:
            assert _same_bytes(a, b), name
    assert torch.isfinite(logits(sharded)).all()


def test_quantized_on_load_model_saves_as_modelopt_w4a16(source, tmp_path):
    source.save_pretrained(tmp_path / "bf16")
    model = AutoModel.from_pretrained(tmp_path / "bf16", quantization_config=NVFP4Config())
    model.save_pretrained(tmp_path / "nvfp4")
    config = json.loads((tmp_path / "nvfp4" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "modelopt" and config["quant_algo"] == "W4A16_NVFP4"
    assert "input_activations" not in config["config_groups"]["group_0"]
    headers = _headers(tmp_path / "nvfp4" / "model.safetensors")
    assert headers["model.decoder.layers.0.experts.3.up_proj.weight"] == ("U8", [32, 32])
    assert headers["model.decoder.layers.0.experts.3.up_proj.weight_scale"] == ("F8_E4M3", [32, 4])
    assert headers["model.decoder.layers.0.experts.3.down_proj.weight_scale_2"] == ("F32", [])
    assert not [key for key in headers if key.endswith((".input_scale", "gate_up_proj"))]
    reloaded = AutoModel.from_pretrained(tmp_path / "nvfp4")
    assert _max_diff(logits(model), logits(reloaded)) == 0


# Errors -------------------------------------------------------------------------------------------------------


def _damaged(modelopt_ckpt, tmp_path, edit):
    folder, _ = modelopt_ckpt
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    state = load_file(target / "model.safetensors")
    edit(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


BAD_TENSORS = {
    "missing scale": (
        lambda s: s.pop("model.decoder.layers.1.experts.3.up_proj.weight_scale_2"),
        "model.decoder.layers.1.experts.3.up_proj.weight_scale_2 is missing",
    ),
    "wrong dtype": (
        lambda s: s.update({"model.decoder.layers.0.experts.1.gate_proj.weight_scale":
                            s["model.decoder.layers.0.experts.1.gate_proj.weight_scale"].float()}),
        "model.decoder.layers.0.experts.1.gate_proj.weight_scale has dtype F32, expected F8_E4M3",
    ),
    "wrong shape": (
        lambda s: s.update({"model.decoder.layers.2.experts.0.down_proj.weight":
                            s["model.decoder.layers.2.experts.0.down_proj.weight"][:, :8].contiguous()}),
        r"model.decoder.layers.2.experts.0.down_proj.weight has shape \[64, 8\], expected \[64, 16\]",
    ),
    "missing input scale": (
        lambda s: s.pop("model.decoder.layers.0.experts.0.down_proj.input_scale"),
        "model.decoder.layers.0.experts.0.down_proj.input_scale is missing",
    ),
    "quantized attention": (
        lambda s: s.update({"model.decoder.layers.0.self_attn.q_proj.weight_scale": torch.ones(1)}),
        "model.decoder.layers.0.self_attn.q_proj is stored quantized",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_expert_tensor_is_named_before_loading(modelopt_ckpt, tmp_path, case):
    edit, message = BAD_TENSORS[case]
    with pytest.raises(CheckpointError, match=message):
        AutoModel.from_pretrained(_damaged(modelopt_ckpt, tmp_path, edit))


@pytest.mark.parametrize("value", [float("nan"), 0.0])
def test_bad_global_scale_value_is_named(modelopt_ckpt, tmp_path, value):
    key = "model.decoder.layers.1.experts.2.up_proj.weight_scale_2"
    target = _damaged(modelopt_ckpt, tmp_path, lambda state: state.update({key: torch.tensor(value)}))
    with pytest.raises(CheckpointError, match=f"{key} is {value}; a global scale must be finite and > 0"):
        AutoModel.from_pretrained(target)


def test_compressed_tensors_missing_global_scale_is_named(source, tmp_path):
    write_checkpoint(source, tmp_path, "ct", input_scales=False)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.decoder.layers.2.experts.1.gate_proj.weight_global_scale"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    message = "model.decoder.layers.2.experts.1.gate_proj.weight_global_scale is missing"
    with pytest.raises(CheckpointError, match=message):
        AutoModel.from_pretrained(tmp_path)


def test_unsupported_modelopt_algorithm_is_named(modelopt_ckpt, tmp_path):
    target = _damaged(modelopt_ckpt, tmp_path, lambda state: None)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"]["quant_algo"] = "FP8"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_algo='FP8' is not supported"):
        AutoModel.from_pretrained(target)


def test_quantize_on_load_names_missing_dense_experts(source, tmp_path):
    source.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.decoder.layers.1.experts.down_proj"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.decoder.layers.1.experts.down_proj is missing"):
        AutoModel.from_pretrained(tmp_path, quantization_config=NVFP4Config())


@pytest.mark.gpu
def test_nvfp4_triton_experts_on_cuda_match_the_reference(modelopt_ckpt):
    """The loaded NVFP4 model on CUDA in bf16: the Triton W4A16 experts against the torch reference, and
    a fused-sampling generate (CUDA graphs) that runs through them."""
    model = AutoModel.from_pretrained(modelopt_ckpt[0], dtype=torch.bfloat16).to("cuda")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, model.config.text_config.hidden_size, generator=generator).to("cuda", torch.bfloat16)
    index = torch.rand(37, model.config.text_config.num_experts, generator=generator).topk(2).indices.cuda()
    weights = torch.rand(37, 2, generator=generator).cuda()
    experts = _experts(model)
    model.set_experts_implementation("eager")
    want = experts(x, index, weights).float()
    model.set_experts_implementation("dgemma_triton")
    got = experts(x, index, weights).float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    model.set_experts_implementation("dgemma")
    input_ids = torch.randint(3, model.config.text_config.vocab_size, (2, 9), device="cuda")
    out = model.generate(input_ids, max_new_tokens=2 * model.config.canvas_length, max_denoising_steps=3, seed=1)
    assert out.sequences.shape == (2, 9 + 2 * model.config.canvas_length)
