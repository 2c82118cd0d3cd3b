"""How dflash's own caches grow (fixed buffers and a length, regrown by one rule) and how a
ragged cache sheds its holes.

Every cache dflash owns (the lean forward's, the drafter's, the growing full-attention layer of
transformers caches) keeps its positions in preallocated buffers along dimension 2
([rows, heads, capacity, head_dim]) and a count of the filled ones. Writing a step is a slice
assignment, rolling back is lowering the count; only running out of room allocates, and then
with slack (twice what is needed, rounded up to a multiple of `step`) so the next steps do not.
"""

from __future__ import annotations

import torch


def grown(needed: int, step: int) -> int:
    """A new buffer's capacity: twice what is needed, rounded up to a multiple of `step`."""
    return -(-2 * needed // step) * step


def regrow(buffer: torch.Tensor | None, filled: int, needed: int, step: int,
           like: torch.Tensor | None = None) -> torch.Tensor:
    """`buffer` if it holds `needed` positions along dimension 2, else a larger one (capacity
    `grown(needed, step)`) holding a copy of its first `filled` positions. With no buffer yet,
    the new one is shaped like `like` ([rows, heads, *, dim])."""
    if buffer is not None and buffer.shape[2] >= needed:
        return buffer
    template = buffer if buffer is not None else like
    shape = (*template.shape[:2], grown(needed, step), *template.shape[3:])
    new = template.new_empty(shape)
    if buffer is not None and filled:
        new[:, :, :filled] = buffer[:, :, :filled]
    return new


def compacted(owned: torch.Tensor, slack: float = 2.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ragged cache's rows own some of its slots (`owned`: [rows, slots] bool); rejected drafts
    leave holes. Once the slots exceed `slack` times the longest row's (plus 64): (the new
    ownership mask, the slot indices each row keeps, [rows, longest]); else (owned, None). Each
    row keeps its slots in order, left-padded to the longest row (the padding reads slot 0, masked)."""
    longest = int(owned.sum(1).max()) if owned.numel() else 0
    if owned.shape[1] <= slack * longest + 64:
        return owned, None
    slots = torch.zeros(owned.shape[0], longest, dtype=torch.long, device=owned.device)
    new = torch.zeros(owned.shape[0], longest, dtype=torch.bool, device=owned.device)
    for i in range(owned.shape[0]):
        idx = torch.nonzero(owned[i]).flatten()
        slots[i, longest - len(idx):] = idx
        new[i, longest - len(idx):] = True
    return new, slots
