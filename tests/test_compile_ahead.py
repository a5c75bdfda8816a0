"""`compile_kernels` (generation/compile_ahead.py) launches every kernel variant a generate() call launches.

On the CPU the kernels run in Triton's interpreter, which compiles nothing, so the tests record what Triton's JIT
would key a compiled variant on, for every launch: the argument dtypes, 16-byte alignment, integers divisible by 16
or equal to 1, and the constexpr values. The variants the call launched must all be among those the warm-up
launched. The GPU test checks the same through Triton's own kernel caches.
"""

import copy

import pytest
import torch
from transformers import StaticCache

from conftest import build_pair, left_padded_batch, variant_config
from dgemma_hf.generation import compile_ahead
from dgemma_hf.kernels import attention, moe, routing, sampler

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CUDA generate() also warms up by itself first


def _variant_of(value):
    """What Triton specialises one launch argument on."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return (value % 16 == 0, value == 1)
    if isinstance(value, float):
        return float
    return value


class LaunchRecorder:
    """Launches a Triton kernel as it is, after adding the launch's variant to `variants`. Keyword arguments
    (our wrappers pass constexprs and launch options that way) count by value."""

    def __init__(self, kernel, name: str, variants: set):
        self.kernel, self.name, self.variants = kernel, name, variants

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def record(*args, **kwargs):
            self.variants.add((self.name, tuple(_variant_of(a) for a in args),
                               tuple(sorted((k, v) for k, v in kwargs.items()))))
            return launch(*args, **kwargs)

        return record


@pytest.fixture
def launched(monkeypatch):
    variants = set()
    for module in (attention, moe, routing, sampler):
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, LaunchRecorder(value, f"{module.__name__}.{name}", variants))
    return variants


def _triton_model(tokenizer, variant: str):
    model = build_pair(variant_config(variant), tokenizer)[0].to(DEVICE)
    model.set_attn_implementation({"text_config": "dgemma_attention_triton"})
    model.set_experts_implementation("dgemma_triton")
    return model


@pytest.mark.parametrize("variant, prompts, kwargs", [
    ("default", ["The quick brown fox jumps over the lazy dog"], {}),
    # Sliding window 8: the prompts fill it, the commits find it full; a padded batch; a chunked prompt.
    ("mha_no_k_eq_v", ["Hi", "A somewhat longer prompt than the first one"], {"prefill_chunk_size": 4}),
    # Logits processors: the sampler reads softcapped fp32 logits.
    ("global_only", ["One", "Two words", "And a third, longer prompt"], {"repetition_penalty": 1.3}),
    # A prompt as long as the canvas goes through the fused encoder layers (the router's top-k too).
    ("default", 16, {}),
])
def test_warm_up_launches_every_variant_the_call_launches(tokenizer, launched, monkeypatch, variant, prompts, kwargs):
    model = _triton_model(tokenizer, variant)
    if isinstance(prompts, int):
        input_ids = torch.randint(3, 100, (1, prompts), device=DEVICE)
        attention_mask = torch.ones_like(input_ids)
    else:
        input_ids, attention_mask = (t.to(DEVICE) for t in left_padded_batch(tokenizer, prompts))
    model.generate(input_ids, attention_mask=attention_mask, sampling="fused", seed=0, eos_token_id=None,
                   max_new_tokens=3 * model.config.canvas_length, max_denoising_steps=2, **kwargs)
    called = set(launched)
    assert {name.rpartition(".")[2] for name, *_ in called} >= {
        "_attention_kernel", "_gate_up_kernel", "_down_kernel", "_route_kernel", "_partial_kernel"}

    launched.clear()
    monkeypatch.setattr(compile_ahead, "_WARMED", set())  # (on CUDA generate() has warmed up already)
    engine = model._dgemma_engine
    engine.cache.reset()  # as the next call finds it
    assert compile_ahead.compile_kernels(engine, input_ids.shape[1], workers=1) > 0
    assert called <= launched, f"not warmed: {sorted(map(str, called - launched))}"
    # What a process has launched once it does not launch again (another engine of the same shapes, say).
    launched.clear()
    assert compile_ahead.compile_kernels(engine, input_ids.shape[1], workers=1) == 0 and not launched


def test_warm_up_covers_a_call_continuing_a_users_static_cache(tokenizer, launched, monkeypatch):
    """A StaticCache that already holds tokens: the simulated passes start from what its layers hold."""
    model = _triton_model(tokenizer, "mha_no_k_eq_v")  # window 8: the second call fills the sliding layers
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=64)
    kwargs = dict(sampling="fused", seed=0, eos_token_id=None, max_denoising_steps=1)
    model.generate(torch.randint(3, 100, (1, 6), device=DEVICE), past_key_values=cache, max_new_tokens=8, **kwargs)
    before = copy.deepcopy(cache)
    launched.clear()
    more = torch.randint(3, 100, (1, 5), device=DEVICE)
    model.generate(more, past_key_values=cache, max_new_tokens=16, **kwargs)
    called = set(launched)

    launched.clear()
    monkeypatch.setattr(compile_ahead, "_WARMED", set())
    engine = model._dgemma_engine
    engine.cache = before  # as the second call found it
    assert compile_ahead.compile_kernels(engine, more.shape[1], workers=1) > 0
    assert called <= launched, f"not warmed: {sorted(map(str, called - launched))}"


def test_encoder_passes_follow_the_static_cache(tokenizer):
    """Key lengths per pass as transformers' cache layers return them: a global layer its whole buffer; a sliding
    layer of window 8 its window while there is room, what it held plus the new tokens while filling up, then the
    last 7 tokens plus the new ones."""
    model = build_pair(variant_config("mha_no_k_eq_v"), tokenizer)[0].to(DEVICE)  # canvas 8, window 8
    input_ids = torch.ones(1, 6, dtype=torch.long, device=DEVICE)
    model.generate(input_ids, sampling="fused", seed=0, eos_token_id=None, max_new_tokens=24, max_denoising_steps=1)
    engine = model._dgemma_engine
    engine.cache.reset()
    passes = compile_ahead._encoder_passes(engine, 6)
    max_length = 6 + 3 * 8
    assert [new for new, _ in passes] == [6, 8, 8]
    assert [lengths[:2] for _, lengths in passes] == [[8, max_length], [6 + 8, max_length], [7 + 8, max_length]]


@pytest.mark.gpu
def test_gpu_first_call_compiles_nothing_the_warm_up_did_not(tokenizer, monkeypatch):
    """On CUDA a new engine's first call warms its kernels; the passes after the warm-up compile no variant of
    ours (Triton's per-device kernel caches do not grow)."""
    import triton

    from dgemma_hf.generation import engine as engine_module

    model = build_pair(variant_config("mha_no_k_eq_v"), tokenizer)[0].to("cuda", torch.bfloat16)
    input_ids, attention_mask = left_padded_batch(tokenizer, ["Hi", "A somewhat longer prompt than the first one"])
    kernels = [value for module in (attention, moe, routing, sampler) for value in vars(module).values()
               if isinstance(value, triton.runtime.JITFunction)]

    def compiled():
        return {(kernel, key) for kernel in kernels for cache in kernel.device_caches.values() for key in cache[0]}

    after_warm_up = []

    def warm_up(engine, prompt_length, prompt_kwargs=None, workers=None):
        launches = compile_ahead.compile_kernels(engine, prompt_length, prompt_kwargs, workers)
        after_warm_up.append(compiled())
        return launches

    monkeypatch.setattr(engine_module, "compile_kernels", warm_up)
    monkeypatch.setattr(compile_ahead, "_WARMED", set())
    model.generate(input_ids.cuda(), attention_mask=attention_mask.cuda(), sampling="fused", seed=0,
                   eos_token_id=None, max_new_tokens=3 * model.config.canvas_length, max_denoising_steps=3)
    assert len(after_warm_up) == 1
    assert compiled() == after_warm_up[0], f"compiled after the warm-up: {compiled() - after_warm_up[0]}"
