"""The OpenAI-compatible server, live on loopback, driven by the real `openai` client."""

import concurrent.futures as cf
import json
import time

import httpx2 as httpx
import pytest
import torch
from openai import OpenAI

from dflash.decode.engine import generate
from dflash.runtime.loader import chat_input_ids

from conftest import serve_args, start_server


def client(url, key="secret"):
    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def reference(scheduler, messages, max_new_tokens):
    """What the engine decodes alone, greedy: (text, token count)."""
    ids = chat_input_ids(scheduler.tokenizer, messages)
    stats = generate(scheduler.target, scheduler.drafter, [ids], max_new_tokens=max_new_tokens,
                     block_size=scheduler.block_size, stop_token_ids=scheduler.stop_token_ids)
    tokens = [t for t in stats.new_tokens if t not in scheduler.stop_token_ids]
    return scheduler.tokenizer.decode(tokens, skip_special_tokens=True), stats.num_new_tokens


def test_chat_completion_and_stream_equal_the_engine(tiny_server):
    url, scheduler = tiny_server
    messages = [{"role": "user", "content": "Count to five."}]
    want, n = reference(scheduler, messages, 24)
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    reply = c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == want
    assert reply.usage.completion_tokens == n and reply.usage.prompt_tokens == len(
        chat_input_ids(scheduler.tokenizer, messages))
    assert reply.usage.model_extra["mean_acceptance_length"] >= 1
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == n
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_text_completion_and_stop_strings(tiny_server):
    url, scheduler = tiny_server
    c = client(url)
    full = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0)
    text = full.choices[0].text
    assert full.usage.completion_tokens == 20 and len(text) > 4
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0, stream=True) if ch.choices)
    assert streamed == text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_requests_equal_their_sequential_answers(tiny_server):
    url, scheduler = tiny_server
    prompts = [f"Tell me about the number {i}." for i in range(16)]
    c = client(url)

    def ask(p):
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=16,
                                      temperature=0)
        return r.choices[0].message.content

    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    for p, got in zip(prompts, answers):
        assert got == reference(scheduler, [{"role": "user", "content": p}], 16)[0]


def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(tiny_server):
    url, _ = tiny_server
    h = {"Authorization": "Bearer secret"}
    post = lambda path, **kw: httpx.post(url + path, headers={**h, **kw.pop("headers", {})}, timeout=60, **kw)
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    cases = [
        (post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
        (post("/v1/chat/completions", json={"model": "tiny"}), 400, "messages"),
        (post("/v1/chat/completions", json={**good, "max_tokens": "ten"}), 400, "max_tokens"),
        (post("/v1/chat/completions", json={**good, "max_tokens": -5}), 400, "max_tokens"),
        (post("/v1/chat/completions", json={**good, "max_tokens": 10**9}), 400, "max_tokens"),
        (post("/v1/chat/completions", json={**good, "temperature": "hot"}), 400, "temperature"),
        (post("/v1/chat/completions", json={**good, "model": "gpt-9"}), 404, "gpt-9"),
        (post("/v1/completions", json={"model": "tiny", "prompt": "word " * 3000}), 400, "context"),
        (post("/v1/nowhere", json=good), 404, "Not Found"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (response.status_code, response.text)
        error = response.json()["error"]
        assert words.lower() in error["message"].lower(), error
    ok = post("/v1/chat/completions", json=good)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_api_key_is_enforced(tiny_server):
    url, _ = tiny_server
    with pytest.raises(Exception) as info:
        client(url, key="wrong").models.list()
    assert getattr(info.value, "status_code", None) == 401
    assert httpx.get(url + "/health").status_code == 200  # health needs no key


def test_disconnect_mid_stream_frees_the_slot(tiny_server):
    url, scheduler = tiny_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 1500,
            "stream": True}
    before = _metric(url, 'dflash_requests_total{finish="cancelled"}')
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer secret"},
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    deadline = time.time() + 30
    while scheduler.depth:
        assert time.time() < deadline, "the cancelled request still holds the worker"
        time.sleep(0.05)
    assert _metric(url, 'dflash_requests_total{finish="cancelled"}') == before + 1
    assert client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2).usage.completion_tokens == 2


def _metric(url, name):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_full_queue_answers_503(tiny_target_dir, tiny_drafter_dir):
    from dflash.serve.cli import build

    scheduler, name = build(serve_args(tiny_target_dir, tiny_drafter_dir, max_queue=1))
    url, stop = start_server(scheduler, name)
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Write a lot."}], "max_tokens": 1500}
        with cf.ThreadPoolExecutor(4) as pool:
            first = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=120)
            deadline = time.time() + 60
            while scheduler.depth == 0:
                assert time.time() < deadline, "the first request never reached the scheduler"
                time.sleep(0.01)
            second = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
            assert second.status_code == 503 and "busy" in second.json()["error"]["message"]
            assert first.result().status_code == 200
    finally:
        stop()


def test_speculative_config_is_read_as_vllm_spells_it(tiny_drafter_dir):
    from dflash.errors import DFlashError
    from dflash.serve.cli import apply_speculative_config

    args = serve_args("x", None, speculative_config=json.dumps(
        {"method": "dflash", "model": str(tiny_drafter_dir), "num_speculative_tokens": 3}))
    apply_speculative_config(args)
    assert args.draft == str(tiny_drafter_dir) and args.block_size == 4
    with pytest.raises(DFlashError, match="method"):
        apply_speculative_config(serve_args("x", None, speculative_config='{"method": "eagle3"}'))
    with pytest.raises(DFlashError, match="JSON"):
        apply_speculative_config(serve_args("x", None, speculative_config="{oops"))


def test_bench_http_backend_against_the_live_server(tiny_server, tmp_path):
    from dflash.bench.cli import main
    from helpers import DATA_DIR

    url, _ = tiny_server
    out = tmp_path / "http.json"
    assert main(["--backend", "openai", "--base-url", url, "--api-key", "secret", "--dataset", "gsm8k", "mt-bench",
                 "--max-samples", "2", "--max-new-tokens", "8", "--concurrency", "1,2", "--data-dir", str(DATA_DIR),
                 "--output", str(out), "--plots", str(tmp_path / "plots"), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["num_requests"] == 4
        assert level["completion_tokens"] == 6 * 8  # 2 gsm8k turns + 4 mt-bench turns, 8 tokens each
        assert level["tau_source"] == "usage" and level["tau"] >= 1
        assert level["ttft_ms_p50"] > 0 and level["tokens_per_s"] > 0
    assert (tmp_path / "plots" / "concurrency.png").exists()


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_greedy_answer_through_the_server_equals_spec_generate(smollm):
    """The real target (with a random drafter: exactness must not depend on the drafter)."""
    from dflash import DFlashDraftModel
    from dflash.serve.metrics import ServerMetrics
    from dflash.serve.scheduler import Scheduler
    from dflash.runtime.loader import stop_token_ids

    model, tokenizer = smollm
    torch.manual_seed(0)
    drafter = DFlashDraftModel.from_target(model, num_layers=1, block_size=8, mask_token_id=16)
    stops = stop_token_ids(tokenizer, model)
    scheduler = Scheduler(model, drafter, tokenizer, block_size=8, stop_token_ids=stops, metrics=ServerMetrics())
    url, stop = start_server(scheduler, "smollm2")
    try:
        question = "What is the capital of France? Answer in one sentence."
        reply = client(url, key="x").chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=40, temperature=0)
        ids = torch.tensor([chat_input_ids(tokenizer, question)])
        out = drafter.spec_generate(ids, max_new_tokens=40, target=model, stop_token_ids=stops)
        tokens = [t for t in out[0, ids.shape[1]:].tolist() if t not in stops]
        assert reply.choices[0].message.content == tokenizer.decode(tokens, skip_special_tokens=True)
        assert reply.usage.completion_tokens == out.shape[1] - ids.shape[1]
    finally:
        stop()
