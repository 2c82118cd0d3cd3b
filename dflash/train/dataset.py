"""Training conversations: reading regenerated files, tokenising them with a loss mask on the
assistant's tokens, and a deterministic held-out split.

Files are gzipped or plain JSON lines {"id", "source", "messages": [...], "finish", ...} as
`dflash data` writes them. Tokenisation is lazy (on first use of a row), so a run that only
gets through part of an epoch never pays for the rest.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path
from typing import Any, Iterator

import torch

from dflash.datasets import read_jsonl
from dflash.errors import DFlashError


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files named by paths or globs, in the order given (each glob sorted), without repeats."""
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()))) or []
        if not matches:
            raise DFlashError(f"no training file matches {pattern}")
        for m in matches:
            p = Path(m)
            if p.is_file() and p not in out:
                out.append(p)
    return out


def load_conversations(patterns: list[str]) -> list[dict[str, Any]]:
    """Every conversation of the files (in file order), with `file` added for the record."""
    rows = []
    for path in expand_paths(patterns):
        n = 0
        for row in read_jsonl(path):
            if not isinstance(row.get("messages"), list):
                raise DFlashError(f"{path}: rows need a `messages` list (the format `dflash data` writes)")
            row["file"] = path.name
            rows.append(row)
            n += 1
        if n == 0:
            raise DFlashError(f"{path} holds no conversations")
    return rows


def split_rows(rows: list[dict[str, Any]], fraction: float,
               repeats: list[tuple[str, str]] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows). `repeats` [(FILE_OR_GLOB, N)] lists the training rows of
    those files N times each, to weight data up. Each copy is the same row, so a held-out row
    never reaches training through a copy (a copy of the file under another name would hash
    differently) and cached features serve every copy."""
    files = {row["file"] for row in rows}
    times: dict[str, int] = {}
    for pattern, n in repeats or []:
        if not str(n).isdigit() or int(n) < 1:
            raise DFlashError(f"--repeat {pattern} {n}: N must be a whole number of at least 1")
        matched = {p.name for p in expand_paths([pattern])}
        if matched - files:
            raise DFlashError(f"--repeat {pattern}: {', '.join(sorted(matched - files))} is not among the --data files")
        times.update(dict.fromkeys(matched, int(n)))
    held = [is_held_out(r, fraction) for r in rows]
    train = [r for r, h in zip(rows, held) if not h for _ in range(times.get(r["file"], 1))]
    return train, [r for r, h in zip(rows, held) if h]


def is_held_out(row: dict[str, Any], fraction: float) -> bool:
    """Deterministic split by a hash of (file, source, id): the same rows are held out in every run."""
    if fraction <= 0:
        return False
    key = f"{row.get('file')}:{row.get('source')}:{row.get('id')}".encode()
    h = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return h < fraction


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]], finish: str = "stop",
                          max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n], loss_mask [n] bool): the chat template's tokens, the assistant's replies (and
    their end-of-turn token) supervised, everything else not.

    Each prompt part is tokenised as the template renders it before the reply, and each reply on
    its own after it: the same split as generation, where the target wrote the reply's tokens
    after the prompt's. A reply cut by the token cap (finish == "length") gets no end-of-turn
    token supervised, since the target never produced one.
    """
    ids: list[int] = []
    mask: list[bool] = []
    done = ""  # template text already tokenised

    def add(text: str, supervised: bool) -> None:
        if text:
            new = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(new)
            mask.extend([supervised] * len(new))

    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DFlashError("this tokenizer's chat template does not render a conversation as growing "
                              "prefixes; its replies cannot be located for the loss mask")
        add(prompt[len(done):], False)
        reply = full[len(prompt):]
        if i == last and finish == "length":
            reply = message["content"]
        start = reply.find(message["content"]) if message["content"] else -1
        if start < 0:  # the template rewrote the reply: supervise all of it
            add(reply, True)
        else:
            content_end = start + len(message["content"])
            add(reply[:content_end], True)
            # the end-of-turn token is supervised (the drafter should learn where replies
            # stop); whatever the template adds after it is not
            tail = tokenizer(reply[content_end:], add_special_tokens=False)["input_ids"]
            ids.extend(tail)
            mask.extend([True] + [False] * (len(tail) - 1) if tail else [])
        done = full
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


class ConversationDataset:
    """Rows tokenised on first use and kept in memory (a few KB each)."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Any, max_len: int) -> None:
        self.rows, self.tokenizer, self.max_len = rows, tokenizer, max_len
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self._cache:
            row = self.rows[i]
            self._cache[i] = tokenize_conversation(self.tokenizer, row["messages"], row.get("finish", "stop"),
                                                   self.max_len)
        return self._cache[i]

    def key(self, i: int) -> str:
        """A stable name of row i (for the feature cache)."""
        row = self.rows[i]
        return f"{row.get('file')}-{row.get('source')}-{row.get('id', i)}"


def epoch_order(sizes: list[int], epoch: int, seed: int, in_order: bool) -> list[int]:
    """Row indices for one epoch: a fresh shuffle per epoch; with `in_order` each file is
    shuffled on its own and the files follow in the order given (to prioritise some data)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if not in_order:
        return torch.randperm(sum(sizes), generator=g).tolist()
    out, start = [], 0
    for n in sizes:
        out += (torch.randperm(n, generator=g) + start).tolist()
        start += n
    return out
