"""The decoding loop for one sequence: prefill -> (draft -> verify -> accept -> commit)* -> stop,
a one-row use of the speculative step (dflash/decode/step.py).

`stream` yields the tokens each target forward commits; `generate` collects them. Block size 1
is plain autoregressive decoding through the same code (no drafter call), the fair baseline.
The loop makes one host transfer per step (the accepted tokens); caches are rolled back by
length, never rebuilt.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import torch

from dflash.decode.sampling import SamplingParams
from dflash.decode.stats import GenerationStats
from dflash.decode.step import Speculator
from dflash.errors import DFlashError
from dflash.runtime.loader import as_runtime

__all__ = ["GenerationStats", "generate", "stream"]


def _as_prompt(input_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise DFlashError(f"input_ids must be one sequence ([1, n]); got shape {tuple(ids.shape)} "
                          "(use the batched engine for several)")
    return ids[0]


def stream(
    target: Any,
    drafter: Any,
    input_ids: Any,
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    block_size: int = 1,
    stop_token_ids: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    stats: GenerationStats | None = None,
    draft_threshold: float = 0.0,
) -> Iterator[list[int]]:
    """Yield the new tokens of each step. `stats` (if given) is filled in as it goes.

    `target` is a runtime (`load_target` returns one; dflash/runtime/base.py) or a Hugging Face
    causal LM (run through the transformers runtime); `drafter` a DFlashDraftModel (or anything
    with its `draft`/`new_cache`/`config`), or None for block size 1.
    `draft_threshold` > 0 verifies only the drafts the drafter is that sure of, multiplied up
    (`confident_prefix`): shorter blocks when it guesses, same output.
    """
    if max_new_tokens < 1:
        raise DFlashError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    runtime = as_runtime(target)
    speculator = Speculator(runtime, drafter, block_size=block_size, stop_token_ids=stop_token_ids or (),
                            draft_threshold=draft_threshold)
    prompt = _as_prompt(input_ids)
    stats = stats if stats is not None else GenerationStats()
    t0 = time.perf_counter()
    row = speculator.start(prompt, max_new_tokens, sampling, generator, stats)
    stats.prefill_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        yield list(stats.new_tokens)
        while not row.done:
            for _, new in speculator.step():
                yield new
    finally:
        speculator.drop(speculator.rows)
        if runtime.info.device.type == "cuda":
            torch.cuda.synchronize(runtime.info.device)
        stats.decode_time = time.perf_counter() - t0
        stats.output_ids = torch.cat([prompt.cpu(), torch.tensor(stats.new_tokens, dtype=torch.long)])[None]


def generate(
    target: Any,
    drafter: Any,
    input_ids: Any,
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    block_size: int = 1,
    stop_token_ids: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    draft_threshold: float = 0.0,
) -> GenerationStats:
    """Run `stream` to the end; the stats hold `output_ids` (prompt + new)."""
    stats = GenerationStats()
    for _ in stream(target, drafter, input_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                    block_size=block_size, stop_token_ids=stop_token_ids, generator=generator,
                    stats=stats, draft_threshold=draft_threshold):
        pass
    return stats
