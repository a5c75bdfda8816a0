"""The block-diffusion training loss (dgemma_hf.training) and the model's `forward(..., labels=...)`."""

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from conftest import build_pair, left_padded_batch, variant_config
from dgemma_hf.training import IGNORE_INDEX, block_diffusion_loss

PROMPTS = ["Why is the sky blue?", "Question: Tom has 3 apples and buys 5 more. How many apples now?"]
ANSWERS = ["Because air scatters blue light more than red.", "He has 8 apples."]


def _models(tokenizer, seed=0):
    """Ours (with the labels forward, in train mode) and upstream's, holding the same random weights."""
    ours, upstream = build_pair(variant_config("default"), tokenizer, seed=seed)
    return ours.train(), upstream


def _batch(tokenizer, canvas_length=16):
    input_ids, attention_mask = left_padded_batch(tokenizer, PROMPTS)
    target = tokenizer(
        [answer + tokenizer.eos_token for answer in ANSWERS],
        padding="max_length",
        max_length=canvas_length,
        truncation=True,
        padding_side="right",
        return_tensors="pt",
    )
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, IGNORE_INDEX)
    assert not attention_mask.all(), "the prompts must exercise left padding"
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).sum() > 8
    return input_ids, attention_mask, labels


def _hand_cross_entropy(logits, targets):
    keep = targets != IGNORE_INDEX
    log_probs = logits.double().log_softmax(dim=-1)
    picked = log_probs[keep].gather(-1, targets[keep][:, None]).squeeze(-1)
    return -picked.sum() / keep.sum()


def _softcapped(model, hidden_states):
    cap = model.config.text_config.final_logit_softcapping
    return cap * torch.tanh(model.lm_head(hidden_states).float() / cap)


# --- what the loss computes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("self_conditioning_prob", [0.0, 0.5, 1.0])
def test_loss_equals_hand_computed_cross_entropy_on_upstream(self_conditioning_prob, tokenizer):
    """Same draws, replayed by hand from the same generator; upstream's forward on that canvas; the loss by hand."""
    model, upstream = _models(tokenizer)
    input_ids, attention_mask, labels = _batch(tokenizer)
    # Four rows, so that p=0.5 gives a mixed self-conditioning mask with this seed (checked below).
    input_ids, attention_mask, labels = (torch.cat([x, x]) for x in (input_ids, attention_mask, labels))
    batch, canvas_length = labels.shape
    vocab = model.config.text_config.vocab_size
    seed = 3

    out = block_diffusion_loss(
        model,
        input_ids,
        attention_mask,
        labels,
        self_conditioning_prob=self_conditioning_prob,
        encoder_loss_weight=0.25,
        generator=torch.Generator().manual_seed(seed),
    )

    replay = torch.Generator().manual_seed(seed)
    rates = 1.0 - torch.rand(batch, generator=replay)
    chosen = torch.rand(batch, canvas_length, generator=replay)
    noise = torch.randint(0, vocab, (batch, canvas_length), generator=replay)
    self_conditioned = torch.rand(batch, generator=replay) < self_conditioning_prob
    canvas = torch.where((chosen < rates[:, None]) | (labels == IGNORE_INDEX), noise, labels)
    torch.testing.assert_close(out.corruption_rate, rates)
    assert torch.equal(out.decoder_input_ids, canvas)
    assert torch.equal(out.self_conditioning_mask, self_conditioned)
    assert (rates > 0).all() and (rates <= 1).all()
    if self_conditioning_prob == 0.5:
        assert 0 < self_conditioned.sum() < batch, "seed must give a mixed self-conditioning mask"

    decoder_attention_mask = F.pad(attention_mask, (0, canvas_length), value=1)
    common = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=canvas,
        decoder_attention_mask=decoder_attention_mask,
    )
    with torch.no_grad():
        first = upstream(**common)
        second = upstream(**common, self_conditioning_logits=first.logits, self_conditioning_mask=self_conditioned)
        want_logits = second.logits if self_conditioned.any() else first.logits
        want_diffusion = _hand_cross_entropy(want_logits, labels)
        # Encoder: next-token loss on the prompt, only where both tokens of a pair are real.
        real = attention_mask.bool()
        pairs = real[:, 1:] & real[:, :-1]
        encoder_logits = _softcapped(upstream, first.encoder_last_hidden_state[:, :-1])
        want_encoder = _hand_cross_entropy(encoder_logits, input_ids[:, 1:].masked_fill(~pairs, IGNORE_INDEX))

    torch.testing.assert_close(out.logits.detach(), want_logits, rtol=1e-5, atol=1e-5)
    assert out.diffusion_loss.item() == pytest.approx(want_diffusion.item(), rel=1e-5)
    assert out.encoder_loss.item() == pytest.approx(want_encoder.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(want_diffusion.item() + 0.25 * want_encoder.item(), rel=1e-5)
    if 0 < self_conditioned.sum() < batch:
        # Self-conditioning changed the conditioned rows only.
        changed = (second.logits - first.logits).abs().amax(dim=(1, 2)) > 1e-4
        assert torch.equal(changed, self_conditioned)


def test_corruption_rate_extremes(tokenizer):
    model, _ = _models(tokenizer)
    input_ids, attention_mask, labels = _batch(tokenizer)
    targets = labels != IGNORE_INDEX
    vocab = model.config.text_config.vocab_size

    nearly_clean = block_diffusion_loss(
        model, input_ids, attention_mask, labels, corruption_rate=1e-6, generator=torch.Generator().manual_seed(0)
    )
    canvas = nearly_clean.decoder_input_ids
    assert torch.equal(canvas[targets], labels[targets]), "a rate near 0 keeps every target token"
    assert ((canvas[~targets] >= 0) & (canvas[~targets] < vocab)).all(), "ignored positions hold random tokens"

    per_row = torch.tensor([1.0, 1e-6])
    mixed = block_diffusion_loss(
        model, input_ids, attention_mask, labels, corruption_rate=per_row, generator=torch.Generator().manual_seed(0)
    )
    kept = (mixed.decoder_input_ids == labels) & targets
    assert kept[0].sum() <= 2, "rate 1 replaces every token (a few may draw their own value back)"
    assert torch.equal(kept[1], targets[1])
    torch.testing.assert_close(mixed.corruption_rate, per_row)


def test_generator_makes_the_loss_reproducible(tokenizer):
    model, _ = _models(tokenizer)
    input_ids, attention_mask, labels = _batch(tokenizer)
    runs = [
        block_diffusion_loss(model, input_ids, attention_mask, labels, generator=torch.Generator().manual_seed(s))
        for s in (5, 5, 6)
    ]
    assert runs[0].loss.item() == runs[1].loss.item()
    assert torch.equal(runs[0].decoder_input_ids, runs[1].decoder_input_ids)
    assert not torch.equal(runs[0].decoder_input_ids, runs[2].decoder_input_ids)


# --- training -------------------------------------------------------------------------------------------------


def test_loss_decreases_over_optimizer_steps(tokenizer):
    model, _ = _models(tokenizer)
    input_ids, attention_mask, labels = _batch(tokenizer)

    def held_out_loss():
        with torch.no_grad():
            return block_diffusion_loss(
                model,
                input_ids,
                attention_mask,
                labels,
                corruption_rate=0.5,
                generator=torch.Generator().manual_seed(1234),
            ).loss.item()

    before = held_out_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(30):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            encoder_loss_weight=0.1,
            generator=torch.Generator().manual_seed(step),
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert math.isfinite(after) and after < 0.5 * before, (before, after)


@pytest.mark.parametrize("self_conditioning_prob", [1.0, 0.0])
def test_gradients_reach_the_self_conditioning_block(self_conditioning_prob, tokenizer):
    model, _ = _models(tokenizer)
    input_ids, attention_mask, labels = _batch(tokenizer)
    # The encoder's first layer output reaches the loss only through the keys and values the decoder reads.
    encoder_outputs = []
    hook = model.model.encoder.language_model.layers[0].register_forward_hook(
        lambda module, args, output: encoder_outputs.append(output) or output.retain_grad()
    )
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        self_conditioning_prob=self_conditioning_prob,
        generator=torch.Generator().manual_seed(0),
    )
    hook.remove()
    out.loss.backward()
    assert out.encoder_loss is None and len(encoder_outputs) == 1
    assert encoder_outputs[0].grad.abs().sum() > 0, "the diffusion loss trains the encoder through the cache"
    block = model.model.decoder.self_conditioning
    grads = {name: p.grad for name, p in block.named_parameters()}
    assert set(grads) == {"pre_norm.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    if self_conditioning_prob == 1.0:
        assert out.self_conditioning_mask.all()
        for name, grad in grads.items():
            assert grad is not None and grad.abs().sum() > 0, name
    else:
        # No self-conditioning signal: the block sees zeros, so its weights get no gradient.
        assert not out.self_conditioning_mask.any()
        for name, grad in grads.items():
            assert grad is None or grad.abs().sum() == 0, name


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tokenizer):
    model, _ = _models(tokenizer)
    input_ids, attention_mask, labels = _batch(tokenizer)

    def loss_and_grads():
        model.zero_grad()
        out = block_diffusion_loss(
            model,
            input_ids,
            attention_mask,
            labels,
            self_conditioning_prob=1.0,
            encoder_loss_weight=0.5,
            generator=torch.Generator().manual_seed(11),
        )
        out.loss.backward()
        return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.decoder.layers)
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == checkpointed_grads.keys() and len(plain_grads) > 20
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_runs_a_step_and_evaluates(tokenizer, tmp_path):
    model, _ = _models(tokenizer)
    input_ids, attention_mask, labels = _batch(tokenizer)
    rows = {
        "input_ids": input_ids.tolist(),
        "attention_mask": attention_mask.tolist(),
        "labels": labels.tolist(),
        "corruption_rate": [0.3, 0.9],
        "text": PROMPTS,  # not a forward argument: the Trainer must drop it
    }
    dataset = Dataset.from_dict(rows)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    before = model.model.decoder.self_conditioning.gate_proj.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    assert trainer.label_names == ["labels"]
    result = trainer.train()
    assert result.global_step == 1 and math.isfinite(result.training_loss) and result.training_loss > 0
    after = model.model.decoder.self_conditioning.gate_proj.weight.detach()
    assert not torch.equal(before, after), "the optimizer step must move the weights"
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0


def test_lora_trains_only_the_adapters(tokenizer):
    from peft import LoraConfig, get_peft_model

    model, _ = _models(tokenizer)
    input_ids, attention_mask, labels = _batch(tokenizer)
    # The random init's tied head (std 0.02) bounds every logit near 0 after the final norm, so frozen, it leaves
    # adapters little to win; a trained head spans a wide logit range, as this scaled one does.
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    # The text stacks' attention projections (the vision tower's are clippable linears, which peft does not wrap).
    targets = r".*(language_model|decoder)\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    lora = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in name for name in lora)
    assert any(".decoder." in name for name in lora) and any(".encoder." in name for name in lora)

    def held_out_loss():
        with torch.no_grad():
            return peft_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                corruption_rate=0.5,
                generator=torch.Generator().manual_seed(99),
            ).loss.item()

    before = held_out_loss()
    optimizer = torch.optim.AdamW(lora.values(), lr=3e-2)
    for step in range(20):
        out = peft_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            generator=torch.Generator().manual_seed(step),
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert after < before - 0.1, (before, after)  # the adapters alone learn (seen: 4.37 -> 4.17 in 20 steps)
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert p.grad is None, name
            key = name.replace(".base_layer", "")
            assert torch.equal(p.detach(), base[key]), f"{name} is frozen under LoRA"


# --- the forward override -------------------------------------------------------------------------------------


def test_forward_without_labels_is_upstream(tokenizer):
    model, upstream = _models(tokenizer)
    model.eval()
    input_ids, attention_mask, _ = _batch(tokenizer)
    canvas = torch.randint(0, model.config.text_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids, attention_mask, decoder_input_ids=canvas)
        want = upstream(input_ids, attention_mask, decoder_input_ids=canvas)
        as_tuple = model(input_ids, attention_mask, decoder_input_ids=canvas, return_dict=False)
    assert got.loss is None
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[0], want.logits, rtol=0, atol=0)


def test_forward_with_labels_is_the_training_loss(tokenizer):
    model, _ = _models(tokenizer)
    input_ids, attention_mask, labels = _batch(tokenizer)
    got = model(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, generator=torch.Generator().manual_seed(4)
    )
    want = block_diffusion_loss(model, input_ids, attention_mask, labels, generator=torch.Generator().manual_seed(4))
    assert got.loss.item() == want.loss.item() and got.loss.requires_grad
    assert got.logits.shape == (2, 16, model.config.text_config.vocab_size)
    as_tuple = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        generator=torch.Generator().manual_seed(4),
        return_dict=False,
    )
    assert isinstance(as_tuple, tuple) and as_tuple[0].item() == want.loss.item()


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(labels=lambda y: y[:, :-1]), ValueError, "`labels` must have shape"),
        (dict(labels=lambda y: torch.cat([y, y[:, :1]], dim=1)), ValueError, "`labels` must have shape"),
        (dict(labels=lambda y: y[:1]), ValueError, "`labels` must have shape"),
        (dict(labels=lambda y: y.flatten()), ValueError, "`labels` must have shape"),
        (dict(labels=lambda y: torch.full_like(y, IGNORE_INDEX)), ValueError, "`labels` has no target"),
        (dict(labels=lambda y: torch.where(torch.arange(16) == 0, 10_000, y)), ValueError, "must hold token ids"),
        (dict(labels=lambda y: y.float()), TypeError, "`labels` must be an integer"),
        (dict(corruption_rate=0.0), ValueError, "`corruption_rate` must lie in"),
        (dict(corruption_rate=1.5), ValueError, "`corruption_rate` must lie in"),
        (dict(corruption_rate=-0.2), ValueError, "`corruption_rate` must lie in"),
        (dict(corruption_rate=float("nan")), ValueError, "`corruption_rate` must lie in"),
        (dict(corruption_rate=torch.tensor([0.5, 0.0])), ValueError, "`corruption_rate` must lie in"),
        (dict(corruption_rate=torch.tensor([0.5, 0.5, 0.5])), ValueError, "`corruption_rate` must be a float"),
        (dict(corruption_rate="high"), TypeError, "`corruption_rate` must be a float"),
        (dict(self_conditioning_prob=-0.1), ValueError, "`self_conditioning_prob` must be a float in"),
        (dict(self_conditioning_prob=1.01), ValueError, "`self_conditioning_prob` must be a float in"),
        (dict(encoder_loss_weight=-1.0), ValueError, "`encoder_loss_weight` must be"),
        (dict(generator=0), TypeError, "`generator` must be"),
        (dict(decoder_input_ids=torch.zeros(2, 16, dtype=torch.long)), ValueError, "`decoder_input_ids` cannot"),
        (dict(past_key_values=object()), ValueError, "`past_key_values` cannot"),
        (dict(output_router_logits=True), TypeError, "unexpected argument"),
        (dict(attention_mask=lambda m: m.masked_fill(torch.tensor([[True], [False]]), 0)), ValueError, "is empty"),
        (dict(attention_mask=lambda m: m[:, 1:]), ValueError, "`attention_mask` must have the shape"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(change, error, match, tokenizer):
    model, _ = _models(tokenizer)
    input_ids, attention_mask, labels = _batch(tokenizer)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    for name, value in change.items():
        kwargs[name] = value(kwargs[name]) if callable(value) else value
    with pytest.raises(error, match=match):
        model(**kwargs)


def test_training_arguments_without_labels_are_refused(tokenizer):
    model, _ = _models(tokenizer)
    input_ids, attention_mask, _ = _batch(tokenizer)
    with pytest.raises(ValueError, match="`corruption_rate`, `self_conditioning_prob` only apply to the training"):
        model(input_ids=input_ids, attention_mask=attention_mask, corruption_rate=0.5, self_conditioning_prob=0.5)


def test_encoder_loss_needs_two_prompt_tokens(tokenizer):
    model, _ = _models(tokenizer)
    _, _, labels = _batch(tokenizer)
    one_token = torch.tensor([[2], [2]])
    with pytest.raises(ValueError, match="`encoder_loss_weight` > 0 needs a prompt of at least two"):
        model(input_ids=one_token, labels=labels, encoder_loss_weight=1.0)
    out = model(input_ids=one_token, labels=labels)  # without the encoder loss a one-token prompt is fine
    assert out.encoder_loss is None and math.isfinite(out.loss.item())
