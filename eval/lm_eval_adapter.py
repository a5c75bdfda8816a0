r"""DiffusionGemma as an lm-evaluation-harness model: `--model dgemma`, generation tasks only.

    python -m eval.lm_eval_adapter --model dgemma \
        --model_args pretrained=PATH,steps=32,scheduler=entropy_bound,entropy_bound=0.1,dtype=bfloat16 \
        --tasks gsm8k --device cuda --limit 50 --output_path results/lm_eval [--include_path my_tasks/]

lm-eval (0.4.x) has no plugin discovery for models: a model is known once the module defining it has run
`lm_eval.api.registry.register_model`. `python -m eval.lm_eval_adapter ARGS` imports this module (registering
`dgemma`, alias `diffusion-gemma`) and then runs lm-eval's own command line with ARGS, so every `lm_eval`
option works (`--include_path` for local task YAMLs, `--apply_chat_template`, `--gen_kwargs`, ...). From
Python: `import eval.lm_eval_adapter` before `lm_eval.simple_evaluate(model="dgemma", model_args=...)`.

model_args (besides `pretrained`, a DiffusionGemma folder or hub id):
  device, dtype (auto, float32, bfloat16, float16)
  steps            denoising steps per canvas (default: the checkpoint's own)
  scheduler        entropy_bound, confidence_threshold or top_k_per_step (dgemma_hf.schedulers; default: the
                   checkpoint's own entropy-bound sampler)
  entropy_bound    for the entropy_bound scheduler; threshold for confidence_threshold; t_min, t_max for all
  sampling         auto, reference or fused (see DiffusionGemmaForMaskedGeneration.generate)
  seed             base seed; each request gets seed + crc32(its context), so results do not depend on order
  max_gen_toks     default generation budget (a task's `max_gen_toks` generation kwarg wins), default 256
  max_length       prompt + generation limit (default: the model's max_position_embeddings); longer prompts
                   keep their last tokens
`batch_size` is accepted and ignored: requests run one at a time.

generate_until: the model writes whole canvases until it has `max_gen_toks` new tokens (or stops early at its
eos/<end_of_turn> tokens); tokens past `max_gen_toks` are dropped, the text is cut at the first stop token
and then at the first of the request's
`until` strings. A diffusion model fills a canvas in parallel, so stop strings cannot end the generation
early: they only cut its text. Other generation kwargs (do_sample, temperature, top_p, ...) are ignored with
a warning: DiffusionGemma's sampling is set by its scheduler.

loglikelihood / loglikelihood_rolling raise `NoLikelihoodError`: a diffusion model has no left-to-right
likelihood, so multiple-choice-by-likelihood and perplexity tasks cannot run on it; use generation variants.
"""

from __future__ import annotations

import logging
import sys
import zlib

import lm_eval.models  # noqa: F401  (lm-eval imports its own models only while its registry is empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

logger = logging.getLogger(__name__)

MODEL_NAMES = ("dgemma", "diffusion-gemma")
GENERATION_KWARGS_USED = ("until", "max_gen_toks")
LIKELIHOOD_MESSAGE = (
    "{method}: DiffusionGemma is a text diffusion model: it fills masked canvases in parallel and has no "
    "left-to-right likelihood to score a continuation (or a whole text) with, so tasks with output_type "
    "loglikelihood, multiple_choice or loglikelihood_rolling cannot run on it. Use a generation task "
    "(output_type: generate_until), e.g. a generative variant of the benchmark."
)


class NoLikelihoodError(NotImplementedError):
    """Raised for likelihood requests, which a diffusion model cannot answer."""


def _stop_strings(until) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, (list, tuple)) and all(isinstance(stop, str) for stop in until):
        return list(until)
    raise ValueError(f"generate_until: `until` must be a string or a list of strings, got {until!r}")


def cut_at_stop_strings(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            position = text.find(stop)
            if position != -1:
                cut = min(cut, position)
    return text[:cut]


@register_model(*MODEL_NAMES)
class DiffusionGemmaLM(LM):
    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "auto", steps: int | None = None,
                 scheduler: str | None = None, entropy_bound: float | None = None, threshold: float | None = None,
                 t_min: float | None = None, t_max: float | None = None, sampling: str = "auto", seed: int = 0,
                 max_gen_toks: int = 256, max_length: int | None = None, batch_size=1, max_batch_size=None,
                 **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"--model_args: unknown argument(s) {sorted(unknown)} for --model dgemma; known: "
                             "pretrained, device, dtype, steps, scheduler, entropy_bound, threshold, t_min, t_max, "
                             "sampling, seed, max_gen_toks, max_length, batch_size")
        from dgemma_hf.schedulers import SCHEDULERS

        from .models import load_model

        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ValueError(f"--model_args: scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}")
        if scheduler is None and threshold is not None:
            raise ValueError("--model_args: threshold needs scheduler=confidence_threshold")
        if scheduler not in (None, "entropy_bound") and entropy_bound is not None:
            raise ValueError("--model_args: entropy_bound belongs to scheduler=entropy_bound")
        if scheduler != "confidence_threshold" and threshold is not None:
            raise ValueError("--model_args: threshold belongs to scheduler=confidence_threshold")
        if sampling not in ("auto", "reference", "fused"):
            raise ValueError(f"--model_args: sampling must be auto, reference or fused, got {sampling!r}")
        for name, value in (("steps", steps), ("max_gen_toks", max_gen_toks), ("max_length", max_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"--model_args: {name} must be a positive integer, got {value!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # Chat templates are applied by lm-eval (--apply_chat_template), so the loaded model encodes plain text.
        self.loaded = load_model("dgemma", str(pretrained), device, str(dtype), chat_template=False)
        self._device = self.loaded.device
        self.pretrained = str(pretrained)
        self.steps = steps
        self.scheduler_name = scheduler
        self.scheduler_options = {key: float(value) for key, value in (
            ("entropy_bound", entropy_bound), ("threshold", threshold), ("t_min", t_min), ("t_max", t_max))
            if value is not None}
        self.entropy_bound = entropy_bound
        self.sampling = sampling
        self.seed = int(seed)
        self.max_gen_toks = max_gen_toks
        self.max_length = max_length or int(self.loaded.model.config.get_text_config().max_position_embeddings)
        self.scheduler = self._build_scheduler()  # fails here, before any request, on bad settings

    # ---- settings -----------------------------------------------------------------------------------------

    def _build_scheduler(self):
        """A dgemma_hf scheduler when model_args name one or set t_min/t_max; None = the checkpoint's sampler."""
        from dgemma_hf.schedulers import SCHEDULERS

        from .models import default_dgemma_settings

        if self.scheduler_name is None and not {"t_min", "t_max"} & set(self.scheduler_options):
            return None
        name = self.scheduler_name or "entropy_bound"
        defaults = default_dgemma_settings(self.pretrained)
        options = dict(self.scheduler_options)
        if name == "entropy_bound":
            options.setdefault("entropy_bound", defaults["entropy_bound"])
        return SCHEDULERS[name](num_inference_steps=self.steps or defaults["steps"], **options)

    def _generate_kwargs(self) -> dict:
        from transformers.models.diffusion_gemma import EntropyBoundSamplerConfig

        if self.scheduler is not None:
            return {"scheduler": self.scheduler}
        kwargs = {}
        if self.steps is not None:
            kwargs["max_denoising_steps"] = self.steps
        if self.entropy_bound is not None:
            kwargs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(self.entropy_bound))
        return kwargs

    # ---- lm-eval's interface ------------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        template = self.loaded.tokenizer.chat_template
        if not chat_template or not template:
            return None
        if isinstance(template, dict):  # named templates
            return template.get(chat_template if isinstance(chat_template, str) else "default")
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        tokenizer = self.loaded.tokenizer
        if not tokenizer.chat_template:
            raise ValueError(f"--apply_chat_template: the tokenizer of {self.pretrained} has no chat template")
        return tokenizer.apply_chat_template(chat_history, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=not add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NoLikelihoodError(LIKELIHOOD_MESSAGE.format(method="loglikelihood"))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NoLikelihoodError(LIKELIHOOD_MESSAGE.format(method="loglikelihood_rolling"))

    def _encode(self, context: str, budget: int) -> torch.Tensor:
        tokenizer = self.loaded.tokenizer
        # A chat-templated context already starts with <bos>; do not add a second one.
        has_bos = bool(tokenizer.bos_token) and context.startswith(tokenizer.bos_token)
        ids = tokenizer(context, add_special_tokens=not has_bos, return_tensors="pt")["input_ids"]
        keep = self.max_length - budget
        if keep <= 0:
            raise ValueError(f"generate_until: max_gen_toks={budget} leaves no room for a prompt within "
                             f"max_length={self.max_length}")
        if ids.shape[1] > keep:
            logger.warning("prompt of %d tokens cut to its last %d (max_length %d - max_gen_toks %d)",
                           ids.shape[1], keep, self.max_length, budget)
            ids = ids[:, -keep:]
        return ids.to(self._device)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from .models import _decode_new

        outputs, warned = [], set()
        for request in tqdm(requests, desc="dgemma generate_until", disable=disable_tqdm or not requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = _stop_strings(gen_kwargs.get("until"))
            budget = gen_kwargs.get("max_gen_toks", self.max_gen_toks)
            if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
                raise ValueError(f"generate_until: max_gen_toks must be a positive integer, got {budget!r}")
            ignored = sorted(set(gen_kwargs) - set(GENERATION_KWARGS_USED) - warned)
            if ignored:
                logger.warning("dgemma ignores generation kwargs %s: its sampling is set by the scheduler "
                               "(model_args steps, scheduler, entropy_bound, ...)", ignored)
                warned.update(ignored)
            input_ids = self._encode(context, budget)
            seed = self.seed + zlib.crc32(context.encode())
            torch.manual_seed(seed)
            with torch.inference_mode():
                output = self.loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                                    max_new_tokens=budget, sampling=self.sampling, seed=seed,
                                                    **self._generate_kwargs())
            # generate() fills whole canvases: tokens past the budget are dropped
            text, _ = _decode_new(self.loaded, output.sequences[0, input_ids.shape[1]:][:budget])
            text = cut_at_stop_strings(text, until)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
        return outputs


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with `--model dgemma` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv[0] = "python -m eval.lm_eval_adapter"
    cli_evaluate()


if __name__ == "__main__":
    main()
