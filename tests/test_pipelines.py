"""pipeline("text-diffusion") and TextDiffusionPipeline on tiny models (CPU; fused sampling runs under
TRITON_INTERPRET=1, set by conftest)."""

import json

import pytest
import torch
from conftest import build_pair, left_padded_batch, variant_config
from diffusers import BlockRefinementScheduler, DiffusionGemmaPipeline, DiscreteDDIMScheduler, EntropyBoundScheduler
from transformers import GPT2Config, GPT2LMHeadModel, pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from dgemma_hf import DiffusionGemmaForMaskedGeneration
from dgemma_hf.pipelines import TextDiffusionGenerationPipeline, TextDiffusionPipeline, register_pipelines
from dgemma_hf.schedulers import ConfidenceThresholdScheduler, EntropyBoundDiffusionScheduler, TopKPerStepScheduler
from dgemma_hf.tiny import make_tiny_checkpoint

register_pipelines()  # registration.py calls it on `import dgemma_hf`; calling again is a no-op

PROMPTS = ["Why is the sky blue?", "Hi", "Tom has 3 apples and eats one of them."]
# Two canvases, every step taken (adaptive stopping and EOS off): deterministic step counts.
FIXED = dict(max_new_tokens=32, stability_threshold=None, confidence_threshold=None, eos_token_id=None)

SCHEDULERS = [
    EntropyBoundDiffusionScheduler(num_inference_steps=3, entropy_bound=0.5),
    ConfidenceThresholdScheduler(num_inference_steps=3, threshold=0.5),
    TopKPerStepScheduler(num_inference_steps=3),
    EntropyBoundScheduler(num_inference_steps=3, entropy_bound=0.5),
    BlockRefinementScheduler(num_inference_steps=3),
    DiscreteDDIMScheduler(num_inference_steps=3),
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_pair(variant_config("default"), tokenizer, seed=0)[0]


@pytest.fixture(scope="module")
def pipe(model, tokenizer):
    return pipeline("text-diffusion", model=model, tokenizer=tokenizer, device="cpu")


def _reference(model, tokenizer, prompts, torch_seed, **kwargs):
    """model.generate on the left-padded batch, torch's generator seeded as the pipelines seed it."""
    input_ids, attention_mask = left_padded_batch(tokenizer, prompts)
    torch.manual_seed(torch_seed)
    out = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    return input_ids, attention_mask, out


# -- registration and models ------------------------------------------------------------------------------------


def test_task_is_registered_and_builds_our_pipeline(pipe, model):
    assert "text-diffusion" in PIPELINE_REGISTRY.get_supported_tasks()
    assert isinstance(pipe, TextDiffusionGenerationPipeline)
    assert pipe.model is model
    register_pipelines()  # idempotent
    assert PIPELINE_REGISTRY.supported_tasks["text-diffusion"]["impl"] is TextDiffusionGenerationPipeline


def test_model_given_as_a_path_loads_through_automodel(tmp_path):
    make_tiny_checkpoint(tmp_path / "tiny")
    pipe = pipeline("text-diffusion", model=str(tmp_path / "tiny"), device="cpu")  # tokenizer from the folder
    assert type(pipe.model) is DiffusionGemmaForMaskedGeneration
    out = pipe("Hello", max_new_tokens=16, seed=0)
    assert len(out) == 1 and out[0]["generated_text"].startswith("Hello")
    assert len(out[0]["generated_text"]) > len("Hello")


def test_default_model_is_the_built_in_one_with_a_warning():
    with pytest.warns(UserWarning, match="trained on short arithmetic only"):
        pipe = pipeline("text-diffusion", device="cpu")
    assert type(pipe.model) is DiffusionGemmaForMaskedGeneration
    out = pipe("Calculate 3 + 4.", seed=0, return_full_text=False)[0]["generated_text"]
    assert out.strip() and "=" in out  # its answers' shape; their accuracy is tests/test_default_model.py's


def test_other_models_are_refused_naming_their_type(tmp_path, tokenizer, model):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=512, n_positions=64))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        pipeline("text-diffusion", model=gpt2, tokenizer=tokenizer, device="cpu")
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        pipeline("text-diffusion", model=str(tmp_path / "gpt2"), tokenizer=tokenizer, device="cpu")
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        TextDiffusionPipeline(model=gpt2, scheduler=None, tokenizer=tokenizer)
    upstream = build_pair(variant_config("default"), tokenizer)[1]
    with pytest.raises(TypeError, match="AutoModel"):
        pipeline("text-diffusion", model=upstream, tokenizer=tokenizer, device="cpu")


# -- every scheduler, both pipelines, same results as generate() ----------------------------------------------


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=lambda s: type(s).__name__)
def test_every_scheduler_through_both_pipelines(scheduler, pipe, model, tokenizer):
    kwargs = dict(scheduler=scheduler, max_new_tokens=32, sampling="reference")
    input_ids, attention_mask, expected = _reference(model, tokenizer, PROMPTS, 3, **kwargs)
    padding = (attention_mask == 0).sum(dim=1)
    new = expected.sequences[:, input_ids.shape[1]:]

    got = pipe(PROMPTS, seed=3, return_tensors=True, **kwargs)
    for row, record in enumerate(got):
        assert record == [{"generated_token_ids": expected.sequences[row, padding[row]:].tolist()}]
    texts = pipe(PROMPTS, seed=3, return_full_text=False, **kwargs)
    assert [r[0]["generated_text"] for r in texts] == tokenizer.batch_decode(new, skip_special_tokens=True)

    diffusion = TextDiffusionPipeline(model=model, scheduler=scheduler, tokenizer=tokenizer)
    out = diffusion(PROMPTS, use_chat_template=False, seed=3, max_new_tokens=32, sampling="reference")
    assert torch.equal(out.sequences, new)
    assert torch.equal(out.tokens_per_forward, expected.tokens_per_forward)
    assert out.texts == tokenizer.batch_decode(new, skip_special_tokens=True)


def test_fused_sampling_through_both_pipelines(pipe, model, tokenizer):
    scheduler = TopKPerStepScheduler(num_inference_steps=2)
    input_ids, _, expected = _reference(model, tokenizer, PROMPTS[:2], 5, scheduler=scheduler,
                                        max_new_tokens=16, sampling="fused", seed=5)
    got = pipe(PROMPTS[:2], scheduler=scheduler, max_new_tokens=16, sampling="fused", seed=5, return_full_text=False)
    new = expected.sequences[:, input_ids.shape[1]:]
    assert [r[0]["generated_text"] for r in got] == tokenizer.batch_decode(new, skip_special_tokens=True)
    diffusion = TextDiffusionPipeline(model=model, scheduler=scheduler, tokenizer=tokenizer)
    out = diffusion(PROMPTS[:2], use_chat_template=False, max_new_tokens=16, sampling="fused", seed=5)
    assert torch.equal(out.sequences, new)


def test_scheduler_by_name_with_its_kwargs(pipe, model, tokenizer):
    got = pipe(PROMPTS[:2], scheduler="top_k_per_step", max_denoising_steps=4, seed=1, return_tensors=True,
               max_new_tokens=32)
    _, mask, expected = _reference(model, tokenizer, PROMPTS[:2], 1, max_new_tokens=32,
                                   scheduler=TopKPerStepScheduler(num_inference_steps=4))
    assert [r[0]["generated_token_ids"] for r in got] == [
        expected.sequences[row, int((mask[row] == 0).sum()):].tolist() for row in range(2)]
    named = pipe("Hi", scheduler="confidence_threshold", scheduler_kwargs={"threshold": 0.3, "num_inference_steps": 2},
                 seed=1, return_tensors=True, max_new_tokens=16)
    _, _, direct = _reference(model, tokenizer, ["Hi"], 1, max_new_tokens=16,
                              scheduler=ConfidenceThresholdScheduler(num_inference_steps=2, threshold=0.3))
    assert named[0]["generated_token_ids"] == direct.sequences[0].tolist()
    # Given when the pipeline is built, they are every call's defaults.
    configured = pipeline("text-diffusion", model=model, tokenizer=tokenizer, device="cpu",
                          scheduler="confidence_threshold",
                          scheduler_kwargs={"threshold": 0.3, "num_inference_steps": 2},
                          max_new_tokens=16, return_tensors=True)
    assert configured("Hi", seed=1) == named


# -- the batching contract ----------------------------------------------------------------------------------------


def test_batch_is_one_generate_call_and_batch_size_one_is_each_prompt_alone(pipe):
    alone = [pipe(p, seed=7, **FIXED)[0]["generated_text"] for p in PROMPTS]
    one_by_one = pipe(PROMPTS, seed=7, batch_size=1, **FIXED)
    assert [r[0]["generated_text"] for r in one_by_one] == alone
    # Chunks of two: the first two prompts share a call, the third runs alone.
    chunked = pipe(PROMPTS, seed=7, batch_size=2, **FIXED)
    assert [r[0]["generated_text"] for r in chunked[:2]] == [r[0]["generated_text"] for r in
                                                             pipe(PROMPTS[:2], seed=7, **FIXED)]
    assert chunked[2][0]["generated_text"] == alone[2]


def test_left_padding_is_neutral_in_reference_mode(model, tokenizer):
    """What makes batch row i differ from prompt i alone is the shared random stream, not the padding: the same
    prompt, padded or not, alone, gives the same tokens."""
    input_ids, mask = left_padded_batch(tokenizer, ["Why is the sky blue?"])
    padded_ids = torch.cat([torch.full((1, 5), tokenizer.pad_token_id), input_ids], dim=1)
    padded_mask = torch.cat([torch.zeros((1, 5), dtype=mask.dtype), mask], dim=1)
    torch.manual_seed(2)
    plain = model.generate(input_ids, attention_mask=mask, sampling="reference", **FIXED)
    torch.manual_seed(2)
    padded = model.generate(padded_ids, attention_mask=padded_mask, sampling="reference", **FIXED)
    assert torch.equal(plain.sequences[:, input_ids.shape[1]:], padded.sequences[:, padded_ids.shape[1]:])


@pytest.mark.parametrize("sampling", ["reference", "fused"])
def test_rows_of_a_batch_draw_their_own_random_numbers(pipe, sampling):
    """Identical prompts in one call get different samples (row i draws from seed + i)."""
    kwargs = dict(FIXED, max_new_tokens=16, max_denoising_steps=2) if sampling == "fused" else FIXED
    out = pipe(["Hi", "Hi"], seed=4, sampling=sampling, return_full_text=False, **kwargs)
    assert out[0][0]["generated_text"] != out[1][0]["generated_text"]


def test_seed_repeats_a_call_and_leaves_the_global_generator_alone(pipe):
    state = torch.get_rng_state()
    first = pipe("Hi", seed=11, **FIXED)
    assert torch.equal(torch.get_rng_state(), state)
    assert pipe("Hi", seed=11, **FIXED) == first
    assert pipe("Hi", seed=12, **FIXED) != first


# -- outputs shaped like text-generation ---------------------------------------------------------------------------


def test_return_full_text_and_return_tensors(pipe, tokenizer):
    full = pipe("Why is the sky blue?", seed=1, **FIXED)
    new = pipe("Why is the sky blue?", seed=1, return_full_text=False, **FIXED)
    assert full[0]["generated_text"] == "Why is the sky blue?" + new[0]["generated_text"]
    assert new[0]["generated_text"] != ""
    ids = pipe("Why is the sky blue?", seed=1, return_tensors=True, **FIXED)[0]["generated_token_ids"]
    prompt_ids = tokenizer("Why is the sky blue?")["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and len(ids) == len(prompt_ids) + 32
    assert tokenizer.decode(ids[len(prompt_ids):], skip_special_tokens=True) == new[0]["generated_text"]
    with pytest.raises(ValueError, match="mutually exclusive"):
        pipe("Hi", return_full_text=True, return_tensors=True)


def test_chat_input_appends_an_assistant_turn(pipe, model, tokenizer):
    chat = [{"role": "user", "content": "Why is the sky blue?"}]
    out = pipe(chat, seed=5, **FIXED)
    new = pipe(chat, seed=5, return_full_text=False, **FIXED)[0]["generated_text"]
    assert out == [{"generated_text": chat + [{"role": "assistant", "content": new}]}]
    assert chat == [{"role": "user", "content": "Why is the sky blue?"}]  # the input is not modified
    # The same tokens as the template applied by hand and generate().
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(5)
    direct = model.generate(ids["input_ids"], sampling="reference", **FIXED)
    assert new == tokenizer.decode(direct.sequences[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    # A batch of conversations gives one list per conversation; a final assistant message is continued.
    prefill = chat + [{"role": "assistant", "content": "Because"}]
    batch = pipe([chat, prefill], seed=5, **FIXED)
    assert len(batch) == 2 and batch[0][0]["generated_text"][-1]["role"] == "assistant"
    continued = batch[1][0]["generated_text"]
    assert len(continued) == 2 and continued[-1]["content"].startswith("Because")


# -- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs, kwargs, error, match",
    [
        ("", {}, ValueError, "`text_inputs` is an empty prompt"),
        ([], {}, ValueError, "`text_inputs` is an empty batch"),
        (["Hi", ""], {}, ValueError, r"`text_inputs`\[1\] is an empty prompt"),
        ("Hi", {"scheduler": "fastest"}, ValueError, "unknown `scheduler` name 'fastest'"),
        ("Hi", {"scheduler": 3}, TypeError, "`scheduler` must be a name"),
        ("Hi", {"max_denoising_steps": 0}, ValueError, "`max_denoising_steps` must be a positive integer"),
        ("Hi", {"max_new_tokens": -1}, ValueError, "`max_new_tokens` must be a positive integer"),
        ("Hi", {"scheduler": "top_k_per_step", "scheduler_kwargs": {"num_inference_steps": 0}}, ValueError,
         "`num_inference_steps` must be a positive integer"),
        ([{"content": "Hi"}], {}, ValueError, r"`text_inputs`\[0\] has no 'role' key"),
        ([[{"role": "user"}]], {}, ValueError, r"`text_inputs`\[0\]\[0\] has no 'content' key"),
        ("Hi", {"batch_size": 0}, ValueError, "`batch_size` must be a positive integer"),
        ("Hi", {"seed": -1}, ValueError, "`seed` must be an integer >= 0"),
    ],
)
def test_errors_name_the_argument(pipe, inputs, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(inputs, **kwargs)


def test_diffusion_pipeline_errors(model, tokenizer):
    pipe = TextDiffusionPipeline(model=model, scheduler=TopKPerStepScheduler(num_inference_steps=2),
                                 tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pass `prompt`"):
        pipe()
    with pytest.raises(ValueError, match="not both"):
        pipe("Hi", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="`prompt` is an empty batch"):
        pipe([])
    with pytest.raises(ValueError, match="`prompt` is an empty prompt"):
        pipe("")
    with pytest.raises(ValueError, match=r"`messages`\[1\] has no 'role' key"):
        pipe(messages=[{"role": "user", "content": "Hi"}, {"content": "x"}])
    with pytest.raises(ValueError, match="`num_inference_steps` must be a positive integer"):
        pipe("Hi", num_inference_steps=0)
    with pytest.raises(ValueError, match="`output_type`"):
        pipe("Hi", output_type="pil")
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("Hi", callback_on_step_end=lambda *a: None, callback_on_step_end_tensor_inputs=["logits"])
    with pytest.raises(TypeError, match="`scheduler` must be a name"):
        TextDiffusionPipeline(model=model, scheduler=object(), tokenizer=tokenizer)


# -- TextDiffusionPipeline (diffusers) ---------------------------------------------------------------------------


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "scheduler, entry",
    [(ConfidenceThresholdScheduler(num_inference_steps=3, threshold=0.4), ["dgemma_hf.schedulers",
                                                                          "ConfidenceThresholdScheduler"]),
     (EntropyBoundScheduler(num_inference_steps=3, entropy_bound=0.3), ["diffusers", "EntropyBoundScheduler"])],
    ids=["dgemma_hf", "diffusers"],
)
def test_save_and_load_round_trip(scheduler, entry, model, tokenizer, tmp_path):
    pipe = TextDiffusionPipeline(model=model, scheduler=scheduler, tokenizer=tokenizer)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "TextDiffusionPipeline"
    assert index["model"] == ["transformers", "DiffusionGemmaForBlockDiffusion"]
    assert index["scheduler"] == entry
    assert index["tokenizer"][0] == "transformers"

    loaded = TextDiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.model) is DiffusionGemmaForMaskedGeneration  # through AutoModel
    assert _same_weights(loaded.model, model)
    assert type(loaded.scheduler) is type(scheduler) and _public(loaded.scheduler.config) == _public(scheduler.config)
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded.model.generation_config.max_denoising_steps == model.generation_config.max_denoising_steps
    before = pipe(PROMPTS[:2], seed=9, **FIXED)
    after = loaded(PROMPTS[:2], seed=9, **FIXED)
    assert before.texts == after.texts and torch.equal(before.sequences, after.sequences)
    # Components can be passed instead of loaded.
    swapped = TextDiffusionPipeline.from_pretrained(tmp_path, scheduler=TopKPerStepScheduler(num_inference_steps=2))
    assert isinstance(swapped.scheduler, TopKPerStepScheduler)


def test_loads_a_folder_saved_by_upstreams_diffusion_gemma_pipeline(tokenizer, tmp_path):
    """Upstream's pipeline records the model's library as "diffusion_gemma" and its text component as "processor";
    ours reads its folder anyway (the model through AutoModel)."""
    ours, upstream_model = build_pair(variant_config("default"), tokenizer, seed=6)
    DiffusionGemmaPipeline(model=upstream_model, scheduler=EntropyBoundScheduler(num_inference_steps=3),
                           processor=tokenizer).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["model"][0] == "diffusion_gemma"
    loaded = TextDiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.model) is DiffusionGemmaForMaskedGeneration and _same_weights(loaded.model, ours)
    assert isinstance(loaded.scheduler, EntropyBoundScheduler) and loaded.scheduler.config.num_inference_steps == 3
    assert loaded("Hi", seed=0, max_new_tokens=16).sequences.shape == (1, 16)


def test_scheduler_swap_from_config(model, tokenizer, tmp_path):
    pipe = TextDiffusionPipeline(model=model, scheduler=EntropyBoundDiffusionScheduler(num_inference_steps=3),
                                 tokenizer=tokenizer)
    pipe.scheduler = TopKPerStepScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, TopKPerStepScheduler) and pipe.scheduler.steps == 3
    assert pipe.config["scheduler"] == ("dgemma_hf.schedulers", "TopKPerStepScheduler")
    out = pipe(PROMPTS[:2], seed=2, use_chat_template=False, **FIXED)
    input_ids, _, expected = _reference(model, tokenizer, PROMPTS[:2], 2, scheduler=TopKPerStepScheduler(3), **FIXED)
    assert torch.equal(out.sequences, expected.sequences[:, input_ids.shape[1]:])
    assert torch.allclose(out.tokens_per_forward, torch.tensor(16 / 3))  # every step taken
    # To diffusers' scheduler and back; the saved index follows the swap.
    pipe.scheduler = EntropyBoundScheduler.from_config(pipe.scheduler.config)
    assert pipe.config["scheduler"] == ("diffusers", "EntropyBoundScheduler")
    pipe.scheduler = ConfidenceThresholdScheduler.from_config(pipe.scheduler.config, threshold=0.6)
    pipe.save_pretrained(tmp_path)
    loaded = TextDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, ConfidenceThresholdScheduler) and loaded.scheduler.config.threshold == 0.6


def test_callback_on_step_end_sees_every_step(model, tokenizer):
    pipe = TextDiffusionPipeline(model=model, scheduler=TopKPerStepScheduler(num_inference_steps=3),
                                 tokenizer=tokenizer)
    calls = []

    def callback(p, step, timestep, callback_kwargs):
        assert p is pipe
        calls.append((step, timestep, callback_kwargs["draft"].clone(), callback_kwargs["sequences"].shape))
        return callback_kwargs

    out = pipe(PROMPTS[:2], seed=1, callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["draft", "sequences"], **FIXED)
    assert [c[0] for c in calls] == list(range(6))  # 2 canvases x 3 steps
    assert [c[1] for c in calls] == [3, 2, 1, 3, 2, 1]  # steps left in the canvas
    assert all(c[2].shape == (2, 16) for c in calls)
    # The last draft of each canvas is what the canvas commits (no EOS: nothing is cut).
    assert torch.equal(calls[2][2], out.sequences[:, :16]) and torch.equal(calls[5][2], out.sequences[:, 16:])
    # "sequences" holds the prompt, then the committed canvases.
    assert calls[0][3][1] + 16 == calls[3][3][1]
    # Same text with and without the callback.
    assert pipe(PROMPTS[:2], seed=1, **FIXED).texts == out.texts
    with pytest.raises(ValueError, match="does not take tensors back"):
        pipe("Hi", seed=1, max_new_tokens=16,
             callback_on_step_end=lambda p, s, t, kw: {"draft": torch.zeros_like(kw["draft"])})


def test_messages_num_inference_steps_and_outputs(model, tokenizer):
    scheduler = TopKPerStepScheduler(num_inference_steps=3)
    pipe = TextDiffusionPipeline(model=model, scheduler=scheduler, tokenizer=tokenizer)
    chat = [{"role": "user", "content": "Why is the sky blue?"}]
    from_messages = pipe(messages=chat, seed=4, **FIXED)
    from_prompt = pipe("Why is the sky blue?", seed=4, **FIXED)  # a user turn of the chat template
    assert torch.equal(from_messages.sequences, from_prompt.sequences)
    raw = pipe("Why is the sky blue?", seed=4, use_chat_template=False, **FIXED)
    assert not torch.equal(raw.sequences, from_prompt.sequences)
    batch = pipe(messages=[chat, [{"role": "user", "content": "Hi"}]], seed=4, **FIXED)
    assert batch.sequences.shape == (2, 32) and len(batch.texts) == 2
    assert batch.texts == tokenizer.batch_decode(batch.sequences, skip_special_tokens=True)
    assert batch.tokens_per_forward.shape == (2,)

    # num_inference_steps runs a copy of the scheduler with that many steps; the pipeline's is unchanged.
    fewer = pipe("Hi", seed=4, num_inference_steps=2, **FIXED)
    assert pipe.scheduler is scheduler and scheduler.steps == 3
    assert torch.allclose(fewer.tokens_per_forward, torch.tensor(16 / 2))
    pipe2 = TextDiffusionPipeline(model=model, scheduler=TopKPerStepScheduler(num_inference_steps=2),
                                  tokenizer=tokenizer)
    assert torch.equal(pipe2("Hi", seed=4, **FIXED).sequences, fewer.sequences)

    sequences, texts, tokens_per_forward = pipe("Hi", seed=4, return_dict=False, output_type="seq", **FIXED)
    assert texts is None
    assert torch.equal(sequences, pipe("Hi", seed=4, **FIXED).sequences)
    assert tokens_per_forward.shape == (1,)
    # generator= draws the seed: the same generator state gives the same result.
    a = pipe("Hi", generator=torch.Generator().manual_seed(0), **FIXED)
    b = pipe("Hi", generator=torch.Generator().manual_seed(0), **FIXED)
    assert torch.equal(a.sequences, b.sequences)


def test_default_scheduler_is_the_generation_configs(model, tokenizer):
    pipe = TextDiffusionPipeline(model=model, scheduler=None, tokenizer=tokenizer)
    gen = model.generation_config
    assert isinstance(pipe.scheduler, EntropyBoundDiffusionScheduler)
    assert pipe.scheduler.steps == gen.max_denoising_steps
    assert (pipe.scheduler.config.t_min, pipe.scheduler.config.t_max) == (gen.t_min, gen.t_max)
    out = pipe("Hi", seed=3, use_chat_template=False, max_new_tokens=16)
    _, _, direct = _reference(model, tokenizer, ["Hi"], 3, max_new_tokens=16, sampling="reference")
    assert torch.equal(out.sequences, direct.sequences[:, -out.sequences.shape[1]:])


def test_pipeline_save_pretrained_reloads_without_remote_code(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert "custom_pipelines" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = pipeline("text-diffusion", model=str(tmp_path), device="cpu")
    assert type(reloaded.model) is DiffusionGemmaForMaskedGeneration
    assert reloaded("Hi", seed=3, **FIXED) == pipe("Hi", seed=3, **FIXED)
    assert "TextDiffusionGenerationPipeline(model=DiffusionGemmaForMaskedGeneration" in repr(reloaded)


def test_fused_batch_gives_each_prompt_its_alone_result(tokenizer):
    """With sampling="fused", row i of a call with seed s draws from seed s + i alone: a batch gives each prompt
    what it gives alone with that seed (a global-attention model, where left padding changes nothing)."""
    model = build_pair(variant_config("global_only"), tokenizer, seed=1)[0]
    pipe = pipeline("text-diffusion", model=model, tokenizer=tokenizer, device="cpu")
    prompts = ["Why is the sky blue?", "Tom has 3 apples.", "Hi"]
    kwargs = dict(sampling="fused", return_full_text=False, max_new_tokens=32, max_denoising_steps=2,
                  eos_token_id=None)
    batch = pipe(prompts, seed=10, **kwargs)
    for index, prompt in enumerate(prompts):
        alone = pipe(prompt, seed=10 + index, **kwargs)
        assert batch[index][0]["generated_text"] == alone[0]["generated_text"], index
