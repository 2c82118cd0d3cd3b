"""What one generation did: its tokens, acceptance lengths and timings (both engines fill it)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


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
