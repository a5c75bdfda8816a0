"""Attention implementations registered in transformers' AttentionInterface (and AttentionMaskInterface).

- "dgemma_attention": on CUDA in bf16/fp16 inference, the Triton flash-attention kernel
  (`dgemma_hf.kernels.attention`: head dims up to 512, grouped-query attention without repeated kv heads,
  no host sync, so it can be captured in a CUDA graph); elsewhere (CPU, float32, training) transformers' own
  "sdpa" function, so results there are sdpa's to the bit. The text layers' default when the model is built on
  a machine with CUDA and no implementation is asked for (`use_default_attention`; at batch 1 and 8 it made
  generate 5% and 9% faster than "sdpa" on an H200).
- "dgemma_attention_triton": always the Triton kernel (float32 as exact IEEE dots); inference only. On a
  machine without a GPU it runs under TRITON_INTERPRET=1, which is how the tests reach it.

Choose with `from_pretrained(..., attn_implementation="dgemma_attention")` or
`model.set_attn_implementation("dgemma_attention")` (or "sdpa", to leave it). Both names also carry a mask
function (transformers builds no mask at all for an implementation missing from AttentionMaskInterface, and
padding would be silently ignored): transformers' SDPA masks (boolean [B, 1, Lq, Lk], or None where `is_causal`
or full attention suffices), except that no mask shortcut reads the padding mask on the host during CUDA-graph
capture.

Like "sdpa", the functions follow the mask they are given: the `sliding_window` argument is not applied on
top (transformers puts the window into the mask; DiffusionGemma's decoder passes the window of sliding layers
whose whole cache it attends to).

`check_attention_config` refuses layers whose head dim, or a dtype, the kernel cannot run; the
`AttentionChecks` mixin (first base of the model class) calls it when the implementation is set, at model init
(constructor and from_pretrained) and in `set_attn_implementation`, so a model never fails mid-generate.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.utils import logging

logger = logging.get_logger(__name__)

AUTO = "dgemma_attention"
TRITON = "dgemma_attention_triton"
NAMES = (AUTO, TRITON)

# Kept in step with dgemma_hf.kernels.attention (not imported here: that module imports triton).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256, 512)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_AUTO_KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # float32 on CUDA keeps SDPA's exact math


def _reject_unsupported(kwargs) -> None:
    if kwargs.get("softcap") is not None:
        raise ValueError("dgemma attention does not support `softcap` (attention logit soft-capping); use 'eager'")
    if kwargs.get("s_aux") is not None:
        raise ValueError("dgemma attention does not support attention sinks (`s_aux`); use 'eager'")
    if kwargs.get("output_attentions", False):
        logger.warning_once("dgemma attention does not return attention weights (`output_attentions=True`); "
                            "use attn_implementation='eager' for them.")


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _resolve_causal(module, query, attention_mask, is_causal) -> bool:
    # As transformers' sdpa path: causal only without a mask and for more than one query; upper-left
    # aligned (query i sees keys j <= i), which is what a skipped causal mask stands for.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(query.shape[2] > 1 and attention_mask is None and is_causal)


def triton_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             sliding_window=None, is_causal=None, **kwargs):
    """The Triton kernel; inference only. Writes [B, Lq, Hq, D] directly (no transpose copy)."""
    from .kernels.attention import flash_attention  # imports triton; only where the kernel runs

    _reject_unsupported(kwargs)
    if dropout:
        raise ValueError(f"attn_implementation={TRITON!r} is inference-only: dropout must be 0, got {dropout}")
    if _needs_grad(query, key, value):
        raise ValueError(f"attn_implementation={TRITON!r} is inference-only (no backward): run under "
                         f"torch.no_grad() or use {AUTO!r}, which falls back to SDPA when gradients are needed")
    causal = _resolve_causal(module, query, attention_mask, is_causal)
    batch, heads, q_len, head_dim = query.shape
    out = torch.empty(batch, q_len, heads, head_dim, dtype=query.dtype, device=query.device)
    flash_attention(query, key, value, attention_mask, scaling=scaling, causal=causal, out=out.transpose(1, 2))
    return out, None


def kernel_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Where "dgemma_attention" runs the Triton kernel: CUDA, bf16/fp16, inference."""
    return (query.is_cuda and query.dtype in _AUTO_KERNEL_DTYPES and not dropout
            and not _needs_grad(query, key, value))


def auto_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           sliding_window=None, is_causal=None, **kwargs):
    if kernel_applies(query, key, value, dropout):
        return triton_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, sliding_window=sliding_window, is_causal=is_causal, **kwargs)
    _reject_unsupported(kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_default_attention(model) -> None:
    """The text layers of a model built without an attention request run "dgemma_attention" where CUDA exists
    and the kernel supports every text layer (else they keep transformers' default, "sdpa"); the vision tower
    keeps its own."""
    if not torch.cuda.is_available():
        return
    try:
        check_attention_config(model.config, {"text_config": AUTO}, dtype=model.dtype)
    except ValueError:
        return
    model.set_attn_implementation({"text_config": AUTO})


def attention_mask_function(*args, allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False,
                            **kwargs):
    """transformers' SDPA mask (boolean [B, 1, Lq, Lk] or None). Its shortcuts to None read the padding mask
    on the host, which a CUDA graph capture forbids: while capturing, the mask is always built."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        allow_is_causal_skip = allow_is_bidirectional_skip = False
    return sdpa_mask(*args, allow_is_causal_skip=allow_is_causal_skip,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)


def _configs_with_implementation(config, requested, path: str = "config"):
    """(path, config, attention implementation) for `config` and its sub-configs, after applying `requested`
    the way transformers does: None keeps the current values, a str applies to the whole tree, a dict maps
    sub-config names (and "" for the config itself) to a str or a nested dict."""
    if isinstance(requested, dict):
        own = requested.get("", config._attn_implementation)
    else:
        own = config._attn_implementation if requested is None else requested
    yield path, config, own
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            sub_requested = requested.get(key) if isinstance(requested, dict) else requested
            yield from _configs_with_implementation(sub, sub_requested, f"{path}.{key}")


def _attention_layers(config):
    """(layer index, layer type, head_dim, q heads, kv heads) of each attention layer of `config`."""
    q_heads = getattr(config, "num_attention_heads", None)
    if not q_heads:
        return []
    layer_types = getattr(config, "layer_types", None)
    layers = []
    for i in range(getattr(config, "num_hidden_layers", 1)):
        layer = config.per_layer_config[i]
        head_dim = getattr(layer, "head_dim", None) or config.hidden_size // q_heads
        kv_heads = getattr(layer, "num_key_value_heads", None) or q_heads
        layers.append((i, layer_types[i] if layer_types else "attention", head_dim, q_heads, kv_heads))
    return layers


def check_attention_config(config, requested=None, dtype: torch.dtype | None = None) -> None:
    """Raises a ValueError, before any forward, if a (sub-)config set to a dgemma attention implementation has
    a layer the kernel cannot run (head dim, heads not a multiple of kv heads) or `dtype` is unsupported.

    `requested` is what is being set (None: the config's current values; a str or per-sub-config dict as
    `set_attn_implementation` takes); `dtype` the model's parameter dtype, if known.
    """
    for path, sub_config, implementation in _configs_with_implementation(config, requested):
        if implementation not in NAMES:
            continue
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"attn_implementation={implementation!r} does not support dtype {dtype} ({path}); "
                             f"supported: torch.bfloat16, torch.float16, torch.float32")
        seen = set()
        for index, layer_type, head_dim, q_heads, kv_heads in _attention_layers(sub_config):
            if (layer_type, head_dim, q_heads, kv_heads) in seen:
                continue
            seen.add((layer_type, head_dim, q_heads, kv_heads))
            if head_dim not in SUPPORTED_HEAD_DIMS:
                key = path.rpartition(".")[2]
                hint = "attn_implementation='sdpa'" if path == "config" else (
                    f"'sdpa' for {key}: attn_implementation={{'': {implementation!r}, {key!r}: 'sdpa'}}")
                raise ValueError(
                    f"attn_implementation={implementation!r} does not support head_dim {head_dim} ({path}, layer "
                    f"{index}, {layer_type}); supported head dims: {SUPPORTED_HEAD_DIMS}. Use {hint}")
            if q_heads % kv_heads:
                raise ValueError(f"attn_implementation={implementation!r}: {path} layer {index} has {q_heads} query "
                                 f"heads, not a multiple of its {kv_heads} kv heads")


def register_attention() -> None:
    AttentionInterface.register(AUTO, auto_attention_forward)
    AttentionInterface.register(TRITON, triton_attention_forward)
    for name in NAMES:
        AttentionMaskInterface.register(name, attention_mask_function)


class AttentionChecks:
    """Mixin for a PreTrainedModel class (put it first among the bases): runs `check_attention_config` when
    the attention implementation is set, i.e. at init (from_pretrained / the constructor) and in
    `set_attn_implementation`, so an unsupported head dim or dtype is refused at load time."""

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check: bool = False,
                                              allow_all_kernels: bool = False):
        implementation = super()._check_and_adjust_attn_implementation(
            attn_implementation, is_init_check=is_init_check, allow_all_kernels=allow_all_kernels)
        if is_init_check:
            # At init the config tree already holds the request (the config setter spreads it to the
            # sub-configs) and the weights do not exist yet: their dtype is the default one from_pretrained sets.
            check_attention_config(self.config, {"": implementation}, dtype=torch.get_default_dtype())
        return implementation

    def set_attn_implementation(self, attn_implementation, allow_all_kernels: bool = False):
        # Checked before anything changes; transformers checks only the top-level name of a dict request.
        check_attention_config(self.config, attn_implementation, dtype=self.dtype)
        return super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)
