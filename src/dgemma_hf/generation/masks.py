"""The engine's attention masks: the decoder's one-row form, and the buffers a captured graph reads them from."""

from __future__ import annotations

import torch


def mask_shapes(masks: dict) -> tuple:
    """Per mask: its shape and whether one row serves every query (a graph reads such a mask's one row)."""
    return tuple((kind, None if mask is None else (tuple(mask.shape), query_broadcast(mask)))
                 for kind, mask in sorted(masks.items()))


def one_row(mask):
    """The decoder's mask is padding only (upstream builds it from `bidirectional_mask_function`), so every canvas
    query has the same row: a 4D one becomes that row, stored once and expanded over the queries, which the
    attention kernel reads as a vector a key tile instead of [queries, keys] tiles. The row is made contiguous
    (at batch 1 it already is, and stays a view of the whole mask), so the first, eager step and the captured one
    pass the kernel strides Triton specialises alike (a new specialisation would compile a kernel inside the
    capture). Other masks (None, 2D, a flex BlockMask) as they are."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[2] == 1:
        return mask
    return mask[:, :, :1].contiguous().expand(mask.shape)


def query_broadcast(tensor: torch.Tensor) -> bool:
    """A 4D mask expanded over its queries (the decoder's, see `one_row`)."""
    return tensor.ndim == 4 and tensor.shape[2] > 1 and tensor.stride(2) == 0


def stored_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor that holds its values: one query row of a query-broadcast mask, else all of it."""
    return tensor[:, :, :1] if query_broadcast(tensor) else tensor


def static_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A buffer for a captured graph's input, as broadcast as the tensor (clone() would materialise every row)."""
    return stored_rows(tensor).clone().expand(tensor.shape)
