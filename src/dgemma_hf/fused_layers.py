"""The text layers as three fused regions around attention and the experts.

Upstream's text layer launches ~160 small kernels per pass (eleven fp32 RMSNorms of ~9 kernels each, rotary
embeddings, routing softmax/top-k, residuals); at batch 1 they cost more than the expert GEMMs. The layer's
forward here computes upstream's arithmetic op for op, cut into three pure functions of tensors:

1. `attention_inputs`: input norm, q/k/v projections (one GEMM once `pack_projections` has stored their weights
   as one tensor), q/k/v norms, rotary embeddings;
2. `feed_forward`: o_proj, post-attention norm and residual, dense MLP (its gate/up one GEMM once packed), router
   scores, experts' input norm;
   then `router_top_k` (on CUDA one Triton launch) picks the experts;
3. `layer_output`: the MLP's and the experts' output norms, their sum, the last norm, residual, layer scalar.

Attention (with the cache read, through `DecoderAttention`, which fixes upstream's read of a full sliding-window
StaticCache) and the experts stay outside, on their backends. A layer split over ranks by dgemma_hf.distributed
(its plan: heads split, MLP colwise/rowwise) runs the same regions on its local shards, with the all-reduce
after o_proj inside `feed_forward` and the one summing the MLP's down_proj with the experts' partial outputs
(experts split over the same ranks) inside `layer_output` (functional collectives, so they are compiled and
captured with the rest). On CUDA each region is compiled once by
torch.compile (inductor fuses the elementwise chains); the regions touch no layer index, so
every layer of one attention type shares one compiled graph, and each (batch, dtype, attention type, split)
gets its own (up to `_RECOMPILE_LIMIT` per region; past it a region runs eagerly, still correct, slower).
Elsewhere the regions run eagerly
(tests check them bit for bit against upstream's layers). The encoder's layers use them for the canvas commits
only (`FusedEncoderLayer`). Training, gradients, and layers the regions do not
cover take upstream's forward: biases, wrapped or quantized projections (LoRA, bitsandbytes), hooks on
submodules, accelerate offloading, transformers recording router logits or attention weights.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from transformers.cache_utils import StaticSlidingWindowLayer
from transformers.models.diffusion_gemma import modeling_diffusion_gemma as upstream
from transformers.utils.output_capturing import _active_collector

_COMPILED: dict = {}
_RECOMPILE_LIMIT = 64


def rms_norm(x, weight, eps):
    """Upstream's DiffusionGemmaRMSNorm.forward as a function of tensors (weight None: the unscaled norm)."""
    x32 = x.float()
    normed = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        normed = normed * weight.float()
    return normed.type_as(x)


def project(x, weights, sizes):
    """F.linear of x by projections of `sizes` output features each, given as one tensor each or, packed by
    `pack_projections`, as one tensor holding them all (one GEMM, split)."""
    if len(weights) == 1 and len(sizes) > 1:
        return F.linear(x, weights[0]).split(sizes, dim=-1)
    return tuple(F.linear(x, weight) for weight in weights)


def attention_inputs(hidden_states, input_norm, qkv, qkv_sizes, q_norm, k_norm, cos, sin, eps, head_dim):
    """Upstream's input norm and the first half of DiffusionGemmaDecoderTextAttention.forward; `qkv`: the q, k
    (and v, unless K doubles as V) projections, see `project`."""
    normed = rms_norm(hidden_states, input_norm, eps)
    shape = (*normed.shape[:-1], -1, head_dim)
    query, key, *value = project(normed, qkv, qkv_sizes)
    query = rms_norm(query.view(shape), q_norm, eps)
    query = upstream.apply_rotary_pos_emb(query, cos, sin, unsqueeze_dim=2).transpose(1, 2)
    key = key.view(shape)
    value = value[0].view(shape) if value else key
    key = upstream.apply_rotary_pos_emb(rms_norm(key, k_norm, eps), cos, sin, unsqueeze_dim=2).transpose(1, 2)
    value = rms_norm(value, None, eps).transpose(1, 2)
    return query, key, value


def _row_parallel(x, weight, group):
    """F.linear of a projection whose input features are split over `group` (None: one process): the local
    products are partial sums, added up by one all-reduce."""
    out = F.linear(x, weight)
    return out if group is None else funcol.all_reduce(out, "sum", group)


def feed_forward(attn_output, residual, weights, eps, scalar_root, group=None, mlp_group=None):
    """o_proj, post-attention norm and residual, the dense MLP (GELU-tanh) up to its down_proj, the experts' input
    norm and upstream's DiffusionGemmaTextRouter.forward up to its softmax (`router_top_k` does the rest).
    `group`: the ranks a tensor-parallel layer is split over; `mlp_group`: the ranks the MLP's output is summed
    over here (None with a group: this rank's partial sum is returned, for `layer_output` to sum with the
    experts'; None without one: the whole output)."""
    hidden_states = _row_parallel(attn_output.reshape(*residual.shape[:-1], -1), weights["o_proj"], group)
    residual = residual + rms_norm(hidden_states, weights["post_attention_norm"], eps)
    x = rms_norm(residual, weights["pre_feedforward_norm"], eps)
    gate, up = project(x, weights["gate_up"], weights["gate_up_sizes"])
    mlp = F.gelu(gate, approximate="tanh") * up
    mlp = _row_parallel(mlp, weights["down_proj"], mlp_group)
    flat = residual.reshape(-1, residual.shape[-1])
    experts_input = rms_norm(flat, weights["pre_feedforward_norm_2"], eps)
    scores = F.linear(rms_norm(flat, None, eps) * weights["router_scale"] * scalar_root, weights["router_proj"])
    return residual, mlp, experts_input, F.softmax(scores, dim=-1, dtype=torch.float32)


def router_top_k(probs, top_k, per_expert_scale):
    """The rest of upstream's router: top-k experts, renormalised weights times the experts' scales; on CUDA one
    Triton launch (torch.topk sorts: two kernels, most of the router's time), elsewhere upstream's ops
    (`upstream_router_top_k`)."""
    if probs.is_cuda:
        from .kernels.routing import top_k_weights  # triton only where a GPU runs it

        return top_k_weights(probs, top_k, per_expert_scale)
    return upstream_router_top_k(probs, top_k, per_expert_scale)


def upstream_router_top_k(probs, top_k, per_expert_scale):
    """Upstream's DiffusionGemmaTextRouter.forward after its softmax: (weights fp32, expert index int64)."""
    top_k_weights, top_k_index = torch.topk(probs, k=top_k, dim=-1)
    top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
    return top_k_weights * per_expert_scale[top_k_index], top_k_index


def layer_output(residual, mlp, experts_output, norms, layer_scalar, eps, group=None):
    """The MLP's and the experts' output norms, their sum, the last norm, residual and layer scalar. `group`: the
    ranks whose partial MLP and experts outputs are summed here, in one all-reduce (one collective, not two).
    `norms`: post_feedforward_layernorm_1, _2 and post_feedforward_layernorm's weights."""
    experts_output = experts_output.reshape(residual.shape)
    if group is not None:  # (every experts backend returns the activations' dtype: one stack, one payload)
        mlp, experts_output = funcol.all_reduce(torch.stack((mlp, experts_output)), "sum", group).unbind(0)
    dense = rms_norm(mlp, norms[0], eps)
    experts_output = rms_norm(experts_output, norms[1], eps)
    hidden_states = residual + rms_norm(dense + experts_output, norms[2], eps)
    hidden_states *= layer_scalar  # in place, as upstream: keeps the activations' dtype (the scalar is fp32)
    return hidden_states


def logit_softcap(logits, cap):
    """Upstream's final logit softcap, from the LM head's output to fp32 logits (compiled: one pass, not four)."""
    return torch.tanh(logits.to(torch.float32) / cap) * cap


def sliding_window_update(filled: int, new: int, window: int) -> str:
    """The branch transformers' StaticSlidingWindowLayer.update takes for `new` tokens into a layer of `window`
    columns that has seen `filled` tokens: "room" (it returns its whole buffer), "fills" (it becomes full and
    returns what it held, then the new tokens) or "full" (its last window - 1 tokens, then the new ones)."""
    if filled >= window:
        return "full"
    return "fills" if filled + new > window else "room"


def call_attention(attn, query, key, value, attention_mask, **kwargs):
    """The layer's attention implementation (transformers' AttentionInterface), called as upstream's layers call
    it."""
    attention = upstream.ALL_ATTENTION_FUNCTIONS.get_interface(
        attn.config._attn_implementation, upstream.eager_attention_forward
    )
    return attention(attn, query, key, value, attention_mask, dropout=0.0, scaling=attn.scaling,
                     sliding_window=attn.sliding_window, is_causal=attn.is_causal, **kwargs)


def full_sliding_window(cache_layer) -> bool:
    """A static sliding-window cache layer holding a whole window (its buffer: the last `window` tokens, in order)."""
    return (isinstance(cache_layer, StaticSlidingWindowLayer)
            and cache_layer.cumulative_length_int >= cache_layer.max_cache_len)


class DecoderAttention(upstream.DiffusionGemmaDecoderTextAttention):
    """Upstream's decoder attention, reading a StaticCache without copying it, and a full sliding-window layer
    correctly.

    For a static cache layer of `length` columns, upstream's `append_to_cache` returns new [batch, heads,
    length + canvas, dim] tensors: zeros, the whole cache copied in, the canvas written at the layer's
    `cumulative_length` (which the commit pass fills next). Every decoder step so copied every cache layer twice.
    Here the cache layer's buffers become views of tensors `canvas` columns longer (zeros past the cache), the
    canvas is written in place at `cumulative_length` and the longer tensors are returned: the same values, with
    no copy. Columns past the canvas are masked out, as in upstream's layout.

    A `StaticSlidingWindowLayer` stops updating `cumulative_length` once its window fills, so upstream's canvas
    would overwrite the latest prefix tokens. A full window is read as a DynamicCache presents it (its last
    window - 1 tokens, then the canvas), followed by one zero column: upstream's decoder mask for that layer has
    exactly this layout, its last column (past the canvas) masked out."""

    def append_to_cache(self, past_key_values, key_states, value_states):
        cache_layer = past_key_values.layers[self.layer_idx]
        if not full_sliding_window(cache_layer):
            # A dynamic cache, gradients (the in-place write would overwrite what backward saved) or a
            # torch.compile trace (which the buffers' swap would break): upstream's out-of-place version.
            if (not past_key_values.is_compileable or key_states.requires_grad or value_states.requires_grad
                    or torch.compiler.is_compiling()):
                return super().append_to_cache(past_key_values, key_states, value_states)
            keys, values = _padded_buffers(cache_layer, key_states.shape[-2])
            positions = torch.arange(key_states.shape[-2], device=keys.device) + cache_layer.cumulative_length
            copy_rows(keys, positions, key_states)
            copy_rows(values, positions, value_states)
            return keys, values
        pad = key_states.new_zeros(*key_states.shape[:2], 1, key_states.shape[-1])
        keys = torch.cat((cache_layer.keys[:, :, 1:], key_states, pad), dim=-2)
        values = torch.cat((cache_layer.values[:, :, 1:], value_states, pad.to(value_states.dtype)), dim=-2)
        return keys, values


def copy_rows(dst: torch.Tensor, positions: torch.Tensor, src: torch.Tensor) -> None:
    """dst.index_copy_(2, positions, src) for [batch, heads, length, head_dim] tensors, bit for bit, moving 8-byte
    words where the rows allow (`as_words`): index_copy_ moves one element per thread, so bf16 rows copied as int64
    take about a quarter of the time."""
    dst, src = as_words(dst, src)
    dst.index_copy_(2, positions, src)


def as_words(dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dst and src viewed as int64 where both have the same dtype of under 8 bytes, rows of whole words and
    word-aligned strides and offsets; else as they are."""
    words = 8 // dst.element_size()
    if (dst.dtype == src.dtype and words > 1 and dst.shape[-1] % words == 0
            and all(t.stride(-1) == 1 and t.storage_offset() % words == 0
                    and all(stride % words == 0 for stride in t.stride()[:-1]) for t in (dst, src))):
        return dst.view(torch.int64), src.view(torch.int64)
    return dst, src


def _padded_buffers(cache_layer, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The static cache layer's keys and values as views of zero-padded tensors `extra` columns longer (made on
    first use: the cache's values are copied over once), and the padded tensors."""
    padded = getattr(cache_layer, "_dgemma_padded", None)
    if padded is None or padded[0].shape[-2] != cache_layer.keys.shape[-2] + extra or any(
        buffer.data_ptr() != whole.data_ptr() for buffer, whole in zip((cache_layer.keys, cache_layer.values), padded)
    ):
        padded = []
        for name in ("keys", "values"):
            buffer = getattr(cache_layer, name)
            whole = buffer.new_zeros(*buffer.shape[:2], buffer.shape[2] + extra, buffer.shape[3])
            whole[:, :, : buffer.shape[2]] = buffer
            setattr(cache_layer, name, whole[:, :, : buffer.shape[2]])
            padded.append(whole)
        cache_layer._dgemma_padded = tuple(padded)
    return cache_layer._dgemma_padded


def compiled_region(function, device: torch.device):
    """`function` compiled by torch.compile once per process on CUDA (static shapes), itself elsewhere."""
    if device.type != "cuda":
        return function
    if function not in _COMPILED:
        compiled = torch.compile(function, dynamic=False)

        def call(*args):
            # Dynamo's default limit (8 graphs per function) would send a process that runs a few batch sizes or
            # models (a benchmark, a split model after a one-GPU one) to the eager regions for good. Raised while
            # a region runs only, so other torch.compile users keep their limit.
            config = torch._dynamo.config
            limit = config.recompile_limit
            config.recompile_limit = max(limit, _RECOMPILE_LIMIT)
            try:
                return compiled(*args)
            finally:
                config.recompile_limit = limit

        _COMPILED[function] = call
    return _COMPILED[function]


# Projections of one input, computed by one GEMM once `pack_projections` has stored their weights as consecutive
# rows of one tensor (the regions' key for each group: its projections, in order). At a 256-token canvas cuBLAS
# streams one layer's packed q/k/v weights faster than in three GEMMs of a third of the rows each.
PACKED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def _plain(weight) -> bool:
    """A dense tensor of its own (not a tensor subclass such as torchao's quantized weights, not on meta): what
    packing may view, concatenate and re-point."""
    return type(weight.data) is torch.Tensor and weight.layout == torch.strided and weight.device.type != "meta"


def packed_weight(weights) -> torch.Tensor | None:
    """The [total rows, in features] tensor whose consecutive rows are `weights` (contiguous 2D tensors), or None
    if they are not stored that way."""
    if not all(_plain(weight) for weight in weights):
        return None
    first = weights[0]
    offset = first.storage_offset()
    for weight in weights:
        if (weight.dim() != 2 or not weight.is_contiguous() or weight.dtype != first.dtype
                or weight.device != first.device or weight.shape[1] != first.shape[1]
                or weight.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or weight.storage_offset() != offset):
            return None
        offset += weight.numel()
    return first.as_strided((sum(weight.shape[0] for weight in weights), first.shape[1]), (first.shape[1], 1))


def _grouped(weights: dict) -> dict:
    """`weights` with each PACKED group's projections replaced by (their packed tensor,) where `packed_weight`
    finds one, else by the tuple of them, plus the group's output sizes ("<group>_sizes")."""
    weights = dict(weights)
    for key, names in PACKED.items():
        members = [weights.pop(name) for name in names if name in weights]
        packed = packed_weight(members)
        weights[key] = (packed,) if packed is not None else tuple(members)
        weights[f"{key}_sizes"] = tuple(member.shape[0] for member in members)
    return weights


@torch.inference_mode(False)
@torch.no_grad()
def pack_projections(model) -> bool:
    """Moves each fused text layer's q/k/v weights, and its dense MLP's gate/up weights, into one tensor per group
    (consecutive rows), so the regions compute each group with one GEMM; returns whether any weight moved. The
    parameters stay the same objects (tied ones stay tied) with the same values: only their storage changes
    (`param.data`); state dicts then hold views of one tensor, which `save_pretrained` and `torch.save` write as
    usual (safetensors' `save_file` and `save_model` refuse them). Layers the regions do not compute (see
    `_projections`), tensor-parallel ones, weights that are tensor subclasses or on meta, and groups already packed
    are left as they are; a later `.to()` or reload unpacks a group (the regions then run its GEMMs one by one)
    until the next call."""
    moved = False
    for layer in _text_layers(model):
        projections = _projections(layer) if type(layer) in _UPSTREAM else None
        if projections is None or projections["group"] is not None:
            continue
        for names in PACKED.values():
            params = [projections[name] for name in names if name in projections]
            if not all(_plain(param) for param in params) or packed_weight(params) is not None:
                continue
            packed = torch.cat([param.detach() for param in params])
            start = 0
            for param in params:
                param.data = packed[start : start + param.shape[0]]
                start += param.shape[0]
            moved = True
    return moved


def _projections(layer) -> dict | None:
    """The layer's projection weights as the regions use them, plus "group" (the ranks of a tensor-parallel layer,
    else None); None if the regions cannot compute the layer's own forward. The regions read weights and call
    F.linear themselves, so every projection must be a plain nn.Linear without bias (not a LoRA or quantized
    wrapper, no forward of its own) and no submodule may carry a hook the regions would skip (transformers'
    output recorders hook the router and the attention permanently; they only act when asked, see `_recording`).
    A layer split by dgemma_hf.distributed's plan gives its local shards: its projections' own forwards are the
    plan's colwise / rowwise ones, which the regions reproduce."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj,
               "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj,
               "router_proj": layer.router.proj}
    linears = {name: linear for name, linear in linears.items() if linear is not None}
    if any(type(linear) is not nn.Linear or linear.bias is not None for linear in linears.values()):
        return None
    if _global_forward_hooks or _global_forward_pre_hooks:
        return None
    for module in layer.modules():
        if module is layer:
            continue
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if getattr(module, "_hf_hook", None) is not None or any(
            getattr(hook, "__name__", "") != "output_capturing_hook" for hook in hooks
        ):
            return None
    group = getattr(attn, "_dgemma_tp_group", None)
    if group is None:
        # An instance-level forward (e.g. a tensor-parallel projection outside the plan) computes something else.
        if any(isinstance(linear.weight, DTensor) or "forward" in vars(linear) for linear in linears.values()):
            return None
        return {name: linear.weight for name, linear in linears.items()} | {"group": None}
    return _tensor_parallel_projections(linears, group)


# Placements of dgemma_hf.distributed's plan: heads and the MLP's hidden units split (colwise: output rows,
# Shard(0) of the [out, in] weight; rowwise: input columns, Shard(1)); the router replicated.
_PLAN_PLACEMENTS = {"q_proj": Shard(0), "k_proj": Shard(0), "v_proj": Shard(0), "o_proj": Shard(1),
                    "gate_proj": Shard(0), "up_proj": Shard(0), "down_proj": Shard(1)}


def _tensor_parallel_projections(linears, group) -> dict | None:
    weights = {"group": group}
    for name, linear in linears.items():
        weight = linear.weight
        if isinstance(weight, DTensor) and (weight.device_mesh.ndim != 1 or weight.device_mesh.get_group() != group):
            return None  # split over other ranks than the attention's: not the plan's layout
        rows = getattr(linear, "_dgemma_rows", None)  # a replicated K/V projection computing one head's rows
        if rows is not None:
            if isinstance(weight, DTensor) and tuple(weight.placements) != (Replicate(),):
                return None
            start, size = rows
            weights[name] = (weight.to_local() if isinstance(weight, DTensor) else weight)[start : start + size]
            continue
        if not isinstance(weight, DTensor):
            if name != "router_proj" or "forward" in vars(linear):
                return None
            weights[name] = weight
            continue
        expected = Replicate() if name == "router_proj" else _PLAN_PLACEMENTS[name]
        if tuple(weight.placements) != (expected,):
            return None
        weights[name] = weight.to_local()
    return weights


def _recording() -> bool:
    """Whether transformers is collecting router logits or attention weights (its hooks on the modules the
    regions skip); hidden states are recorded at the layer, which still runs."""
    collected = _active_collector.get()
    return collected is not None and bool({"router_logits", "attentions"} & set(collected))


def fused_projections(layer, hidden_states, kwargs) -> dict | None:
    """The layer's projections (see `_projections`) when the regions compute its forward, else None."""
    config = layer.config
    if (
        torch.is_grad_enabled()
        or layer.training
        or config.hidden_activation != "gelu_pytorch_tanh"
        or kwargs.get("output_attentions", False)
        or hidden_states.dtype not in (torch.bfloat16, torch.float16, torch.float32)
        or _recording()
    ):
        return None
    projections = _projections(layer)
    return None if projections is None else _grouped(projections)


def fused_forward(layer, projections, hidden_states, position_embeddings, attention_mask, position_ids,
                  past_key_values, write_cache, **kwargs):
    """A text layer's inference forward in the three regions; `write_cache(attn, cache, key, value)` gives the
    keys and values to attend to (the decoder reads the cache, the encoder appends to it)."""
    device, eps = hidden_states.device, layer.config.rms_norm_eps
    attn, router = layer.self_attn, layer.router
    cos, sin = position_embeddings
    query, key, value = compiled_region(attention_inputs, device)(
        hidden_states, layer.input_layernorm.weight, projections["qkv"], projections["qkv_sizes"],
        attn.q_norm.weight, attn.k_norm.weight, cos, sin, eps, attn.head_dim,
    )
    if past_key_values is not None:
        key, value = write_cache(attn, past_key_values, key, value)
    attn_output, _ = call_attention(attn, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
    weights = {
        "o_proj": projections["o_proj"], "post_attention_norm": layer.post_attention_layernorm.weight,
        "pre_feedforward_norm": layer.pre_feedforward_layernorm.weight, "gate_up": projections["gate_up"],
        "gate_up_sizes": projections["gate_up_sizes"], "down_proj": projections["down_proj"],
        "pre_feedforward_norm_2": layer.pre_feedforward_layernorm_2.weight, "router_scale": router.scale,
        "router_proj": projections["router_proj"],
    }
    group = projections["group"]
    # Experts split over the layer's ranks (dgemma_hf.distributed.ExpertShard) return partial sums here, added
    # up with the MLP's in one all-reduce.
    shard = getattr(layer.experts, "_dgemma_expert_shard", None)
    summed_together = group is not None and shard is not None and (
        shard.group is group or shard.ranks == tuple(torch.distributed.get_process_group_ranks(group)))
    residual, mlp, experts_input, probs = compiled_region(feed_forward, device)(
        attn_output, hidden_states, weights, eps, router.scalar_root_size, group, None if summed_together else group,
    )
    top_k_weights, top_k_index = router_top_k(probs, router.config.top_k_experts, router.per_expert_scale)
    with shard.partial_sums() if summed_together else contextlib.nullcontext():
        experts_output = layer.experts(experts_input, top_k_index, top_k_weights)
    norms = (layer.post_feedforward_layernorm_1.weight, layer.post_feedforward_layernorm_2.weight,
             layer.post_feedforward_layernorm.weight)
    return compiled_region(layer_output, device)(
        residual, mlp, experts_output, norms, layer.layer_scalar, eps, group if summed_together else None,
    )


def _read_cache(attn, past_key_values, key, value):
    return attn.append_to_cache(past_key_values, key, value)


def _append_to_cache(attn, past_key_values, key, value):
    return past_key_values.update(key, value, attn.layer_idx)


class _FusedForward:
    """The inference forward both fused layer classes share: the regions where `fused_projections` allows them
    (and the layer takes these inputs, see `_fuses`), else the upstream class's forward (next in the MRO)."""

    def _fuses(self, hidden_states) -> bool:
        return True

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                past_key_values=None, **kwargs):
        projections = fused_projections(self, hidden_states, kwargs) if self._fuses(hidden_states) else None
        if projections is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, position_ids,
                                   past_key_values, **kwargs)
        return fused_forward(self, projections, hidden_states, position_embeddings, attention_mask, position_ids,
                             past_key_values, self._write_cache, **kwargs)


class FusedDecoderLayer(_FusedForward, upstream.DiffusionGemmaDecoderTextLayer):
    """Upstream's decoder layer with a fused forward for inference (same parameters, same state dict).
    `DiffusionGemmaForMaskedGeneration` gives its decoder layers this class when it is built. The regions take
    plain tensors, not modules: per-module objects (e.g. each activation's functools.partial) would make dynamo
    compile one graph per layer."""

    _write_cache = staticmethod(_read_cache)  # the decoder reads the cache (the canvas is not committed)


class FusedEncoderLayer(_FusedForward, upstream.DiffusionGemmaEncoderTextLayer):
    """Upstream's encoder layer, fused like the decoder's for the canvas commits (inputs of `canvas_length`
    tokens: the decoder's shapes, so the same compiled graphs). Prompts of other lengths take upstream's forward,
    so a new prompt length never triggers a compilation."""

    canvas_length: int | None = None  # set by `use_fused_layers`
    _write_cache = staticmethod(_append_to_cache)

    def _fuses(self, hidden_states) -> bool:
        return hidden_states.shape[1] == self.canvas_length


_FUSED = {upstream.DiffusionGemmaDecoderTextLayer: FusedDecoderLayer,
          upstream.DiffusionGemmaEncoderTextLayer: FusedEncoderLayer}
_UPSTREAM = {fused: upstream_class for upstream_class, fused in _FUSED.items()}


def _text_layers(model) -> list:
    return [*model.model.encoder.language_model.layers, *model.model.decoder.layers]


def use_fused_layers(model) -> None:
    """Gives the text layers the fused forward and the decoder's attention the static-cache fix (parameters and
    buffers untouched)."""
    for layer in _text_layers(model):
        if type(layer) in _FUSED:
            layer.__class__ = _FUSED[type(layer)]
        if type(layer) is FusedEncoderLayer:
            layer.canvas_length = model.config.canvas_length
        if type(layer.self_attn) is upstream.DiffusionGemmaDecoderTextAttention:
            layer.self_attn.__class__ = DecoderAttention


@contextlib.contextmanager
def upstream_layers(model):
    """While open, the text layers and the decoder's attention are upstream's as they ship (e.g. to time
    upstream's generate)."""
    layers = {layer: type(layer) for layer in _text_layers(model)}
    attentions = [layer.self_attn for layer in layers if type(layer.self_attn) is DecoderAttention]
    for layer, cls in layers.items():
        layer.__class__ = _UPSTREAM.get(cls, cls)
    for attention in attentions:
        attention.__class__ = upstream.DiffusionGemmaDecoderTextAttention
    try:
        yield
    finally:
        for layer, cls in layers.items():
            layer.__class__ = cls
        for attention in attentions:
            attention.__class__ = DecoderAttention
