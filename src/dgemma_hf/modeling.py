"""DiffusionGemmaForMaskedGeneration: upstream's DiffusionGemmaForBlockDiffusion, checked at the door.

Same config class, weights, forward and generate semantics as upstream (transformers 5.23); this subclass is
the one place where dgemma_hf's faster engine, experts and attention backends plug in. Today it adds:
- the block-diffusion training loss when `forward` gets `labels` (training.py);
- the "dgemma" experts backend by default (Triton MoE kernels on CUDA, upstream's grouped_mm elsewhere);
- text layers whose inference forward runs in three fused regions (the encoder's for canvas commits), and
  decoder attention that reads a full sliding-window StaticCache as a DynamicCache presents it (fused_layers.py);
- the "dgemma_attention" backend for the text layers by default where CUDA exists (attention.py);
- checkpoint checks before loading (model type, shards, safetensors headers, quantization method);
- argument checks before generating (empty prompt, context length, ranges of the generation settings).
"""

from __future__ import annotations

import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma import DiffusionGemmaGenerationOutput

from .attention import AttentionChecks, use_default_attention
from .checkpoint import check_checkpoint, check_quantization_config
from .distributed import model_devices, prepare_generate, resolve_parallel_plans
from .quantization.export import check_save_arguments, write_export_files
from .training import block_diffusion_loss, check_no_training_arguments
from .quantization.swap import nvfp4_experts_modules
from .experts import AUTO as AUTO_EXPERTS
from .fused_layers import use_fused_layers
from .generation.checks import (
    check_canvas,
    check_context,
    check_generation_fields,
    check_prompt,
    resolve_generation_fields,
)
from .generation.engine import DenoisingEngine, Settings, resolve_sampling
from .generation.logits_processing import LogitsSettings
from .generation.scheduling import resolve_scheduler

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


class DiffusionGemmaForMaskedGeneration(AttentionChecks, DiffusionGemmaForBlockDiffusion):
    # transformers decides whether experts backends can be swapped by grepping the class's module for its
    # decorator; the experts modules are upstream's, so swapping is supported.
    _can_set_experts_implementation_cached_value = True

    # device_map="auto" must keep a decoder layer on one device: the fused layers are upstream's, renamed.
    _no_split_modules = [*DiffusionGemmaForBlockDiffusion._no_split_modules, "FusedDecoderLayer", "FusedEncoderLayer"]

    # transformers' Trainer: the training loss is a mean over this batch's target tokens (the Trainer averages it
    # over gradient-accumulation steps), so the Trainer must not pass `num_items_in_batch`.
    accepts_loss_kwargs = False

    def __init__(self, config):
        asked = config._attn_implementation_internal or config.text_config._attn_implementation_internal
        super().__init__(config)
        # transformers resolves the default backend on the top config only; the experts read the text config.
        self.set_experts_implementation(self.config._experts_implementation)
        if not asked:
            use_default_attention(self)
        use_fused_layers(self)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # Unless the caller names one, experts run on dgemma_hf's dispatcher: Triton kernels on CUDA,
        # upstream's grouped_mm elsewhere.
        return super().get_correct_experts_implementation(requested_experts or AUTO_EXPERTS)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if pretrained_model_name_or_path is not None:
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            check_checkpoint(pretrained_model_name_or_path, config=kwargs.get("config"), **hub_kwargs)
            if kwargs.get("quantization_config") is not None:
                check_quantization_config(kwargs["quantization_config"], "quantization_config argument")
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def _resolve_parallel_plans(self, distributed_config):
        # tp_plan="auto" / DistributedConfig under torchrun: dgemma_hf.distributed's plans (both text stacks, EP).
        return resolve_parallel_plans(self, distributed_config, super()._resolve_parallel_plans)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        *args,
        labels=None,
        corruption_rate=None,
        self_conditioning_prob=None,
        encoder_loss_weight=None,
        generator=None,
        **kwargs,
    ):
        """Upstream's forward. With `labels` (the target canvas, [batch, canvas_length], -100 = no loss): the
        block-diffusion training loss of `dgemma_hf.training.block_diffusion_loss` (`loss`, and the `logits` of
        the pass it is taken on)."""
        training = dict(
            corruption_rate=corruption_rate,
            self_conditioning_prob=self_conditioning_prob,
            encoder_loss_weight=encoder_loss_weight,
            generator=generator,
        )
        if labels is None:
            check_no_training_arguments(**training)
            return super().forward(input_ids, attention_mask, *args, **kwargs)
        if args:
            raise TypeError("with `labels`, pass the arguments after `attention_mask` by keyword")
        return block_diffusion_loss(self, input_ids, attention_mask, labels, **training, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained; an NVFP4 model (its state dict already in ModelOpt's layout, from
        the quantizer) also gets ModelOpt's hf_quant_config.json and a model card."""
        nvfp4 = bool(nvfp4_experts_modules(self))
        if nvfp4:
            check_save_arguments(kwargs)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if nvfp4 and kwargs.get("is_main_process", True):
            write_export_files(self, save_directory)
        return result

    @torch.no_grad()
    def generate(
        self,
        input_ids=None,
        past_key_values=None,
        streamer=None,
        generation_config=None,
        logits_processor=None,
        stopping_criteria=None,
        scheduler=None,
        sampling: str = "auto",
        seed: int | list[int] | None = None,
        **kwargs,
    ):
        """Upstream's generate (same arguments, outputs and semantics) on dgemma_hf's engine.

        scheduler: a `dgemma_hf.schedulers` scheduler (entropy bound, confidence threshold, top-k per step) or
            one of diffusers' DiffusionGemma schedulers; by default the entropy-bound scheduler built from the
            generation config (upstream's sampler). Its `num_inference_steps` is the number of denoising steps.
        top_k, top_p, min_p, repetition_penalty, presence_penalty: logits processing as in transformers'
            generate, on the device (penalties over the prompt and the committed canvases).
        sampling: "reference" (upstream's randomness, exactly), "fused" (Triton sampler, static cache, CUDA
            graphs on CUDA) or "auto" (fused on CUDA, reference elsewhere and for diffusers' schedulers).
        seed: the fused sampler's seeds: one per sequence (a list), or an int s giving row i the seed s + i. A
            sequence's result depends on its seed only, not on the rest of the batch (up to the arithmetic of
            batched matrix products). By default drawn from torch's global generator, so `torch.manual_seed`
            makes runs repeatable in both modes (the reference mode uses torch's generator throughout).
        """
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        check_prompt(input_ids, kwargs.get("attention_mask"), past_length)
        fields = resolve_generation_fields(self.generation_config, generation_config, kwargs)
        check_generation_fields(fields)
        prompt_length = input_ids.shape[1] + past_length
        max_new_tokens = fields["max_new_tokens"]
        if fields["max_length"] is not None and max_new_tokens == 256:  # upstream's precedence rule
            max_new_tokens = fields["max_length"] - prompt_length
            if max_new_tokens <= 0:
                raise ValueError(
                    f"`max_length`={fields['max_length']} leaves no room after a prompt of {prompt_length} tokens"
                )
        check_context(
            prompt_length, max_new_tokens, self.config.canvas_length, self.config.text_config.max_position_embeddings
        )
        check_canvas(
            kwargs.get("decoder_input_ids"),
            input_ids.shape[0],
            self.config.canvas_length,
            self.config.text_config.vocab_size,
        )
        if logits_processor is not None or stopping_criteria is not None:
            raise ValueError(
                "`logits_processor` and `stopping_criteria` are not supported by dgemma_hf's engine; "
                "use its schedulers and generation settings"
            )
        logits_settings = LogitsSettings.pop_from(kwargs)
        generation_config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        scheduler = resolve_scheduler(scheduler, generation_config, "max_denoising_steps" in kwargs)
        sampling = resolve_sampling(sampling, input_ids.device, scheduler, one_device=len(model_devices(self)) <= 1)
        prepare_generate(self, input_ids, sampling)  # device maps; same prompt and random state on every rank
        if past_key_values is not None and generation_config.cache_implementation is not None:
            raise ValueError("Cannot provide both `past_key_values` and `generation_config.cache_implementation`.")
        if sampling == "fused" and generation_config.cache_implementation not in (None, "static"):
            raise ValueError(
                f"sampling='fused' runs on a static cache; cache_implementation="
                f"{generation_config.cache_implementation!r} needs sampling='reference'"
            )
        _, max_new_tokens = self._prepare_generated_length(generation_config, prompt_length)
        settings = Settings(
            max_new_tokens=max_new_tokens,
            scheduler=scheduler,
            scheduler_key=scheduler.cache_key(),
            stability_threshold=generation_config.stability_threshold,
            confidence_threshold=generation_config.confidence_threshold,
            eos_token_id=_as_tuple(generation_config.eos_token_id),
            pad_token_id=generation_config.pad_token_id,
            logits=logits_settings,
            prefill_chunk_size=fields["prefill_chunk_size"],
        )
        seeds = _row_seeds(seed, input_ids.shape[0], sampling)
        attention_mask = model_kwargs.pop("attention_mask", None)
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError("`attention_mask` passed to `generate` must be 2D.")
        decoder_input_ids = model_kwargs.pop("decoder_input_ids", None)
        sc_logits = model_kwargs.pop("self_conditioning_logits", None)
        model_kwargs.pop("prefill_chunk_size", None)  # in `settings` (DiffusionGemmaGenerationConfig leaves it here)
        engine = DenoisingEngine.for_call(self, settings, input_ids.shape[0], prompt_length, sampling, seeds)
        sequences, tokens_per_forward, cache = engine.run(
            generation_config, input_ids, attention_mask, past_key_values, decoder_input_ids, sc_logits, streamer,
            prompt_kwargs=model_kwargs,
        )
        if not generation_config.return_dict_in_generate:
            return sequences
        return DiffusionGemmaGenerationOutput(
            sequences=sequences, tokens_per_forward=tokens_per_forward, past_key_values=cache
        )


def _row_seeds(seed, batch_size: int, sampling: str) -> list[int]:
    if seed is None:
        if sampling != "fused":
            return [0] * batch_size  # unused: the reference mode follows torch's global generator
        seed = int(torch.randint(0, 2**40, (1,)).item())
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch_size or not all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
            raise ValueError(f"`seed` as a list must hold {batch_size} integers (one per sequence), got {seed!r}")
        seeds = list(seed)
    elif isinstance(seed, int) and not isinstance(seed, bool):
        seeds = [seed + row for row in range(batch_size)]
    else:
        raise TypeError(f"`seed` must be an int, a list of ints or None, got {type(seed).__name__}")
    if any(not 0 <= s < 2**40 for s in seeds):
        raise ValueError(f"`seed` values must be in [0, 2**40), got {seeds}")
    return seeds


def _as_tuple(token_ids):
    if token_ids is None:
        return None
    return tuple(token_ids) if isinstance(token_ids, (list, tuple)) else (token_ids,)
