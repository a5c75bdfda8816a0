"""Loading DiffusionGemma and autoregressive models, and one timed, greedy-or-diffusion generation.

Both families see the same token ids: the task's user message through the tokenizer's chat template when it
has one (and `chat_template` is on), else the task's plain prompt. Generated text stops at the first stop
token (eos, and Gemma's <end_of_turn> when the vocabulary has it); generated tokens are counted up to and
including it, padding excluded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

import dgemma_hf  # noqa: F401  (registers DiffusionGemmaForMaskedGeneration with the auto classes)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma import DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig

from .measure import FirstOutputTimer, synchronize
from .tasks import Task

DGEMMA_MODEL_TYPE = "diffusion_gemma"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_model_type(path: str | Path, expect_dgemma: bool, argument: str) -> str:
    """Reads only the config; raises ValueError naming `argument` when the model family is the wrong one."""
    model_type = AutoConfig.from_pretrained(str(path)).model_type
    if expect_dgemma and model_type != DGEMMA_MODEL_TYPE:
        raise ValueError(
            f"{argument}: {path} holds a {model_type!r} model, not a DiffusionGemma ({DGEMMA_MODEL_TYPE!r}) checkpoint"
        )
    if not expect_dgemma and model_type == DGEMMA_MODEL_TYPE:
        raise ValueError(
            f"{argument}: {path} holds a DiffusionGemma ({DGEMMA_MODEL_TYPE!r}) checkpoint; this side needs an "
            "autoregressive causal language model"
        )
    return model_type


def default_dgemma_settings(path: str | Path) -> dict:
    """The checkpoint's own denoising steps and entropy bound (upstream's defaults where it sets none)."""
    defaults = DiffusionGemmaGenerationConfig._get_default_generation_params()
    try:
        config = DiffusionGemmaGenerationConfig.from_pretrained(str(path))
    except OSError:  # no generation_config.json
        config = None
    steps = getattr(config, "max_denoising_steps", None) or defaults["max_denoising_steps"]
    sampler = getattr(config, "sampler_config", None) or defaults["sampler_config"]
    return {"steps": int(steps), "entropy_bound": float(sampler.entropy_bound)}


@dataclass
class LoadedModel:
    kind: str  # "dgemma" or "ar"
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    use_chat_template: bool
    stop_ids: list[int]
    pad_id: int | None


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    latency_s: float
    first_output_s: float | None
    tokens_per_forward: float | None


def _stop_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if end_of_turn is not None and end_of_turn != tokenizer.unk_token_id:
        ids.append(end_of_turn)  # Gemma chat turns end here
    return sorted({int(i) for i in ids if i is not None})


def load_model(kind: str, path: str | Path, device: str | torch.device, dtype: str = "auto",
               chat_template: bool = True) -> LoadedModel:
    if kind not in ("dgemma", "ar"):
        raise ValueError(f"kind must be 'dgemma' or 'ar', got {kind!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    device = torch.device(device)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    argument = "--dgemma-model" if kind == "dgemma" else "--ar-model"
    check_model_type(path, expect_dgemma=kind == "dgemma", argument=argument)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if kind == "dgemma":
        model = AutoModel.from_pretrained(str(path), dtype=torch_dtype)
        if not isinstance(model, DiffusionGemmaForBlockDiffusion):
            raise ValueError(f"{argument}: {path} loaded as {type(model).__name__}, not a DiffusionGemma generator")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    model = model.to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LoadedModel(
        kind=kind,
        model=model,
        tokenizer=tokenizer,
        device=device,
        use_chat_template=bool(chat_template and tokenizer.chat_template),
        stop_ids=_stop_ids(model, tokenizer),
        pad_id=pad_id,
    )


def encode(loaded: LoadedModel, task: Task, item: dict) -> torch.Tensor:
    """Prompt token ids [1, length] on the model's device."""
    tokenizer = loaded.tokenizer
    if loaded.use_chat_template:
        ids = tokenizer.apply_chat_template(
            task.messages(item), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(task.plain_prompt(item), return_tensors="pt")["input_ids"]
    return ids.to(loaded.device)


def _decode_new(loaded: LoadedModel, new_ids: torch.Tensor) -> tuple[str, int]:
    ids = new_ids.tolist()
    stop_at = next((index for index, token in enumerate(ids) if token in loaded.stop_ids), None)
    kept = ids if stop_at is None else ids[:stop_at]
    counted = ids if stop_at is None else ids[: stop_at + 1]
    new_tokens = sum(1 for token in counted if token != loaded.pad_id)
    return loaded.tokenizer.decode(kept, skip_special_tokens=True), new_tokens


def generate(loaded: LoadedModel, input_ids: torch.Tensor, max_new_tokens: int, settings: dict,
             seed: int = 0) -> Generation:
    """One timed generation. DiffusionGemma takes settings {"steps", "entropy_bound"}; the AR model is greedy."""
    torch.manual_seed(seed)  # DiffusionGemma samples its canvases: the same seed gives the same run
    synchronize(loaded.device)
    start = time.perf_counter()
    timer = FirstOutputTimer(start)
    with torch.inference_mode():
        if loaded.kind == "dgemma":
            output = loaded.model.generate(
                input_ids,
                max_new_tokens=max_new_tokens,
                max_denoising_steps=int(settings["steps"]),
                sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(settings["entropy_bound"])),
                streamer=timer,
            )
            sequences, tokens_per_forward = output.sequences, float(output.tokens_per_forward[0])
        else:
            sequences = loaded.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=loaded.stop_ids,
                pad_token_id=loaded.pad_id,
                streamer=timer,
            )
            tokens_per_forward = None
    synchronize(loaded.device)
    latency = time.perf_counter() - start
    text, new_tokens = _decode_new(loaded, sequences[0, input_ids.shape[1] :])
    return Generation(
        text=text,
        prompt_tokens=int(input_ids.shape[1]),
        new_tokens=new_tokens,
        latency_s=latency,
        first_output_s=timer.first_output_s,
        tokens_per_forward=tokens_per_forward,
    )
