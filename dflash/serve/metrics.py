"""Prometheus metrics of the server (`GET /metrics`), in their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dflash.decode.engine import GenerationStats


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dflash_requests", "Finished requests by finish reason", ["finish"], registry=r)
        self.rejected = Counter("dflash_rejected_requests", "Requests refused by status code", ["status"], registry=r)
        self.prompt_tokens = Counter("dflash_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("dflash_generation_tokens", "Tokens generated", registry=r)
        self.verify_steps = Counter("dflash_verify_steps", "Target forwards that verified a draft block", registry=r)
        self.committed = Counter("dflash_committed_tokens", "Tokens committed by those verify forwards", registry=r)
        self.acceptance = Histogram("dflash_request_acceptance_length", "Mean acceptance length per request",
                                    buckets=(1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16), registry=r)
        self.queue_depth = Gauge("dflash_queue_depth", "Requests queued or running", registry=r)

    def observe(self, stats: GenerationStats, finish: str) -> None:
        self.requests.labels(finish=finish).inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.num_new_tokens)
        self.verify_steps.inc(len(stats.acceptance_lengths))
        self.committed.inc(sum(stats.acceptance_lengths))
        if stats.acceptance_lengths:
            self.acceptance.observe(stats.tau)

    def render(self) -> bytes:
        return generate_latest(self.registry)
