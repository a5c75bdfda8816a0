"""Loading DiffusionGemma checkpoints through the auto classes, and clear errors for bad checkpoints."""

import json
import shutil

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    DiffusionGemmaForBlockDiffusion,
    Gemma3TextConfig,
    Gemma3ForCausalLM,
    LlamaConfig,
    LlamaModel,
)

from conftest import build_pair, variant_config
from dgemma_hf import CheckpointError, DiffusionGemmaForMaskedGeneration


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A tiny checkpoint saved by upstream's class (upstream format), single file and sharded."""
    model = build_pair(variant_config("default"), tokenizer, seed=21)[1]
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="150KB")
    return model, single, sharded


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].float(), sb[key].float()), key


def _assert_tied(model):
    text = model.model.encoder.language_model
    decoder = model.model.decoder
    assert text.layers[0].experts.gate_up_proj is decoder.layers[0].experts.gate_up_proj
    assert text.layers[-1].self_attn.q_proj.weight is decoder.layers[-1].self_attn.q_proj.weight
    assert text.embed_tokens.weight is decoder.embed_tokens.weight
    assert model.lm_head.weight is decoder.embed_tokens.weight


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForImageTextToText])
def test_auto_classes_load_our_class(saved, layout, auto_class):
    reference, single, sharded = saved
    folder = single if layout == "single" else sharded
    if layout == "sharded":
        assert len(list(folder.glob("*.safetensors"))) > 1
    model, info = auto_class.from_pretrained(folder, output_loading_info=True)
    assert type(model) is DiffusionGemmaForMaskedGeneration
    assert isinstance(model, DiffusionGemmaForBlockDiffusion)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_same_weights(model, reference)
    _assert_tied(model)
    assert model.model.encoder.vision_tower is not None


def test_dtype_and_device_map(saved):
    _, single, _ = saved
    model = AutoModel.from_pretrained(single, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    _assert_tied(model)


def test_save_pretrained_round_trips(saved, tmp_path):
    _, single, _ = saved
    model = AutoModel.from_pretrained(single)
    model.save_pretrained(tmp_path)
    again, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_same_weights(model, again)
    unnamed = {"_name_or_path": None}
    assert again.config.to_diff_dict() | unnamed == model.config.to_diff_dict() | unnamed
    assert again.generation_config.to_dict() == model.generation_config.to_dict()


def test_hub_id_from_cache(saved, tmp_path):
    """A hub id resolves through huggingface_hub's cache (offline: local_files_only)."""
    _, single, _ = saved
    snapshot = tmp_path / "models--dgemma--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(single, snapshot)
    (tmp_path / "models--dgemma--tiny" / "refs").mkdir()
    (tmp_path / "models--dgemma--tiny" / "refs" / "main").write_text("0" * 40)
    model = AutoModel.from_pretrained("dgemma/tiny", cache_dir=tmp_path, local_files_only=True)
    assert type(model) is DiffusionGemmaForMaskedGeneration


def test_other_model_types_are_untouched():
    llama = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    assert type(AutoModel.from_config(llama)) is LlamaModel


def test_experts_implementation_can_be_switched(saved):
    _, single, _ = saved
    model = AutoModel.from_pretrained(single, experts_implementation="eager")
    assert model.config.text_config._experts_implementation == "eager"
    model.set_experts_implementation("grouped_mm")
    assert model.config.text_config._experts_implementation == "grouped_mm"


# Bad checkpoints -----------------------------------------------------------------------------------------


def test_other_model_type_is_named(tmp_path):
    config = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model type 'gemma3_text'"):
        DiffusionGemmaForMaskedGeneration.from_pretrained(tmp_path)


def test_missing_shard_is_named(saved, tmp_path):
    _, _, sharded = saved
    shutil.copytree(sharded, tmp_path / "ckpt")
    victim = sorted((tmp_path / "ckpt").glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard .*{victim.name}"):
        AutoModel.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_corrupt_safetensors_is_named(saved, tmp_path, damage):
    _, single, _ = saved
    shutil.copytree(single, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\xff" * 64 + data[64:] if damage == "header" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors file"):
        AutoModel.from_pretrained(tmp_path / "ckpt")


def test_unregistered_quant_method_is_refused(saved, tmp_path):
    _, single, _ = saved
    shutil.copytree(single, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {"quant_method": "mystery4", "bits": 4}
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method='mystery4' has no registered quantizer"):
        AutoModel.from_pretrained(tmp_path / "ckpt")


def test_empty_folder_is_refused(tmp_path, saved):
    _, single, _ = saved
    (tmp_path / "ckpt").mkdir()
    shutil.copy(single / "config.json", tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        DiffusionGemmaForMaskedGeneration.from_pretrained(tmp_path / "ckpt")
