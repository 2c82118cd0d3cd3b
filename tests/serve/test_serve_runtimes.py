"""`dflash serve` runs whatever runtime the flags choose: here the recommended CPU configuration
(`--cpu-weights fp16 --compile --draft-threshold`), continuous batching included, answering
exactly what the same runtime decodes alone."""

import concurrent.futures as cf

from openai import OpenAI

from dflash.decode.engine import generate
from dflash.runtime.lean import LeanRuntime
from dflash.runtime.loader import chat_input_ids

from conftest import serve_args, start_server

QUESTIONS = ["hi", "What is 2 + 2?", "Name a colour.", "Count to five."]


def test_serve_runs_the_compiled_fp16_runtime_with_a_threshold(tiny_target_dir, tiny_drafter_dir):
    from dflash.serve.cli import build

    args = serve_args(tiny_target_dir, tiny_drafter_dir, cpu_weights="fp16", compile=True, draft_threshold=0.1)
    scheduler, name = build(args)
    runtime = scheduler.engine.runtime
    assert isinstance(runtime, LeanRuntime) and runtime.lean.compiled is not None
    url, stop = start_server(scheduler, name)
    try:
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)

        def ask(question):
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                   max_tokens=12, temperature=0)
            return reply.choices[0].message.content

        with cf.ThreadPoolExecutor(len(QUESTIONS)) as pool:  # together: rows of one batch
            answers = list(pool.map(ask, QUESTIONS))
    finally:
        stop()
    stops = scheduler.stop_token_ids
    for question, answer in zip(QUESTIONS, answers):
        ids = chat_input_ids(scheduler.tokenizer, question)
        alone = generate(runtime, None, [ids], max_new_tokens=12, stop_token_ids=stops).new_tokens
        assert answer == scheduler.tokenizer.decode([t for t in alone if t not in stops], skip_special_tokens=True)
