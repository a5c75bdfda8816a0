"""Logits processing on the device, inside the captured step: penalties and top-k / top-p / min-p filters.

Applied to each step's raw logits [B, L, V] (fp32) before sampling, in the order transformers' generate uses:
repetition penalty and presence penalty over the tokens already in the sequence (the prompt and the committed
canvases, not the canvas being denoised), then top-k, top-p and min-p on the temperature-scaled distribution.
Filtered tokens get -inf. Everything is tensor work on preallocated buffers with no host synchronisation.
top-p sorts every row of the vocabulary (262144 entries a position): correct, and the costliest of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import torch


@dataclass(frozen=True)
class LogitsSettings:
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None

    FIELDS = ("top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty")

    def __post_init__(self):
        top_k, top_p, min_p = self.top_k, self.top_p, self.min_p
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
            raise ValueError(f"`top_k` must be an integer >= 1, got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, Real) or not 0 < top_p <= 1):
            raise ValueError(f"`top_p` must be a float in (0, 1], got {top_p!r}")
        if min_p is not None and (not isinstance(min_p, Real) or not 0 <= min_p < 1):
            raise ValueError(f"`min_p` must be a float in [0, 1), got {min_p!r}")
        penalty = self.repetition_penalty
        if penalty is not None and (not isinstance(penalty, Real) or not penalty > 0):
            raise ValueError(f"`repetition_penalty` must be a float > 0 (1.0 = none), got {penalty!r}")
        presence = self.presence_penalty
        if presence is not None and (not isinstance(presence, Real) or not presence >= 0):
            raise ValueError(f"`presence_penalty` must be a float >= 0, got {presence!r}")

    @classmethod
    def pop_from(cls, kwargs: dict) -> "LogitsSettings":
        return cls(**{name: kwargs.pop(name) for name in cls.FIELDS if name in kwargs})

    @property
    def penalises(self) -> bool:
        return self.repetition_penalty not in (None, 1.0) or self.presence_penalty not in (None, 0.0)

    @property
    def active(self) -> bool:
        return self.penalises or any(v is not None for v in (self.top_k, self.top_p, self.min_p))


class LogitsProcessing:
    """Applies LogitsSettings; `seen` [B, V] marks the tokens already in each sequence."""

    def __init__(self, settings: LogitsSettings, batch_size: int, vocab_size: int, device):
        self.settings = settings
        self.vocab_size = vocab_size
        self.seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)

    def reset(self) -> None:
        self.seen.zero_()

    def observe(self, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Marks `tokens` [B, n] as present where `valid` [B, n] (padding excluded). Between steps, not inside."""
        if self.settings.penalises:
            # amax, not a plain scatter: padding positions point at token 0 too, and must not unmark it.
            marks = torch.zeros(self.seen.shape, dtype=torch.int8, device=self.seen.device)
            marks.scatter_reduce_(1, torch.where(valid, tokens, 0), valid.to(torch.int8), reduce="amax")
            self.seen |= marks.bool()

    def __call__(self, logits: torch.Tensor, inv_temperature: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if not s.active:
            return logits
        if s.penalises:
            seen = self.seen[:, None, :]
            if s.repetition_penalty not in (None, 1.0):
                penalised = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
                logits = torch.where(seen, penalised, logits)
            if s.presence_penalty not in (None, 0.0):
                logits = logits - s.presence_penalty * seen.to(logits.dtype)
        if s.top_k is not None and s.top_k < logits.shape[-1]:
            kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p is not None and s.top_p < 1.0:
            scaled = logits * inv_temperature
            sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # Keep a token if the mass before it is below top_p (so the most likely token always stays).
            drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= s.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        if s.min_p is not None and s.min_p > 0:
            scaled = logits * inv_temperature
            probs = torch.softmax(scaled, dim=-1)
            logits = logits.masked_fill(probs < s.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
        return logits
