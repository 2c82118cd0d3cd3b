"""The serving scheduler: a bounded queue of requests and one worker thread that runs the batched
engine, streaming text deltas back to the asyncio side.

Continuous batching: requests join the running batch between steps (up to --max-batch-size) and
leave when they stop, hit a stop string, or their client goes away. A full queue is refused at
once; a cancelled request leaves the batch at the next step and frees its slot.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch

from dflash.decode.batch import BatchEngine, BatchRequest
from dflash.decode.engine import GenerationStats
from dflash.decode.sampling import SamplingParams
from dflash.decode.text import IncrementalDetokenizer
from dflash.errors import DFlashError


class QueueFull(Exception):
    """The server holds as many requests as it may; the client should retry later."""


@dataclass
class GenerationRequest:
    input_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Delta:
    """New text; on the last delta `finish` is "stop", "length", "cancelled" or "error" and
    `stats` is filled."""

    text: str
    finish: str | None = None
    stats: GenerationStats | None = None
    error: str | None = None


class RequestHandle:
    """The asyncio side of one request: iterate `deltas()`; `cancel()` when the client leaves."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.cancelled = threading.Event()

    def push(self, delta: Delta) -> None:  # called from the worker thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    def cancel(self) -> None:
        self.cancelled.set()

    async def deltas(self) -> AsyncIterator[Delta]:
        while True:
            delta = await self._queue.get()
            yield delta
            if delta.finish is not None:
                return


class TextStream:
    """Token ids in, text deltas out: holds back an incomplete multi-byte character and any tail
    that could still become a stop string; reports where a stop string cut the text."""

    def __init__(self, tokenizer: Any, stop_strings: list[str], skip: set[int]) -> None:
        self.stops, self.skip = stop_strings, skip
        self.detokenizer = IncrementalDetokenizer(tokenizer)  # holds back incomplete characters
        self.text = ""
        self.sent = ""
        self.hold = max((len(s) for s in stop_strings), default=1) - 1

    def add(self, tokens: list[int]) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the text)."""
        self.text += self.detokenizer.add(t for t in tokens if t not in self.skip)
        text = self.text
        hits = [i for i in (text.find(s, max(0, len(self.sent) - self.hold)) for s in self.stops) if i >= 0]
        if hits:
            return self._emit(text[: min(hits)]), True
        ready = text
        if self.stops:
            ready = ready[: max(len(self.sent), len(ready) - self.hold)]
        return self._emit(ready), False

    def flush(self) -> str:
        self.text += self.detokenizer.flush()
        return self._emit(self.text)

    def _emit(self, text: str) -> str:
        delta = text[len(self.sent):] if len(text) > len(self.sent) else ""
        self.sent = max(self.sent, text, key=len)
        return delta


@dataclass
class _Live:
    handle: RequestHandle
    text: TextStream


class Scheduler:
    """Owns the models; `submit` from the event loop, decoding happens on the worker thread."""

    def __init__(self, target: Any, drafter: Any, tokenizer: Any, *, block_size: int, stop_token_ids: list[int],
                 max_queue: int = 64, max_batch_size: int = 8, metrics: Any = None,
                 draft_threshold: float = 0.0) -> None:
        self.target, self.drafter, self.tokenizer = target, drafter, tokenizer
        self.block_size = block_size if drafter is not None else 1
        self.stop_token_ids = stop_token_ids
        self.metrics = metrics
        self.max_queue = max_queue
        self.engine = BatchEngine(target, drafter if self.block_size > 1 else None, block_size=self.block_size,
                                  stop_token_ids=stop_token_ids, max_batch_size=max_batch_size,
                                  draft_threshold=draft_threshold)
        self._inbox: queue.Queue[RequestHandle | None] = queue.Queue()
        self._pending = 0          # queued + running
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="dflash-decoder", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._pending

    def submit(self, request: GenerationRequest) -> RequestHandle:
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"the server is busy: {self._pending} requests queued or running "
                                f"(--max-queue {self.max_queue}); retry later")
            self._pending += 1
        handle = RequestHandle(request, asyncio.get_running_loop())
        self._inbox.put(handle)
        self._gauge()
        return handle

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._pending)

    # --- the worker thread ----------------------------------------------------------------------

    def _work(self) -> None:
        live: dict[int, _Live] = {}
        while not self._closing:
            self._take_new(live, block=self.engine.idle)
            for rid, item in list(live.items()):
                if item.handle.cancelled.is_set():
                    self._end(live, rid, "cancelled", self.engine.cancel(rid))
            if self.engine.idle:
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug or out-of-memory: fail the batch, keep serving
                for rid in list(live):
                    self.engine.cancel(rid)
                    self._end(live, rid, "error", None, f"{type(exc).__name__}: {exc}")
                continue
            for out in outputs:
                item = live.get(out.rid)
                if item is None:
                    continue
                text, stopped = item.text.add(out.tokens)
                if text:
                    item.handle.push(Delta(text))
                if stopped:
                    self._end(live, out.rid, "stop", out.stats or self.engine.cancel(out.rid))
                elif out.finished:
                    tail = item.text.flush()
                    if tail:
                        item.handle.push(Delta(tail))
                    self._end(live, out.rid, out.stats.finish_reason, out.stats)

    def _take_new(self, live: dict[int, _Live], block: bool) -> None:
        while True:
            try:
                handle = self._inbox.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                return
            block = False
            if handle is None:
                self._closing = True
                return
            rid = next(self._ids)
            live[rid] = _Live(handle, TextStream(self.tokenizer, handle.request.stop_strings, set(self.stop_token_ids)))
            r = handle.request
            generator = None
            if not r.sampling.greedy and r.seed is not None:
                generator = torch.Generator(device=self.engine.device).manual_seed(r.seed)
            try:
                self.engine.add(BatchRequest(rid, r.input_ids, r.max_new_tokens, r.sampling, generator))
            except DFlashError as exc:
                self._end(live, rid, "error", None, str(exc))

    def _end(self, live: dict[int, _Live], rid: int, finish: str, stats: GenerationStats | None,
             error: str | None = None) -> None:
        item = live.pop(rid)
        stats = stats or GenerationStats(prompt_tokens=len(item.handle.request.input_ids))
        if self.metrics is not None:
            self.metrics.observe(stats, finish)
        item.handle.push(Delta("", finish=finish, stats=stats, error=error))
        with self._lock:
            self._pending -= 1
        self._gauge()
