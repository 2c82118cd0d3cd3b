"""Batched speculative decoding with continuous batching: one draft pass and one target pass per
step for every running sequence, each with its own acceptance length, position and sampling.

Ragged rows share one target KV cache and one draft cache. A row owns some slots of them: its
prompt (left-padded to the batch's length when it joined) and, each step, the anchor and the
accepted drafts of its block. Rejected drafts stay in the cache as holes that an attention mask
hides; `compact` squeezes the holes out when they outgrow the useful part. Sequences join
between steps (prefilled alone, then merged) and leave when they stop.

Greedy output equals decoding each sequence alone, up to float rounding of batched kernels.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import torch

from dflash.decode.engine import GenerationStats
from dflash.decode.sampling import SamplingParams, greedy_accept, logits_to_probs, rejection_accept, sample
from dflash.errors import DFlashError
from dflash.runtime.adapter import TargetAdapter

if TYPE_CHECKING:
    from dflash.model.drafter import Drafts


@dataclass
class BatchRequest:
    rid: Hashable
    input_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    generator: torch.Generator | None = None


@dataclass
class StepOutput:
    """Tokens one step committed for one request; `finished` with a reason on its last output."""

    rid: Hashable
    tokens: list[int]
    finished: bool = False
    stats: GenerationStats | None = None


@dataclass
class _Row:
    request: BatchRequest
    stats: GenerationStats
    budget: int
    anchor: int                        # newest committed token; the target has not run it yet
    length: int                        # tokens the target has run: the anchor's position
    context: torch.Tensor | None       # [n, F] features the drafter has not seen yet
    started: float = field(default_factory=time.perf_counter)


class BatchEngine:
    """`add` requests, call `step` until `idle`; `cancel` drops one."""

    def __init__(self, target: Any, drafter: Any, *, block_size: int, stop_token_ids: Sequence[int],
                 max_batch_size: int = 8) -> None:
        if block_size < 1 or max_batch_size < 1:
            raise DFlashError("block_size and max_batch_size must be at least 1")
        self.drafting = block_size > 1
        if self.drafting and drafter is None:
            raise DFlashError("block_size > 1 needs a drafter")
        if self.drafting and block_size > drafter.config.block_size:
            raise DFlashError(f"block_size {block_size} exceeds the {drafter.config.block_size} "
                              "this drafter was trained for")
        self.adapter = TargetAdapter.wrap(target, drafter.config.target_layer_ids if self.drafting else [])
        if self.drafting:
            self.adapter.check_drafter(drafter.config)
        self.adapter.new_cache(batched=True)  # refuse a target whose cache cannot be rolled back, now
        self.drafter = drafter if self.drafting else None
        self.block_size = block_size
        self.stops = set(stop_token_ids)
        self.max_batch_size = max_batch_size
        self.device = self.adapter.device
        self.waiting: deque[BatchRequest] = deque()
        self.rows: list[_Row] = []
        self.cache: Any = None             # target KV cache, one row per running sequence
        self.owned: torch.Tensor | None = None        # [b, T] bool: target cache slots each row owns
        self.draft_cache: Any = None
        self.draft_owned: torch.Tensor | None = None  # [b, Td] bool

    # --- requests ----------------------------------------------------------------------------

    def add(self, request: BatchRequest) -> None:
        if request.max_new_tokens < 1:
            raise DFlashError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if not request.input_ids:
            raise DFlashError("the prompt is empty: give at least one token")
        if len(request.input_ids) >= self.adapter.max_positions:
            raise DFlashError(f"the prompt has {len(request.input_ids)} tokens; the target's context holds "
                              f"{self.adapter.max_positions}: shorten it")
        self.waiting.append(request)

    def cancel(self, rid: Hashable) -> GenerationStats | None:
        """Drop a request, waiting or running; returns its stats so far (None if unknown)."""
        for r in list(self.waiting):
            if r.rid == rid:
                self.waiting.remove(r)
                return GenerationStats(prompt_tokens=len(r.input_ids), block_size=self.block_size)
        index = next((i for i, row in enumerate(self.rows) if row.request.rid == rid), None)
        if index is None:
            return None
        stats = self._finish(self.rows[index])
        self._keep_rows([i for i in range(len(self.rows)) if i != index])
        return stats

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting

    @property
    def running(self) -> int:
        return len(self.rows)

    # --- one step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Admit waiting requests (prefill), then draft and verify once for every row."""
        outputs = self._admit()
        if not self.rows:
            return outputs
        b, size = len(self.rows), self.block_size
        block = torch.full((b, size), self.drafter.config.mask_token_id if self.drafting else 0,
                           dtype=torch.long, device=self.device)
        block[:, 0] = torch.tensor([row.anchor for row in self.rows], device=self.device)
        starts = torch.tensor([row.length for row in self.rows], device=self.device)
        q = None
        if self.drafting and size > 1:
            drafts = self._draft(block, starts)                                  # logits [b, B-1, K]
            q = [None] * b
            greedy = [row.request.sampling.greedy for row in self.rows]
            if any(greedy):
                block[:, 1:] = drafts.tokens()                 # (sampled rows are overwritten below)
            full = None if all(greedy) else drafts.full_logits()                 # [b, B-1, V]
            for i, row in enumerate(self.rows):
                if not greedy[i]:
                    q[i] = logits_to_probs(full[i], row.request.sampling)
                    block[i, 1:] = sample(q[i], row.request.generator)
        mask = torch.cat([self.owned, torch.ones(b, size, dtype=torch.bool, device=self.device)], dim=1)
        positions = starts[:, None] + torch.arange(size, device=self.device)
        out = self.adapter.forward(block, self.cache, features=self.drafting, attention_mask=mask.long(),
                                   position_ids=positions)
        accepted = self._accept(block, out.logits, q)                            # per row: (n_acc, new)
        self.adapter.rollback_rows(self.cache, [n_acc + 1 for n_acc, _ in accepted])
        owned_new = torch.zeros(b, size, dtype=torch.bool, device=self.device)
        finished = []
        for i, (row, (n_acc, new)) in enumerate(zip(self.rows, accepted)):
            done = False
            for j, tok in enumerate(new):
                if tok in self.stops:
                    new, done = new[: j + 1], True
                    row.stats.finish_reason = "stop"
                    break
            new = new[: row.budget - row.stats.num_new_tokens]
            row.stats.acceptance_lengths.append(len(new))
            row.stats.draft_lengths.append(size - 1)
            row.stats.new_tokens.extend(new)
            done = done or row.stats.num_new_tokens >= row.budget
            owned_new[i, : n_acc + 1] = True
            row.length += n_acc + 1
            row.anchor = new[-1]
            if self.drafting:
                row.context = out.features[i, : n_acc + 1]
            if done:
                finished.append(i)
            outputs.append(StepOutput(row.request.rid, new, done, self._finish(row) if done else None))
        self.owned = torch.cat([self.owned, owned_new], dim=1)
        if finished:
            self._keep_rows([i for i in range(b) if i not in finished])
        self._maybe_compact()
        return outputs

    def _accept(self, block: torch.Tensor, logits: torch.Tensor, q: list | None) -> list[tuple[int, list[int]]]:
        rows = self.rows
        greedy = [i for i, r in enumerate(rows) if r.request.sampling.greedy]
        result: list[tuple[int, list[int]] | None] = [None] * len(rows)
        if greedy:
            index = torch.tensor(greedy, device=self.device)
            both = torch.cat([block[index, 1:], logits[index].argmax(-1)], dim=1).tolist()  # one transfer
            k = block.shape[1] - 1
            for i, values in zip(greedy, both):
                drafts, choice = values[:k], values[k:]
                n = greedy_accept(drafts, choice)
                result[i] = (n, drafts[:n] + [choice[n]])
        for i, row in enumerate(rows):
            if result[i] is not None:
                continue
            p = logits_to_probs(logits[i], row.request.sampling)
            if q is None or q[i] is None:
                result[i] = (0, [int(sample(p[0], row.request.generator))])
            else:
                n, bonus = rejection_accept(block[i, 1:], q[i], p, row.request.generator)
                result[i] = (n, block[i, 1: 1 + n].tolist() + [bonus])
        return result  # type: ignore[return-value]

    def _finish(self, row: _Row) -> GenerationStats:
        stats = row.stats
        stats.decode_time = time.perf_counter() - row.started
        stats.output_ids = torch.tensor([row.request.input_ids + stats.new_tokens])
        return stats

    # --- drafting --------------------------------------------------------------------------------

    def _draft(self, block: torch.Tensor, starts: torch.Tensor) -> Drafts:
        """One draft pass for every row: new context features (ragged, right-padded) go into the
        draft cache; each row's queries see only the slots it owns."""
        b = len(self.rows)
        lengths = [0 if row.context is None else row.context.shape[0] for row in self.rows]
        n = max(lengths)
        width = self.rows[0].context.shape[-1] if n else 0
        context = torch.zeros(b, n, width, dtype=self.drafter.dtype, device=self.device)
        new_owned = torch.zeros(b, n, dtype=torch.bool, device=self.device)
        for i, row in enumerate(self.rows):
            if lengths[i]:
                context[i, : lengths[i]] = row.context.to(self.drafter.dtype)
                new_owned[i, : lengths[i]] = True
            row.context = None
        ctx_pos = (starts - torch.tensor(lengths, device=self.device))[:, None] + torch.arange(n, device=self.device)
        block_pos = starts[:, None] + torch.arange(block.shape[1], device=self.device)
        keys = torch.cat([self.draft_owned, new_owned,
                          torch.ones(b, block.shape[1], dtype=torch.bool, device=self.device)], dim=1)
        drafts = self.drafter.draft(self.adapter, block, context, self.draft_cache, positions=(ctx_pos, block_pos),
                                    attn_mask=keys[:, None, None, :])
        self.draft_owned = torch.cat([self.draft_owned, new_owned], dim=1)
        return drafts

    # --- joining, leaving, compaction ---------------------------------------------------------------

    def _admit(self) -> list[StepOutput]:
        outputs = []
        while self.waiting and len(self.rows) < self.max_batch_size:
            request = self.waiting.popleft()
            stats = GenerationStats(prompt_tokens=len(request.input_ids), block_size=self.block_size)
            t0 = time.perf_counter()
            cache = self.adapter.new_cache(batched=True)
            prompt = torch.tensor([request.input_ids], device=self.device)
            out = self.adapter.forward(prompt, cache, logits_to_keep=1, features=self.drafting)
            logits = out.logits[0, -1]
            if request.sampling.greedy:
                first = int(logits.argmax())
            else:
                first = int(sample(logits_to_probs(logits, request.sampling), request.generator))
            stats.prefill_time = time.perf_counter() - t0
            stats.new_tokens.append(first)
            budget = min(request.max_new_tokens, self.adapter.max_positions - len(request.input_ids))
            row = _Row(request, stats, budget, first, len(request.input_ids),
                       out.features[0] if self.drafting else None)
            if first in self.stops or budget <= 1:
                stats.finish_reason = "stop" if first in self.stops else "length"
                outputs.append(StepOutput(request.rid, [first], True, self._finish(row)))
                continue
            self._join(row, cache)
            outputs.append(StepOutput(request.rid, [first]))
        return outputs

    def _join(self, row: _Row, cache: Any) -> None:
        n = row.length
        if not self.rows:
            self.cache, self.owned = cache, torch.ones(1, n, dtype=torch.bool, device=self.device)
            if self.drafting:
                self.draft_cache = self.drafter.new_cache(batch=1, capacity=n + 4 * self.drafter.config.block_size)
                self.draft_owned = torch.zeros(1, 0, dtype=torch.bool, device=self.device)
        else:
            t = self.owned.shape[1]
            self.adapter.cache_merge(self.cache, cache, max(0, n - t), max(0, t - n))
            pad = torch.zeros(len(self.rows), max(0, n - t), dtype=torch.bool, device=self.device)
            mine = torch.cat([torch.zeros(1, max(0, t - n), dtype=torch.bool, device=self.device),
                              torch.ones(1, n, dtype=torch.bool, device=self.device)], dim=1)
            self.owned = torch.cat([torch.cat([pad, self.owned], dim=1), mine])
            if self.drafting:
                self.draft_cache.add_rows(1)
                self.draft_owned = torch.cat([self.draft_owned, torch.zeros_like(self.draft_owned[:1])])
        self.rows.append(row)

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self.rows, self.cache, self.owned, self.draft_cache, self.draft_owned = [], None, None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.adapter.cache_gather(self.cache, index)
        self.owned = self.owned[index]
        if self.drafting:
            self.draft_cache.gather(index)
            self.draft_owned = self.draft_owned[index]

    def _maybe_compact(self) -> None:
        """Squeeze out holes once they are most of the cache (each row keeps its slots in order,
        left-padded to the longest row)."""
        if not self.rows:
            return
        self.owned, slots = _compacted(self.owned)
        if slots is not None:
            self.adapter.cache_gather(self.cache, torch.arange(len(self.rows), device=self.device), slots)
        if self.drafting:
            owned, slots = _compacted(self.draft_owned)
            if slots is not None:
                self.draft_cache.gather(torch.arange(len(self.rows), device=self.device), slots)
                self.draft_owned = owned


def _compacted(owned: torch.Tensor, slack: float = 2.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(new ownership mask, slot indices per row) when holes exceed `slack` times the longest
    row's slots, else (owned, None)."""
    counts = owned.sum(1)
    longest = int(counts.max()) if owned.numel() else 0
    if owned.shape[1] <= slack * longest + 64:
        return owned, None
    b = owned.shape[0]
    slots = torch.zeros(b, longest, dtype=torch.long, device=owned.device)
    new = torch.zeros(b, longest, dtype=torch.bool, device=owned.device)
    for i in range(b):
        idx = torch.nonzero(owned[i]).flatten()
        slots[i, longest - len(idx):] = idx       # left-padded; the padding reads slot 0, masked
        new[i, longest - len(idx):] = True
    return new, slots
