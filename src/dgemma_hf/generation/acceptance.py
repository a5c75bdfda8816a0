"""Acceptance and stopping rules of upstream's sampler, as in-place, capture-safe tensor functions."""

from __future__ import annotations

import torch


def entropy_bound_accept(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """Accepts, per row, the k lowest-entropy tokens with sum(entropy) - max(entropy) <= entropy_bound
    (upstream's EntropyBoundSampler rule; at least one token per row). entropy [B, L] -> bool [B, L]."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    # Sorted ascending, so each prefix's max is its last element.
    selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= entropy_bound
    return torch.zeros_like(selected).scatter(-1, order, selected)


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
