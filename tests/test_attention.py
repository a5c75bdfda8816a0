"""The Triton attention kernel and the "dgemma_attention" backends.

Kernel tests compare `flash_attention` with float64 math on fresh random inputs; on the CPU the kernel runs
under TRITON_INTERPRET=1 in fp16/fp32 (the interpreter gets bf16 wrong), on a GPU in bf16 too. Model tests
compare DiffusionGemma logits and generate() with our attention against upstream's sdpa.
"""

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from conftest import REPO, build_pair, left_padded_batch, variant_config
from dgemma_hf import DiffusionGemmaForMaskedGeneration
from dgemma_hf import attention as backend
from dgemma_hf.attention import AUTO, TRITON, AttentionChecks, check_attention_config
from dgemma_hf.kernels import attention as kernel
from dgemma_hf.kernels.attention import flash_attention
from dgemma_hf.tiny import make_tiny_checkpoint, tiny_config


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Whole-model fp32 logits: CPU kernels reproduce upstream's to ~1e-6; on a GPU, cuBLAS and the attention
# kernels sum in other orders (up to 1.4e-3 on encoder states of magnitude ~3 seen on an H200).
FP32_TOLERANCE = 2e-5 if DEVICE == "cpu" else 3e-3
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # relative (Frobenius)
SMALL = (16, 16, 1, 4, 1)  # tiny tiles: several blocks even at the short lengths the interpreter can afford


def reference(q, k, v, mask=None, scaling=None, causal=False, q_offset=0, window=None):
    """float64 math with repeated kv heads; rows with no allowed key are zeros."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
    i = torch.arange(q.shape[2])[:, None] + q_offset
    j = torch.arange(k.shape[2])[None, :]
    allowed = torch.ones(scores.shape, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window
    if mask is not None:
        mask = mask.cpu()
        if mask.dtype == torch.bool:
            allowed &= mask
        else:
            allowed &= mask > torch.finfo(mask.dtype).min
            scores = scores + torch.where(allowed, mask.double(), 0.0)
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
    return probs @ v


def rel_err(got, want):
    return ((got.double().cpu() - want).norm() / want.norm()).item()


def make_qkv(batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype, generator, model_layout=True):
    """q as the model passes it: a transposed view of [B, Lq, Hq, D] (non-contiguous)."""
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=generator).to(dtype).transpose(1, 2)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator).to(dtype)
    if not model_layout:
        q = q.contiguous()
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def padding_mask(batch, q_len, kv_len, generator, left=(0, 5, 11), unused=4):
    """Bool [B, 1, Lq, Lk]: row b has left[b] left-padding keys and `unused` trailing (static-cache) slots."""
    keep = torch.ones(batch, kv_len, dtype=torch.bool)
    for b in range(batch):
        keep[b, : left[b % len(left)]] = False
    keep[:, kv_len - unused:] = False
    mask = keep[:, None, None, :].expand(batch, 1, q_len, kv_len).clone()
    mask &= torch.rand(batch, 1, q_len, kv_len, generator=generator) > 0.1  # a few more holes per row
    return mask


def run_poisoned(q, k, v, mask=None, **kwargs):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # poison
    got = flash_attention(q, k, v, mask, out=out, **kwargs)
    assert got is out
    assert torch.isfinite(got).all(), "every output element must be written (and finite)"
    return got


# (batch, q heads, kv heads, q_len, kv_len, head_dim, mask, config)
KERNEL_CASES = [
    (2, 8, 1, 5, 37, 256, "bool", SMALL),  # GQA 8, kv not a multiple of BLOCK_N, padding + unused slots
    (2, 4, 2, 3, 45, 512, "additive", (16, 16, 2, 4, 1)),  # GQA 2, D 512 split in two output halves
    (3, 16, 2, 4, 29, 512, "bool_batch_broadcast", (32, 16, 1, 4, 1)),  # GQA 8, D 512 in one program
    (2, 4, 4, 6, 33, 64, "row_broadcast", SMALL),  # no GQA, one mask row for every query (stride 0)
    (2, 4, 2, 7, 70, 128, "bool", None),  # the tuned table's config
    (1, 2, 1, 1, 20, 32, "none", SMALL),  # a single query
    (2, 6, 2, 7, 41, 64, "bool", SMALL),  # GQA 3: blocks of packed rows start mid-group
    (1, 32, 1, 3, 25, 32, "bool", SMALL),  # GQA 32: one block holds fewer rows than a query's heads
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, q_heads, kv_heads, q_len, kv_len, head_dim, mask_kind, config", KERNEL_CASES)
def test_kernel_matches_reference(batch, q_heads, kv_heads, q_len, kv_len, head_dim, mask_kind, config, dtype):
    generator = torch.Generator().manual_seed(kv_len * 31 + head_dim)
    q, k, v = make_qkv(batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype, generator)
    mask = None
    if mask_kind == "bool":
        mask = padding_mask(batch, q_len, kv_len, generator)
    elif mask_kind == "bool_batch_broadcast":
        mask = padding_mask(1, q_len, kv_len, generator, left=(3,))
    elif mask_kind == "row_broadcast":
        mask = padding_mask(batch, 1, kv_len, generator).expand(batch, 1, q_len, kv_len)
        assert mask.stride(2) == 0
    elif mask_kind == "additive":
        bias = torch.randn(batch, 1, q_len, kv_len, generator=generator).to(dtype)
        holes = padding_mask(batch, q_len, kv_len, generator)
        mask = bias.masked_fill(~holes, torch.finfo(dtype).min)  # transformers' eager convention
        mask[0, 0, 1, 20:] = -math.inf  # -inf counts as masked too
    if mask is not None:
        mask = mask.to(DEVICE)
    got = run_poisoned(q, k, v, mask, scaling=0.7, config=config)
    want = reference(q, k, v, mask, scaling=0.7)
    assert rel_err(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, config", [(256, SMALL), (512, (16, 16, 1, 4, 1)), (512, (16, 16, 2, 4, 1))])
def test_k_is_v(head_dim, config, dtype):
    """Passing the same tensor as k and v (K doubles as V) gives the attention with V = K."""
    generator = torch.Generator().manual_seed(head_dim)
    q, k, _ = make_qkv(2, 4, 2, 5, 23, head_dim, dtype, generator)
    mask = padding_mask(2, 5, 23, generator).to(DEVICE)
    got = run_poisoned(q, k, k, mask, config=config)
    assert rel_err(got, reference(q, k, k, mask)) < TOLERANCE[dtype]
    # Same numbers as with a separate copy of K as V (the path that loads V).
    separate = flash_attention(q, k, k.clone(), mask, config=config)
    assert torch.allclose(got.float(), separate.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_offset, window, with_mask", [
    (34, 9, False),  # query block at the end of the keys (lower-right), sliding window
    (0, None, True),  # upper-left causal: keys past the queries are never seen; plus padding
    (20, 6, True),  # a window and padding together
    (-2, None, False),  # the first queries see no key at all: zeros
])
def test_causal_sliding_window_with_query_offset(q_offset, window, with_mask, dtype):
    generator = torch.Generator().manual_seed(q_offset + 100)
    q, k, v = make_qkv(2, 4, 2, 6, 40, 256, dtype, generator)
    mask = padding_mask(2, 6, 40, generator, unused=0).to(DEVICE) if with_mask else None
    got = run_poisoned(q, k, v, mask, causal=True, q_offset=q_offset, sliding_window=window, config=SMALL)
    want = reference(q, k, v, mask, causal=True, q_offset=q_offset, window=window)
    assert rel_err(got, want) < TOLERANCE[dtype]
    if q_offset < 0:
        assert (got[:, :, : -q_offset] == 0).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_fully_masked_rows_are_zero(mask_dtype):
    """A query row with no allowed key (a padded query, a row of a fully padded batch element) gives zeros,
    never NaN, like PyTorch's SDPA; the other rows are unaffected."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(2, 4, 2, 5, 30, 64, torch.float32, generator)
    allowed = padding_mask(2, 5, 30, generator)
    allowed[0, :, 2] = False  # one query row of batch 0
    allowed[1] = False  # all of batch 1
    if mask_dtype == torch.bool:
        mask = allowed
    else:
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        mask[0, :, 2] = -math.inf
    mask = mask.to(DEVICE)
    got = run_poisoned(q, k, v, mask, config=SMALL)
    assert (got[0, :, 2] == 0).all() and (got[1] == 0).all()
    assert rel_err(got, reference(q, k, v, mask)) < 1e-5
    if mask_dtype == torch.bool:  # SDPA agrees (with finite "min" entries it would average V instead)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert torch.allclose(got, sdpa, atol=1e-5)


def test_mask_scan_skips_work_without_changing_results():
    """The per-program scan of the mask (left padding, unused static-cache slots) only narrows the key loop."""
    generator = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(2, 8, 2, 4, 90, 64, torch.float32, generator)
    mask = padding_mask(2, 4, 90, generator, left=(17, 40), unused=30).to(DEVICE)
    scanned = run_poisoned(q, k, v, mask, config=SMALL)
    full = flash_attention(q, k, v, mask, config=SMALL, bound_by_mask=False)
    assert torch.equal(scanned, full)
    assert rel_err(scanned, reference(q, k, v, mask)) < 1e-5


# (q heads, kv heads, q_len, kv_len, head_dim, config, mask kind, causal q_offset / window or None)
SPLIT_CASES = [
    (8, 1, 5, 77, 256, SMALL, "bool", None),  # GQA 8, padding and unused slots split over programs
    (4, 2, 3, 45, 512, (16, 16, 2, 4, 1), "additive", None),  # D 512 over two output-column programs
    (4, 2, 6, 60, 64, SMALL, "none", (40, 15)),  # causal sliding window: each program's own key range
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_splits", [2, 3, 16])  # 16: more splits than key blocks, some get none
@pytest.mark.parametrize("q_heads, kv_heads, q_len, kv_len, head_dim, config, mask_kind, causal", SPLIT_CASES)
def test_split_keys_match_reference(q_heads, kv_heads, q_len, kv_len, head_dim, config, mask_kind, causal,
                                    kv_splits, dtype):
    """Programs splitting the keys and the merge kernel give the attention over all keys; a row with no allowed
    key in any split is zeros."""
    generator = torch.Generator().manual_seed(kv_len * 7 + kv_splits)
    q, k, v = make_qkv(2, q_heads, kv_heads, q_len, kv_len, head_dim, dtype, generator)
    mask, kwargs, ref_kwargs = None, {}, {}
    if mask_kind != "none":
        holes = padding_mask(2, q_len, kv_len, generator, left=(0, 30), unused=9)
        holes[1, :, 1] = False  # a query row that sees nothing
        mask = holes
        if mask_kind == "additive":
            bias = torch.randn(holes.shape, generator=generator).to(dtype)
            mask = bias.masked_fill(~holes, torch.finfo(dtype).min)
        mask = mask.to(DEVICE)
    if causal is not None:
        kwargs = dict(causal=True, q_offset=causal[0], sliding_window=causal[1])
        ref_kwargs = dict(causal=True, q_offset=causal[0], window=causal[1])
    got = run_poisoned(q, k, v, mask, scaling=0.7, config=config, kv_splits=kv_splits, **kwargs)
    assert rel_err(got, reference(q, k, v, mask, scaling=0.7, **ref_kwargs)) < TOLERANCE[dtype]
    if mask is not None:
        assert (got[1, :, 1] == 0).all()
    whole = flash_attention(q, k, v, mask, scaling=0.7, config=config, kv_splits=1, **kwargs)
    assert rel_err(got, whole.double().cpu()) < TOLERANCE[dtype]


class _KernelSpy:
    """Records the KEY_MASK specialisation of each `_attention_kernel` launch."""

    def __init__(self, kernel_fn):
        self.kernel_fn, self.key_mask = kernel_fn, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.key_mask.append(kwargs["KEY_MASK"])
            return self.kernel_fn[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("kv_splits", [1, 3])
def test_query_broadcast_mask_reads_one_row(mask_dtype, kv_splits, monkeypatch):
    """A mask expanded over the queries (stride 0) takes the one-row path: the same numbers, bit for bit, as the
    same mask made contiguous (the [rows, keys] tile path), and the reference."""
    spy = _KernelSpy(kernel._attention_kernel)
    monkeypatch.setattr(kernel, "_attention_kernel", spy)
    generator = torch.Generator().manual_seed(11 + kv_splits)
    q, k, v = make_qkv(2, 8, 2, 7, 83, 64, torch.float32, generator)
    keep = padding_mask(2, 1, 83, generator, left=(0, 13), unused=6)
    keep[1] = False if kv_splits == 3 else keep[1]  # a batch row with no key at all: zeros
    mask = keep if mask_dtype == torch.bool else torch.randn(keep.shape, generator=generator).masked_fill(
        ~keep, torch.finfo(torch.float32).min)
    mask = mask.to(DEVICE).expand(2, 1, 7, 83)
    assert mask.stride(2) == 0
    got = run_poisoned(q, k, v, mask, config=SMALL, kv_splits=kv_splits)
    assert torch.equal(got, flash_attention(q, k, v, mask.contiguous(), config=SMALL, kv_splits=kv_splits))
    assert spy.key_mask == [True, False]  # one row, then the tiles
    assert rel_err(got, reference(q, k, v, mask)) < 1e-5


def test_auto_kv_splits_fill_idle_sms_only():
    # Batch 1, sliding layer: 256 queries x 2 heads / 128 rows = 4 row blocks x 8 kv heads = 32 programs.
    assert kernel.auto_kv_splits(32, 1280, 132) == 4
    assert kernel.auto_kv_splits(64, 1280, 132) == 2
    assert kernel.auto_kv_splits(256, 131072, 132) == 1  # batch 4: the grid fills the GPU already
    assert kernel.auto_kv_splits(4, 600, 132) == 2  # at least 256 keys a split
    assert kernel.auto_kv_splits(1, 1 << 20, 132) == 16  # at most 16
    assert kernel.auto_kv_splits(64, 1280, 0) == 1  # off CUDA


def test_kernel_bad_inputs_raise_clear_errors():
    generator = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(1, 4, 2, 3, 8, 64, torch.float32, generator)
    with pytest.raises(ValueError, match="unsupported head_dim 80"):
        flash_attention(*make_qkv(1, 4, 2, 3, 8, 80, torch.float32, generator))
    with pytest.raises(ValueError, match="unsupported head_dim 1024"):
        flash_attention(*make_qkv(1, 2, 1, 2, 4, 1024, torch.float16, generator))
    with pytest.raises(TypeError, match="q has unsupported dtype torch.float64"):
        flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of kv heads \(3\)"):
        flash_attention(q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3])
    with pytest.raises(ValueError, match="v must have k's shape"):
        flash_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="k must have unit stride in its last"):
        flash_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v)
    with pytest.raises(ValueError, match=r"mask must have shape \[1 or 1, 1, 3 or 1, 8\]"):
        flash_attention(q, k, v, torch.ones(1, 2, 3, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="mask must be bool or a float dtype"):
        flash_attention(q, k, v, torch.ones(1, 1, 3, 8, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="sliding_window needs causal=True"):
        flash_attention(q, k, v, sliding_window=4)
    with pytest.raises(ValueError, match="out must have q's shape"):
        flash_attention(q, k, v, out=torch.empty(1, 4, 2, 64, device=DEVICE))
    with pytest.raises(ValueError, match="config DV_SPLIT"):
        flash_attention(q, k, v, config=(16, 16, 8, 4, 1))
    for bad in (0, 17, True, 2.0):
        with pytest.raises(ValueError, match="kv_splits must be None or an int from 1 to 16"):
            flash_attention(q, k, v, kv_splits=bad)


# -- the backends inside transformers ------------------------------------------------------------------

PROMPTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "Why is the sky blue?",
    "The river runs past the old mill",
]


def test_registered_with_transformers():
    for name in (AUTO, TRITON):
        assert name in ALL_ATTENTION_FUNCTIONS.valid_keys()
        # Without a mask function under the same name transformers would build no padding masks.
        assert name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    assert backend.SUPPORTED_HEAD_DIMS == kernel.SUPPORTED_HEAD_DIMS
    assert backend.SUPPORTED_DTYPES == kernel.SUPPORTED_DTYPES


def _prefill_and_steps(model, config, input_ids, attention_mask, canvases):
    """Encoder prefill + first decoder pass on a padded batch, then a decoder step over the cache (on DEVICE)."""
    model = model.to(DEVICE)
    input_ids, attention_mask = input_ids.to(DEVICE), attention_mask.to(DEVICE)
    canvases = [c.to(DEVICE) for c in canvases]
    decoder_attention_mask = F.pad(attention_mask, (0, config.canvas_length), value=1)
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    prefill = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                    decoder_input_ids=canvases[0], decoder_attention_mask=decoder_attention_mask)
    step = model(past_key_values=cache, decoder_input_ids=canvases[1], decoder_attention_mask=decoder_attention_mask)
    return {"prefill logits": prefill.logits, "encoder hidden": prefill.encoder_last_hidden_state,
            "step logits": step.logits}


def _inputs(config, tokenizer, batch=3):
    input_ids, attention_mask = left_padded_batch(tokenizer, PROMPTS[:batch])
    assert not attention_mask.all() and input_ids.shape[1] > config.text_config.sliding_window
    generator = torch.Generator().manual_seed(7)
    vocab = config.text_config.vocab_size
    canvases = [torch.randint(vocab, (batch, config.canvas_length), generator=generator) for _ in range(2)]
    return input_ids, attention_mask, canvases


def _with_attention(model, name, dtype=None):
    fast = copy.deepcopy(model)
    if dtype is not None:
        fast = fast.to(dtype)
    fast.set_attn_implementation(name)
    assert fast.config.text_config._attn_implementation == name
    return fast


@pytest.mark.parametrize("variant", ["default", "mha_no_k_eq_v", "global_only"])
@pytest.mark.parametrize("name", [AUTO, TRITON])
def test_model_logits_match_upstream_fp32(variant, name, tokenizer):
    """fp32: "dgemma_attention" on the CPU (transformers' sdpa function) and the interpreted Triton kernel (IEEE
    fp32 dots) both reproduce upstream's sdpa logits on a left-padded batch."""
    config = variant_config(variant)
    ours, upstream = build_pair(config, tokenizer, seed=2)
    input_ids, attention_mask, canvases = _inputs(config, tokenizer)
    with torch.no_grad():
        want = _prefill_and_steps(upstream, config, input_ids, attention_mask, canvases)
        got = _prefill_and_steps(_with_attention(ours, name), config, input_ids, attention_mask, canvases)
    for key in want:
        assert torch.isfinite(got[key]).all(), key
        assert (got[key] - want[key]).abs().max().item() <= FP32_TOLERANCE, key


@pytest.mark.parametrize("name", [AUTO, TRITON])
def test_model_logits_match_upstream_without_masks(name, tokenizer):
    """One short unpadded prompt: transformers skips the masks (None), so the encoder relies on `is_causal`
    and the decoder on full attention."""
    config = variant_config("default")
    ours, upstream = build_pair(config, tokenizer, seed=4)
    input_ids, attention_mask = left_padded_batch(tokenizer, PROMPTS[1:2])
    assert attention_mask.all() and input_ids.shape[1] < config.text_config.sliding_window
    generator = torch.Generator().manual_seed(8)
    canvases = [torch.randint(config.text_config.vocab_size, (1, config.canvas_length), generator=generator)
                for _ in range(2)]
    with torch.no_grad():
        want = _prefill_and_steps(upstream, config, input_ids, attention_mask, canvases)
        got = _prefill_and_steps(_with_attention(ours, name), config, input_ids, attention_mask, canvases)
    for key in want:
        assert (got[key] - want[key]).abs().max().item() <= FP32_TOLERANCE, key


def test_model_logits_fp16_through_the_kernel(tokenizer):
    """fp16 model through the interpreted kernel: as close to fp32 math as upstream's own fp16 sdpa model
    (whole-model fp16 rounding and MoE routing flips dominate both), and close to it."""
    config = variant_config("default")
    ours, upstream = build_pair(config, tokenizer, seed=3)
    input_ids, attention_mask, canvases = _inputs(config, tokenizer)
    with torch.no_grad():
        exact = _prefill_and_steps(upstream, config, input_ids, attention_mask, canvases)
        upstream16 = _prefill_and_steps(upstream.to(torch.float16), config, input_ids, attention_mask, canvases)
        fast = _with_attention(ours, TRITON, torch.float16)
        assert fast.dtype == torch.float16
        got = _prefill_and_steps(fast, config, input_ids, attention_mask, canvases)
    for key in exact:
        assert torch.isfinite(got[key]).all(), key
        ours_err = (got[key].float() - exact[key]).abs().max().item()
        upstream_err = (upstream16[key].float() - exact[key]).abs().max().item()
        assert ours_err <= 1.25 * upstream_err + 5e-3, key
        if DEVICE == "cpu":  # on a GPU both fp16 models drift far from fp32 (routing flips), so only the bound above
            assert (got[key].float() - upstream16[key].float()).abs().max().item() < 0.1 * exact[key].abs().max(), key


@pytest.mark.parametrize("name", [AUTO, TRITON])
def test_generate_matches_upstream(name, tokenizer):
    """generate() (our engine: its own masks and cache) with our attention gives upstream's sequences."""
    config = variant_config("default")
    ours, upstream = build_pair(config, tokenizer, seed=11)
    input_ids, attention_mask = (t.to(DEVICE) for t in left_padded_batch(tokenizer, PROMPTS))
    fast = _with_attention(ours, name).to(DEVICE)
    outputs = []
    for model, extra in ((upstream.to(DEVICE), {}), (fast, {"sampling": "reference"})):
        torch.manual_seed(99)
        outputs.append(model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=2 * config.canvas_length,
                                      max_denoising_steps=3, eos_token_id=None, **extra))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert torch.equal(outputs[0].tokens_per_forward, outputs[1].tokens_per_forward)


def test_backend_function_contract():
    """fn(module, q, k, v, mask, ...) -> ([B, Lq, Hq, D], None), as transformers' sdpa path; causal only
    without a mask, upper-left aligned; softcap refused."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(2, 4, 2, 5, 9, 32, torch.float32, generator)
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 2  # as on transformers' attention modules (its sdpa function reads it)
    for fn in (ALL_ATTENTION_FUNCTIONS[AUTO], ALL_ATTENTION_FUNCTIONS[TRITON]):
        out, weights = fn(module, q, k, v, None, scaling=1.0)
        assert weights is None and out.shape == (2, 5, 4, 32) and out.is_contiguous()
        want = reference(q, k, v, scaling=1.0, causal=True)  # no mask + is_causal: keys j <= i
        assert rel_err(out.transpose(1, 2), want) < 1e-5
        mask = padding_mask(2, 5, 9, generator, unused=1).to(DEVICE)
        out, _ = fn(module, q, k, v, mask, scaling=1.0, is_causal=True)  # a mask wins over is_causal
        assert rel_err(out.transpose(1, 2), reference(q, k, v, mask, scaling=1.0)) < 1e-5
        with pytest.raises(ValueError, match="softcap"):
            fn(module, q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match="inference-only"):
        ALL_ATTENTION_FUNCTIONS[TRITON](module, q.requires_grad_(), k, v, None)


def test_unsupported_head_dim_or_dtype_refused_when_set(tokenizer):
    """The check runs when the implementation is set (model init, set_attn_implementation), not mid-generate."""
    model_class = DiffusionGemmaForMaskedGeneration
    assert issubclass(model_class, AttentionChecks)
    config = tiny_config(global_head_dim=48)  # layer 2 (global) gets a head dim the kernel does not take
    assert config.text_config.per_layer_config[2].head_dim == 48
    config._attn_implementation = AUTO
    with pytest.raises(ValueError, match=r"head_dim 48 \(config.text_config, layer 2, full_attention\)"):
        model_class(config)
    config._attn_implementation = "sdpa"
    model = model_class(config)  # fine with sdpa
    with pytest.raises(ValueError, match="does not support head_dim 48"):
        model.set_attn_implementation(AUTO)
    with pytest.raises(ValueError, match="does not support head_dim 48"):
        model.set_attn_implementation({"text_config": TRITON})
    assert model.config.text_config._attn_implementation == "sdpa"  # refused before anything changed
    model.set_attn_implementation({"vision_config": AUTO})  # the vision tower's head dim (16) is fine

    ok = variant_config("default")
    ok._attn_implementation = AUTO
    assert model_class(ok).config.text_config._attn_implementation == AUTO
    with pytest.raises(ValueError, match="does not support dtype torch.float64"):
        check_attention_config(ok, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not support dtype torch.float64"):
        model_class(ok).to(torch.float64).set_attn_implementation(TRITON)


def test_text_layers_default_to_the_kernel_where_cuda_exists(monkeypatch, tmp_path):
    """Built without an attention request: on a machine with CUDA the text layers take "dgemma_attention" (the
    vision tower keeps sdpa); without CUDA, or for a head dim the kernel lacks, or when the caller names one,
    transformers' choice stands. Only construction here: no kernel runs."""
    model_class = DiffusionGemmaForMaskedGeneration
    make_tiny_checkpoint(tmp_path / "tiny")
    plain = model_class.from_pretrained(tmp_path / "tiny")
    assert plain.config.text_config._attn_implementation == ("dgemma_attention" if torch.cuda.is_available()
                                                             else "sdpa")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = model_class.from_pretrained(tmp_path / "tiny")
    assert model.config.text_config._attn_implementation == AUTO
    assert model.config.vision_config._attn_implementation == "sdpa"
    layer = model.model.decoder.layers[0].self_attn
    assert layer.config._attn_implementation == AUTO
    for asked in ("sdpa", "eager", {"text_config": "eager"}):
        kept = model_class.from_pretrained(tmp_path / "tiny", attn_implementation=asked)
        assert kept.config.text_config._attn_implementation == (asked if isinstance(asked, str) else "eager")
    config = variant_config("default")
    assert model_class(config).config.text_config._attn_implementation == AUTO  # the constructor too
    unsupported = tiny_config(global_head_dim=48)
    assert model_class(unsupported).config.text_config._attn_implementation == "sdpa"
    float64 = model_class.from_pretrained(tmp_path / "tiny", dtype=torch.float64)  # a dtype the kernel lacks
    assert float64.config.text_config._attn_implementation == "sdpa"


def test_from_pretrained_refuses_unsupported_head_dim_at_load(tmp_path):
    model_class = DiffusionGemmaForMaskedGeneration
    assert issubclass(model_class, AttentionChecks)
    make_tiny_checkpoint(tmp_path / "bad", global_head_dim=24)
    with pytest.raises(ValueError, match=r"does not support head_dim 24 .*Use 'sdpa' for text_config"):
        model_class.from_pretrained(tmp_path / "bad", attn_implementation=AUTO)
    make_tiny_checkpoint(tmp_path / "good")
    with pytest.raises(ValueError, match="does not support dtype torch.float64"):
        model_class.from_pretrained(tmp_path / "good", attn_implementation=AUTO, dtype=torch.float64)
    model = model_class.from_pretrained(tmp_path / "good", attn_implementation=AUTO, dtype=torch.float16)
    assert model.dtype == torch.float16 and model.config.text_config._attn_implementation == AUTO


def test_eval_script_parses_arguments_on_cpu():
    result = subprocess.run([sys.executable, "-m", "eval.attention", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "--kv" in result.stdout and "--sweep" in result.stdout
    from eval.attention import parse_args

    args = parse_args(["--kv", "4096,32768", "--batch", "1", "--shapes", "global"])
    assert args.kv == [4096, 32768] and args.batch == [1] and args.shapes == ["global"]
    assert args.kv_splits == [None]
    assert parse_args(["--kv-splits", "auto,1,4"]).kv_splits == [None, 1, 4]
    with pytest.raises(SystemExit):
        parse_args(["--kv-splits", "17"])
    with pytest.raises(SystemExit):
        parse_args(["--shapes", "local"])
    with pytest.raises(SystemExit):
        parse_args(["--kv", "0"])


# -- GPU only -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("one_row", [False, True])  # True: the decoder's mask as the engine passes it
@pytest.mark.parametrize("batch", [1, 2])  # batch 1 splits the keys (fewer programs than SMs)
# 4352: 16-aligned mask rows, where Triton pipelines the mask tile's loads (Triton 3.6 once failed to compile it)
@pytest.mark.parametrize("kv_len", [4345, 4352])
@pytest.mark.parametrize("q_heads, kv_heads, head_dim", [(16, 2, 512), (16, 8, 256)])
def test_gpu_real_shapes_bf16_and_cuda_graph(q_heads, kv_heads, head_dim, kv_len, batch, one_row):
    """bf16 at DiffusionGemma's shapes (canvas 256 over a cached prefix, padding), and capture in a CUDA graph."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(batch, q_heads, kv_heads, 256, kv_len, head_dim, torch.bfloat16, generator)
    q = q / head_dim**0.25
    mask = padding_mask(batch, 1 if one_row else 256, kv_len, generator, left=(0, 300), unused=96).cuda()
    mask = mask.contiguous().expand(batch, 1, 256, kv_len) if one_row else mask
    want = reference(q, k, v, mask, scaling=1.0)
    got = run_poisoned(q, k, v, mask, scaling=1.0)
    assert rel_err(got, want) < TOLERANCE[torch.bfloat16]
    module = torch.nn.Module()
    module.is_causal = False
    fn = ALL_ATTENTION_FUNCTIONS[AUTO]
    fn(module, q, k, v, mask, scaling=1.0)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = fn(module, q, k, v, mask, scaling=1.0)
    q.copy_(torch.randn(q.shape, generator=generator).to(q) / head_dim**0.25)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(captured.transpose(1, 2), reference(q, k, v, mask, scaling=1.0)) < TOLERANCE[torch.bfloat16]
