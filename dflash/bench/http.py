"""Server backends: any OpenAI-compatible server (this project's `dflash serve`, vLLM, SGLang,
llama.cpp's llama-server) driven over HTTP at a given concurrency, streaming, with time to first
token, inter-token latency, throughput, and the acceptance length where the server reports it: in
each response's `usage` (`dflash serve`), in its Prometheus `/metrics` (vLLM's
`vllm:spec_decode_*` counters, llama-server's `llamacpp:spec_decode_*` ones when started with
`--metrics`, SGLang's `sglang:spec_accept_length`), or, failing those, from the `timings` object
llama-server adds to its last chunk (`draft_n` drafted, `draft_n_accepted` accepted tokens).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from dflash.errors import DFlashError


@dataclass
class RequestRecord:
    """One conversation sent to the server (every turn), as the client saw it."""

    dataset: str
    index: int
    turns: int
    completion_tokens: int = 0
    prompt_tokens: int = 0
    latency_s: float = 0.0               # all turns, first byte sent to last byte received
    ttft_s: float = 0.0                  # first turn
    itl_s: list[float] = field(default_factory=list)   # gaps between streamed chunks
    acceptance_lengths: list[float] = field(default_factory=list)  # per turn, where `usage` has it
    texts: list[str] = field(default_factory=list)
    # llama-server's `timings`, summed over turns: tokens drafted, drafts accepted, tokens after the first
    draft_tokens: int = 0
    draft_accepted: int = 0
    timed_tokens: int = 0


def scrape_metrics(base_url: str, timeout: float = 10.0) -> dict[str, float]:
    """The server's Prometheus samples as {name{labels}: value}; empty if it has no /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except OSError:
        return {}
    samples: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[s.name] = samples.get(s.name, 0.0) + s.value  # summed over label sets
    except ValueError:
        return {}
    return samples


def tau_from_metrics(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean acceptance length (tokens per target forward) from a server's counters over a run."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    for prefix in ("vllm:", "llamacpp:"):  # accepted drafts per verify step + the target's own token
        steps = delta(prefix + "spec_decode_num_drafts_total")
        if steps > 0:
            return 1.0 + delta(prefix + "spec_decode_num_accepted_tokens_total") / steps
    if delta("dflash_verify_steps_total") > 0:          # dflash serve
        return delta("dflash_committed_tokens_total") / delta("dflash_verify_steps_total")
    if after.get("sglang:spec_accept_length"):          # SGLang: a running mean (gauge)
        return after["sglang:spec_accept_length"]
    return None


async def _conversation(client: Any, model: str, dataset: str, index: int, turns: list[str], *,
                        max_tokens: int, temperature: float, enable_thinking: bool,
                        seed: int | None) -> RequestRecord:
    record = RequestRecord(dataset, index, len(turns))
    messages: list[dict[str, str]] = []
    extra = {"chat_template_kwargs": {"enable_thinking": True}} if enable_thinking else None
    for t, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        start = last = time.perf_counter()
        parts: list[str] = []
        usage = timings = None
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, seed=seed,
            stream=True, stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if (chunk.model_extra or {}).get("timings"):  # llama-server, on its last chunk
                timings = chunk.model_extra["timings"]
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                now = time.perf_counter()
                if not parts and t == 0:
                    record.ttft_s = now - start
                elif parts:
                    record.itl_s.append(now - last)
                last = now
                parts.append(delta)
        record.latency_s += time.perf_counter() - start
        text = "".join(parts)
        record.texts.append(text)
        messages.append({"role": "assistant", "content": text})
        if usage is not None:
            record.completion_tokens += usage.completion_tokens or 0
            record.prompt_tokens += usage.prompt_tokens or 0
            accept = (usage.model_extra or {}).get("mean_acceptance_length")
            if accept is not None:
                record.acceptance_lengths.append(float(accept))
        else:  # a server that does not report usage: count streamed chunks
            record.completion_tokens += len(parts)
        if timings is not None:
            record.draft_tokens += int(timings.get("draft_n") or 0)
            record.draft_accepted += int(timings.get("draft_n_accepted") or 0)
            # the prompt's forward yields the first token; every later forward one plus its accepted drafts
            record.timed_tokens += max(int(timings.get("predicted_n") or 0) - 1, 0)
    return record


async def _run_level(base_url: str, model: str, prompts: dict[str, list[list[str]]], concurrency: int,
                     api_key: str | None, progress: Callable[[int], None] | None,
                     **options: Any) -> tuple[list[RequestRecord], float]:
    from openai import AsyncOpenAI

    # A fresh connection per request (`Connection: close`): llama-server (cpp-httplib) closes a connection
    # idle for 5 s, and a request sent on it as it closes fails outright (no retries here); a connect costs
    # next to nothing beside a generation.
    client = AsyncOpenAI(base_url=base_url.rstrip("/").removesuffix("/v1") + "/v1", api_key=api_key or "EMPTY",
                         timeout=3600, max_retries=0, default_headers={"Connection": "close"})
    gate = asyncio.Semaphore(concurrency)

    async def one(dataset: str, index: int, turns: list[str]) -> RequestRecord:
        async with gate:
            record = await _conversation(client, model, dataset, index, turns, **options)
        if progress is not None:
            progress(1)
        return record

    start = time.perf_counter()
    try:
        records = await asyncio.gather(*(one(name, i, turns) for name, items in prompts.items()
                                         for i, turns in enumerate(items)))
    finally:
        await client.close()
    return list(records), time.perf_counter() - start


def first_model(base_url: str, api_key: str | None) -> str:
    """The first model id the server lists (for --model left out)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url.rstrip("/").removesuffix("/v1") + "/v1", api_key=api_key or "EMPTY",
                    max_retries=0, timeout=30)
    try:
        models = client.models.list().data
    except Exception as exc:
        raise DFlashError(f"no OpenAI-compatible server answers at {base_url}: {exc}") from None
    if not models:
        raise DFlashError(f"the server at {base_url} lists no models")
    return models[0].id


def run_http(base_url: str, model: str | None, prompts: dict[str, list[list[str]]], concurrency: int, *,
             max_tokens: int, temperature: float, api_key: str | None = None, enable_thinking: bool = False,
             seed: int | None = None, warmup: bool = True,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Send every conversation at `concurrency`; returns records, wall time and server metrics."""
    model = model or first_model(base_url, api_key)
    options = dict(max_tokens=max_tokens, temperature=temperature, enable_thinking=enable_thinking, seed=seed)
    try:
        if warmup:
            first = next(iter(prompts.values()))[:1]
            asyncio.run(_run_level(base_url, model, {"warmup": [[first[0][0]]]}, 1, api_key, None,
                                   **{**options, "max_tokens": min(8, max_tokens)}))
        before = scrape_metrics(base_url)
        records, wall = asyncio.run(_run_level(base_url, model, prompts, concurrency, api_key, progress, **options))
        after = scrape_metrics(base_url)
    except DFlashError:
        raise
    except Exception as exc:  # connection refused, 4xx/5xx from the server: say which and where
        raise DFlashError(f"request to {base_url} failed: {type(exc).__name__}: {exc}") from None
    return {"model": model, "concurrency": concurrency, "records": records, "wall_s": wall,
            "metrics_tau": tau_from_metrics(before, after)}
