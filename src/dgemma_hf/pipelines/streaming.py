"""Streaming finer than one canvas.

dgemma_hf's `generate()` calls a streamer in this order: `put(prompt ids)`, then for every canvas
`put_draft(value=argmax canvas)` after each denoising step and `put(committed canvas)` once the canvas is
final, then `end()`. The streamers here turn those calls into text:

- a **draft** is the decoded argmax canvas after a step: the current canvas's best guess so far, replaced by the
  next draft (cut at the first stop token, so text the canvas will drop after its end-of-sequence never shows);
- a **commit** is the text a finished canvas adds. Commits only ever append, and their concatenation equals the
  text of the non-streamed output (the decoded new tokens): each commit is the difference between decoding all
  committed tokens now and before, and a trailing incomplete character (a multi-byte character split across
  canvases) is held back until the next commit or the end.

`DiffusionTextStreamer` is the base (override `on_prompt` / `on_draft` / `on_commit` / `on_end`);
`TextDiffusionIteratorStreamer` queues `StreamEvent(kind, text)` tuples for a consumer in another thread.
Both stream one sequence (batch size 1), as transformers' text streamers do.
"""

from __future__ import annotations

import threading
from queue import Queue
from typing import Any, NamedTuple

import torch
from transformers.generation.streamers import BaseStreamer

_INCOMPLETE = "\ufffd"  # what a decoder writes for a partial UTF-8 sequence


class StreamEvent(NamedTuple):
    """One streamed event: kind is "prompt", "draft" or "commit"."""

    kind: str
    text: str


def _one_row(value, method: str) -> list[int]:
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    if value.ndim > 1:
        if value.shape[0] != 1:
            raise ValueError(
                f"{method}: text streamers stream one sequence, got a batch of {value.shape[0]}; generate one prompt "
                "at a time (pipeline: batch_size=1) to stream"
            )
        value = value[0]
    return value.tolist()


class DiffusionTextStreamer(BaseStreamer):
    """Decodes a diffusion generate() stream into prompt, draft and commit texts.

    Args:
        tokenizer: decodes the tokens.
        skip_prompt: when False, the prompt's text is passed to `on_prompt` first (default True).
        stop_token_ids: drafts are cut at the first of these ids (the pipelines pass the model's eos ids).
        **decode_kwargs: for `tokenizer.decode`; `skip_special_tokens` defaults to True, as in the pipelines.

    `committed_text` holds the text committed so far in the current (or last) generation.
    """

    def __init__(self, tokenizer, skip_prompt: bool = True, stop_token_ids=None, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        if stop_token_ids is not None and not isinstance(stop_token_ids, (list, tuple, set)):
            stop_token_ids = [stop_token_ids]
        self.stop_token_ids = set(stop_token_ids or ())
        decode_kwargs.setdefault("skip_special_tokens", True)
        self.decode_kwargs = decode_kwargs
        self._reset()

    def _reset(self) -> None:
        self._expect_prompt = True
        self._committed_ids: list[int] = []
        self.committed_text = ""
        self.canvas_index = 0  # canvases committed so far
        self.step_index = 0  # denoising steps seen in the current canvas

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, **self.decode_kwargs)

    # -- what generate() calls -------------------------------------------------------------------------------

    def put(self, value) -> None:
        ids = _one_row(value, "put")
        if self._expect_prompt:  # a new generation: the first put is its prompt
            self._reset()
            self._expect_prompt = False
            if not self.skip_prompt:
                self.on_prompt(self._decode(ids))
            return
        self._committed_ids.extend(ids)
        text = self._decode(self._committed_ids)
        stable = text.rstrip(_INCOMPLETE)
        new_text = stable[len(self.committed_text):] if stable.startswith(self.committed_text) else ""
        self.committed_text += new_text
        self.canvas_index += 1
        self.step_index = 0
        self.on_commit(new_text)

    def put_draft(self, value, **kwargs) -> None:
        ids = _one_row(value, "put_draft")
        for index, token in enumerate(ids):
            if token in self.stop_token_ids:
                ids = ids[: index + 1]
                break
        self.step_index += 1
        self.on_draft(self._decode(ids))

    def end(self) -> None:
        rest = ""
        if self._committed_ids:
            text = self._decode(self._committed_ids)
            if text.startswith(self.committed_text):
                rest = text[len(self.committed_text):]
        if rest:
            self.committed_text += rest
            self.on_commit(rest)
        self.on_end()
        self._expect_prompt = True  # ready for the next generate() call (committed_text stays readable)

    # -- override these ----------------------------------------------------------------------------------------

    def on_prompt(self, text: str) -> None:
        """The prompt's text (only when skip_prompt=False)."""

    def on_draft(self, text: str) -> None:
        """The current canvas's draft after a denoising step (replaces the previous draft)."""

    def on_commit(self, text: str) -> None:
        """Text a finished canvas appends to the output."""

    def on_end(self) -> None:
        """Generation ended."""


class _End:
    pass


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class TextDiffusionIteratorStreamer(DiffusionTextStreamer):
    """Queues `StreamEvent(kind, text)` events for a consumer, like transformers' TextIteratorStreamer: iterate
    over it in one thread while generation runs in another. Iteration ends when generation ends; if generation
    raises (through the pipelines, or `run_in_thread`), the iteration re-raises that error instead of waiting.

    Events: ("prompt", text) first when skip_prompt=False; ("draft", text) after every denoising step (unless
    drafts=False); ("commit", text) per finished canvas. "".join of the commit texts is the generated text.

        streamer = TextDiffusionIteratorStreamer(pipe.tokenizer)
        thread = streamer.run_in_thread(pipe, "Why is the sky blue?", max_new_tokens=512)
        for kind, text in streamer:
            ...  # send a draft (replaces the last one) or a commit (appends) to the client
        thread.join()
        result = streamer.result  # what pipe(...) returned

    Args:
        timeout: seconds a consumer waits for the next event before `queue.Empty` is raised (None: forever).
        drafts: queue the per-step drafts (True) or only commits.
    """

    def __init__(self, tokenizer, skip_prompt: bool = True, timeout: float | None = None, drafts: bool = True,
                 stop_token_ids=None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt=skip_prompt, stop_token_ids=stop_token_ids, **decode_kwargs)
        self.queue: Queue = Queue()
        self.timeout = timeout
        self.drafts = drafts
        self.result = None
        self._failure: BaseException | None = None

    def on_prompt(self, text: str) -> None:
        self.queue.put(StreamEvent("prompt", text), timeout=self.timeout)

    def on_draft(self, text: str) -> None:
        if self.drafts:
            self.queue.put(StreamEvent("draft", text), timeout=self.timeout)

    def on_commit(self, text: str) -> None:
        self.queue.put(StreamEvent("commit", text), timeout=self.timeout)

    def on_end(self) -> None:
        self.queue.put(_End(), timeout=self.timeout)

    def fail(self, error: BaseException) -> None:
        """Ends the stream with `error`: the consumer's iteration raises it."""
        self._failure = error
        self._expect_prompt = True
        self.queue.put(_Failure(error), timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> StreamEvent:
        item = self.queue.get(timeout=self.timeout)
        if isinstance(item, _End):
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def run_in_thread(self, target, *args, **kwargs) -> threading.Thread:
        """Starts `target(*args, streamer=self, **kwargs)` (a pipeline, or model.generate) in a daemon thread and
        returns the thread; its return value lands in `self.result`, and an error it raises ends the stream."""
        kwargs.setdefault("streamer", self)
        self.result = None
        self._failure = None

        def work():
            try:
                self.result = target(*args, **kwargs)
            except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
                if self._failure is not error:  # the pipelines already passed it on
                    self.fail(error)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return thread


class StepCallbackStreamer(BaseStreamer):
    """Runs a diffusers-style `callback_on_step_end(pipe, step, timestep, callback_kwargs)` from the engine's
    per-step streamer call (no engine change): `step` counts denoising steps over the whole call, `timestep` is
    the steps left in the canvas including this one (N .. 1, dgemma_hf schedulers' timesteps), and
    `callback_kwargs` holds the requested tensors: "draft" (the argmax canvas after the step, [batch, canvas])
    and "sequences" (prompt and committed canvases so far, [batch, length]). The engine's state is read-only here:
    a callback may return None or the dict it got, but not replacement tensors. Calls are forwarded to `inner`
    (the caller's own streamer), if any."""

    def __init__(self, pipe, callback, tensor_inputs, steps: int, inner=None):
        self.pipe = pipe
        self.callback = callback
        self.tensor_inputs = list(tensor_inputs)
        self.steps = steps
        self.inner = inner
        self.global_step = 0
        self.step_in_canvas = 0
        self.sequences = None

    def put(self, value) -> None:
        value = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        self.sequences = value.clone() if self.sequences is None else torch.cat([self.sequences, value], dim=-1)
        self.step_in_canvas = 0
        if self.inner is not None:
            self.inner.put(value)

    def put_draft(self, value, **kwargs) -> None:
        if self.inner is not None and hasattr(self.inner, "put_draft"):
            self.inner.put_draft(value, **kwargs)
        available = {"draft": value, "sequences": self.sequences}
        callback_kwargs = {name: available[name] for name in self.tensor_inputs}
        returned = self.callback(self.pipe, self.global_step, self.steps - self.step_in_canvas, callback_kwargs)
        if returned is not None:
            if not isinstance(returned, dict):
                raise TypeError(f"callback_on_step_end must return None or a dict, got {type(returned).__name__}")
            changed = [k for k, v in returned.items() if k not in callback_kwargs or v is not callback_kwargs[k]]
            if changed:
                raise ValueError(
                    f"callback_on_step_end returned new values for {changed}: dgemma_hf's engine does not take "
                    "tensors back from a callback (the canvas is read-only there)"
                )
        self.global_step += 1
        self.step_in_canvas += 1

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()

    def fail(self, error: BaseException) -> None:
        if self.inner is not None and hasattr(self.inner, "fail"):
            self.inner.fail(error)
