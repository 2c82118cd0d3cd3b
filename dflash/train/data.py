"""`dflash data`: regenerate training responses with the target itself.

A drafter must learn the target's own distribution, so the answers in the prompt sets are not
used: the target answers every prompt (multi-turn rows get its own earlier answers fed back).
Each finished conversation is appended to the output at once (one gzip member per batch), so an
interrupted run loses nothing and a rerun skips the ids already written.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import torch

from dflash.datasets import find_rows, open_text, read_jsonl


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
def answer_batch(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], stops: list[int],
                 max_new_tokens: int, temperature: float) -> list[tuple[str, str, int]]:
    """The target's next reply to each conversation: (text, finish, new token count). Left
    padding, one `generate` call; a reply ends at its first stop token (not kept in the text)."""
    from dflash.runtime.loader import chat_input_ids

    prompts = [chat_input_ids(tokenizer, c) for c in conversations]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
                         max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, **sampling)
    replies = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        tokens = row if cut is None else row[:cut]
        replies.append((tokenizer.decode(tokens, skip_special_tokens=True), "length" if cut is None else "stop",
                        len(tokens) + (cut is not None)))
    return replies


def regenerate(rows: list[tuple[int, dict[str, Any]]], model: Any, tokenizer: Any, out: Path, *,
               batch_size: int = 8, max_new_tokens: int = 512, temperature: float = 0.0,
               progress: bool = True) -> int:
    """Answer (id, row) pairs in batches, appending each finished batch to `out`. Returns the
    number of conversations written."""
    from tqdm import tqdm

    from dflash.runtime.loader import stop_token_ids

    stops = stop_token_ids(tokenizer, model)
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
            replies = answer_batch(model, tokenizer, [convs[i] for i in active], stops, max_new_tokens, temperature)
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
