"""The speculative step, one for every engine: draft -> verify -> accept -> commit, for the rows
of one runtime cache (the single-sequence engine is a one-row use of it, the batched engine runs
every running sequence through it).

Per row: the drafter proposes a block after the row's newest token (the anchor), the target runs
the block once, the acceptance rule keeps a prefix of the drafts plus one token of the target's
own (the bonus), and the runtime keeps that much of the block in its cache. Greedy rows keep the
drafts equal to the target's argmax; sampled rows use the rejection rule
(dflash/decode/sampling.py), so every row's output is exactly the target's own. A draft
threshold verifies only the drafts the drafter is sure of: for several rows, the longest
confident prefix among them (verifying more never changes an output). Stop tokens and budgets cut
a row's tokens here and nowhere else. Block size 1 is plain decoding through the same code.
The drafts come from the runtime's own draft pass where it offers one (the native runtime's),
else from the drafter's (dflash/decode/drafting.py); both keep one draft cache per row set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dflash.decode.drafting import DraftRows
from dflash.decode.sampling import (SamplingParams, confident_prefix, greedy_accept, logits_to_probs, rejection_accept,
                                    sample)
from dflash.decode.stats import GenerationStats
from dflash.errors import DFlashError
from dflash.runtime.base import check_drafter


@dataclass
class Row:
    """One sequence being decoded: what the step reads and updates."""

    row: int                            # its row in the runtime's cache
    sampling: SamplingParams
    generator: torch.Generator | None
    stats: GenerationStats
    budget: int                         # new tokens it may have in all
    anchor: int = 0                     # newest committed token; the target has not run it yet
    length: int = 0                     # tokens the target has run: the anchor's position
    context: torch.Tensor | None = None  # [n, F] target features the drafter has not seen yet
    done: bool = False
    request: Any = None                 # what the caller knows it by

    @property
    def remaining(self) -> int:
        return self.budget - self.stats.num_new_tokens


class Speculator:
    """Rows of one runtime cache and one draft cache, decoded a speculative step at a time.
    `start` prefills a row, `step` advances every row once, finished rows leave by themselves,
    `drop` removes rows early."""

    def __init__(self, runtime: Any, drafter: Any, *, block_size: int, stop_token_ids: Sequence[int] = (),
                 draft_threshold: float = 0.0, max_rows: int = 1) -> None:
        if block_size < 1:
            raise DFlashError(f"block_size must be at least 1, got {block_size}")
        if not 0 <= draft_threshold < 1:
            raise DFlashError(f"draft_threshold must be in [0, 1), got {draft_threshold}")
        self.drafting = block_size > 1
        if self.drafting:
            if drafter is None:
                raise DFlashError("block_size > 1 needs a drafter")
            if block_size > drafter.config.block_size:
                raise DFlashError(f"block_size {block_size} exceeds the {drafter.config.block_size} "
                                  "this drafter was trained for")
            check_drafter(runtime.info, drafter.config)
            runtime.bind(drafter.config.target_layer_ids)
        self.runtime, self.drafter = runtime, drafter if self.drafting else None
        self.block_size, self.draft_threshold = block_size, draft_threshold
        self.stops = set(stop_token_ids)
        self.device = runtime.info.device
        self.cache = runtime.new_cache(max_rows)
        self.drafts = (runtime.draft_rows(drafter) or DraftRows(drafter, runtime)) if self.drafting else None
        self.rows: list[Row] = []

    def check_prompt(self, n: int) -> None:
        if n == 0:
            raise DFlashError("the prompt is empty: give at least one token")
        if n >= self.runtime.info.max_positions:
            raise DFlashError(f"the prompt has {n} tokens; the target's context holds "
                              f"{self.runtime.info.max_positions}: shorten it")

    # --- rows joining and leaving ------------------------------------------------------------------

    @torch.no_grad()
    def start(self, ids: torch.Tensor, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
              generator: torch.Generator | None = None, stats: GenerationStats | None = None,
              request: Any = None) -> Row:
        """Prefill a prompt (`ids`: [n]) as a new row and choose its first token. The row joins
        the running ones unless that token already finished it."""
        if max_new_tokens < 1:
            raise DFlashError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        n = ids.shape[-1]
        self.check_prompt(n)
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens, stats.block_size = n, self.block_size
        rid, out = self.runtime.prefill(self.cache, ids.reshape(-1).to(self.device), logits=not sampling.greedy)
        if sampling.greedy:
            first = int(out.tokens[0, -1])
        else:
            first = int(sample(logits_to_probs(out.logits[0, -1], sampling), generator))
        budget = min(max_new_tokens, self.runtime.info.max_positions - n)
        row = Row(rid, sampling, generator, stats, budget, first, n,
                  out.features[0] if self.drafting else None, request=request)
        self._take(row, [first])
        if row.done:
            self.runtime.drop(self.cache, [rid])
        else:
            self.rows.append(row)
            if self.drafting:
                self.drafts.add()
        return row

    def drop(self, rows: Sequence[Row]) -> None:
        """Remove rows (finished or cancelled) from both caches."""
        gone = {id(row) for row in rows}
        if not gone:
            return
        self.runtime.drop(self.cache, [row.row for row in self.rows if id(row) in gone])
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if self.drafting:
            self.drafts.keep(keep)
        self.rows = [self.rows[i] for i in keep]

    # --- one step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[tuple[Row, list[int]]]:
        """Draft, verify, accept and commit once for every row: (row, tokens it committed) each.
        Rows that finished (stop token or budget) are marked `done` and leave the caches."""
        rows = self.rows
        if not rows:
            return []
        size = min(self.block_size, max(row.remaining for row in rows),
                   min(self.runtime.info.max_positions - row.length for row in rows))
        block = torch.full((len(rows), size), self.drafter.config.mask_token_id if self.drafting else 0,
                           dtype=torch.long, device=self.device)
        block[:, 0] = torch.tensor([row.anchor for row in rows], device=self.device)
        q: list[torch.Tensor | None] = [None] * len(rows)
        if self.drafting and size > 1:
            block, q = self._draft(rows, block)
        size = block.shape[1]
        sampled = any(not row.sampling.greedy for row in rows)
        out = self.runtime.step(self.cache, [row.row for row in rows], block, logits=sampled)
        accepted = self._accept(rows, block, out, q)
        self.runtime.commit(self.cache, [row.row for row in rows], [n + 1 for n, _ in accepted])
        result = []
        for i, (row, (n_acc, new)) in enumerate(zip(rows, accepted)):
            new = self._take(row, new)
            row.stats.acceptance_lengths.append(len(new))
            row.stats.draft_lengths.append(size - 1)
            row.length += n_acc + 1
            row.anchor = new[-1]
            if self.drafting:  # features of the anchor and the accepted drafts; the bonus has not run
                kept = out.features[i, : n_acc + 1]
                row.context = kept if row.context is None else torch.cat([row.context, kept])
            result.append((row, new))
        self.drop([row for row in rows if row.done])
        if self.drafting:
            self.drafts.compact()
        return result

    def _draft(self, rows: list[Row], block: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Fill the block's drafts (greedy rows: the drafter's best token; sampled rows: a sample
        of its distribution q, returned per row), shortened to the confident prefix."""
        drafts = self.drafts.draft(rows, block)                       # logits [rows, size - 1, K]
        greedy = [row.sampling.greedy for row in rows]
        q: list[torch.Tensor | None] = [None] * len(rows)
        if any(greedy):
            block[:, 1:] = drafts.tokens()                            # (sampled rows overwritten below)
        full = None if all(greedy) else drafts.full_logits()         # [rows, size - 1, V]
        for i, row in enumerate(rows):
            if not greedy[i]:
                q[i] = logits_to_probs(full[i], row.sampling)
                block[i, 1:] = sample(q[i], row.generator)
        if self.draft_threshold > 0:  # top probabilities; greedy needs no full softmax for them
            top = drafts.top_probs() if any(greedy) else None
            keep = max(confident_prefix(top[i] if q[i] is None else q[i].amax(-1), self.draft_threshold)
                       for i in range(len(rows)))
            block = block[:, : keep + 1]
            q = [None if x is None else x[:keep] for x in q]
        return block, q

    def _accept(self, rows: list[Row], block: torch.Tensor, out: Any,
                q: list[torch.Tensor | None]) -> list[tuple[int, list[int]]]:
        """(drafts accepted, tokens committed) per row."""
        result: list[tuple[int, list[int]] | None] = [None] * len(rows)
        greedy = [i for i, row in enumerate(rows) if row.sampling.greedy]
        if greedy:
            index = torch.tensor(greedy, device=block.device)
            both = torch.cat([block[index, 1:], out.tokens[index].to(block.device)], dim=1).tolist()  # one transfer
            k = block.shape[1] - 1
            for i, values in zip(greedy, both):
                drafts, choice = values[:k], values[k:]
                n = greedy_accept(drafts, choice)
                result[i] = (n, drafts[:n] + [choice[n]])
        for i, row in enumerate(rows):
            if result[i] is not None:
                continue
            p = logits_to_probs(out.logits[i], row.sampling)
            if q[i] is None:
                result[i] = (0, [int(sample(p[0], row.generator))])
            else:
                n, bonus = rejection_accept(block[i, 1:], q[i], p, row.generator)
                result[i] = (n, block[i, 1: 1 + n].tolist() + [bonus])
        return result  # type: ignore[return-value]

    def _take(self, row: Row, new: list[int]) -> list[int]:
        """The tokens a row keeps of `new`: up to and with a stop token, within its budget."""
        for i, tok in enumerate(new):
            if tok in self.stops:
                new, row.done = new[: i + 1], True
                row.stats.finish_reason = "stop"
                break
        new = new[: row.remaining]
        row.stats.new_tokens.extend(new)
        row.done = row.done or row.remaining <= 0
        return new
