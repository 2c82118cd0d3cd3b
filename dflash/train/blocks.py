"""Turning one tokenised sequence into training blocks: anchors, block tokens and labels, the
block-sparse attention mask, the position-weighted loss and the acceptance statistics.

A block for anchor a is [token a, mask x (B-1)] at positions a..a+B-1; block position k
(1..B-1) is trained to predict token a+k. Its queries see the target features of positions
strictly before a (what decoding has committed when the drafter runs) and its own block, never
another block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


def default_gamma(block_size: int) -> float:
    """Decay of the loss weights: 7 for B = 16 (the published recipe), proportional to B."""
    return 7.0 * block_size / 16


def loss_weights(block_size: int, gamma: float) -> torch.Tensor:
    """Weight of block positions 1..B-1: exp(-(k-1)/gamma). An early miss ends acceptance, so
    early positions matter most."""
    k = torch.arange(1, block_size, dtype=torch.float32)
    return torch.exp(-(k - 1) / gamma)


def valid_anchors(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions a where token a and token a+1 are both supervised (a 1-D bool mask in, ids out)."""
    m = loss_mask.bool()
    return torch.nonzero(m[:-1] & m[1:]).flatten()


def sample_anchors(loss_mask: torch.Tensor, max_anchors: int, generator: torch.Generator) -> torch.Tensor:
    """Up to `max_anchors` distinct valid anchors, drawn at random, in increasing order."""
    candidates = valid_anchors(loss_mask)
    if len(candidates) > max_anchors:
        pick = torch.randperm(len(candidates), generator=generator)[:max_anchors]
        candidates = candidates[pick]
    return candidates.sort().values


@dataclass
class Blocks:
    """The blocks of one sequence, flattened: n_anchors * B entries each (labels: B-1 per block)."""

    anchors: torch.Tensor      # [n_anchors]
    tokens: torch.Tensor       # [n_anchors * B]: anchor token then mask ids
    positions: torch.Tensor    # [n_anchors * B]: a .. a+B-1
    labels: torch.Tensor       # [n_anchors, B-1]: token a+k, or IGNORE past the end / outside the loss mask


def build_blocks(ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor,
                 block_size: int, mask_token_id: int) -> Blocks:
    """Blocks for the given anchors of one sequence (ids, loss_mask: [n])."""
    n = ids.shape[0]
    offsets = torch.arange(block_size)
    positions = anchors[:, None] + offsets                        # [n_a, B]
    tokens = torch.full_like(positions, mask_token_id)
    tokens[:, 0] = ids[anchors]
    target_pos = positions[:, 1:]
    inside = target_pos < n
    clamped = target_pos.clamp(max=n - 1)
    supervised = inside & loss_mask.bool()[clamped]
    labels = torch.where(supervised, ids[clamped], torch.full_like(clamped, IGNORE))
    return Blocks(anchors, tokens.flatten(), positions.flatten(), labels)


def block_attention_mask(anchors: torch.Tensor, n_ctx: int, block_size: int) -> torch.Tensor:
    """Boolean mask [n_a * B, n_ctx + n_a * B] (True = may attend), keys ordered [context ; blocks]:
    a query of block i sees context keys j < anchor_i and every key of block i. Anchors
    [b, n_a] give [b, n_a * B, n_ctx + n_a * B], built where the anchors are (on a GPU there,
    rather than copied over: a step's masks are tens of megabytes)."""
    rows = anchors if anchors.dim() == 2 else anchors[None]
    block_of_query = torch.arange(rows.shape[1], device=rows.device).repeat_interleave(block_size)  # [Q]
    ctx = torch.arange(n_ctx, device=rows.device) < rows[:, block_of_query, None]                 # [b, Q, n_ctx]
    own = block_of_query[:, None] == block_of_query[None, :]                                        # [Q, Q]
    mask = torch.cat([ctx, own.expand(rows.shape[0], -1, -1)], dim=-1)
    return mask if anchors.dim() == 2 else mask[0]


def block_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy: logits [N, V] of the supervised positions only, labels [N],
    weights [N] (the position weight of each). Normalised by the weights' sum."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (ce * weights).sum() / weights.sum().clamp(min=1e-8)


def soft_block_loss(logits: torch.Tensor, target_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy against the target's own distribution softmax(target_logits) at each
    supervised position (logits, target_logits: [N, V] over the same tokens; weights [N]): KL
    divergence from the target plus its entropy, which the drafter cannot change. Every token the
    target finds likely is taught, not only the one it chose."""
    p = torch.softmax(target_logits.float(), -1)
    ce = -(p * torch.log_softmax(logits.float(), -1)).sum(-1)
    return (ce * weights).sum() / weights.sum().clamp(min=1e-8)


@dataclass
class BlockStats:
    """Running sums for per-position accuracy and simulated acceptance length."""

    correct: torch.Tensor        # [B-1] correct predictions per block position
    counted: torch.Tensor        # [B-1] supervised predictions per block position
    accepted: float = 0.0        # sum over full blocks of the tokens a verify step would commit
    full_blocks: int = 0

    @classmethod
    def zeros(cls, block_size: int) -> "BlockStats":
        return cls(torch.zeros(block_size - 1), torch.zeros(block_size - 1))

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """predictions, labels: [n_blocks, B-1] (labels IGNORE where unsupervised)."""
        valid = labels != IGNORE
        hit = (predictions == labels) & valid
        self.correct += hit.sum(0).float().cpu()
        self.counted += valid.sum(0).float().cpu()
        full = valid.all(1)  # acceptance is only defined where every position has a label
        if full.any():
            run = hit[full].long().cumprod(1).sum(1) + 1  # accepted drafts + the bonus token
            self.accepted += float(run.sum())
            self.full_blocks += int(full.sum())

    def merge(self, other: "BlockStats") -> None:
        self.correct += other.correct
        self.counted += other.counted
        self.accepted += other.accepted
        self.full_blocks += other.full_blocks

    def as_tensor(self) -> torch.Tensor:
        """Flat tensor for all-reduce across ranks."""
        return torch.cat([self.correct, self.counted, torch.tensor([self.accepted, float(self.full_blocks)])])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "BlockStats":
        n = (t.shape[0] - 2) // 2
        return cls(t[:n].clone(), t[n:2 * n].clone(), float(t[-2]), int(t[-1]))

    @property
    def per_position(self) -> list[float]:
        return (self.correct / self.counted.clamp(min=1)).tolist()

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / self.counted.sum().clamp(min=1))

    @property
    def tau(self) -> float:
        """Simulated acceptance length: mean of 1 + cumprod(correct).sum() over full blocks."""
        return self.accepted / self.full_blocks if self.full_blocks else math.nan
