"""The denoising engine behind DiffusionGemmaForMaskedGeneration.generate().

Same semantics as upstream's generate (transformers 5.23): canvases of `canvas_length` tokens, each committed to
the KV cache by one encoder pass, each refined by up to `max_denoising_steps` decoder passes that sample tokens,
accept some (the scheduler's rule; upstream's entropy bound by default), renoise the rest and stop early when the
canvas is stable and confident. Two sampling modes:

- "reference": torch sampling that consumes the global RNG exactly as upstream does (multinomial, then
  randint for the renoise), a dynamic cache, a host check after every step: identical sequences to upstream
  for a given seed. The default off CUDA.
- "fused": one Triton pass over the logits per step (`dgemma_hf.kernels.sampler`) with a counter-based
  generator, a static cache, the self-conditioning state kept as the [batch, canvas, hidden] soft embedding,
  all per-step state in preallocated device buffers, and on CUDA each step captured once as a CUDA graph and
  replayed; so are the canvas commits and, when the engine is reused, a short prompt's pass (see `_encode`).
  With adaptive stopping the host reads the finished flags two steps behind, so the GPU queue never drains
  inside a canvas; without it, nothing is read back until the canvas ends. The default on CUDA.

The engine knows the order of calls; the arithmetic is upstream's modules, our kernels and the scheduler's.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticSlidingWindowLayer

from ..distributed import sample_tokens_over_ranks, split_sampling_shard
from ..fused_layers import (compiled_region, full_sliding_window, logit_softcap, pack_projections,
                            sliding_window_update)
from ..schedulers import DiffusersSchedulerAdapter, TextDiffusionScheduler
from .compile_ahead import compile_kernels
from .logits_processing import LogitsProcessing, LogitsSettings
from .masks import mask_shapes, one_row, static_copy, stored_rows
from .stopping import stable_and_confident

SAMPLING_MODES = ("auto", "reference", "fused")
# Vocabulary columns per chunk when rebuilding softmax for the soft embedding: a multiple of 16384, as many as keep a
# chunk's probabilities within 2^24 elements (32 MiB in bf16). A batch-1 canvas (256 rows) then takes 4 GEMMs of 65536
# columns instead of 16 small split-K ones.
_SOFT_CHUNK = 16384
_SOFT_CHUNK_ELEMENTS = 2**24
_CAPTURED_PROMPT_TOKENS = 4096  # longest prompt pass or chunk (tokens, all rows) that is captured: its graph
# keeps the pass's activations; past this the GPU's work outweighs the host's launches anyway


@dataclass(frozen=True)
class Settings:
    """The resolved generation settings the engine uses. Equal settings can share a captured step; the
    scheduler takes part through its key (class and config)."""

    max_new_tokens: int
    scheduler: TextDiffusionScheduler | DiffusersSchedulerAdapter = field(compare=False, hash=False)
    scheduler_key: str
    stability_threshold: int | None
    confidence_threshold: float | None
    eos_token_id: tuple[int, ...] | None
    pad_token_id: int | None
    logits: LogitsSettings = LogitsSettings()
    prefill_chunk_size: int | None = None  # transformers' field: the prompt's encoder pass in chunks of this size

    @property
    def adaptive_stopping(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None

    @property
    def steps(self) -> int:
        return self.scheduler.steps


def resolve_sampling(sampling: str, device: torch.device, scheduler, one_device: bool = True) -> str:
    """`one_device`: False for a model that device_map split over several devices (no one-device graph)."""
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"`sampling` must be one of {SAMPLING_MODES}, got {sampling!r}")
    diffusers_scheduler = isinstance(scheduler, DiffusersSchedulerAdapter)
    if sampling == "auto":
        return "fused" if device.type == "cuda" and not diffusers_scheduler and one_device else "reference"
    if sampling == "fused" and diffusers_scheduler:
        raise ValueError(
            f"diffusers' {type(scheduler.scheduler).__name__} runs with sampling='reference' (its steps read values "
            "back to the host); use one of dgemma_hf.schedulers for sampling='fused'"
        )
    if sampling == "fused" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"sampling='fused' runs Triton kernels: the model must be on CUDA (it is on {device}), or set "
            "TRITON_INTERPRET=1 before importing triton to interpret them on the CPU (slow; for tests)"
        )
    return sampling


class DenoisingEngine:
    """Runs generate() calls. Its buffers, static cache and captured graph are reused by later calls with the
    same shapes and settings (see `for_call`)."""

    @classmethod
    def for_call(cls, model, settings: Settings, batch_size: int, prompt_length: int, sampling: str,
                 seeds: list[int]):
        # A captured step has the model's kernels baked in: a switch of backend (or of the decoder layers' class)
        # needs a new engine.
        backends = (model.config.get_text_config()._experts_implementation, model.config._attn_implementation,
                    tuple(type(layer) for layer in model.model.decoder.layers))
        key = (settings, batch_size, prompt_length, sampling, model.dtype, model.device, backends)
        engine = getattr(model, "_dgemma_engine", None)
        if engine is None or engine.key != key:
            # One GEMM per group, before a graph captures the weights' addresses; a kept engine's graphs hold the
            # old ones if weights moved.
            if pack_projections(model):
                model._dgemma_engine = None
            engine = cls(model, settings, batch_size, prompt_length, sampling, seeds)
            engine.key = key
            if sampling == "fused":  # reference engines hold nothing worth keeping
                model._dgemma_engine = engine
        if sampling == "fused":
            engine.seed.copy_(torch.tensor(seeds))
        engine.seed_values = seeds
        return engine

    def __init__(self, model, settings: Settings, batch_size: int, prompt_length: int, sampling: str,
                 seeds: list[int]):
        self.model = model
        self.settings = settings
        self.sampling = sampling
        self.batch_size = batch_size
        self.canvas_length = model.config.canvas_length
        self.vocab_size = model.config.text_config.vocab_size
        self.canvases = math.ceil(settings.max_new_tokens / self.canvas_length)
        self.max_length = prompt_length + self.canvases * self.canvas_length
        device = model.device
        self.device = device
        self.use_graphs = sampling == "fused" and device.type == "cuda"
        shape = (batch_size, self.canvas_length)
        self.scheduler = settings.scheduler
        self.logits_processing = LogitsProcessing(settings.logits, batch_size, self.vocab_size, device)
        if isinstance(self.scheduler, DiffusersSchedulerAdapter):  # they scale logits themselves
            temperatures = torch.ones(settings.steps, device=device)
        else:
            temperatures = self.scheduler.temperatures(device)
        self.inverse_temperatures = (1.0 / temperatures).float()
        # Per-step state, updated in place so a captured graph keeps reading and writing the same memory.
        self.canvas = torch.zeros(shape, dtype=torch.long, device=device)
        self.argmax = torch.zeros(shape, dtype=torch.long, device=device)
        self.finished_denoising = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.finished_sequences = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.forward_passes = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        history = max(settings.stability_threshold or 0, 1)
        self.history = torch.full((history, *shape), -1, dtype=torch.long, device=device)
        # A tensor-parallel LM head (dgemma_hf.distributed): the fused sampler reads this rank's vocabulary columns
        # and never gathers the logits, unless logits processing needs whole rows.
        split_sampling = sampling == "fused" and not settings.logits.active
        self.vocab_shard = split_sampling_shard(model) if split_sampling else None
        # Unless logits processors need them softcapped first, the fused sampler and the soft embedding apply the
        # final logit softcap as they read the LM head's output: no pass writing [batch, canvas, vocab] fp32 logits.
        self.read_softcap = model.final_logit_softcapping if split_sampling else None
        # What the fused sampler reads: the LM head's output as it is, or softcapped fp32 logits.
        self.sampler_logits_dtype = model.lm_head.weight.dtype if self.read_softcap is not None else torch.float32
        if sampling == "fused":
            hidden = model.config.text_config.hidden_size
            self.soft = torch.zeros((*shape, hidden), dtype=model.dtype, device=device)
            self.seed = torch.tensor(seeds, dtype=torch.long, device=device)  # one per sequence
            self.counter = torch.zeros(1, dtype=torch.long, device=device)
            self.position_ids = torch.zeros((1, self.canvas_length), dtype=torch.long, device=device)
        else:
            self.sc_logits = None
        self.seed_values = seeds
        self.mask_mapping = None
        self.cache = None
        # Encoder passes run once, and captured (graph, static inputs, cache memory), by `_pass_key`.
        self._warm_passes, self._encoder_graphs = set(), {}

    # -- cache ------------------------------------------------------------------------------------------

    def make_cache(self, past_key_values):
        text_config = self.model.config.get_text_config(decoder=True)
        if past_key_values is not None:
            if self.sampling == "fused" and not isinstance(past_key_values, StaticCache):
                raise ValueError(
                    "`past_key_values` must be a StaticCache with sampling='fused' (the captured step reads a "
                    "fixed-size cache); pass sampling='reference' to continue a dynamic cache"
                )
            return past_key_values
        if self.sampling == "reference":
            return DynamicCache(config=text_config)
        # One static cache per (batch, length, dtype, device) is kept on the model and reused across calls.
        key = (self.batch_size, self.max_length, self.model.dtype, self.device)
        cached_key, cached = getattr(self.model, "_dgemma_static_cache", (None, None))
        if cached_key == key:
            cached.reset()
            return cached
        cache = StaticCache(config=text_config, max_cache_len=self.max_length)
        self.model._dgemma_static_cache = (key, cache)
        return cache

    # -- one denoising step -----------------------------------------------------------------------------

    def _decoder_logits(self, decoder_position_ids) -> torch.Tensor:
        kwargs = dict(
            decoder_input_ids=self.canvas,
            decoder_attention_mask=self.mask_mapping,
            past_key_values=self.cache,
            decoder_position_ids=decoder_position_ids,
        )
        if self.sampling == "reference":
            kwargs["self_conditioning_logits"] = self.sc_logits
            return self.model(**kwargs).logits
        # Upstream's forward; its logit softcap (four passes over the logits) in one region, or left to the readers
        # of the logits (`read_softcap`).
        hidden = self.model.model(**kwargs).last_hidden_state
        if self.vocab_shard is None:
            logits = self.model.lm_head(hidden)
        else:  # this rank's vocabulary columns only
            logits = torch.nn.functional.linear(hidden, self.vocab_shard.weight)
        if self.read_softcap is not None:
            return logits
        return compiled_region(logit_softcap, logits.device)(logits, self.model.final_logit_softcapping)

    def _soft_embedding(self, logits: torch.Tensor, inv_temperature, log_norm) -> torch.Tensor:
        """softmax(logits * inv_temperature) @ embedding * embed_scale, rebuilt chunk by chunk from the
        sampler's log-normaliser, so no second [batch, canvas, vocab] tensor exists. With the vocabulary split over
        ranks (dgemma_hf.distributed) each rank sums over its own rows of the embedding, then the ranks add up; its
        logits are those columns already, or the whole rows (gathered for logits processing)."""
        embed = self.model.model.decoder.embed_tokens
        shard = getattr(embed, "vocab_shard", None)
        weight = embed.weight if shard is None else shard.weight
        rows = logits.view(-1, logits.shape[-1])
        if shard is not None and self.vocab_shard is None:  # whole rows: this rank's columns
            rows = rows[:, shard.start : shard.start + shard.size]
        soft = torch.zeros(rows.shape[0], weight.shape[1], dtype=torch.float32, device=rows.device)
        add_chunk = compiled_region(add_soft_embedding_chunk, rows.device)
        chunk = max(1, _SOFT_CHUNK_ELEMENTS // rows.shape[0] // _SOFT_CHUNK) * _SOFT_CHUNK
        for begin in range(0, weight.shape[0], chunk):
            end = begin + chunk
            soft = add_chunk(soft, rows[:, begin:end], inv_temperature, log_norm, weight[begin:end], self.read_softcap)
        if shard is not None:
            torch.distributed.all_reduce(soft, group=shard.group)
        soft = soft.to(weight.dtype) * embed.embed_scale.to(weight.dtype)
        return soft.view(*logits.shape[:2], -1)

    def _fused_candidates(self, logits, inv_temperature):
        """Fused sampler + the scheduler's acceptance: next canvas, argmax, entropy, log-normaliser."""
        batch, length, vocab = logits.shape
        if self.vocab_shard is None:
            from ..kernels.sampler import sample_tokens

            stats = sample_tokens(logits.view(-1, vocab), inv_temperature, self.seed, self.counter,
                                  softcap=self.read_softcap)
        else:
            stats = sample_tokens_over_ranks(logits.view(-1, vocab), inv_temperature, self.seed, self.counter,
                                             self.vocab_shard, softcap=self.read_softcap)
        entropy, max_prob = stats.entropy.view(batch, length), stats.max_prob.view(batch, length)
        accepted = self.scheduler.accept(entropy, max_prob, self.step_index)
        new_canvas = torch.where(accepted, stats.sampled.view(batch, length), stats.noise.view(batch, length))
        return new_canvas, stats.argmax.view(batch, length), entropy, (inv_temperature, stats.log_norm)

    def _reference_candidates(self, logits):
        """The scheduler's reference step (torch RNG, as upstream): next canvas, argmax, entropy, pred logits."""
        out = self.scheduler.step(logits, self.settings.steps - self.host_step, self.canvas)
        entropy = None
        if self.settings.adaptive_stopping:
            entropy = torch.distributions.Categorical(logits=out.pred_logits).entropy()
        return out.prev_sample, out.pred_original_sample, entropy, out.pred_logits

    def step(self, decoder_position_ids) -> None:
        """One denoising step: every write goes to the engine's buffers, in place."""
        self.forward_passes += (~(self.finished_denoising | self.finished_sequences)).int()
        logits = self._decoder_logits(decoder_position_ids)
        # index_select, not [], so the step index stays on the device (indexing by a tensor would read it back).
        inv_temperature = torch.index_select(self.inverse_temperatures, 0, self.step_index.view(1))
        logits = self.logits_processing(logits, inv_temperature)
        if self.sampling == "fused":
            new_canvas, argmax, entropy, extra = self._fused_candidates(logits, inv_temperature)
        else:
            new_canvas, argmax, entropy, extra = self._reference_candidates(logits)
        frozen = self.finished_denoising[:, None]
        if self.settings.adaptive_stopping:
            # Rows that already stopped keep their canvas, argmax and self-conditioning state.
            argmax = torch.where(frozen, self.argmax, argmax)
            new_canvas = torch.where(frozen, self.canvas, new_canvas)
            stop = stable_and_confident(
                argmax, entropy, self.history, self.settings.stability_threshold, self.settings.confidence_threshold
            )
            self.finished_denoising |= stop
        self.canvas.copy_(new_canvas)
        self.argmax.copy_(argmax)
        if self.sampling == "fused":
            inv_temperature, log_norm = extra
            soft = self._soft_embedding(logits, inv_temperature, log_norm)
            if self.settings.adaptive_stopping:
                soft = torch.where(frozen[..., None], self.soft, soft)
            self.soft.copy_(soft)
            self.counter += 1
        else:
            processed = extra
            embed_dtype = self.model.model.decoder.embed_tokens.weight.dtype
            if self.settings.adaptive_stopping and self.sc_logits is not None:
                processed = torch.where(frozen[..., None], self.sc_logits, processed)
            self.sc_logits = processed.to(embed_dtype)
            self.host_step += 1
        self.step_index += 1

    # -- canvases ---------------------------------------------------------------------------------------

    def _start_canvas(self, canvas: torch.Tensor, sc_logits, canvas_index: int) -> None:
        self.canvas.copy_(canvas)
        self.argmax.copy_(canvas)  # upstream's argmax canvas before the first step
        self.finished_denoising.zero_()
        self.history.fill_(-1)
        self.step_index.zero_()
        if self.sampling == "fused":
            self.soft.zero_()
            # The random streams of a step depend on (sequence seed, canvas, step, position) only, so a sequence
            # draws the same numbers alone or in any batch.
            self.counter.fill_(canvas_index << 20)
        else:
            self.sc_logits = sc_logits
            self.host_step = 0
            if isinstance(self.scheduler, DiffusersSchedulerAdapter):
                self.scheduler.start_canvas(self.canvas_length, self.device)

    def _initial_canvas(self, canvas_index: int) -> torch.Tensor:
        shape = (self.batch_size, self.canvas_length)
        if self.sampling == "reference":  # upstream's sampler.initialize_canvas, same RNG use
            return torch.randint(0, self.vocab_size, shape, device=self.device)
        # Like the steps: a sequence's canvas depends on (its seed, canvas index) only.
        rows = []
        for seed in self.seed_values:
            generator = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + canvas_index)
            rows.append(torch.randint(0, self.vocab_size, (self.canvas_length,), device=self.device,
                                      generator=generator))
        return torch.stack(rows)

    def _denoise_reference(self, decoder_position_ids, streamer) -> None:
        for _ in range(self.settings.steps):
            self.step(decoder_position_ids)
            _put_draft(streamer, self.argmax)
            if bool(self.finished_denoising.all()):  # upstream breaks here too (and so consumes no more RNG)
                break

    def _denoise_fused(self, decoder_position_ids, streamer) -> None:
        self.position_ids.copy_(decoder_position_ids)
        steps = self.settings.steps
        poll = self.settings.adaptive_stopping
        if not self.use_graphs:
            for _ in range(steps):
                self.step(self.position_ids)
                _put_draft(streamer, self.argmax)
                if poll and bool(self.finished_denoising.all()):
                    break
            return
        graph = self._ready_graph()
        if graph is None:
            # First step eagerly: real work, and the warm-up (kernel compilation, library handles) for capture.
            self.step(self.position_ids)
            _put_draft(streamer, self.argmax)
            steps -= 1
            graph = self._capture() if steps else None
        # Adaptive stopping: each replay also copies "all rows finished" to pinned memory behind an event. Before
        # launching a step the host waits for the flag of the step two back, so one step stays queued and the
        # GPU never idles; a canvas that is done stops within two steps (finished rows are frozen, and the
        # random streams are counter-based, so the extra steps change nothing).
        pending = []
        for _ in range(steps):
            if len(pending) == 2:
                event, flag = pending.pop(0)
                event.synchronize()
                if bool(flag):
                    break
            graph.replay()
            _put_draft(streamer, self.argmax)
            if poll:
                flag = torch.empty((), dtype=torch.bool, pin_memory=True)
                flag.copy_(self.finished_denoising.all(), non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                pending.append((event, flag))

    def _mask_key(self):
        """What a captured step depends on besides the engine's buffers: the masks' shapes, the cache's memory
        (another cache object, or its buffers made anew) and which sliding-window cache layers are full (the
        fused layers read a full window differently, see fused_layers)."""
        return (mask_shapes(self.mask_mapping), self._cache_memory(),
                tuple(full_sliding_window(layer) for layer in self.cache.layers))

    def _ready_graph(self):
        """The captured step, if one exists for masks of these shapes: the canvas's masks are copied into the
        buffers it reads. Shapes change only when the cache does, so a graph serves every canvas and call."""
        if getattr(self, "_graph_key", None) != self._mask_key():
            return None
        for name, mask in self.mask_mapping.items():
            if mask is not None:
                stored_rows(self._static_masks[name]).copy_(stored_rows(mask))
        self.mask_mapping = self._static_masks
        return self._captured

    def _capture(self):
        key = self._mask_key()
        self._static_masks = {k: None if m is None else static_copy(m) for k, m in self.mask_mapping.items()}
        self.mask_mapping = self._static_masks
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(self.position_ids)
        self._graph_key, self._captured = key, graph
        return graph

    def _encode(self, input_ids, attention_mask, position_ids, is_prefill, prompt_kwargs=None) -> None:
        """One encoder pass writing the new tokens (all of input_ids when prefilling, else the last canvas) to the
        cache; attention_mask covers the cache and the new tokens.

        With CUDA graphs a pass is captured the second time its shapes and cache state come (`_pass_key`; the
        first run, eager, is the warm-up) and replayed from then on: a canvas commit, or a text prompt (or
        prefill chunk) of up to `_CAPTURED_PROMPT_TOKENS` tokens in all, which for a whole prompt means when
        the engine is reused. Eagerly, the host launches the layers' kernels slower than the GPU runs them. A
        cache whose buffers are not allocated yet (a fresh StaticCache) takes the eager pass, which allocates
        them."""
        model = self.model
        unprocessed, encoder_masks = model._prepare_encoder_inputs(
            input_ids=input_ids, attention_mask=attention_mask, encoder_position_ids=position_ids,
            past_key_values=self.cache, is_prefill=is_prefill, canvas_length=self.canvas_length,
            batch_size=self.batch_size,
        )
        inputs = dict(input_ids=unprocessed, attention_mask=encoder_masks, position_ids=position_ids)
        if not self.use_graphs or prompt_kwargs or (is_prefill and unprocessed.numel() > _CAPTURED_PROMPT_TOKENS):
            self._encoder_pass(inputs, prompt_kwargs)
            return
        memory = self._cache_memory()
        key = self._pass_key(encoder_masks, unprocessed.shape[1])
        captured = self._encoder_graphs.get(key)
        if captured is None or captured[2] != memory:  # (a graph of other cache memory would read freed buffers)
            if key not in self._warm_passes or None in memory:  # an eager pass, the warm-up, allocates the cache
                self._warm_passes.add(key)
                self._encoder_pass(inputs)
                return
            captured = self._encoder_graphs[key] = (*self._capture_pass(inputs), memory)
        graph, static, _ = captured
        for name, value in _tensors(inputs):
            stored_rows(static[name]).copy_(stored_rows(value))
        graph.replay()
        for layer in self._sliding_layers():  # the one host-side state of the cache the replay cannot advance
            layer.cumulative_length_int += unprocessed.shape[1]

    def _encoder_pass(self, inputs, prompt_kwargs=None) -> None:
        self.model.model.encoder(**inputs, past_key_values=self.cache, **(prompt_kwargs or {}))

    def _sliding_layers(self) -> list:
        return [layer for layer in self.cache.layers if isinstance(layer, StaticSlidingWindowLayer)]

    def _cache_memory(self) -> tuple:
        """Where the cache's tensors are (a captured pass or step reads and writes there: keys, values and the
        device-side length); None for a layer not allocated yet. The decoder's first step moves the keys and
        values once (DecoderAttention's padded buffers)."""
        return tuple(
            None if layer.keys is None
            else (layer.keys.data_ptr(), layer.values.data_ptr(), layer.cumulative_length.data_ptr())
            for layer in self.cache.layers
        )

    def _pass_key(self, masks, new_tokens: int) -> tuple:
        """The shapes and cache state a captured encoder pass is recorded for: the new tokens' and the masks'
        shapes, and the branch transformers' StaticSlidingWindowLayer.update takes for each sliding layer
        (decided on the host by its `cumulative_length_int`: room for the new tokens, filling up from a given
        length, or full)."""
        branches = []
        for layer in self._sliding_layers():
            length = layer.cumulative_length_int
            branch = sliding_window_update(length, new_tokens, layer.max_cache_len)
            branches.append((branch, length) if branch == "fills" else branch)
        return new_tokens, mask_shapes(masks), tuple(branches)

    def _capture_pass(self, inputs):
        """Captures an encoder pass into a graph reading static copies of its inputs. Capturing records the
        kernels without running them; the sliding layers' host counters it advances are set back."""
        static = {name: static_copy(value) for name, value in _tensors(inputs)}
        captured_inputs = {name: static.get(name, value) for name, value in inputs.items()}
        captured_inputs["attention_mask"] = {
            kind: static.get(f"attention_mask.{kind}", mask) for kind, mask in inputs["attention_mask"].items()
        }
        counters = [layer.cumulative_length_int for layer in self._sliding_layers()]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._encoder_pass(captured_inputs)
        finally:
            for layer, counter in zip(self._sliding_layers(), counters):
                layer.cumulative_length_int = counter
        return graph, static

    def _encode_prompt(self, input_ids, attention_mask, position_ids, prompt_kwargs) -> None:
        """The prompt's encoder pass; with `prefill_chunk_size`, a text prompt goes in chunks, each attending to the
        cache so far (the attention mask of one pass grows with the prompt squared). Prompts with images go whole:
        the image features belong to the first pass."""
        chunks = self.prompt_chunks(input_ids.shape[1], prompt_kwargs)
        if len(chunks) == 1:
            self._encode(input_ids, attention_mask, position_ids, is_prefill=True, prompt_kwargs=prompt_kwargs)
            return
        cached = attention_mask.shape[1] - input_ids.shape[1]
        for start, end in chunks:
            self._encode(input_ids[:, start:end], attention_mask[:, : cached + end], position_ids[:, start:end],
                         is_prefill=True)

    def prompt_chunks(self, length: int, prompt_kwargs=None) -> list[tuple[int, int]]:
        """(start, end) of the prompt's encoder passes: one, or chunks of `prefill_chunk_size` tokens for a text
        prompt."""
        chunk = self.settings.prefill_chunk_size
        if chunk is None or length <= chunk or prompt_kwargs:
            return [(0, length)]
        return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]

    def run(self, generation_config, input_ids, attention_mask, past_key_values, decoder_input_ids, sc_logits,
            streamer, prompt_kwargs):
        """The canvas loop; `prompt_kwargs` (e.g. pixel_values) go to the prompt's encoder pass."""
        with self.self_conditioning_input():
            return self._run(generation_config, input_ids, attention_mask, past_key_values, decoder_input_ids,
                             sc_logits, streamer, prompt_kwargs)

    @contextlib.contextmanager
    def self_conditioning_input(self):
        """Fused mode: while open, the decoder reads the soft embedding (not logits) as its self-conditioning
        input. Every decoder step of the engine runs inside it."""
        if self.sampling != "fused":
            yield
            return
        hook = self.model.model.decoder.self_conditioning.register_forward_pre_hook(
            lambda module, args: (args[0], self.soft)
        )
        try:
            yield
        finally:
            hook.remove()

    def _run(self, generation_config, input_ids, attention_mask, past_key_values, decoder_input_ids, sc_logits,
             streamer, prompt_kwargs):
        model = self.model
        settings = self.settings
        length = self.canvas_length
        initial_length = input_ids.shape[1]
        cur_len = initial_length + (past_key_values.get_seq_length() if past_key_values is not None else 0)
        self.cache = self.make_cache(past_key_values)
        if self.use_graphs:
            # Kernels this process has not launched yet, compiled in parallel threads now rather than one by one as
            # the passes meet them (nothing to do once they all have been).
            with _phase("compile_kernels"):
                compile_kernels(self, initial_length, prompt_kwargs)
        self.finished_sequences.zero_()
        self.forward_passes.zero_()
        eos = None
        if settings.eos_token_id is not None:
            eos = torch.tensor(list(settings.eos_token_id), device=self.device)
        stopping_criteria = model._prepare_ar_stopping_criteria(generation_config, None)
        encoder_position_ids = torch.arange(cur_len - initial_length, cur_len, device=self.device).unsqueeze(0)
        decoder_position_ids = torch.arange(cur_len, cur_len + length, device=self.device).unsqueeze(0)
        if attention_mask is None:
            attention_mask = torch.ones((self.batch_size, cur_len), dtype=torch.bool, device=self.device)
        attention_mask = attention_mask.bool()
        decoder_attention_mask = torch.nn.functional.pad(attention_mask, (0, length), value=True)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        self.logits_processing.reset()
        self.logits_processing.observe(input_ids, attention_mask[:, -initial_length:])

        for canvas_index in range(self.canvases):
            # Commit what is new (the prompt, then the last canvas) to the cache with one encoder pass.
            if canvas_index == 0:
                with _phase("prefill"):
                    self._encode_prompt(input_ids, attention_mask, encoder_position_ids, prompt_kwargs)
            else:
                with _phase("commit"):
                    self._encode(input_ids, attention_mask, encoder_position_ids, is_prefill=False)
            with _phase("canvas_start"):
                start = self._initial_canvas(canvas_index)  # drawn even when a canvas is given, as upstream does
                if canvas_index == 0 and decoder_input_ids is not None:
                    start = decoder_input_ids
                masks = model.model.decoder.create_diffusion_decoder_attention_mask(
                    config=model.config, inputs_embeds=start.unsqueeze(-1), past_key_values=self.cache,
                    decoder_attention_mask=decoder_attention_mask,
                )
                self.mask_mapping = {kind: one_row(mask) for kind, mask in masks.items()}
                self._start_canvas(start, sc_logits if canvas_index == 0 else None, canvas_index)
            with _phase("denoise"):
                if self.sampling == "fused":
                    self._denoise_fused(decoder_position_ids, streamer)
                else:
                    self._denoise_reference(decoder_position_ids, streamer)
            with _phase("canvas_end"):  # ends with the one host sync of a canvas
                input_ids = torch.cat([input_ids, self.argmax.clone()], dim=-1)
                input_ids, finished = model._finalize_canvas(
                    input_ids=input_ids, finished_sequences=self.finished_sequences.clone(),
                    generation_config=generation_config, stopping_criteria=stopping_criteria,
                    canvas_length=length, eos_tensor=eos,
                )
                self.finished_sequences.copy_(finished)
                committed = input_ids[:, -length:]
                if settings.pad_token_id is not None:
                    self.logits_processing.observe(committed, committed != settings.pad_token_id)
                else:
                    self.logits_processing.observe(committed, torch.ones_like(committed, dtype=torch.bool))
                if streamer is not None:
                    streamer.put(input_ids[:, -length:].cpu())
                if bool(self.finished_sequences.all()):
                    break
            cur_len, decoder_attention_mask, attention_mask, encoder_position_ids, decoder_position_ids = (
                model._prepare_kwargs_for_next_canvas(
                    attention_mask=attention_mask, decoder_attention_mask=decoder_attention_mask,
                    decoder_position_ids=decoder_position_ids, canvas_length=length, cur_len=cur_len,
                )
            )
        if streamer is not None:
            streamer.end()
        tokens_per_forward = model._compute_tokens_per_forward(
            input_ids, self.forward_passes, initial_length, settings.pad_token_id
        )
        return input_ids, tokens_per_forward, self.cache


def add_soft_embedding_chunk(soft, logits, inv_temperature, log_norm, weight, softcap=None) -> torch.Tensor:
    """soft + softmax(logits * inv_temperature) @ weight for one chunk of the vocabulary, the softmax rebuilt
    from its log-normaliser (compiled on CUDA per chunk: the softcap, the exp and the cast in one pass, one chunk
    of probabilities at a time). `softcap`: the logits are the LM head's raw output, softcapped here as the
    sampler does."""
    logits = logits.float() if softcap is None else logit_softcap(logits, softcap)
    probs = torch.exp(logits * inv_temperature - log_norm[:, None])
    return soft + torch.mm(probs.to(weight.dtype), weight).float()


def _tensors(inputs: dict):
    """(name, tensor) of an encoder pass's inputs, the attention masks' as "attention_mask.<layer type>"."""
    for name, value in inputs.items():
        if isinstance(value, dict):
            yield from ((f"{name}.{kind}", mask) for kind, mask in value.items() if mask is not None)
        elif value is not None:
            yield name, value


def _phase(name: str):
    """A named range of generate() in torch.profiler's traces (eval.speed --profile sums them)."""
    return torch.profiler.record_function(f"dgemma_hf.{name}")


def _put_draft(streamer, argmax: torch.Tensor) -> None:
    # A draft streamer sees every step (upstream's put_draft), at the cost of a device-to-host copy per step.
    if streamer is not None and hasattr(streamer, "put_draft"):
        streamer.put_draft(value=argmax.cpu())
