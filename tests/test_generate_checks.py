"""generate() refuses bad input before any model work, naming the argument."""

import pytest
import torch
from transformers.models.diffusion_gemma import EntropyBoundSamplerConfig

from conftest import build_pair, variant_config


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_pair(variant_config("default"), tokenizer, seed=0)[0]


@pytest.fixture
def prompt(tokenizer):
    return tokenizer(["Why is the sky blue?"], return_tensors="pt")["input_ids"]


@pytest.fixture
def no_forward(model, monkeypatch):
    """Fails the test if the model runs at all: checks must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran before the bad input was refused")

    monkeypatch.setattr(model.model, "forward", refuse)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "`max_new_tokens` must be a positive integer, got 0"),
        (dict(max_new_tokens=2.5), "`max_new_tokens` must be a positive integer"),
        (dict(max_denoising_steps=-3), "`max_denoising_steps` must be a positive integer, got -3"),
        (dict(max_denoising_steps=0), "`max_denoising_steps` must be a positive integer, got 0"),
        (dict(t_min=-0.1), "`t_min` must be a finite float >= 0"),
        (dict(t_min=0.9, t_max=0.5), "`t_max` must be greater than `t_min`"),
        (dict(stability_threshold=-1), "`stability_threshold` must be an integer >= 0, got -1"),
        (dict(confidence_threshold=0.0), "`confidence_threshold` must be a float > 0"),
        (dict(max_new_tokens=4096), "more than the model's context of 2048"),
        (dict(max_new_tokens=256, max_length=3), "leaves no room after a prompt"),  # upstream: max_length wins over 256
        (dict(decoder_input_ids=torch.zeros(1, 5, dtype=torch.long)), r"`decoder_input_ids` must have shape \(1, 16\)"),
        (dict(decoder_input_ids=torch.full((1, 16), 10_000)), r"`decoder_input_ids` must hold token ids in \[0, 512\)"),
    ],
)
def test_bad_generation_settings(model, prompt, no_forward, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(prompt, **kwargs)


def test_bad_sampler_config_type(model, prompt, no_forward):
    with pytest.raises(TypeError, match="`sampler_config` must be an EntropyBoundSamplerConfig"):
        model.generate(prompt, sampler_config={"entropy_bound": 0.1})


def test_empty_prompt(model, no_forward):
    with pytest.raises(ValueError, match="the prompt is empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        model.generate(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="`input_ids` is required"):
        model.generate()


def test_empty_row_in_padded_batch(model, no_forward):
    input_ids = torch.tensor([[0, 0, 0], [7, 8, 9]])
    attention_mask = torch.tensor([[0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"batch row\(s\) \[0\] is empty"):
        model.generate(input_ids, attention_mask=attention_mask)


def test_prompt_longer_than_context(model, no_forward):
    long_prompt = torch.full((1, 2040), 7)
    with pytest.raises(ValueError, match="prompt of 2040 tokens .* needs 2056 positions"):
        model.generate(long_prompt, max_new_tokens=16)


def test_wrong_input_types(model, no_forward):
    with pytest.raises(TypeError, match="`input_ids` must be an integer torch.Tensor"):
        model.generate([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape \(1, 3\)"):
        model.generate(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4))


def test_valid_settings_still_generate(model, prompt):
    out = model.generate(
        prompt, max_new_tokens=16, max_denoising_steps=2, sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.5)
    )
    assert out.sequences.shape[1] == prompt.shape[1] + 16
