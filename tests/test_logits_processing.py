"""Logits processing on the device (penalties, top-k / top-p / min-p) against transformers' own processors, and
end to end through generate()."""

import pytest
import torch
from transformers.generation import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import build_pair, left_padded_batch, variant_config
from dgemma_hf.generation.logits_processing import LogitsProcessing, LogitsSettings

VOCAB = 40


def _processing(**settings):
    processing = LogitsProcessing(LogitsSettings(**settings), batch_size=2, vocab_size=VOCAB, device="cpu")
    history = torch.tensor([[3, 7, 7, 0], [5, 1, 2, 9]])
    processing.observe(history, torch.tensor([[True, True, True, False], [True, True, True, True]]))
    return processing, history


def test_observe_marks_the_sequence_without_padding():
    processing, _ = _processing(repetition_penalty=1.3)
    assert processing.seen[0].nonzero().flatten().tolist() == [3, 7]  # padding (token 0) is not marked
    assert processing.seen[1].nonzero().flatten().tolist() == [1, 2, 5, 9]


def test_repetition_penalty_matches_transformers():
    processing, _ = _processing(repetition_penalty=1.7)
    logits = torch.randn(2, 5, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    got = processing(logits, torch.tensor([1.0]))
    reference = RepetitionPenaltyLogitsProcessor(penalty=1.7)
    for row, ids in enumerate(([3, 7], [5, 1, 2, 9])):  # the sequences without their padding
        for position in range(5):
            expected = reference(torch.tensor([ids]), logits[row, position][None].clone())[0]
            assert torch.equal(got[row, position], expected)


def test_presence_penalty_subtracts_from_seen_tokens_only():
    processing, _ = _processing(presence_penalty=2.5)
    logits = torch.randn(2, 3, VOCAB)
    got = processing(logits, torch.tensor([1.0]))
    diff = logits - got
    assert torch.allclose(diff[0][:, [3, 7]], torch.full((3, 2), 2.5))
    assert (diff[0][:, [i for i in range(VOCAB) if i not in (3, 7)]] == 0).all()


@pytest.mark.parametrize(
    "settings, warper",
    [
        (dict(top_k=5), TopKLogitsWarper(top_k=5)),
        (dict(top_p=0.7), TopPLogitsWarper(top_p=0.7)),
        (dict(min_p=0.1), MinPLogitsWarper(min_p=0.1)),
    ],
)
def test_filters_keep_what_transformers_keeps(settings, warper):
    processing = LogitsProcessing(LogitsSettings(**settings), 2, VOCAB, "cpu")
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, VOCAB, generator=generator) * 2
    temperature = 0.7
    got = processing(logits, torch.tensor([1 / temperature]))
    want = warper(None, (logits / temperature).view(-1, VOCAB)).view(2, 6, VOCAB)
    assert torch.equal(torch.isinf(got), torch.isinf(want))  # same tokens filtered
    kept = ~torch.isinf(got)
    assert torch.equal(got[kept], logits[kept])  # the rest untouched (temperature is applied by the sampler)
    assert kept.any(dim=-1).all()


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(top_p=0.0), r"`top_p` must be a float in \(0, 1\]"),
        (dict(top_p=1.5), r"`top_p` must be a float in \(0, 1\]"),
        (dict(top_k=0), "`top_k` must be an integer >= 1"),
        (dict(min_p=1.0), r"`min_p` must be a float in \[0, 1\)"),
        (dict(repetition_penalty=-1.0), "`repetition_penalty` must be a float > 0"),
        (dict(presence_penalty=-0.5), "`presence_penalty` must be a float >= 0"),
    ],
)
def test_bad_settings_are_named(settings, match, tokenizer):
    with pytest.raises(ValueError, match=match):
        LogitsSettings(**settings)
    model = build_pair(variant_config("default"), tokenizer)[0]
    with pytest.raises(ValueError, match=match):
        model.generate(tokenizer(["Hi"], return_tensors="pt")["input_ids"], **settings)


@pytest.mark.parametrize("sampling", ["reference", "fused"])
def test_presence_penalty_keeps_prompt_tokens_out_of_the_output(sampling, tokenizer):
    config = variant_config("default")
    model = build_pair(config, tokenizer, seed=7)[0]
    input_ids, attention_mask = left_padded_batch(tokenizer, ["Why is the sky blue?", "Tom has 3 apples."])
    kwargs = dict(attention_mask=attention_mask, sampling=sampling, seed=2, max_new_tokens=3 * config.canvas_length,
                  max_denoising_steps=2, eos_token_id=None, stability_threshold=None, confidence_threshold=None)
    plain = model.generate(input_ids, **kwargs).sequences[:, input_ids.shape[1]:]
    if sampling == "fused":  # without processors the sampler softcaps the raw logits itself
        assert model._dgemma_engine.read_softcap == model.final_logit_softcapping
    penalised = model.generate(input_ids, presence_penalty=1e4, **kwargs).sequences[:, input_ids.shape[1]:]
    if sampling == "fused":  # processors see softcapped logits: the region softcaps them first
        assert model._dgemma_engine.read_softcap is None
    for row in range(2):
        prompt_tokens = set(input_ids[row][attention_mask[row].bool()].tolist())
        assert not prompt_tokens & set(penalised[row].tolist())
        # Later canvases also avoid what earlier canvases committed (the committed argmax tokens).
        first = set(penalised[row, : config.canvas_length].tolist())
        assert not first & set(penalised[row, config.canvas_length :].tolist())
    assert not torch.equal(plain, penalised)


def test_top_k_one_commits_the_argmax(tokenizer):
    config = variant_config("default")
    model = build_pair(config, tokenizer, seed=8)[0]
    input_ids, _ = left_padded_batch(tokenizer, ["Why is the sky blue?"])
    out = model.generate(input_ids, top_k=1, sampling="reference", max_new_tokens=config.canvas_length,
                         max_denoising_steps=3, eos_token_id=None)
    assert out.sequences.shape[1] == input_ids.shape[1] + config.canvas_length
