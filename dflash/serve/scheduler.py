"""The serving scheduler: a bounded queue of requests and one worker thread that decodes them
with the engine, streaming text deltas back to the asyncio side.

Requests are decoded one at a time in arrival order (the single-sequence engine); the queue
bounds memory and latency, a full queue is refused at once, and a cancelled request (client gone)
stops at its next step and frees the worker.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch

from dflash.decode.engine import GenerationStats, stream
from dflash.decode.sampling import SamplingParams


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
    """New text; on the last delta `finish` is "stop" or "length" and `stats` is filled."""

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
        self.enqueued = time.perf_counter()

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


class Scheduler:
    """Owns the models; `submit` from the event loop, decoding happens on the worker thread."""

    def __init__(self, target: Any, drafter: Any, tokenizer: Any, *, block_size: int, stop_token_ids: list[int],
                 max_queue: int = 64, metrics: Any = None) -> None:
        self.target, self.drafter, self.tokenizer = target, drafter, tokenizer
        self.block_size = block_size
        self.stop_token_ids = stop_token_ids
        self.metrics = metrics
        self.max_queue = max_queue
        self._queue: queue.Queue[RequestHandle | None] = queue.Queue()
        self._pending = 0          # queued + running
        self._lock = threading.Lock()
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
        self._queue.put(handle)
        self._gauge()
        return handle

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._pending)

    def _work(self) -> None:
        while True:
            handle = self._queue.get()
            if handle is None:
                return
            try:
                if not handle.cancelled.is_set():
                    self._decode(handle)
                else:
                    handle.push(Delta("", finish="cancelled"))
            except Exception as exc:  # a bug or out-of-memory: fail this request, keep serving
                handle.push(Delta("", finish="error", error=f"{type(exc).__name__}: {exc}"))
            finally:
                with self._lock:
                    self._pending -= 1
                self._gauge()

    def _decode(self, handle: RequestHandle) -> None:
        r = handle.request
        stats = GenerationStats()
        generator = None
        if not r.sampling.greedy and r.seed is not None:
            generator = torch.Generator(device=self.target.device).manual_seed(r.seed)
        block_size = self.block_size if self.drafter is not None else 1
        tokens: list[int] = []
        sent = ""
        finish = "length"
        hold = max((len(s) for s in r.stop_strings), default=1) - 1  # a stop string may be arriving
        steps = stream(self.target, self.drafter if block_size > 1 else None, [r.input_ids],
                       max_new_tokens=r.max_new_tokens, sampling=r.sampling, block_size=block_size,
                       stop_token_ids=self.stop_token_ids, generator=generator, stats=stats)
        for new in steps:
            if handle.cancelled.is_set():
                finish = "cancelled"
                break
            tokens += [t for t in new if t not in self.stop_token_ids]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(s, max(0, len(sent) - hold)) for s in r.stop_strings) if i >= 0),
                      default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                handle.push(Delta(text[len(sent):]))
                sent = text
                break
            ready = text.rstrip("\ufffd")  # a multi-byte character not complete yet
            ready = ready[: max(len(sent), len(ready) - hold)] if r.stop_strings else ready
            if len(ready) > len(sent):
                handle.push(Delta(ready[len(sent):]))
                sent = ready
        else:
            finish = stats.finish_reason
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) > len(sent):
                handle.push(Delta(text[len(sent):]))
        steps.close()  # a loop left early: end the generator now (it records the timings)
        if self.metrics is not None:
            self.metrics.observe(stats, finish)
        handle.push(Delta("", finish=finish, stats=stats))
