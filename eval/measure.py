"""Timing and memory measurements shared by both model families."""

from __future__ import annotations

import resource
import sys
import time

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer


class FirstOutputTimer(BaseStreamer):
    """A streamer that notes when generate() hands out its first new tokens.

    Both generate() loops call `put` once with the prompt, then with each new output: the next token for an
    autoregressive model, a whole committed canvas for DiffusionGemma. `put` receives CPU tensors, so the
    device has finished that output when the time is taken.
    """

    def __init__(self, start: float):
        self.start = start
        self.calls = 0
        self.first_output_s: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_output_s = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA max allocated since the last reset, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes. The process peak never resets: it covers everything run so far.
    return int(peak if sys.platform == "darwin" else peak * 1024), "process_peak_rss"


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation) of `values`, None when there are none."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None
