"""Sampling and acceptance rules, as pure functions of logits and token ids.

Terms: the target verifies a block [anchor, d_1 .. d_k]; a draft token is *accepted* when the
rule keeps it; the first token the target supplies itself (after the accepted prefix) is the
*bonus*. Greedy keeps the longest prefix equal to the target's argmax; sampling keeps d_i with
probability min(1, p(d_i) / q(d_i)) and draws the bonus from max(0, p - q) at the first
rejection (or from p after a fully accepted block), which leaves the output distributed exactly
as the target's own samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, then softmax, over the last axis (float32)."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` ([..., vocab]) -> [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def greedy_accept(draft: list[int], target_argmax: list[int]) -> int:
    """How many leading draft tokens equal the target's argmax at the position before them
    (`target_argmax[i]` is the target's choice for the slot `draft[i]` fills)."""
    n = 0
    for d, t in zip(draft, target_argmax):
        if d != t:
            break
        n += 1
    return n


def rejection_accept(
    draft: torch.Tensor,     # [k] draft tokens, sampled from q
    q: torch.Tensor,         # [k, vocab] draft distributions
    p: torch.Tensor,         # [k + 1, vocab] target distributions (the last one is for the bonus)
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """(number accepted, bonus token) by the speculative-sampling rule."""
    k = draft.shape[0]
    if k:
        rows = torch.arange(k, device=draft.device)
        p_x, q_x = p[rows, draft], q[rows, draft]
        u = torch.rand(k, device=draft.device, generator=generator)
        keep = (u * q_x < p_x).int()  # u < p/q without dividing by a tiny q
        n = int(keep.cumprod(0).sum())
    else:
        n = 0
    if n < k:
        residual = (p[n] - q[n]).clamp_min(0)
        total = residual.sum()
        dist = residual / total if total > 0 else p[n]
    else:
        dist = p[k]
    return n, int(sample(dist, generator))


def confident_prefix(top_probs: torch.Tensor, threshold: float) -> int:
    """How many leading drafts are worth verifying: the longest prefix over which the drafter's
    top probability at each position (`top_probs`, [k]), multiplied up, stays >= `threshold`.

    Verifying a token costs time even when it is rejected (on a CPU, 4 tokens cost ~1.3x one
    step), so a drafter that knows it is guessing should not make the target check the guess.
    The rule looks at the draft distributions only, never at the tokens drawn from them: the
    verified drafts stay plain samples of q, so rejection sampling still gives exactly the
    target's distribution (and greedy output is unchanged whatever is verified)."""
    return int((top_probs.cumprod(0) >= threshold).sum())
