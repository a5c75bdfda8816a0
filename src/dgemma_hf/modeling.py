"""DiffusionGemmaForMaskedGeneration: upstream's DiffusionGemmaForBlockDiffusion, checked at the door.

Same config class, weights, forward and generate semantics as upstream (transformers 5.23); this subclass is
the one place where dgemma_hf's faster engine, experts and attention backends plug in. Today it adds:
- the "dgemma" experts backend by default (Triton MoE kernels on CUDA, upstream's grouped_mm elsewhere);
- checkpoint checks before loading (model type, shards, safetensors headers, quantization method);
- argument checks before generating (empty prompt, context length, ranges of the generation settings).
"""

from __future__ import annotations

from transformers import DiffusionGemmaForBlockDiffusion

from .checkpoint import check_checkpoint, check_quantization_config
from .experts import AUTO as AUTO_EXPERTS
from .generation.checks import (
    check_canvas,
    check_context,
    check_generation_fields,
    check_prompt,
    resolve_generation_fields,
)

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


class DiffusionGemmaForMaskedGeneration(DiffusionGemmaForBlockDiffusion):
    # transformers decides whether experts backends can be swapped by grepping the class's module for its
    # decorator; the experts modules are upstream's, so swapping is supported.
    _can_set_experts_implementation_cached_value = True

    def __init__(self, config):
        super().__init__(config)
        # transformers resolves the default backend on the top config only; the experts read the text config.
        self.set_experts_implementation(self.config._experts_implementation)

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

    def generate(
        self,
        input_ids=None,
        past_key_values=None,
        streamer=None,
        generation_config=None,
        logits_processor=None,
        stopping_criteria=None,
        **kwargs,
    ):
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
        return super().generate(
            input_ids=input_ids,
            past_key_values=past_key_values,
            streamer=streamer,
            generation_config=generation_config,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            **kwargs,
        )
