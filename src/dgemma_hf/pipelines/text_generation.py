"""`pipeline("text-diffusion")`: transformers' pipeline API over DiffusionGemma, shaped like "text-generation".

    import dgemma_hf
    from transformers import pipeline

    pipe = pipeline("text-diffusion", model="google/diffusiongemma-26B-A4B-it", dtype="bfloat16")
    pipe("Why is the sky blue?", max_new_tokens=256, seed=0)
    # [{'generated_text': 'Why is the sky blue? ...'}]
    pipe([{"role": "user", "content": "Hi!"}])
    # [{'generated_text': [{'role': 'user', 'content': 'Hi!'}, {'role': 'assistant', 'content': '...'}]}]
    pipe(["a prompt", "a longer prompt"], scheduler="top_k_per_step", scheduler_kwargs={"num_inference_steps": 16})
    # [[{'generated_text': ...}], [{'generated_text': ...}]]

Batches: a list of inputs is tokenized, left-padded and generated in one `generate()` call (or in chunks of
`batch_size`). A row's result depends on the batch it is in: the prompts share the call's random streams
(sampling="reference" draws the whole batch from torch's generator; the fused sampler keys its Philox streams
by (seed, step counter x rows + row), rows counting batch x canvas positions), so batch row i is not prompt i
generated alone, even with the same seed. Left padding itself changes nothing in reference mode (tested); in
fused mode (a static cache) it can change the results of models with sliding-window layers, as upstream's
generate with cache_implementation="static" does. `batch_size=1` generates each prompt alone: same seed, same
result as a single call.
"""

from __future__ import annotations

import enum
import os

import torch
from transformers import Pipeline

from .common import (
    build_scheduler,
    check_model,
    check_positive_int,
    check_scheduler_argument,
    encode_item,
    generate,
    is_conversation,
    left_pad,
    normalize_inputs,
    pad_token_id,
)


class ReturnType(enum.Enum):
    TENSORS = 0
    NEW_TEXT = 1
    FULL_TEXT = 2


class TextDiffusionGenerationPipeline(Pipeline):
    """Generates text with a DiffusionGemma model (task "text-diffusion").

    Call arguments (also accepted at construction, as defaults for every call):
        text_inputs: a string, a list of strings, a conversation (a list of {"role", "content"} dicts; the chat
            template is applied and a new assistant turn generated, or a final assistant message continued) or a
            list of conversations.
        return_full_text (default True): the prompt (or the conversation) with the new text; False: the new text.
        return_tensors: return {"generated_token_ids": prompt ids (no padding) + new ids} instead of text.
        scheduler: a dgemma_hf.schedulers scheduler, one of diffusers' DiffusionGemma schedulers, or a name of
            `dgemma_hf.schedulers.SCHEDULERS` ("entropy_bound", "confidence_threshold", "top_k_per_step") built
            with its class's defaults, then `scheduler_kwargs`; a name's `num_inference_steps` defaults to
            `max_denoising_steps` (else the model's generation config). Default: the generation config's sampler.
        scheduler_kwargs: settings for a named scheduler.
        seed: makes the call repeatable in both sampling modes (the fused sampler's seed; torch's generator,
            seeded with it and restored afterwards, for sampling="reference"). One seed per generate() call.
        sampling: "auto" (default), "reference" or "fused" (see `DiffusionGemmaForMaskedGeneration.generate`).
        streamer: passed to generate(), e.g. a `TextDiffusionIteratorStreamer` (one prompt at a time).
        batch_size: prompts per generate() call (default: all of them).
        skip_special_tokens (default True), clean_up_tokenization_spaces, continue_final_message,
        add_special_tokens, tokenizer_encode_kwargs: decoding and encoding options, as in "text-generation".
        Anything else (max_new_tokens, max_denoising_steps, t_min, ...) goes to generate().
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False
    _load_tokenizer = True
    _pipeline_calls_generate = False  # generation settings go through _sanitize_parameters

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_model(self.model)
        if self.tokenizer is None:
            raise ValueError("the text-diffusion pipeline needs a tokenizer: pass tokenizer=...")

    def __repr__(self):
        return (f"{type(self).__name__}(model={type(self.model).__name__}, dtype={self.model.dtype}, "
                f"device={self.device})")

    def save_pretrained(self, save_directory, **kwargs):
        """Saves the model and the tokenizer. Unlike transformers' custom pipelines, no pipeline code or
        `custom_pipelines` entry is written: `import dgemma_hf` registers the task, and a saved entry would make
        `pipeline("text-diffusion", model=folder)` ask for trust_remote_code."""
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        self.tokenizer.save_pretrained(save_directory, **kwargs)

    # -- parameters -------------------------------------------------------------------------------------------

    def _sanitize_parameters(
        self,
        return_full_text=None,
        return_tensors=None,
        return_text=None,
        return_type=None,
        clean_up_tokenization_spaces=None,
        skip_special_tokens=None,
        continue_final_message=None,
        add_special_tokens=None,
        tokenizer_encode_kwargs=None,
        scheduler=None,
        scheduler_kwargs=None,
        seed=None,
        sampling=None,
        streamer=None,
        **generate_kwargs,
    ):
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        if add_special_tokens is not None:
            preprocess_params["add_special_tokens"] = add_special_tokens
        if tokenizer_encode_kwargs is not None:
            preprocess_params["tokenizer_encode_kwargs"] = tokenizer_encode_kwargs
        if continue_final_message is not None:
            preprocess_params["continue_final_message"] = continue_final_message

        for name in ("max_new_tokens", "max_denoising_steps"):
            if name in generate_kwargs and generate_kwargs[name] is not None:
                check_positive_int(name, generate_kwargs[name])
        # Only what is given: a call's scheduler_kwargs may go with the name given at construction.
        if scheduler is not None:
            check_scheduler_argument(scheduler, scheduler_kwargs)
            forward_params["scheduler"] = scheduler
            forward_params["scheduler_kwargs"] = scheduler_kwargs
        elif scheduler_kwargs is not None:
            check_scheduler_argument("entropy_bound", scheduler_kwargs)  # the type of scheduler_kwargs
            forward_params["scheduler_kwargs"] = scheduler_kwargs
        for name, value in (("seed", seed), ("sampling", sampling), ("streamer", streamer)):
            if value is not None:
                forward_params[name] = value
        forward_params.update(generate_kwargs)

        if return_full_text is not None and return_type is None:
            if return_text is not None:
                raise ValueError("`return_text` is mutually exclusive with `return_full_text`")
            if return_tensors:
                raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
            return_type = ReturnType.FULL_TEXT if return_full_text else ReturnType.NEW_TEXT
        if return_tensors and return_type is None:
            if return_text is not None:
                raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
            return_type = ReturnType.TENSORS
        if return_type is not None:
            postprocess_params["return_type"] = return_type
        if clean_up_tokenization_spaces is not None:
            postprocess_params["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        if skip_special_tokens is not None:
            postprocess_params["skip_special_tokens"] = skip_special_tokens
        return preprocess_params, forward_params, postprocess_params

    # -- the call -----------------------------------------------------------------------------------------------

    def __call__(self, text_inputs, batch_size: int | None = None, **kwargs):
        """Generates for one input or a batch; see the class docstring. Returns, per input, a list holding one
        {"generated_text": ...} (or {"generated_token_ids": ...}) dict; a list of such lists for a batch."""
        items, single = normalize_inputs(text_inputs, "text_inputs")
        batch_size = batch_size if batch_size is not None else self._batch_size
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        forward_params = {**self._forward_params, **forward_params}
        postprocess_params = {**self._postprocess_params, **postprocess_params}

        encoded = [self.preprocess(item, **preprocess_params) for item in items]  # all checks before any work
        for index, row in enumerate(encoded):
            if len(row["input_ids"]) == 0:
                where = "`text_inputs`" if single else f"`text_inputs`[{index}]"
                raise ValueError(f"{where} is an empty prompt: it has no tokens")
        chunk = batch_size or len(encoded)
        results = []
        for start in range(0, len(encoded), chunk):
            model_inputs = self._collate(encoded[start: start + chunk], start)
            model_outputs = self.forward(model_inputs, **forward_params)
            for row in range(len(model_outputs["prompt_text"])):
                results.append(self.postprocess(_row(model_outputs, row), **postprocess_params))
        return results[0] if single else results

    def preprocess(self, prompt, add_special_tokens=None, tokenizer_encode_kwargs=None,
                   continue_final_message=None):
        tokenizer_kwargs = dict(tokenizer_encode_kwargs or {})
        if add_special_tokens is not None:
            tokenizer_kwargs["add_special_tokens"] = add_special_tokens
        ids, continued = encode_item(
            self.tokenizer, prompt, use_chat_template=is_conversation(prompt),
            continue_final_message=continue_final_message, tokenizer_kwargs=tokenizer_kwargs,
        )
        return {"input_ids": ids, "prompt_text": prompt, "continue_final_message": continued}

    def _collate(self, rows, start: int = 0):
        names = [f"`text_inputs`[{start + index}]" for index in range(len(rows))]
        input_ids, attention_mask = left_pad([r["input_ids"] for r in rows], pad_token_id(self.tokenizer, self.model),
                                             names)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prompt_text": [r["prompt_text"] for r in rows],
            "continue_final_message": [r["continue_final_message"] for r in rows],
        }

    def _forward(self, model_inputs, scheduler=None, scheduler_kwargs=None, seed=None, streamer=None,
                 **generate_kwargs):
        scheduler = build_scheduler(scheduler, scheduler_kwargs, generate_kwargs.get("max_denoising_steps"),
                                    self.model)
        if scheduler is not None:
            generate_kwargs["scheduler"] = scheduler
        output = generate(self.model, model_inputs["input_ids"], model_inputs["attention_mask"], seed=seed,
                          streamer=streamer, **generate_kwargs)
        return {
            "generated_sequence": output.sequences,
            "input_ids": model_inputs["input_ids"],
            "attention_mask": model_inputs["attention_mask"],
            "tokens_per_forward": output.tokens_per_forward,
            "prompt_text": model_inputs["prompt_text"],
            "continue_final_message": model_inputs["continue_final_message"],
        }

    def postprocess(self, model_outputs, return_type=ReturnType.FULL_TEXT, clean_up_tokenization_spaces=None,
                    skip_special_tokens=True):
        sequence = model_outputs["generated_sequence"]
        prompt_length = model_outputs["input_ids"].shape[-1]
        padding = int((model_outputs["attention_mask"] == 0).sum())
        prompt_text = model_outputs["prompt_text"]
        if return_type == ReturnType.TENSORS:
            return [{"generated_token_ids": sequence[padding:].tolist()}]
        new_text = self.tokenizer.decode(
            sequence[prompt_length:], skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
        )
        if return_type == ReturnType.NEW_TEXT:
            return [{"generated_text": new_text}]
        if isinstance(prompt_text, str):
            return [{"generated_text": prompt_text + new_text}]
        messages = [dict(message) for message in prompt_text]
        if model_outputs["continue_final_message"]:
            messages[-1]["content"] = messages[-1]["content"] + new_text
        else:
            messages.append({"role": "assistant", "content": new_text})
        return [{"generated_text": messages}]


def _row(model_outputs: dict, row: int) -> dict:
    out = {}
    for key, value in model_outputs.items():
        out[key] = value[row] if isinstance(value, (torch.Tensor, list)) else value
    return out
