"""The local backend: the same prompts decoded with DFlash and with plain decoding (block size 1
of the same engine) in one process, plus optional peers (transformers `generate`, its prompt
lookup mode). Multi-turn prompts feed each method's own earlier answers back, as a chat would.

Under torchrun every rank takes every world-th prompt and rank 0 gathers the records.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from dflash.decode.engine import GenerationStats, generate
from dflash.decode.sampling import SamplingParams
from dflash.runtime.loader import as_runtime


@dataclass
class Run:
    """One method's decoding of one prompt (all its turns together)."""

    new_tokens: int = 0
    time_s: float = 0.0
    ttft_s: float = 0.0                     # first turn: prefill and the first token
    acceptance_lengths: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)
    output_ids: list[list[int]] = field(default_factory=list)  # new tokens of each turn

    def add(self, stats: GenerationStats, first_turn: bool) -> None:
        self.new_tokens += stats.num_new_tokens
        self.time_s += stats.total_time
        if first_turn:
            self.ttft_s = stats.prefill_time
        self.acceptance_lengths += stats.acceptance_lengths
        self.draft_lengths += stats.draft_lengths
        self.output_ids.append(list(stats.new_tokens))


@dataclass
class PromptRecord:
    """Everything measured on one prompt; the report aggregates these."""

    dataset: str
    index: int
    turns: int
    prompt_tokens: int
    dflash: dict[str, Any]
    baseline: dict[str, Any] | None
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def identical(self) -> bool | None:
        if self.baseline is None:
            return None
        return self.dflash["output_ids"] == self.baseline["output_ids"]


def shard(items: Sequence[Any]) -> list[tuple[int, Any]]:
    """(index, item) pairs this process handles: all of them, or every world-th under torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return [(i, x) for i, x in enumerate(items) if i % world == rank]


def gather(records: list[PromptRecord]) -> list[PromptRecord] | None:
    """All ranks' records on rank 0 (None elsewhere); the identity in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    parts: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object([asdict(r) for r in records], parts, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = [PromptRecord(**r) for part in parts for r in part]
    return sorted(merged, key=lambda r: (r.dataset, r.index))


def converse(decode: Callable[[torch.Tensor], GenerationStats], tokenizer: Any, turns: list[str],
             enable_thinking: bool) -> tuple[Run, int]:
    """Decode every turn of a conversation, its own answers fed back; (run, first prompt length)."""
    from dflash.runtime.loader import chat_input_ids

    run, messages, first_len = Run(), [], 0
    for t, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        ids = torch.tensor([chat_input_ids(tokenizer, messages, enable_thinking=enable_thinking)])
        first_len = first_len or ids.shape[1]
        stats = decode(ids)
        run.add(stats, first_turn=t == 0)
        text = tokenizer.decode(stats.new_tokens, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": text})
    return run, first_len


class Peer:
    """A baseline outside the engine. `decode(ids)` returns GenerationStats-like timings."""

    name = "peer"

    def decode(self, ids: torch.Tensor) -> GenerationStats:
        raise NotImplementedError


class TransformersGenerate(Peer):
    """transformers `generate`, greedy or sampled, optionally with prompt-lookup drafting."""

    def __init__(self, model: Any, max_new_tokens: int, sampling: SamplingParams, stops: list[int],
                 prompt_lookup: int = 0) -> None:
        self.model, self.max_new_tokens, self.sampling, self.stops = model, max_new_tokens, sampling, stops
        self.prompt_lookup = prompt_lookup
        self.name = "hf-lookup" if prompt_lookup else "hf"

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> GenerationStats:
        options: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, eos_token_id=self.stops,
                                       pad_token_id=self.stops[0])
        if self.sampling.greedy:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            options.update(do_sample=True, temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                           top_k=self.sampling.top_k or None)
        if self.prompt_lookup:
            options["prompt_lookup_num_tokens"] = self.prompt_lookup
        ids = ids.to(self.model.device)
        start = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        stats = GenerationStats(prompt_tokens=ids.shape[1])
        stats.decode_time = time.perf_counter() - start
        new = out[0, ids.shape[1]:].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in self.stops), len(new))
        stats.new_tokens = new[:cut]
        return stats


def run_local(target: Any, drafter: Any, tokenizer: Any, prompts: dict[str, list[list[str]]], *,
              block_size: int, max_new_tokens: int, sampling: SamplingParams, stops: list[int],
              baseline: bool = True, peers: Sequence[Peer] = (), enable_thinking: bool = False,
              seed: int = 0, progress: Any = None, draft_threshold: float = 0.0) -> list[PromptRecord]:
    """Decode every prompt of every dataset with DFlash, then plainly, then with each peer.
    `progress(n)` is called after each prompt."""
    options = dict(max_new_tokens=max_new_tokens, sampling=sampling, stop_token_ids=stops)
    target = as_runtime(target)  # made once for every prompt
    device = target.info.device

    def engine(size: int, index: int) -> Callable[[torch.Tensor], GenerationStats]:
        generator = None if sampling.greedy else torch.Generator(device=device).manual_seed(seed + index)
        return lambda ids: generate(target, drafter if size > 1 else None, ids, block_size=size,
                                    generator=generator, draft_threshold=draft_threshold, **options)

    warm = torch.tensor([[stops[0]] * 4])  # one-off costs (allocations, kernels) stay out of the timings
    generate(target, drafter, warm, block_size=block_size, max_new_tokens=4, sampling=sampling)
    if baseline:
        generate(target, None, warm, block_size=1, max_new_tokens=4, sampling=sampling)
    for peer in peers:
        peer.decode(warm)

    records = []
    for name, items in prompts.items():
        for index, turns in shard(items):
            run, n_prompt = converse(engine(block_size, index), tokenizer, turns, enable_thinking)
            base = converse(engine(1, index), tokenizer, turns, enable_thinking)[0] if baseline else None
            record = PromptRecord(name, index, len(turns), n_prompt, asdict(run), asdict(base) if base else None)
            for peer in peers:
                record.peers[peer.name] = asdict(converse(peer.decode, tokenizer, turns, enable_thinking)[0])
            records.append(record)
            if progress is not None:
                progress(1)
    return records
