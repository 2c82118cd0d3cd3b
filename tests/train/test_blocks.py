"""Anchors, blocks, the block-sparse mask, the loss weights and the acceptance statistics."""

import math

import pytest

import torch
import torch.nn.functional as F

from dflash.train.blocks import (IGNORE, BlockStats, block_attention_mask, block_loss, build_blocks,
                                 default_gamma, loss_weights, sample_anchors, soft_block_loss, valid_anchors)


def test_mask_small_case_every_entry():
    # anchors 2 and 5, 7 context positions, blocks of 3: keys are [c0..c6 ; b0 b0 b0 b1 b1 b1]
    mask = block_attention_mask(torch.tensor([2, 5]), n_ctx=7, block_size=3)
    expected = torch.tensor([
        # c0 c1 c2 c3 c4 c5 c6 | block 0 | block 1
        [1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_mask_matches_definition_for_random_anchors():
    g = torch.Generator().manual_seed(0)
    anchors = torch.randperm(40, generator=g)[:6].sort().values
    n_ctx, size = 40, 4
    mask = block_attention_mask(anchors, n_ctx, size)
    for qi in range(len(anchors) * size):
        block = qi // size
        for k in range(n_ctx + len(anchors) * size):
            want = k < anchors[block] if k < n_ctx else (k - n_ctx) // size == block
            assert bool(mask[qi, k]) == bool(want)


def test_batched_mask_stacks_the_single_ones():
    anchors = torch.tensor([[3, 9, 20], [0, 0, 0], [5, 6, 0]])  # a row of padding, a padded row
    batched = block_attention_mask(anchors, 25, 4)
    assert batched.shape == (3, 12, 25 + 12)
    for row, a in zip(batched, anchors):
        assert torch.equal(row, block_attention_mask(a, 25, 4))


def test_loss_weights_and_gamma():
    w = loss_weights(16, 7.0)
    assert w.shape == (15,)
    assert w[0] == 1.0
    for k in range(1, 16):
        assert math.isclose(float(w[k - 1]), math.exp(-(k - 1) / 7), rel_tol=1e-6)
    assert default_gamma(16) == 7.0 and default_gamma(8) == 3.5


def test_anchors_only_where_anchor_and_next_are_supervised():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        mask = torch.rand(60, generator=g) < 0.6
        anchors = sample_anchors(mask, 10, g)
        assert len(anchors) == min(10, len(valid_anchors(mask)))
        assert torch.all(anchors[1:] > anchors[:-1])  # distinct, sorted
        for a in anchors.tolist():
            assert mask[a] and mask[a + 1]
    assert len(sample_anchors(torch.tensor([True, False, True]), 5, g)) == 0


def test_blocks_tokens_positions_and_labels():
    ids = torch.arange(100, 110)                       # 10 tokens
    loss_mask = torch.tensor([0, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    blocks = build_blocks(ids, loss_mask, torch.tensor([2, 7]), block_size=4, mask_token_id=9)
    assert blocks.tokens.tolist() == [102, 9, 9, 9, 107, 9, 9, 9]
    assert blocks.positions.tolist() == [2, 3, 4, 5, 7, 8, 9, 10]
    # anchor 2 -> tokens 3, 4, 5 (all supervised); anchor 7 -> 8, 9, then past the end
    assert blocks.labels.tolist() == [[103, 104, 105], [108, 109, IGNORE]]
    blocks = build_blocks(ids, loss_mask, torch.tensor([4]), block_size=4, mask_token_id=9)
    assert blocks.labels.tolist() == [[105, IGNORE, 107]]  # position 6 is outside the loss mask


def test_block_loss_is_weighted_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 11, generator=g)
    labels = torch.randint(0, 11, (5,), generator=g)
    w = torch.tensor([1.0, 0.5, 0.25, 1.0, 0.1])
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(block_loss(logits, labels, w), (ce * w).sum() / w.sum())


def test_soft_block_loss_by_hand():
    """Row 1: drafter (1/4, 3/4) against target (1/2, 1/2) costs -(ln 1/4 + ln 3/4) / 2 = 0.836988;
    row 2: (1/2, 1/2) against itself costs ln 2. Weights 1 and 3."""
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    target = torch.tensor([[5.0, 5.0], [-1.0, -1.0]])  # a shift changes no distribution
    w = torch.tensor([1.0, 3.0])
    assert soft_block_loss(logits, target, w).item() == pytest.approx((0.836988 + 3 * math.log(2)) / 4, abs=1e-6)
    # a target sure of one token gives that token's hard-label loss: -ln 3/4
    sure = torch.tensor([[0.0, 80.0]])
    assert soft_block_loss(logits[:1], sure, w[:1]).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert soft_block_loss(logits[:1], sure, w[:1]).item() == pytest.approx(
        block_loss(logits[:1], torch.tensor([1]), w[:1]).item(), abs=1e-6)


def test_stats_accuracy_and_simulated_acceptance():
    labels = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, IGNORE]])
    preds = torch.tensor([[1, 2, 0], [0, 5, 6], [7, 0, 0]])
    s = BlockStats.zeros(4)
    s.update(preds, labels)
    assert s.per_position == pytest.approx([2 / 3, 2 / 3, 1 / 2])
    assert s.full_blocks == 2 and s.tau == ((2 + 1) + (0 + 1)) / 2  # the partial block is not simulated
    assert BlockStats.from_tensor(s.as_tensor()).tau == s.tau
