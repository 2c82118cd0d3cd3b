"""`dflash bench --backend llamacpp`: llama-server's acceptance, from its /metrics counters or, without
them, from the `timings` object on its last streamed chunk (no llama.cpp needed: canned chunks)."""

import asyncio

from openai.types.chat import ChatCompletionChunk

from dflash.bench.http import RequestRecord, _conversation, tau_from_metrics
from dflash.bench.report import summarize_http


def chunk(content=None, usage=None, timings=None):
    body = {"id": "c", "created": 0, "model": "m", "object": "chat.completion.chunk",
            "choices": [] if content is None else [{"index": 0, "delta": {"content": content}}]}
    if usage is not None:
        body["usage"] = usage
    if timings is not None:
        body["timings"] = timings
    return ChatCompletionChunk.model_validate(body)


class FakeClient:
    """Streams what llama-server streams for one turn: text chunks, then usage with timings."""

    def __init__(self, chunks):
        self.chat = self
        self.completions = self
        self.chunks = chunks

    async def create(self, **kwargs):
        async def stream():
            for c in self.chunks:
                yield c
        return stream()


def test_timings_of_the_last_chunk_are_recorded():
    timings = {"predicted_n": 43, "draft_n": 66, "draft_n_accepted": 20}  # as llama-server sent them
    client = FakeClient([chunk("Seven"), chunk(" eights"), chunk(usage={"completion_tokens": 43, "prompt_tokens": 38,
                                                                        "total_tokens": 81}, timings=timings)])
    record = asyncio.run(_conversation(client, "m", "gsm8k", 0, ["q"], max_tokens=64, temperature=0.0,
                                       enable_thinking=False, seed=0))
    assert record.texts == ["Seven eights"] and record.completion_tokens == 43
    assert (record.draft_tokens, record.draft_accepted, record.timed_tokens) == (66, 20, 42)
    # without /metrics: 42 tokens after the first in 42 - 20 = 22 target forwards
    level = summarize_http({"concurrency": 1, "records": [record], "wall_s": 1.0, "metrics_tau": None})
    assert level["tau_source"] == "timings" and abs(level["tau"] - 42 / 22) < 1e-9
    assert level["draft_tokens"] == 66 and level["draft_accepted"] == 20
    assert abs(level["draft_acceptance_rate"] - 20 / 66) < 1e-9


def test_metrics_counters_win_over_timings():
    before = {"llamacpp:spec_decode_num_drafts_total": 10.0, "llamacpp:spec_decode_num_accepted_tokens_total": 5.0}
    after = {"llamacpp:spec_decode_num_drafts_total": 32.0, "llamacpp:spec_decode_num_accepted_tokens_total": 25.0}
    tau = tau_from_metrics(before, after)
    assert abs(tau - (1 + 20 / 22)) < 1e-9  # llama.cpp's own "mean len": 1 + accepted / verify steps
    record = RequestRecord("gsm8k", 0, 1, completion_tokens=10, draft_tokens=9, draft_accepted=3, timed_tokens=9)
    level = summarize_http({"concurrency": 1, "records": [record], "wall_s": 1.0, "metrics_tau": tau})
    assert level["tau_source"] == "metrics" and level["tau"] == tau


def test_a_plain_server_reports_no_acceptance():
    record = RequestRecord("gsm8k", 0, 1, completion_tokens=10, timed_tokens=9)
    level = summarize_http({"concurrency": 1, "records": [record], "wall_s": 1.0,
                            "metrics_tau": tau_from_metrics({}, {"llamacpp:tokens_predicted_total": 10.0})})
    assert level["tau"] is None and level["draft_acceptance_rate"] is None
