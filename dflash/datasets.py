"""Prompt sets: the five evaluation sets in the reference's prompt formats, and training pools.

A set is found, in this order, as a JSONL file path, as NAME.jsonl in a data directory
(`--data-dir`, else $DFLASH_DATA_DIR; evaluation sets under eval/, training pools under train/),
or as a Hugging Face Hub dataset when the `datasets` package and the network are there. Every row
becomes a list of user turns (`turns`), in order.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dflash.errors import DFlashError

DATA_DIR_ENV = "DFLASH_DATA_DIR"
REASONING = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class EvalSet:
    """Where an evaluation set lives on the Hub, which field holds the prompt, and the prompt
    format the DFlash reference benchmark uses (so figures are comparable)."""

    hub_id: str
    hub_config: str | None
    hub_split: str
    field: str
    template: str = "{prompt}"


EVAL_SETS: dict[str, EvalSet] = {
    "gsm8k": EvalSet("openai/gsm8k", "main", "test", "question", REASONING),
    "math500": EvalSet("HuggingFaceH4/MATH-500", None, "test", "problem", REASONING),
    "humaneval": EvalSet("openai/openai_humaneval", None, "test", "prompt",
                         "Write a solution to the following problem and make sure that it passes the tests:\n"
                         "```python\n{prompt}\n```"),
    "mbpp": EvalSet("google-research-datasets/mbpp", "sanitized", "test", "prompt"),
    "mt-bench": EvalSet("HuggingFaceH4/mt_bench_prompts", None, "train", "turns"),
}


def open_text(path: Path, mode: str = "rt"):
    """A text handle on a plain or gzipped file (gzip by suffix)."""
    if path.suffix == ".gz":
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSON-lines file, plain or gzipped (multi-member gzip included). A row cut by an
    interrupted write at the very end is dropped, not fatal."""
    with open_text(path) as f:
        try:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a partial last line
        except (EOFError, zlib.error, gzip.BadGzipFile):
            return  # a gzip member cut short by an interrupted write


def data_dir(explicit: str | Path | None = None) -> Path | None:
    folder = explicit or os.environ.get(DATA_DIR_ENV)
    return Path(folder).expanduser() if folder else None


def find_rows(name: str, folder: str | Path | None, subdir: str, hub: EvalSet | None = None) -> list[dict[str, Any]]:
    """Rows (each with a non-empty `turns` list) of a set named by path, data-directory name or
    Hub id. The error names every place looked at, so the user knows what to fix."""
    path = Path(name).expanduser()
    if path.is_file():
        return _checked(list(read_jsonl(path)), str(path))
    tried = [f"no file {path}"]
    root = data_dir(folder)
    stem = name.removesuffix(".jsonl")
    if root is not None:
        for candidate in (root / subdir / f"{stem}.jsonl", root / f"{stem}.jsonl"):
            if candidate.is_file():
                return _checked(list(read_jsonl(candidate)), str(candidate))
        tried.append(f"no {stem}.jsonl in the data directory {root}/{subdir}")
    else:
        tried.append(f"no data directory given (--data-dir or ${DATA_DIR_ENV})")
    rows, why = _from_hub(hub) if hub else _from_hub(EvalSet(name, None, "train", "turns"))
    if rows is not None:
        return _checked(rows, hub.hub_id if hub else name)
    tried.append(f"the Hugging Face Hub {hub.hub_id if hub else name!r}: {why}")
    raise DFlashError(f"dataset {name!r} not found: " + "; ".join(tried))


def _from_hub(spec: EvalSet) -> tuple[list[dict[str, Any]] | None, str]:
    """A Hub dataset's rows as `turns` rows, or (None, why not)."""
    if spec.hub_id.startswith((".", "/", "~")) or spec.hub_id.count("/") != 1:
        return None, "not a Hub id"
    try:
        import datasets
    except ImportError:
        return None, "the `datasets` package is not installed"
    try:
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    except Exception as exc:  # offline, unknown id, gated: all the same to the user
        return None, str(exc).splitlines()[0][:160]
    rows = []
    for r in ds:
        turns = r.get("turns") or r.get(spec.field) or next(
            (r[k] for k in ("prompt", "question", "instruction", "problem") if r.get(k)), None)
        if turns:
            rows.append({**r, "turns": [turns] if isinstance(turns, str) else list(turns)})
    return rows, "ok"


def _checked(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    for i, r in enumerate(rows):
        turns = r.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DFlashError(f"{where}: row {i} has no `turns` list of user messages")
    if not rows:
        raise DFlashError(f"{where} holds no rows")
    return rows


def eval_prompts(name: str, folder: str | Path | None = None, limit: int | None = None) -> list[list[str]]:
    """The user turns of an evaluation set, in the reference's prompt format: one list of
    turns per prompt (two for mt-bench). A name that is not one of EVAL_SETS is read as a JSONL
    file or Hub dataset of `turns`, used as is."""
    spec = EVAL_SETS.get(name.lower())
    rows = find_rows(name.lower() if spec else name, folder, "eval", spec)
    if limit is not None:
        rows = rows[:limit]
    template = spec.template if spec else "{prompt}"
    return [[template.replace("{prompt}", turn) for turn in r["turns"]] for r in rows]
