"""`TextDiffusionPipeline`: a diffusers `DiffusionPipeline` (model, scheduler, tokenizer) over dgemma_hf's engine.

    import dgemma_hf
    from dgemma_hf.pipelines import TextDiffusionPipeline
    from dgemma_hf.schedulers import EntropyBoundDiffusionScheduler, TopKPerStepScheduler
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path, dtype="bfloat16", device_map="cuda")
    pipe = TextDiffusionPipeline(model=model, scheduler=EntropyBoundDiffusionScheduler(num_inference_steps=48),
                                 tokenizer=AutoTokenizer.from_pretrained(path))
    out = pipe("Why is the sky blue?", max_new_tokens=256, seed=0)
    out.texts, out.sequences, out.tokens_per_forward
    pipe.scheduler = TopKPerStepScheduler.from_config(pipe.scheduler.config)   # swap schedulers
    pipe.save_pretrained("saved"); TextDiffusionPipeline.from_pretrained("saved")

Saving and loading. diffusers records each component's (library, class) in model_index.json from the
component's module, and for loading imports the class from that library and needs the library module to expose
the loadable base class (`PreTrainedModel`, `SchedulerMixin`, ...). Left alone that gives ("dgemma_hf.modeling",
...) for the model and ("dgemma_hf.schedulers.acceptance", ...) for a scheduler, neither of which diffusers can
load back (those modules expose no `SchedulerMixin` / `PreTrainedModel`); upstream's DiffusionGemmaPipeline
records "diffusion_gemma" for the model, which breaks the same way. This pipeline records
- the model as ("transformers", "DiffusionGemmaForBlockDiffusion"), a real transformers class with the same
  config and weights, and loads it back with `AutoModel` (so `import dgemma_hf` gives our class);
- a dgemma_hf scheduler as ("dgemma_hf.schedulers", class name) and loads it from that module; diffusers'
  schedulers as ("diffusers", class name);
- the tokenizer (or processor) as diffusers does, ("transformers", class name), loaded with AutoTokenizer or
  AutoProcessor.
`from_pretrained` reads model_index.json itself (also upstream DiffusionGemmaPipeline folders, whose text
component is "processor"); any component can be passed in instead.

`callback_on_step_end` runs through the streamer hook the engine already has (`put_draft` after every step), so
the engine is unchanged; see `StepCallbackStreamer` for its arguments.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple
from diffusers.utils import BaseOutput
from transformers import PreTrainedModel, ProcessorMixin

from ..generation.scheduling import resolve_scheduler
from ..schedulers import DIFFUSERS_SCHEDULERS, TextDiffusionScheduler
from .common import (
    check_model,
    check_positive_int,
    check_scheduler_argument,
    encode_item,
    generate,
    left_pad,
    normalize_inputs,
    pad_token_id,
)
from .streaming import StepCallbackStreamer

_COMPONENTS = ("model", "scheduler", "tokenizer")
_MODEL_ENTRY = ("transformers", "DiffusionGemmaForBlockDiffusion")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies")


@dataclass
class TextDiffusionPipelineOutput(BaseOutput):
    """texts: the decoded new text per sequence (None for output_type="seq");
    sequences: the new tokens [batch, new_length] (the prompt is stripped; pad after a sequence's end);
    tokens_per_forward: per sequence, generated tokens per decoder forward pass [batch]."""

    texts: list[str] | None
    sequences: torch.LongTensor
    tokens_per_forward: torch.Tensor


def _component_entry(value) -> tuple[str | None, str | None]:
    """The (library, class) that model_index.json records for a component (see the module docstring)."""
    if value is None:
        return (None, None)
    if isinstance(value, PreTrainedModel):
        return _MODEL_ENTRY
    if isinstance(value, TextDiffusionScheduler):
        from .. import schedulers

        if getattr(schedulers, type(value).__name__, None) is type(value):
            return ("dgemma_hf.schedulers", type(value).__name__)
    return _fetch_class_library_tuple(value)


class TextDiffusionPipeline(DiffusionPipeline):
    """DiffusionGemma text generation as a diffusers pipeline: `__call__` tokenizes, runs
    `model.generate(..., scheduler=self.scheduler)` on dgemma_hf's engine and decodes.

    Args:
        model: a `DiffusionGemmaForMaskedGeneration` (what AutoModel returns after `import dgemma_hf`).
        scheduler: a dgemma_hf.schedulers scheduler or one of diffusers' DiffusionGemma schedulers; None builds
            the entropy-bound scheduler from the model's generation config (upstream's sampler).
        tokenizer: a tokenizer, or a processor (its `.tokenizer` encodes and decodes).
    All three are required arguments (diffusers saves the required ones), but `scheduler` may be None.
    """

    model_cpu_offload_seq = "model"
    _callback_tensor_inputs = ("draft", "sequences")

    def __init__(self, model, scheduler, tokenizer):
        super().__init__()
        check_model(model)
        if tokenizer is None:
            raise ValueError("TextDiffusionPipeline needs a tokenizer (or processor): pass tokenizer=...")
        if scheduler is None:  # the one generate() would build, from the generation config with its defaults
            generation_config, _ = model._prepare_generation_config(None)
            scheduler = resolve_scheduler(None, generation_config, False)
        check_scheduler_argument(scheduler, None)
        self.register_modules(model=model, scheduler=scheduler, tokenizer=tokenizer)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)  # diffusers records its own (library, class) for a component ...
        if name in _COMPONENTS and "_internal_dict" in self.__dict__ and name in self.config:
            self.register_to_config(**{name: _component_entry(value)})  # ... which we replace with ours

    @property
    def text_tokenizer(self):
        """The tokenizer that encodes and decodes text (a processor's `.tokenizer`)."""
        if isinstance(self.tokenizer, ProcessorMixin):
            return self.tokenizer.tokenizer
        return self.tokenizer

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> TextDiffusionPipeline:
        """Loads a saved pipeline folder (or hub repository). Keyword arguments: `model`, `scheduler`, `tokenizer`
        to pass components instead of loading them; `dtype` / `torch_dtype`, `device_map` and other
        `from_pretrained` arguments for the model; hub arguments (`cache_dir`, `revision`, `token`, ...)."""
        components = {name: kwargs.pop(name) for name in _COMPONENTS if name in kwargs}
        hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(pretrained_model_name_or_path), **hub_kwargs))
        if not (folder / cls.config_name).is_file():
            raise ValueError(f"{folder} has no {cls.config_name}: not a saved pipeline folder")
        index = cls.load_config(folder)

        if "model" not in components:
            library, _ = index.get("model", (None, None))
            if library is None:
                raise ValueError(f"{folder / cls.config_name} names no model component")
            components["model"] = _load_model(folder / "model", kwargs)
        elif kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} (they are for loading the model, which was passed)")
        if "scheduler" not in components:
            library, class_name = index.get("scheduler", (None, None))
            components["scheduler"] = None if library is None else _load_scheduler(folder, library, class_name)
        if "tokenizer" not in components:
            name = "tokenizer" if index.get("tokenizer", (None,))[0] is not None else "processor"
            library, class_name = index.get(name, (None, None))
            if library is None:
                raise ValueError(f"{folder / cls.config_name} names no tokenizer (or processor) component")
            components["tokenizer"] = _load_tokenizer(folder / name, library, class_name)
        return cls(**components)

    # -- the call -----------------------------------------------------------------------------------------------

    def _encode(self, prompt, messages, use_chat_template):
        if prompt is None and messages is None:
            raise ValueError("pass `prompt` (a string or a list of strings) or `messages` (a conversation or a list "
                             "of conversations)")
        if prompt is not None and messages is not None:
            raise ValueError("pass either `prompt` or `messages`, not both")
        if prompt is not None:
            items, _ = normalize_inputs(prompt, "prompt")
            if any(not isinstance(item, str) for item in items):
                raise TypeError("`prompt` must be a string or a list of strings; pass conversations as `messages`")
            name = "prompt"
        else:
            if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], str):
                raise TypeError("`messages` must be a conversation (a list of message dicts) or a list of them; "
                                "pass text as `prompt`")
            items, _ = normalize_inputs(messages, "messages")
            name = "messages"
        tokenizer = self.text_tokenizer
        if use_chat_template is None:
            use_chat_template = getattr(tokenizer, "chat_template", None) is not None
        rows = [encode_item(tokenizer, item, use_chat_template=use_chat_template)[0] for item in items]
        names = [f"`{name}`[{index}]" for index in range(len(rows))] if len(rows) > 1 else [f"`{name}`"]
        return left_pad(rows, pad_token_id(tokenizer, self.model), names)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        messages: list[dict] | list[list[dict]] | None = None,
        *,
        max_new_tokens: int | None = None,
        num_inference_steps: int | None = None,
        use_chat_template: bool | None = None,
        sampling: str = "auto",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "text",
        return_dict: bool = True,
        streamer=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **generate_kwargs,
    ):
        """Generates text.

        Args:
            prompt: a string or a list of strings; a user turn of the chat template when the tokenizer has one
                (or use_chat_template=True), the raw text otherwise (use_chat_template=False).
            messages: a conversation ({"role", "content"} dicts) or a list of conversations, through the chat
                template (a final assistant message is continued).
            max_new_tokens: new tokens (rounded up to whole canvases); default: the model's generation config.
            num_inference_steps: denoising steps per canvas; default: the scheduler's. Given, the call runs a copy
                of the scheduler (`from_config(..., num_inference_steps=n)`); `self.scheduler` is unchanged.
            sampling, seed: as `DiffusionGemmaForMaskedGeneration.generate`; `seed` also seeds torch's generator
                for sampling="reference" (restored afterwards). `generator`: a torch.Generator to draw the seed from.
            output_type: "text" (texts and sequences) or "seq" (sequences only).
            streamer: passed to generate() (e.g. a `TextDiffusionIteratorStreamer`).
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs)` after every denoising step (or a
                diffusers PipelineCallback), with the tensors named in `callback_on_step_end_tensor_inputs` among
                "draft" (default) and "sequences"; see `StepCallbackStreamer`.
            generate_kwargs: other generate() settings (t_min, stability_threshold, eos_token_id, ...).

        Returns: TextDiffusionPipelineOutput(texts, sequences, tokens_per_forward), or (sequences, texts,
            tokens_per_forward) for return_dict=False.
        """
        if output_type not in ("text", "seq"):
            raise ValueError(f"`output_type` must be 'text' or 'seq', got {output_type!r}")
        if max_new_tokens is not None:
            check_positive_int("max_new_tokens", max_new_tokens)
        if "max_denoising_steps" in generate_kwargs:
            raise ValueError("set the steps with `num_inference_steps` (TextDiffusionPipeline's name for "
                             "max_denoising_steps)")
        scheduler = self.scheduler
        if num_inference_steps is not None:
            check_positive_int("num_inference_steps", num_inference_steps)
            scheduler = type(scheduler).from_config(scheduler.config, num_inference_steps=num_inference_steps)
        steps = scheduler.config.num_inference_steps
        if seed is not None and generator is not None:
            raise ValueError("pass either `seed` or `generator`, not both")
        if generator is not None:
            seed = int(torch.randint(0, 2**39, (1,), generator=generator).item())

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["draft"]
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            allowed = list(self._callback_tensor_inputs)
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be among {allowed}, got {unknown}")
        if callback_on_step_end is not None:
            if not callable(callback_on_step_end):
                raise TypeError("`callback_on_step_end` must be callable")
            streamer = StepCallbackStreamer(self, callback_on_step_end, callback_on_step_end_tensor_inputs, steps,
                                            inner=streamer)

        input_ids, attention_mask = self._encode(prompt, messages, use_chat_template)
        device = self.model.device
        if max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = max_new_tokens
        output = generate(self.model, input_ids.to(device), attention_mask.to(device), seed=seed, streamer=streamer,
                          scheduler=scheduler, sampling=sampling, **generate_kwargs)
        sequences = output.sequences[:, input_ids.shape[1]:]
        texts = None
        if output_type == "text":
            texts = self.text_tokenizer.batch_decode(sequences, skip_special_tokens=True)
        if not return_dict:
            return sequences, texts, output.tokens_per_forward
        return TextDiffusionPipelineOutput(texts=texts, sequences=sequences,
                                           tokens_per_forward=output.tokens_per_forward)


# -- loading helpers ---------------------------------------------------------------------------------------------


def _load_model(path: Path, kwargs: dict):
    from transformers import AutoModel

    # dgemma_hf is imported (this module is part of it), so AutoModel maps diffusion_gemma to our class.
    model = AutoModel.from_pretrained(path, **kwargs)
    check_model(model)
    return model


def _load_scheduler(folder: Path, library: str, class_name: str):
    if library.startswith("dgemma_hf"):
        from .. import schedulers as module
    elif library == "diffusers":
        import diffusers as module
    else:  # a scheduler of the caller's own module: only one already imported, as diffusers does
        module = sys.modules.get(library)
        if module is None:
            raise ValueError(f"scheduler library {library!r} in model_index.json is not imported; import it first")
    scheduler_class = getattr(module, class_name, None)
    if scheduler_class is None or not issubclass(scheduler_class, (TextDiffusionScheduler, *DIFFUSERS_SCHEDULERS)):
        raise ValueError(f"model_index.json names scheduler ({library!r}, {class_name!r}), which is not a "
                         "dgemma_hf.schedulers scheduler or one of diffusers' DiffusionGemma schedulers")
    return scheduler_class.from_pretrained(folder, subfolder="scheduler")


def _load_tokenizer(path: Path, library: str, class_name: str):
    import transformers
    from transformers import AutoProcessor, AutoTokenizer

    declared = getattr(transformers, class_name, None) if library == "transformers" else None
    if isinstance(declared, type) and issubclass(declared, ProcessorMixin):
        return AutoProcessor.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
