"""`dflash data`: regenerate training responses with the target itself.

A drafter must learn the target's own distribution, so the answers in the prompt sets are not
used: the target answers every prompt (multi-turn rows get its own earlier answers fed back).
Answers are decoded through the runtime interface (dflash/runtime/base.py), a batch of
conversations as rows of one cache, so every runtime `load_target` gives works: the native GGUF
runtime (the CPU default for a GGUF target: the fastest, and a step of several rows costs little
more than one), the fp16 lean forward, or transformers (float32 on a CPU, or a GPU). Each
finished conversation is appended to the output at once (one gzip member per batch), so an
interrupted run loses nothing and a rerun skips the ids already written.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from dflash.datasets import find_rows, open_text, read_jsonl
from dflash.decode.sampling import SamplingParams


def find_pool(name: str, data_dir: str | None = None) -> list[dict[str, Any]]:
    """Rows (each with `turns`) of a prompt pool: a JSONL path, a NAME in the data directory
    (DATA_DIR/train/NAME.jsonl or DATA_DIR/NAME.jsonl), or a Hugging Face Hub dataset id."""
    return find_rows(name, data_dir, "train")


def done_ids(out: Path) -> set[int]:
    """Ids already in the output. A tail cut by an interrupted write is dropped by rewriting the
    file's good rows (so later appends stay readable)."""
    if not out.exists():
        return set()
    rows = list(read_jsonl(out))
    with open_text(out) as f:
        try:
            intact = sum(1 for line in f if line.strip()) == len(rows)
        except (EOFError, OSError):
            intact = False
    if not intact:
        tmp = out.with_name(out.stem + ".tmp" + out.suffix)  # keeps .gz: same format
        with open_text(tmp, "wt") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        tmp.replace(out)
    return {int(r["id"]) for r in rows}


def append_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows as one new gzip member (or plain lines), flushed to disk."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out.suffix == ".gz":
        with open(out, "ab") as f:
            f.write(gzip.compress(text.encode("utf-8")))
            f.flush()
            os.fsync(f.fileno())
    else:
        with open(out, "a", encoding="utf-8") as f:
            f.write(text)


@torch.no_grad()
def decode_rows(runtime: Any, prompts: list[list[int]], stops: Sequence[int], max_new_tokens: int,
                temperature: float = 0.0, generator: torch.Generator | None = None) -> list[tuple[list[int], bool]]:
    """Each prompt's reply tokens (without the stop token) and whether a stop token ended it.

    The prompts are decoded together as rows of one cache by the engine's own step at block
    size 1 (plain decoding, dflash/decode/step.py), so the runtime pays for a step once per batch
    rather than once per prompt. Rows do not affect each other (bit for bit in the native and
    fp16 runtimes, to float rounding in transformers': tests/runtime/test_contract.py), so a
    greedy reply is the one its prompt gets decoded alone. A reply stops at a stop token, at
    `max_new_tokens` tokens (the stop token counted), or where prompt and reply fill the
    target's context (so the conversation still fits in it for training); a prompt that fills
    it alone gets an empty reply. Sampling (temperature > 0) draws with `generator`."""
    from dflash.decode.step import Speculator

    step = Speculator(runtime, None, block_size=1, stop_token_ids=stops, max_rows=len(prompts))
    sampling = SamplingParams(temperature)
    limit = runtime.info.max_positions
    rows = [step.start(torch.tensor(p, dtype=torch.long), max_new_tokens, sampling, generator)
            if len(p) < limit else None for p in prompts]
    while step.rows:
        step.step()
    replies = []
    for row in rows:
        tokens = row.stats.new_tokens if row is not None else []
        stopped = row is not None and row.stats.finish_reason == "stop"
        replies.append((tokens[:-1] if stopped else tokens, stopped))
    return replies


def answer_batch(runtime: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], stops: Sequence[int],
                 max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> list[tuple[str, str, int]]:
    """The target's next reply to each conversation: (text, finish, new token count). finish is
    "stop" when a stop token ended the reply (counted in the tokens, not kept in the text), else
    "length"."""
    from dflash.runtime.loader import chat_input_ids

    prompts = [chat_input_ids(tokenizer, c) for c in conversations]
    replies = []
    for tokens, stopped in decode_rows(runtime, prompts, stops, max_new_tokens, temperature, generator):
        replies.append((tokenizer.decode(tokens, skip_special_tokens=True), "stop" if stopped else "length",
                        len(tokens) + int(stopped)))
    return replies


def regenerate(rows: list[tuple[int, dict[str, Any]]], runtime: Any, tokenizer: Any, out: Path, *,
               batch_size: int = 8, max_new_tokens: int = 512, temperature: float = 0.0, seed: int = 0,
               progress: bool = True) -> int:
    """Answer (id, row) pairs in batches through `runtime` (any runtime: load_target's),
    appending each finished batch to `out`. Returns the number of conversations written.
    Sampling draws from one generator seeded with `seed`, so a run is reproducible."""
    from tqdm import tqdm

    from dflash.runtime.loader import stop_token_ids

    stops = stop_token_ids(tokenizer, runtime)
    generator = torch.Generator(device=runtime.info.device).manual_seed(seed)
    written = 0
    bar = tqdm(total=len(rows), desc="regenerating", unit="conv", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        convs: list[list[dict[str, str]]] = [[] for _ in chunk]
        finish = ["stop"] * len(chunk)
        new = [0] * len(chunk)
        for turn in range(max(len(r["turns"]) for _, r in chunk)):
            active = [i for i, (_, r) in enumerate(chunk) if turn < len(r["turns"])]
            for i in active:
                convs[i].append({"role": "user", "content": chunk[i][1]["turns"][turn]})
            replies = answer_batch(runtime, tokenizer, [convs[i] for i in active], stops, max_new_tokens,
                                   temperature, generator)
            for i, (text, fin, n) in zip(active, replies):
                convs[i].append({"role": "assistant", "content": text})
                finish[i], new[i] = fin, new[i] + n
        append_rows(out, [{"id": rid, "source": r.get("source", ""), "messages": convs[i], "finish": finish[i],
                           "new_tokens": new[i]} for i, (rid, r) in enumerate(chunk)])
        written += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return written


def select(rows: list[dict[str, Any]], offset: int, stride: int, limit: int | None,
           skip: set[int]) -> list[tuple[int, dict[str, Any]]]:
    """(id, row) to do: ids offset, offset+stride, ... (id = index in the pool), first `limit`
    of them, minus those already written."""
    ids = list(range(offset, len(rows), stride))
    if limit is not None:
        ids = ids[:limit]
    return [(i, rows[i]) for i in ids if i not in skip]
