"""The decoding loop for one sequence: prefill -> (draft -> verify -> accept -> commit)* -> stop.

`stream` yields the tokens each target forward commits; `generate` collects them. Block size 1
is plain autoregressive decoding through the same code (no drafter call), the fair baseline.
The loop makes one host transfer per step (the accepted tokens); caches are rolled back by
length, never rebuilt.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from dflash.decode.sampling import (SamplingParams, confident_prefix, greedy_accept, logits_to_probs, rejection_accept,
                                    sample)
from dflash.errors import DFlashError
from dflash.runtime.adapter import TargetAdapter


@dataclass
class GenerationStats:
    """What one generation did. `acceptance_lengths` has one entry per verify forward: the
    tokens it committed (accepted drafts + the bonus). The prefill commits the first token."""

    prompt_tokens: int = 0
    block_size: int = 1
    output_ids: torch.Tensor | None = None       # [1, prompt + new]
    new_tokens: list[int] = field(default_factory=list)
    acceptance_lengths: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)  # drafts verified per forward (a threshold shortens blocks)
    prefill_time: float = 0.0
    decode_time: float = 0.0
    finish_reason: str = "length"                # "stop" (a stop token) or "length"

    @property
    def num_new_tokens(self) -> int:
        return len(self.new_tokens)

    @property
    def tau(self) -> float:
        """Mean acceptance length: tokens committed per target forward while decoding."""
        if not self.acceptance_lengths:
            return 0.0
        return sum(self.acceptance_lengths) / len(self.acceptance_lengths)

    @property
    def total_time(self) -> float:
        return self.prefill_time + self.decode_time

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of wall time, prefill included (end to end)."""
        return self.num_new_tokens / self.total_time if self.total_time > 0 else 0.0

    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.acceptance_lengths).items()))


def _as_prompt(input_ids: Any, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise DFlashError(f"input_ids must be one sequence ([1, n]); got shape {tuple(ids.shape)} "
                          "(use the batched engine for several)")
    if ids.shape[1] == 0:
        raise DFlashError("the prompt is empty: give at least one token")
    return ids.to(device)


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

    `target` is a Hugging Face causal LM or a TargetAdapter; `drafter` a DFlashDraftModel (or
    anything with its `draft`/`new_cache`/`config`), or None for block size 1.
    `draft_threshold` > 0 verifies only the drafts the drafter is that sure of, multiplied up
    (`confident_prefix`): shorter blocks when it guesses, same output.
    """
    if max_new_tokens < 1:
        raise DFlashError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if block_size < 1:
        raise DFlashError(f"block_size must be at least 1, got {block_size}")
    if not 0 <= draft_threshold < 1:
        raise DFlashError(f"draft_threshold must be in [0, 1), got {draft_threshold}")
    drafting = block_size > 1
    if drafting:
        if drafter is None:
            raise DFlashError("block_size > 1 needs a drafter")
        if block_size > drafter.config.block_size:
            raise DFlashError(f"block_size {block_size} exceeds the {drafter.config.block_size} "
                              "this drafter was trained for")
    adapter = TargetAdapter.wrap(target, drafter.config.target_layer_ids if drafting else [])
    if drafting:
        adapter.check_drafter(drafter.config)
    prompt = _as_prompt(input_ids, adapter.device)
    n_prompt = prompt.shape[1]
    if n_prompt >= adapter.max_positions:
        raise DFlashError(f"the prompt has {n_prompt} tokens; the target's context holds "
                          f"{adapter.max_positions}: shorten it")
    budget = min(max_new_tokens, adapter.max_positions - n_prompt)
    stops = set(stop_token_ids or ())
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.block_size = n_prompt, block_size
    device = adapter.device

    def choose(logits: torch.Tensor) -> torch.Tensor:  # [n, vocab] -> [n]
        if sampling.greedy:
            return logits.argmax(-1)
        return sample(logits_to_probs(logits, sampling), generator)

    t0 = time.perf_counter()
    cache = adapter.new_cache()
    out = adapter.forward(prompt, cache, logits_to_keep=1, features=drafting)
    first = int(choose(out.logits[0, -1:])[0])
    stats.prefill_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats.new_tokens.append(first)
    context = out.features                 # target features of positions not yet given to the drafter
    draft_cache = drafter.new_cache(capacity=n_prompt + budget + drafter.config.block_size) if drafting else None
    start = n_prompt                       # position of the newest token; the target has not run it
    anchor = first
    done = first in stops
    stats.finish_reason = "stop" if done else "length"
    try:
        yield [first]
        while not done and len(stats.new_tokens) < budget:
            remaining = budget - len(stats.new_tokens)
            size = min(block_size, remaining, adapter.max_positions - start)
            block = torch.full((1, size), drafter.config.mask_token_id if drafting else anchor,
                               dtype=torch.long, device=device)
            block[0, 0] = anchor
            q = None
            if size > 1:
                drafts = drafter.draft(adapter, block, context, draft_cache)  # logits [1, size-1, K]
                if sampling.greedy:
                    block[0, 1:] = drafts.tokens()[0]
                else:
                    q = logits_to_probs(drafts.full_logits()[0], sampling)
                    block[0, 1:] = sample(q, generator)
                context = None
                if draft_threshold > 0:  # top probabilities; greedy needs no full softmax for them
                    top = q.amax(-1) if q is not None else drafts.top_probs()[0]
                    size = 1 + confident_prefix(top, draft_threshold)
                    block = block[:, :size]
                    q = q[: size - 1] if q is not None else None
            out = adapter.forward(block, cache, features=drafting)
            logits = out.logits[0]                                           # [size, V]
            if sampling.greedy:
                both = torch.cat([block[0, 1:], logits.argmax(-1)]).tolist()  # one transfer
                drafts, choice = both[: size - 1], both[size - 1:]
                n_acc = greedy_accept(drafts, choice)
                new = drafts[:n_acc] + [choice[n_acc]]
            else:
                p = logits_to_probs(logits, sampling)
                if q is None:
                    n_acc, bonus = 0, int(sample(p[0], generator))
                else:
                    n_acc, bonus = rejection_accept(block[0, 1:], q, p, generator)
                new = block[0, 1: 1 + n_acc].tolist() + [bonus]
            for i, tok in enumerate(new):
                if tok in stops:
                    new, done = new[: i + 1], True
                    stats.finish_reason = "stop"
                    break
            new = new[:remaining]
            stats.acceptance_lengths.append(len(new))
            stats.draft_lengths.append(size - 1)
            stats.new_tokens.extend(new)
            yield new
            if done:
                break
            start += n_acc + 1
            adapter.rollback(cache, start)
            if drafting:  # features of the anchor and accepted drafts; the bonus has not run yet
                kept = out.features[:, : n_acc + 1]
                context = kept if context is None else torch.cat([context, kept], dim=1)
            anchor = new[-1]
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.decode_time = time.perf_counter() - t0
        stats.output_ids = torch.cat([prompt.cpu(), torch.tensor([stats.new_tokens], dtype=torch.long)], dim=1)


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
