"""Batched speculative decoding with continuous batching: every running sequence is a row of one
runtime cache, and each step drafts and verifies all of them once (dflash/decode/step.py), each
with its own acceptance length, position and sampling. Sequences join between steps (prefilled,
then running with the others) and leave when they stop or are cancelled.

How rows of different lengths share a cache is the runtime's business (dflash/runtime/): the
engine names rows. Greedy output equals decoding each sequence alone, up to the float rounding of
batched kernels where the runtime batches rows.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from dflash.decode.sampling import SamplingParams
from dflash.decode.stats import GenerationStats
from dflash.decode.step import Row, Speculator
from dflash.errors import DFlashError
from dflash.runtime.loader import as_runtime


@dataclass
class BatchRequest:
    rid: Hashable
    input_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    generator: torch.Generator | None = None


@dataclass
class RequestOutput:
    """Tokens one step committed for one request; `finished` with its stats on its last output."""

    rid: Hashable
    tokens: list[int]
    finished: bool = False
    stats: GenerationStats | None = None


class BatchEngine:
    """`add` requests, call `step` until `idle`; `cancel` drops one."""

    def __init__(self, target: Any, drafter: Any, *, block_size: int, stop_token_ids: Sequence[int],
                 max_batch_size: int = 8, draft_threshold: float = 0.0) -> None:
        if block_size < 1 or max_batch_size < 1:
            raise DFlashError("block_size and max_batch_size must be at least 1")
        self.runtime = as_runtime(target)
        self.speculator = Speculator(self.runtime, drafter, block_size=block_size, stop_token_ids=stop_token_ids,
                                     draft_threshold=draft_threshold, max_rows=max_batch_size)
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.device = self.runtime.info.device
        self.waiting: deque[BatchRequest] = deque()
        self.started: dict[int, float] = {}  # id(row) -> when its request was admitted

    @property
    def rows(self) -> list[Row]:
        """The running sequences, in the order the step drafts them (`row.request` is theirs)."""
        return self.speculator.rows

    # --- requests ----------------------------------------------------------------------------

    def add(self, request: BatchRequest) -> None:
        if request.max_new_tokens < 1:
            raise DFlashError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        self.speculator.check_prompt(len(request.input_ids))
        self.waiting.append(request)

    def cancel(self, rid: Hashable) -> GenerationStats | None:
        """Drop a request, waiting or running; returns its stats so far (None if unknown)."""
        for r in list(self.waiting):
            if r.rid == rid:
                self.waiting.remove(r)
                return GenerationStats(prompt_tokens=len(r.input_ids), block_size=self.block_size)
        row = next((row for row in self.rows if row.request.rid == rid), None)
        if row is None:
            return None
        self.speculator.drop([row])
        return self._finish(row)

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting

    @property
    def running(self) -> int:
        return len(self.rows)

    # --- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Admit waiting requests (prefill), then draft and verify once for every row."""
        outputs = self._admit()
        for row, tokens in self.speculator.step():
            outputs.append(RequestOutput(row.request.rid, tokens, row.done, self._finish(row) if row.done else None))
        return outputs

    def _admit(self) -> list[RequestOutput]:
        outputs = []
        while self.waiting and len(self.rows) < self.max_batch_size:
            request = self.waiting.popleft()
            t0 = time.perf_counter()
            row = self.speculator.start(torch.tensor(request.input_ids), request.max_new_tokens, request.sampling,
                                        request.generator, request=request)
            row.stats.prefill_time = time.perf_counter() - t0
            self.started[id(row)] = t0
            outputs.append(RequestOutput(request.rid, list(row.stats.new_tokens), row.done,
                                         self._finish(row) if row.done else None))
        return outputs

    def _finish(self, row: Row) -> GenerationStats:
        stats = row.stats
        stats.decode_time = time.perf_counter() - self.started.pop(id(row))
        stats.output_ids = torch.tensor([row.request.input_ids + stats.new_tokens])
        return stats
