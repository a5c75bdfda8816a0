"""Schedulers: their acceptance rules, diffusers compatibility (config files, from_config), and every scheduler
through generate() in both sampling modes."""

import pytest
import torch
from diffusers import BlockRefinementScheduler, DiscreteDDIMScheduler, EntropyBoundScheduler
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
)

from conftest import build_pair, left_padded_batch, variant_config
from dgemma_hf.schedulers import (
    SCHEDULERS,
    ConfidenceThresholdScheduler,
    EntropyBoundDiffusionScheduler,
    TextDiffusionScheduler,
    TopKPerStepScheduler,
)

PROMPTS = ["Why is the sky blue?", "Tom has 3 apples and buys 5 more."]


def test_entropy_bound_accepts_what_upstream_accepts():
    generator = torch.Generator().manual_seed(2)
    for bound in (0.05, 0.5, 3.0):
        logits = torch.randn(3, 40, 50, generator=generator) * torch.rand(3, 40, 1, generator=generator) * 8
        upstream = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 40, 50, 4)
        upstream.accept_canvas(torch.zeros(3, 40, dtype=torch.long), torch.ones(3, 40, dtype=torch.long), logits, 1)
        entropy = torch.distributions.Categorical(logits=logits).entropy()
        mask = EntropyBoundDiffusionScheduler(entropy_bound=bound).accept(entropy, None, torch.tensor(0))
        assert torch.equal(mask, upstream.accepted_token_mask)
        assert mask.any(dim=-1).all()


def test_temperatures_are_upstreams():
    scheduler = EntropyBoundDiffusionScheduler(num_inference_steps=7, t_min=0.3, t_max=0.9)
    processor = LinearTemperatureScheduleLogitsProcessor(t_min=0.3, t_max=0.9, max_denoising_steps=7)
    scores = torch.randn(2, 5)
    for index, remaining in enumerate(range(7, 0, -1)):
        want = processor(None, scores, cur_step=torch.tensor(remaining, dtype=torch.int32))
        assert torch.equal(scores / scheduler.temperatures()[index], want)


def test_confidence_threshold_on_hand_made_probabilities():
    scheduler = ConfidenceThresholdScheduler(threshold=0.8)
    max_prob = torch.tensor([[0.95, 0.5, 0.81, 0.2], [0.3, 0.6, 0.1, 0.5]])
    accepted = scheduler.accept(None, max_prob, torch.tensor(0))
    assert accepted.tolist() == [[True, False, True, False], [False, True, False, False]]  # row 2: its best only


def test_top_k_per_step_completes_the_canvas_in_n_steps():
    scheduler = TopKPerStepScheduler(num_inference_steps=4)
    max_prob = torch.rand(2, 10, generator=torch.Generator().manual_seed(0))
    counts = [scheduler.accept(None, max_prob, torch.tensor(s)).sum(-1).tolist() for s in range(4)]
    assert counts == [[3, 3], [5, 5], [8, 8], [10, 10]] == [[k, k] for k in scheduler.tokens_per_step(10)]
    # The accepted ones are the most confident.
    first = scheduler.accept(None, max_prob, torch.tensor(0))
    assert (max_prob[first].view(2, 3).min(-1).values >= max_prob.masked_fill(first, 0).max(-1).values).all()


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_config_round_trip_and_swap(name, tmp_path):
    scheduler = SCHEDULERS[name](num_inference_steps=5, t_min=0.5, t_max=0.7)
    scheduler.save_config(tmp_path)
    again = SCHEDULERS[name].from_pretrained(tmp_path)
    settings = lambda s: {k: v for k, v in s.config.items() if not k.startswith("_")}  # noqa: E731
    assert type(again) is type(scheduler) and settings(again) == settings(scheduler)
    assert (tmp_path / "scheduler_config.json").is_file()
    swapped = TopKPerStepScheduler.from_config(scheduler.config)  # diffusers' swap idiom keeps shared settings
    assert swapped.config.num_inference_steps == 5 and swapped.config.t_min == 0.5


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EntropyBoundDiffusionScheduler(num_inference_steps=0), "`num_inference_steps` must be a positive"),
        (lambda: EntropyBoundDiffusionScheduler(entropy_bound=0.0), "`entropy_bound` must be a float > 0"),
        (lambda: ConfidenceThresholdScheduler(threshold=1.0), r"`threshold` must be a float in \(0, 1\)"),
        (lambda: TopKPerStepScheduler(t_min=0.9, t_max=0.5), "`t_max` must be >= `t_min`"),
        (lambda: TopKPerStepScheduler(t_min=0.0), "`t_min` must be a float > 0"),
    ],
)
def test_bad_scheduler_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _model_and_prompts(tokenizer, variant="default", seed=0):
    config = variant_config(variant)
    model = build_pair(config, tokenizer, seed=seed)[0]
    input_ids, attention_mask = left_padded_batch(tokenizer, PROMPTS)
    return model, config, input_ids, attention_mask


OURS = [
    EntropyBoundDiffusionScheduler(num_inference_steps=3, entropy_bound=0.5),
    ConfidenceThresholdScheduler(num_inference_steps=3, threshold=0.5),
    TopKPerStepScheduler(num_inference_steps=3),
]


@pytest.mark.parametrize("sampling", ["reference", "fused"])
@pytest.mark.parametrize("scheduler", OURS, ids=lambda s: type(s).__name__)
def test_every_scheduler_generates(scheduler, sampling, tokenizer):
    model, config, input_ids, attention_mask = _model_and_prompts(tokenizer)
    out = model.generate(input_ids, attention_mask=attention_mask, scheduler=scheduler, sampling=sampling, seed=1,
                         max_new_tokens=2 * config.canvas_length, eos_token_id=None, stability_threshold=None,
                         confidence_threshold=None)
    assert out.sequences.shape == (2, input_ids.shape[1] + 2 * config.canvas_length)
    assert torch.equal(out.sequences[:, : input_ids.shape[1]], input_ids)
    # Adaptive stopping off: every canvas takes the scheduler's steps.
    assert torch.allclose(out.tokens_per_forward, torch.tensor(config.canvas_length / scheduler.steps))


def test_default_scheduler_is_upstreams_sampler(tokenizer):
    """Passing the entropy-bound scheduler built from the generation config changes nothing."""
    model, config, input_ids, attention_mask = _model_and_prompts(tokenizer, seed=4)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=2 * config.canvas_length, sampling="reference")
    gen = model.generation_config
    torch.manual_seed(3)
    default = model.generate(input_ids, **kwargs)
    scheduler = EntropyBoundDiffusionScheduler(num_inference_steps=gen.max_denoising_steps, t_min=gen.t_min,
                                               t_max=gen.t_max, entropy_bound=0.1)
    torch.manual_seed(3)
    explicit = model.generate(input_ids, scheduler=scheduler, **kwargs)
    assert torch.equal(default.sequences, explicit.sequences)


@pytest.mark.parametrize(
    "scheduler",
    [EntropyBoundScheduler(num_inference_steps=3, entropy_bound=0.5), BlockRefinementScheduler(num_inference_steps=3),
     DiscreteDDIMScheduler(num_inference_steps=3)],
    ids=lambda s: type(s).__name__,
)
def test_diffusers_schedulers_generate_in_reference_mode(scheduler, tokenizer):
    model, config, input_ids, attention_mask = _model_and_prompts(tokenizer, seed=2)
    torch.manual_seed(0)
    out = model.generate(input_ids, attention_mask=attention_mask, scheduler=scheduler,
                         max_new_tokens=2 * config.canvas_length, eos_token_id=None, stability_threshold=None,
                         confidence_threshold=None)
    assert out.sequences.shape == (2, input_ids.shape[1] + 2 * config.canvas_length)
    assert torch.allclose(out.tokens_per_forward, torch.tensor(config.canvas_length / 3))
    assert ((0 <= out.sequences) & (out.sequences < config.text_config.vocab_size)).all()


def test_scheduler_errors_in_generate(tokenizer):
    model, config, input_ids, attention_mask = _model_and_prompts(tokenizer)
    with pytest.raises(TypeError, match="`scheduler` must be a dgemma_hf.schedulers scheduler"):
        model.generate(input_ids, scheduler="entropy_bound")
    with pytest.raises(ValueError, match="disagrees with the scheduler's num_inference_steps=3"):
        model.generate(input_ids, scheduler=TopKPerStepScheduler(num_inference_steps=3), max_denoising_steps=5)
    with pytest.raises(ValueError, match="runs with sampling='reference'"):
        model.generate(input_ids, scheduler=EntropyBoundScheduler(), sampling="fused")
    assert issubclass(TopKPerStepScheduler, TextDiffusionScheduler)
