"""What both pipelines share: input checks, tokenizing and left padding, scheduler resolution, seeding, the
model check and the default (tiny, random) model.

Everything here runs before any model work and raises a ValueError/TypeError that names the argument.
"""

from __future__ import annotations

import contextlib
import warnings
from numbers import Integral

import torch

from ..modeling import DiffusionGemmaForMaskedGeneration
from ..schedulers import DIFFUSERS_SCHEDULERS, SCHEDULERS, TextDiffusionScheduler

# -- the model -----------------------------------------------------------------------------------------------


def check_model(model) -> None:
    """Only dgemma_hf's DiffusionGemma (what `AutoModel` returns after `import dgemma_hf`) runs these pipelines."""
    if isinstance(model, DiffusionGemmaForMaskedGeneration):
        return
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "diffusion_gemma":
        raise TypeError(
            f"the text-diffusion pipelines run dgemma_hf's DiffusionGemmaForMaskedGeneration; got "
            f"{type(model).__name__} (model_type 'diffusion_gemma'). Load the model with "
            "`transformers.AutoModel.from_pretrained(...)` after `import dgemma_hf`"
        )
    raise ValueError(
        f"the text-diffusion pipelines need a DiffusionGemma model (model_type 'diffusion_gemma'); got "
        f"{type(model).__name__} (model_type {model_type!r})"
    )


def default_model_path() -> str:
    """dgemma_hf's built-in small DiffusionGemma (trained on arithmetic only), with a warning saying so."""
    from ..default_model import DEFAULT_MODEL_DESCRIPTION, default_model_path as shipped

    path = shipped()
    warnings.warn(f"no model given: the text-diffusion pipeline uses {DEFAULT_MODEL_DESCRIPTION} ({path})",
                  UserWarning, stacklevel=3)
    return str(path)


class BuiltInDefault(dict):
    """The `default` entry of the "text-diffusion" task: transformers reads `default["model"]` only when
    `pipeline()` gets no model, and only then is the warning given (never at import)."""

    def __init__(self):
        super().__init__(model=None)

    def __getitem__(self, key):
        if key == "model":
            return default_model_path(), None  # (model, revision), as transformers expects
        return super().__getitem__(key)


# -- inputs --------------------------------------------------------------------------------------------------


def _check_message(message, where: str) -> None:
    if not isinstance(message, dict):
        raise TypeError(f"{where} must be a dict with 'role' and 'content' keys, got {type(message).__name__}")
    missing = [key for key in ("role", "content") if key not in message]
    if missing:
        raise ValueError(f"{where} has no {' and no '.join(repr(k) for k in missing)} key: every chat message needs "
                         f"'role' and 'content', got keys {sorted(message)}")


def _check_conversation(conversation, where: str) -> list[dict]:
    if len(conversation) == 0:
        raise ValueError(f"{where} is an empty conversation")
    for index, message in enumerate(conversation):
        _check_message(message, f"{where}[{index}]")
    return list(conversation)


def normalize_inputs(inputs, name: str) -> tuple[list, bool]:
    """Returns (items, single): each item a prompt string or a conversation (a list of message dicts).

    Accepted: a string, a list of strings, a conversation (list of {"role", "content"} dicts) or a list of
    conversations; other iterables (generators, datasets) are read into a list first.
    """
    if isinstance(inputs, str):
        items, single = [inputs], True
    elif isinstance(inputs, dict):
        raise TypeError(f"`{name}` is a single message dict; pass a conversation (a list of messages)")
    else:
        if not isinstance(inputs, (list, tuple)):
            try:
                inputs = list(inputs)
            except TypeError:
                raise TypeError(
                    f"`{name}` must be a string, a list of strings, a conversation (a list of message dicts) or a "
                    f"list of conversations, got {type(inputs).__name__}"
                ) from None
        if len(inputs) == 0:
            raise ValueError(f"`{name}` is an empty batch: pass at least one prompt or conversation")
        if isinstance(inputs[0], dict):  # one conversation
            items, single = [_check_conversation(inputs, f"`{name}`")], True
        else:
            items, single = list(inputs), False
    for index, item in enumerate(items):
        where = f"`{name}`" if single else f"`{name}`[{index}]"
        if isinstance(item, str):
            if item == "":
                raise ValueError(f"{where} is an empty prompt")
        elif isinstance(item, (list, tuple)):
            items[index] = _check_conversation(item, where)
        else:
            raise TypeError(f"{where} must be a string or a conversation (a list of message dicts), got "
                            f"{type(item).__name__}")
    return items, single


def is_conversation(item) -> bool:
    return isinstance(item, list)


def encode_item(tokenizer, item, *, use_chat_template: bool, continue_final_message: bool | None = None,
                tokenizer_kwargs: dict | None = None) -> tuple[list[int], bool]:
    """Token ids of one prompt or conversation, and whether a final assistant message is being continued.
    A string becomes a user turn when `use_chat_template`; a conversation always goes through the template."""
    tokenizer_kwargs = dict(tokenizer_kwargs or {})
    if isinstance(item, str) and not use_chat_template:
        return list(tokenizer(item, **tokenizer_kwargs)["input_ids"]), False
    messages = item if is_conversation(item) else [{"role": "user", "content": item}]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat input needs a tokenizer with a chat template; this tokenizer has none")
    if continue_final_message is None:
        continue_final_message = messages[-1]["role"] == "assistant"
    tokenizer_kwargs.pop("add_special_tokens", None)  # the template writes its own special tokens
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=not continue_final_message, continue_final_message=continue_final_message,
        tokenize=True, return_dict=True, **tokenizer_kwargs,
    )
    return list(encoded["input_ids"]), continue_final_message


def left_pad(rows: list[list[int]], pad_token_id: int, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, longest] input ids and attention mask, padded on the left (DiffusionGemma's encoder is causal)."""
    for row, where in zip(rows, names):
        if len(row) == 0:
            raise ValueError(f"{where} is an empty prompt: it has no tokens")
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, length - len(row):] = 1
    return input_ids, attention_mask


def pad_token_id(tokenizer, model) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), model.generation_config.pad_token_id,
                  model.config.get_text_config().pad_token_id):
        if value is not None:
            return value
    raise ValueError("batched prompts need a pad token: the tokenizer and the model define none")


# -- generation settings -------------------------------------------------------------------------------------


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def check_scheduler_argument(scheduler, scheduler_kwargs) -> None:
    """Early check of a `scheduler` argument: an object, or a name of `dgemma_hf.schedulers.SCHEDULERS`."""
    if scheduler_kwargs is not None and not isinstance(scheduler_kwargs, dict):
        raise TypeError(f"`scheduler_kwargs` must be a dict, got {type(scheduler_kwargs).__name__}")
    if isinstance(scheduler, str):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown `scheduler` name {scheduler!r}; the names are {sorted(SCHEDULERS)} "
                             "(or pass a scheduler object)")
        return
    if scheduler_kwargs:
        raise ValueError("`scheduler_kwargs` goes with a scheduler name; set them on the scheduler object instead")
    if scheduler is not None and not isinstance(scheduler, (TextDiffusionScheduler, *DIFFUSERS_SCHEDULERS)):
        names = ", ".join(cls.__name__ for cls in DIFFUSERS_SCHEDULERS)
        raise TypeError(f"`scheduler` must be a name from {sorted(SCHEDULERS)}, a dgemma_hf.schedulers scheduler or "
                        f"one of diffusers' {names}; got {type(scheduler).__name__}")


def build_scheduler(scheduler, scheduler_kwargs, max_denoising_steps, model):
    """A scheduler object from a name (its class's defaults, then `scheduler_kwargs`; `num_inference_steps`
    defaults to `max_denoising_steps`, else the model's generation config); objects and None pass through."""
    check_scheduler_argument(scheduler, scheduler_kwargs)
    if not isinstance(scheduler, str):
        return scheduler
    kwargs = dict(scheduler_kwargs or {})
    steps = max_denoising_steps if max_denoising_steps is not None else model.generation_config.max_denoising_steps
    kwargs.setdefault("num_inference_steps", steps)
    return SCHEDULERS[scheduler](**kwargs)


@contextlib.contextmanager
def seeded(seed, device):
    """Within the block, torch's global generator starts from `seed` (what sampling="reference" draws from);
    the caller's generator state is restored afterwards. No-op for seed=None."""
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0, got {seed!r}")
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def generate(model, input_ids, attention_mask, *, seed=None, streamer=None, **kwargs):
    """model.generate with a seed that works in both sampling modes: the fused sampler gets it as its seed, and the
    reference sampler draws from torch's generator seeded with it. A streamer that can `fail` (the iterator
    streamer) is told when generation raises, so its consumer ends instead of waiting."""
    try:
        with seeded(seed, input_ids.device):
            return model.generate(input_ids, attention_mask=attention_mask, seed=seed, streamer=streamer,
                                  return_dict_in_generate=True, **kwargs)
    except BaseException as error:
        if streamer is not None and hasattr(streamer, "fail"):
            streamer.fail(error)
        raise
