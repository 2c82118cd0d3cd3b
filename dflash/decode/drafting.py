"""The drafter's side of decoding several rows: one draft cache whose rows own some of its slots.

Each step, every row hands the drafter the target features of the positions it committed since
its last draft (a different number per row): they are right-padded into one pass, and each row's
queries see only the slots it owns. Rows join (owning none of the existing slots) and leave
between steps; holes are squeezed out when they outgrow the useful part. A single row with no
holes drafts exactly as the drafter does alone (its positions follow its cache, no mask).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from dflash.runtime import buffers

if TYPE_CHECKING:
    from dflash.decode.step import Row
    from dflash.model.drafter import Drafts


class DraftRows:
    """The draft cache of the rows being decoded, in their order."""

    def __init__(self, drafter: Any, runtime: Any) -> None:
        self.drafter, self.runtime = drafter, runtime
        self.device = runtime.info.device
        self.width = len(drafter.config.target_layer_ids) * drafter.config.hidden_size
        self.cache: Any = None
        self.owned: torch.Tensor | None = None  # [rows, slots] bool

    def add(self) -> None:
        """One more row, after the others."""
        if self.cache is None:
            self.cache = self.drafter.new_cache(batch=1, capacity=4 * self.drafter.config.block_size)
            self.owned = torch.zeros(1, 0, dtype=torch.bool, device=self.device)
        else:
            self.cache.add_rows(1)
            self.owned = torch.cat([self.owned, torch.zeros_like(self.owned[:1])])

    def keep(self, index: list[int]) -> None:
        """Keep the rows at these positions (the others left)."""
        if not index:
            self.cache, self.owned = None, None
            return
        rows = torch.tensor(index, device=self.device)
        self.cache.gather(rows)
        self.owned = self.owned[rows]

    def draft(self, rows: Sequence[Row], block: torch.Tensor) -> Drafts:
        """One draft pass for every row (`block`: [rows, n], anchors then masks); each row's new
        context features go into the cache and are taken from the row."""
        b = len(rows)
        lengths = [0 if row.context is None else row.context.shape[0] for row in rows]
        n = max(lengths)
        context = torch.zeros(b, n, self.width, dtype=self.drafter.dtype, device=self.device)
        new_owned = torch.zeros(b, n, dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows):
            if lengths[i]:
                context[i, : lengths[i]] = row.context.to(self.drafter.dtype)
                new_owned[i, : lengths[i]] = True
            row.context = None
        if b == 1 and bool(self.owned.all()):  # one row, no holes: positions follow the cache
            drafts = self.drafter.draft(self.runtime, block, context, self.cache)
        else:
            starts = torch.tensor([row.length for row in rows], device=self.device)
            ctx_pos = (starts - torch.tensor(lengths, device=self.device))[:, None] + torch.arange(n, device=self.device)
            block_pos = starts[:, None] + torch.arange(block.shape[1], device=self.device)
            keys = torch.cat([self.owned, new_owned, torch.ones(b, block.shape[1], dtype=torch.bool,
                                                                  device=self.device)], dim=1)
            drafts = self.drafter.draft(self.runtime, block, context, self.cache, positions=(ctx_pos, block_pos),
                                        attn_mask=keys[:, None, None, :])
        self.owned = torch.cat([self.owned, new_owned], dim=1)
        return drafts

    def compact(self) -> None:
        """Squeeze out the holes once they are most of the cache."""
        if self.owned is None:
            return
        owned, slots = buffers.compacted(self.owned)
        if slots is not None:
            self.cache.gather(torch.arange(owned.shape[0], device=self.device), slots)
            self.owned = owned
