"""Multi-process inference: DiffusionGemma split over N ranks of torch.distributed (NCCL on GPUs, gloo on CPUs).

    torchrun --nproc-per-node N script.py     # script.py as for one GPU, loading with
    model = AutoModel.from_pretrained(path, tp_plan="auto", dtype="bfloat16")
    # or distributed_config=transformers.DistributedConfig(tp_size=N) / DistributedConfig(tp_size=N, ep_size=N)

transformers applies the plan below (its tp_plan machinery: DTensor placements, so each rank reads only its
shard of the checkpoint; `DiffusionGemmaForMaskedGeneration._resolve_parallel_plans` hands it this module's
plan). Upstream's own plan for DiffusionGemma covers the encoder's text stack only, and the tie of the encoder's
weights to the decoder's then undoes it; this plan covers both stacks (and the self-conditioning MLP and the
vocabulary), so the tied weights share one placement. On N ranks:

- attention (style "dgemma_attention_heads"): each rank runs Hq/N query heads (colwise q_proj, rowwise o_proj
  and one all-reduce). KV heads are split too when N divides them; when N is a multiple of them each rank keeps
  the one KV head its query heads read (k/v weights replicated, only that head's rows computed). 26B-A4B: the
  sliding layers' 8 KV heads split at N = 2, 4, 8; the global layers' 2 KV heads split at N = 2 and are
  replicated in pairs/quads at N = 4/8 (their K/V weights are 2.9M parameters a layer). Anything else
  (N not dividing the query heads, N neither dividing nor a multiple of the KV heads) is a ValueError.
- dense MLP and self-conditioning MLP: transformers' "colwise" gate/up and "rowwise" down (one all-reduce).
- vocabulary ("dgemma_vocab_embedding", "dgemma_vocab_head", "dgemma_soft_embedding"): the embedding / LM
  head matrix (tied) is split by rows: a lookup is a local lookup + all-reduce (exact), the LM head a local
  matmul + all-gather, the self-conditioning soft embedding (softmax(logits) @ embedding) a local matmul over
  this rank's vocabulary columns + all-reduce, in both sampling modes (the fused engine's `_soft_embedding`
  reads the rank's rows from `VocabShard`).
- routed experts ("grouped_gemm" + "dgemma_expert_parallel"): expert parallelism. Rank r holds experts
  [r E/N, (r+1) E/N) (bf16 parameters, or NVFP4 buffers, which are cut to the local experts at the first
  forward). Routing runs identically on every rank; each rank zeroes the routing weights of the other ranks'
  experts, runs its experts with the model's experts backend (the Triton kernels on CUDA), and one all-reduce
  sums the N partial outputs (in the fused layers, the same all-reduce as the dense MLP's partial sums). No
  token moves and nothing is read back, so the engine's captured denoising step includes the collectives.
  Routes to other ranks' experts carry the sentinel id E/N, which the backends skip: each rank reads only its
  own experts' weights and does only their arithmetic.
- router, norms, rotary tables, vision tower: replicated. The text layers keep dgemma_hf's fused forward: it
  reads each projection's local shard and runs the all-reduces (after o_proj; after the MLP's down_proj and the
  experts, summed in one) inside its compiled regions (`fused_layers`), so the captured step holds them too.

Sampling: the fused engine does not gather the logits. Each rank samples from its own vocabulary columns and
the ranks exchange only per-slice partials (`sample_tokens_over_ranks`), so every rank draws the same tokens.
The reference sampler, logits processing (top-k, top-p, min-p, penalties: it reads whole rows) and vocabulary
shards of a size not divisible by 4 (the sampler's random words come in fours) use the all-gathered logits,
identical on every rank. `prepare_generate` (called by generate()) checks that every rank
got the same prompt and copies rank 0's random state to the others before any randomness is drawn, so the
sequences cannot diverge and every rank returns them. Inference only (no
gradients through the collectives). Models split by `device_map` over several devices run with
sampling="reference" only (a CUDA graph is captured on one device); `prepare_generate` says so.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from transformers.distributed.expert_parallel import EPImplementation, EPImplementationInterface
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
from transformers.distributed.tensor_parallel import TensorParallelLayer, apply_tensor_parallelism


ATTENTION = "dgemma_attention_heads"
VOCAB_EMBEDDING = "dgemma_vocab_embedding"
VOCAB_HEAD = "dgemma_vocab_head"
SOFT_EMBEDDING = "dgemma_soft_embedding"
EXPERTS = "dgemma_expert_parallel"
EP_IMPLEMENTATION = "dgemma"
TEXT_STACKS = ("model.encoder.language_model", "model.decoder")


# -- the plans ------------------------------------------------------------------------------------------------


def expert_plan(style: str = EXPERTS) -> dict[str, str]:
    """Expert parallelism: whole experts per rank (transformers' "grouped_gemm" shards the expert dimension)."""
    plan = {}
    for stack in TEXT_STACKS:
        plan[f"{stack}.layers.*.experts.gate_up_proj"] = "grouped_gemm"
        plan[f"{stack}.layers.*.experts.down_proj"] = "grouped_gemm"
        plan[f"{stack}.layers.*.experts"] = style
    return plan


def tensor_plan() -> dict[str, str]:
    """The whole model's plan (the experts by expert, so `tp_plan="auto"` alone gives TP + EP)."""
    plan = {"lm_head": VOCAB_HEAD, "model.decoder": SOFT_EMBEDDING}
    for stack in TEXT_STACKS:
        plan[f"{stack}.embed_tokens"] = VOCAB_EMBEDDING
        plan[f"{stack}.layers.*.self_attn"] = ATTENTION
        plan[f"{stack}.layers.*.mlp.gate_proj"] = "colwise"
        plan[f"{stack}.layers.*.mlp.up_proj"] = "colwise"
        plan[f"{stack}.layers.*.mlp.down_proj"] = "rowwise"
    plan["model.decoder.self_conditioning.gate_proj"] = "colwise"
    plan["model.decoder.self_conditioning.up_proj"] = "colwise"
    plan["model.decoder.self_conditioning.down_proj"] = "rowwise"
    return plan | expert_plan()


def parallel_plans() -> tuple[dict[str, str], dict[str, str]]:
    """(tp_plan, ep_plan) for DiffusionGemmaForMaskedGeneration, in transformers' format. The ep_plan applies
    with `DistributedConfig(ep_size=N)` (its rules replace the tp_plan's for the experts) and runs through
    transformers' "ep_dispatch_experts" style with this module's `ep_implementation="dgemma"`."""
    return tensor_plan(), expert_plan("ep_dispatch_experts")


def check_world_size(config, world_size: int) -> None:
    """ValueError naming what N = `world_size` cannot split (before any weight is sharded or loaded)."""
    text = config.get_text_config()
    if world_size < 1:
        raise ValueError(f"the number of ranks must be >= 1, got {world_size}")
    if world_size == 1:
        return
    problems = []
    if text.num_experts % world_size:
        problems.append(f"the {text.num_experts} routed experts (expert parallelism holds E/N whole experts a rank)")
    if text.num_attention_heads % world_size:
        problems.append(f"the {text.num_attention_heads} query heads")
    kv_heads = {text.per_layer_config[layer].num_key_value_heads for layer in range(text.num_hidden_layers)}
    for heads in sorted(kv_heads):
        if heads % world_size and world_size % heads:
            problems.append(f"the {heads} key/value heads (N must divide them or be a multiple of them)")
    if text.vocab_size % world_size:
        problems.append(f"the vocabulary of {text.vocab_size} (the embedding is split by rows)")
    if problems:
        raise ValueError(f"DiffusionGemma cannot be split over N={world_size} ranks: N must divide "
                         + "; ".join(problems))


def check_distributed_config(config, distributed_config) -> None:
    """The layouts dgemma_hf runs: tensor parallelism over all ranks, experts split over the same ranks."""
    tp, ep = distributed_config.tp_size, distributed_config.ep_size
    others = {"pp_size": distributed_config.pp_size, "fsdp_size": distributed_config.fsdp_size,
              "dp_replicate_size": distributed_config.dp_replicate_size}
    if any(size != 1 for size in others.values()):
        raise ValueError(
            f"dgemma_hf runs DiffusionGemma with tensor + expert parallelism over all ranks; got {others} "
            "(use DistributedConfig(tp_size=N) or tp_plan='auto' under torchrun)"
        )
    if ep not in (1, tp):
        raise ValueError(f"ep_size must be 1 or tp_size ({tp}): the experts are split over the tensor-parallel "
                         f"ranks, got ep_size={ep}")
    if ep > 1:
        if distributed_config.ep_implementation == "auto":
            distributed_config.ep_implementation = EP_IMPLEMENTATION
        if distributed_config.ep_implementation != EP_IMPLEMENTATION:
            raise ValueError(
                f"ep_implementation={distributed_config.ep_implementation!r}: DiffusionGemma's experts run with "
                f"'auto' or {EP_IMPLEMENTATION!r} (routes masked with weight 0 and one all-reduce, captured in the "
                "engine's CUDA graph)"
            )
    check_world_size(config, tp)


def resolve_parallel_plans(model, distributed_config, resolve):
    """`DiffusionGemmaForMaskedGeneration._resolve_parallel_plans`: checks the layout, puts this module's plans
    on the model (a DistributedConfig's dict plans still override single rules), then lets `resolve`
    (transformers' method) merge and expand them."""
    check_distributed_config(model.config, distributed_config)
    model._tp_plan, model._ep_plan = parallel_plans()
    return resolve(distributed_config)


# -- helpers ----------------------------------------------------------------------------------------------------


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _group(mesh):
    return mesh.get_group()


# torch 2.13 renamed all_gather_into_tensor (still there, deprecated); the GPU machines run older torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _shard_rows(module: nn.Module, name: str, mesh, what: str) -> None:
    """`module.<name>` (on the meta device, before loading) becomes a DTensor placeholder split by rows."""
    meta = module._parameters.get(name)
    if meta is None:
        return
    if meta.shape[0] % mesh.size():
        raise ValueError(f"{what}: {meta.shape[0]} rows do not split evenly over {mesh.size()} ranks")
    module._parameters[name] = nn.Parameter(
        distribute_tensor(meta, mesh, [Shard(0)], src_data_rank=None), requires_grad=meta.requires_grad
    )


class VocabShard:
    """This rank's rows [start, start + size) of the (tied) embedding / LM head matrix, of `total` rows over
    `ranks` ranks, and the group to reduce over."""

    def __init__(self, embedding: nn.Embedding | nn.Linear, mesh):
        self.embedding = embedding
        self.total = embedding.weight.shape[0]
        self.ranks = mesh.size()
        self.size = self.total // self.ranks
        self.start = mesh.get_local_rank() * self.size
        self.group = _group(mesh)

    @property
    def weight(self) -> torch.Tensor:
        return _local(self.embedding.weight)

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `input_ids` (unscaled), identical to a full lookup: one rank contributes each row."""
        weight = self.weight
        local_ids = input_ids - self.start
        outside = (local_ids < 0) | (local_ids >= self.size)
        rows = F.embedding(local_ids.masked_fill(outside, 0), weight)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(rows, group=self.group)
        return rows

    def matmul(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., V] @ embedding [V, H], as partial products over this rank's columns, all-reduced."""
        out = torch.matmul(probs[..., self.start : self.start + self.size], self.weight)
        dist.all_reduce(out, group=self.group)
        return out


def split_sampling_shard(model) -> VocabShard | None:
    """The LM head's vocabulary shard if the fused sampler can work on this rank's logits columns alone: the
    embedding is split the same way (the soft embedding reads the same rows) and the shard holds a multiple of 4
    tokens (the sampler's random words come in fours). None otherwise: the logits are gathered."""
    head = getattr(model.lm_head, "vocab_shard", None)
    embed = getattr(model.model.decoder.embed_tokens, "vocab_shard", None)
    if head is None or embed is None or head.size % 4 or (embed.start, embed.size) != (head.start, head.size):
        return None
    return head


def sample_tokens_over_ranks(logits: torch.Tensor, inv_temperature, seeds, counter, shard: VocabShard,
                             softcap: float | None = None):
    """The fused sampler (`dgemma_hf.kernels.sampler`, `softcap` as there) on this rank's columns of the logits
    [R, V / N]: each rank reduces its own columns, one all-gather moves the small per-slice partials (24 bytes a
    slice, not the [R, V] logits), and every rank merges all of them in vocabulary order. Every rank gets the same
    outputs; the tokens are those of one pass over whole rows (the statistics round differently)."""
    from .kernels.sampler import combine_partials, token_partials

    # Checked alike on every rank, before the collective (a rank that raised alone would leave the others waiting).
    if shard.size % 4:
        raise ValueError(f"the split sampler needs vocabulary shards of a multiple of 4 tokens, got {shard.size}")
    local = token_partials(logits, inv_temperature, seeds, counter, vocab_offset=shard.start, softcap=softcap)
    gathered = local.new_empty((shard.ranks * local.shape[0], *local.shape[1:]))  # ranks stacked on dim 0
    _all_gather_single(gathered, local, group=shard.group)
    return combine_partials(gathered.view(shard.ranks, *local.shape), inv_temperature, seeds, counter, shard.total)


# -- styles -----------------------------------------------------------------------------------------------------


class VocabEmbeddingParallel(TensorParallelLayer):
    """A scaled word embedding split by vocabulary rows: local lookup, zero for other ranks' ids, all-reduce."""

    def shard_param(self, module, param, mesh):
        _shard_rows(module, param, mesh, "the vocabulary embedding")

    def install_forward(self, module, mesh):
        shard = VocabShard(module, mesh)
        module.vocab_shard = shard

        def forward(input_ids):
            rows = shard.lookup(input_ids)
            return rows * module.embed_scale.to(rows.dtype)

        module.forward = forward
        return module


class VocabHeadParallel(TensorParallelLayer):
    """The LM head split by vocabulary rows (tied to the embedding, same placement): local logits, all-gather."""

    def shard_param(self, module, param, mesh):
        _shard_rows(module, param, mesh, "the LM head")

    def install_forward(self, module, mesh):
        group, world = _group(mesh), mesh.size()
        module.vocab_shard = VocabShard(module, mesh)  # the fused engine samples from the local logits

        def forward(hidden_states):
            local = F.linear(hidden_states, _local(module.weight)).contiguous()
            gathered = local.new_empty((world * local.shape[0], *local.shape[1:]))  # ranks stacked on dim 0
            _all_gather_single(gathered, local, group=group)
            gathered = gathered.view(world, *local.shape).movedim(0, -2)
            return gathered.reshape(*local.shape[:-1], world * local.shape[-1])

        module.forward = forward
        return module


class SoftEmbeddingParallel(TensorParallelLayer):
    """On the decoder: turns `self_conditioning_logits` into the soft embedding over the split vocabulary (upstream
    computes softmax(logits) @ embedding with the whole matrix) and hands it to the self-conditioning MLP."""

    def install_forward(self, module, mesh):
        original = module.forward

        def forward(*args, **kwargs):
            logits = kwargs.pop("self_conditioning_logits", None)
            mask = kwargs.pop("self_conditioning_mask", None)
            if logits is None:
                return original(*args, **kwargs)
            embed = module.embed_tokens
            dtype = _local(embed.weight).dtype
            soft = embed.vocab_shard.matmul(logits.softmax(dim=-1, dtype=torch.float32).to(dtype))
            soft = soft * embed.embed_scale.to(dtype)
            if mask is not None:
                soft = soft * mask.to(soft.dtype)[:, None, None]
            handle = module.self_conditioning.register_forward_pre_hook(lambda _, inputs: (inputs[0], soft))
            try:
                return original(*args, **kwargs)
            finally:
                handle.remove()

        module.forward = forward
        return module


class AttentionHeadsParallel(TensorParallelLayer):
    """One attention module split by heads (see the module docstring): shards q/k/v/o itself, so it can pick per
    layer between split and replicated KV heads."""

    def install_forward(self, module, mesh):
        world, rank = mesh.size(), mesh.get_local_rank()
        head_dim = module.head_dim
        q_heads = module.q_proj.out_features // head_dim
        kv_heads = module.k_proj.out_features // head_dim
        where = f"layer {module.layer_idx} attention"
        if q_heads % world:
            raise ValueError(f"{where}: {q_heads} query heads do not split over N={world} ranks")
        kv_projections = [p for p in (module.k_proj, module.v_proj) if p is not None]
        if kv_heads % world == 0:
            local_kv = kv_heads // world
            for projection in kv_projections:
                _shard_linear(projection, "colwise", mesh)
        elif world % kv_heads == 0:
            local_kv = 1
            head = rank // (world // kv_heads)  # the KV head this rank's query heads read
            for projection in kv_projections:
                _keep_rows(projection, head * head_dim, head_dim)
        else:
            raise ValueError(f"{where}: {kv_heads} key/value heads: N={world} must divide them or be a multiple")
        _shard_linear(module.q_proj, "colwise", mesh)
        _shard_linear(module.o_proj, "rowwise", mesh)
        # sdpa/eager repeat each KV head for its query heads: the local ratio.
        module.num_key_value_groups = (q_heads // world) // local_kv
        module._dgemma_tp_group = mesh.get_group()  # the fused layers' all-reduce (fused_layers._projections)
        return module


def _shard_linear(linear: nn.Linear, style_name: str, mesh) -> None:
    """transformers' "colwise" / "rowwise" style on one projection: its parameters, then its forward."""
    style = ALL_PARALLEL_STYLES[style_name]
    for name in ("weight", "bias"):
        if linear._parameters.get(name) is not None:
            style.shard_param(linear, name, mesh)
    style.install_forward(linear, mesh)


def _keep_rows(linear: nn.Linear, start: int, size: int) -> None:
    """A replicated projection that computes only output rows [start, start + size) (the fused layers read
    `_dgemma_rows`)."""
    linear._dgemma_rows = (start, size)

    def forward(x):
        bias = None if linear.bias is None else linear.bias[start : start + size]
        return F.linear(x, linear.weight[start : start + size], bias)

    linear.forward = forward


class ExpertShard:
    """Rank r's experts [r E/N, (r+1) E/N) of one experts module, and the all-reduce that combines the ranks.

    Routing runs identically on every rank. A route to a local expert gets its local id; a route to another
    rank's expert gets the sentinel id E/N (and weight 0), which every experts backend skips (transformers'
    grouped_mm and eager loops, dgemma_hf's Triton kernels and NVFP4 reference): no GEMM work, an exact zero.
    The sum over ranks is the layer's output."""

    def __init__(self, experts: nn.Module, mesh):
        weights = experts._parameters.get("gate_up_proj")
        if weights is None:
            weights = experts._buffers.get("gate_up_packed")
        if weights is None:
            raise ValueError(f"{type(experts).__name__}: expert parallelism needs gate_up_proj or gate_up_packed")
        self.experts = experts
        self.total = weights.shape[0]  # a DTensor's shape is the global one
        world = mesh.size()
        if self.total % world:
            raise ValueError(f"{self.total} routed experts do not split over N={world} ranks")
        self.local = self.total // world
        self.rank = mesh.get_local_rank()
        self.group = _group(mesh)
        self.ranks = tuple(dist.get_process_group_ranks(self.group))
        self.reduce = True
        experts._is_expert_parallel = True  # transformers' experts functions then skip the sentinel id
        experts._dgemma_expert_shard = self  # the fused layers sum its output with the MLP's (`partial_sums`)

    def __call__(self, run, hidden_states, top_k_index, top_k_weights):
        """`run` is the experts' own forward (the model's experts backend) on local tensors."""
        _cut_buffers(self.experts, self.total, self.rank * self.local, self.local)
        local_index = top_k_index - self.rank * self.local
        mine = (local_index >= 0) & (local_index < self.local)
        local_index = torch.where(mine, local_index, self.local)  # the sentinel
        out = run(hidden_states, local_index, top_k_weights.masked_fill(~mine, 0.0))
        if self.reduce:
            dist.all_reduce(out, group=self.group)
        return out

    @contextlib.contextmanager
    def partial_sums(self):
        """Within, the experts return this rank's partial output: the caller sums it over `self.ranks` (the fused
        layers do it in one all-reduce with the dense MLP's, one collective a layer fewer)."""
        self.reduce = False
        try:
            yield
        finally:
            self.reduce = True


def _cut_buffers(experts: nn.Module, total: int, start: int, local: int) -> None:
    """Keeps experts [start, start + local) of every per-expert buffer (NVFP4 experts load whole); once."""
    if experts.num_experts == local and all(b.shape[0] != total for b in experts._buffers.values() if b is not None):
        return
    for name, buffer in list(experts._buffers.items()):
        if buffer is not None and buffer.ndim >= 1 and buffer.shape[0] == total:
            experts._buffers[name] = buffer[start : start + local].clone()
    experts.num_experts = local


class ExpertParallel(TensorParallelLayer):
    """The experts style of the tp plan (`tp_plan="auto"`). The bf16 parameters are sharded by transformers'
    "grouped_gemm" style (which sets `num_experts` to the local count); NVFP4 buffers are cut at the first forward."""

    def should_use_local_tensors(self, module):
        return True

    def install_forward(self, module, mesh):
        if getattr(module, "_dgemma_expert_shard", None) is not None:  # NVFP4 experts: one module, two stacks
            return module
        shard = ExpertShard(module, mesh)
        original = module.forward

        def forward(hidden_states, top_k_index, top_k_weights):
            with self.context_around_forward(module, mesh):
                return shard(original, hidden_states, top_k_index, top_k_weights)

        module.forward = forward
        return module


class ExpertParallelImplementation(EPImplementation):
    """The same, as transformers' `ep_implementation` "dgemma", for `DistributedConfig(tp_size=N, ep_size=N)`
    (its "ep_dispatch_experts" style). transformers' own "all_reduce" marks other ranks' routes with an
    out-of-range expert id, which the Triton kernels do not skip."""

    needs_shared_batch = True

    def __init__(self, experts, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        self.shard = ExpertShard(experts, ep_mesh)

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        return self.shard(self.experts_forward, hidden_states, top_k_index, top_k_weights)


ALL_PARALLEL_STYLES.register(ATTENTION, AttentionHeadsParallel())
ALL_PARALLEL_STYLES.register(VOCAB_EMBEDDING, VocabEmbeddingParallel())
ALL_PARALLEL_STYLES.register(VOCAB_HEAD, VocabHeadParallel())
ALL_PARALLEL_STYLES.register(SOFT_EMBEDDING, SoftEmbeddingParallel())
ALL_PARALLEL_STYLES.register(EXPERTS, ExpertParallel())
EPImplementationInterface.register(EP_IMPLEMENTATION, ExpertParallelImplementation)


# -- a model built in the process (benchmarks) ------------------------------------------------------------------


def parallelize(model, mesh):
    """Applies the plan to a model whose parameters are still on the meta device (e.g. built under
    `accelerate.init_empty_weights()` for a random-weight benchmark): each parameter becomes a DTensor placeholder
    of this rank's shard, to be materialised by the caller; `from_pretrained(tp_plan="auto")` does this itself."""
    check_world_size(model.config, mesh.size())
    model._tp_plan, model._ep_plan = parallel_plans()
    apply_tensor_parallelism(model, mesh, model._expand_parallel_plan(model._tp_plan))
    model._device_mesh = mesh
    model._tp_size = mesh.size()
    return model


# -- generate() --------------------------------------------------------------------------------------------------


def tensor_parallel_group(model):
    """The process group the model is split over, or None for a model on one rank."""
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        return None
    if mesh.mesh_dim_names and "tp" in mesh.mesh_dim_names and mesh.ndim > 1:
        mesh = mesh["tp"]
    return mesh.get_group() if mesh.size() > 1 else None


def model_devices(model) -> set:
    """The devices a device_map placed the model on (empty without a device_map)."""
    return set((getattr(model, "hf_device_map", None) or {}).values())


def check_device_map(model, sampling: str) -> None:
    devices = model_devices(model)
    if sampling == "fused" and len(devices) > 1:
        raise ValueError(
            f"sampling='fused' captures each denoising step as one CUDA graph on one device, but device_map placed "
            f"this model on {sorted(map(str, devices))}: for several GPUs load it with tp_plan='auto' under "
            "`torchrun --nproc-per-node N`, or pass sampling='reference'"
        )


def prepare_generate(model, input_ids: torch.Tensor, sampling: str) -> None:
    """Called by generate() before any work. A model split by device_map cannot run the captured engine; a model
    split over ranks needs the same prompt on every rank, and gets rank 0's random state (CPU and the model's
    accelerator) on every rank, so all ranks draw the same canvases and seeds."""
    check_device_map(model, sampling)
    group = tensor_parallel_group(model)
    if group is None:
        return
    device = input_ids.device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise ValueError(f"the model is split over NCCL ranks but input_ids are on {device}; move them to the model's "
                         "device")
    shape = torch.tensor(input_ids.shape, device=device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    same = all(torch.equal(s, shapes[0]) for s in shapes)
    if same:
        first = input_ids.clone()
        dist.broadcast(first, src=dist.get_global_rank(group, 0), group=group)
        differs = torch.tensor([int(not torch.equal(first, input_ids))], device=device)
        dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=group)
        same = not bool(differs.item())
    if not same:
        raise ValueError(
            "generate() got different input_ids on the ranks of a tensor-parallel model: every rank must run the same "
            f"prompts (rank {dist.get_rank()} has shape {tuple(input_ids.shape)})"
        )
    _broadcast_random_state(group, device)


def _broadcast_random_state(group, device: torch.device) -> None:
    src = dist.get_global_rank(group, 0)
    transport = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    cpu_state = torch.get_rng_state().to(transport)
    dist.broadcast(cpu_state, src=src, group=group)
    torch.set_rng_state(cpu_state.cpu())
    if device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(device).to(transport)
        dist.broadcast(cuda_state, src=src, group=group)
        torch.cuda.set_rng_state(cuda_state.cpu(), device)
