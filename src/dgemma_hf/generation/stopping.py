"""Upstream's adaptive stopping rule as an in-place, capture-safe tensor function (acceptance rules live in
dgemma_hf.schedulers)."""

from __future__ import annotations

import torch


def stable_and_confident(
    argmax: torch.Tensor,
    entropy: torch.Tensor,
    history: torch.Tensor,
    stability_threshold: int,
    confidence_threshold: float,
) -> torch.Tensor:
    """Upstream's StableAndConfidentStoppingCriteria: the argmax canvas equals each of the last
    `stability_threshold` ones and the mean token entropy is below `confidence_threshold`. `history`
    [max(stability_threshold, 1), B, L] (start: all -1) is updated in place. Returns bool [B]."""
    if stability_threshold == 0:
        stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
    else:
        stable = (history == argmax[None]).all(dim=-1).all(dim=0)
        history[:-1] = history[1:].clone()
        history[-1] = argmax
    return stable & (entropy.mean(dim=-1) < confidence_threshold)
