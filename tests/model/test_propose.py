"""A block shorter than the drafter's trained one is drafted as a full trained block: the drafts
returned are the first ones of that full block, for one sequence and for a ragged batch."""

import torch
from helpers import tiny_target

from dflash import DFlashDraftModel
from dflash import TransformersRuntime


def _models():
    target = tiny_target("llama").eval()
    torch.manual_seed(0)
    drafter = DFlashDraftModel.from_target(target, num_layers=2, block_size=8, target_layer_ids=[0, 2]).eval()
    return TransformersRuntime(target), drafter


def test_short_block_returns_the_prefix_of_a_full_block():
    adapter, drafter = _models()
    features = torch.randn(1, 9, 2 * adapter.info.hidden_size)
    mask = drafter.mask_token_id
    full, short = drafter.new_cache(capacity=4), drafter.new_cache(capacity=4)
    for cache in (full, short):  # the same context, given in two calls
        drafter.propose(adapter, torch.tensor([[7] + [mask] * 7]), features[:, :5], cache)
    want = drafter.propose(adapter, torch.tensor([[11] + [mask] * 7]), features[:, 5:], full)   # [1, 7, V]
    got = drafter.propose(adapter, torch.tensor([[11] + [mask] * 2]), features[:, 5:], short)   # [1, 2, V]
    assert got.shape == (1, 2, adapter.info.vocab_size)
    assert torch.allclose(got, want[:, :2], atol=1e-5)
    assert full.length == short.length == 9  # the block itself is never kept


def test_short_blocks_of_a_ragged_batch_match_full_ones():
    adapter, drafter = _models()
    b, n_ctx = 2, 6
    features = torch.randn(b, n_ctx, 2 * adapter.info.hidden_size)
    starts = torch.tensor([[10], [4]])
    ctx_pos = starts - n_ctx + torch.arange(n_ctx)
    keys = torch.ones(b, n_ctx, dtype=torch.bool)
    keys[1, :2] = False  # row 1 does not own the first two slots
    results = []
    for size in (8, 3):
        cache = drafter.new_cache(batch=b, capacity=4)
        block = torch.full((b, size), drafter.mask_token_id)
        block[:, 0] = torch.tensor([5, 9])
        mask = torch.cat([keys, torch.ones(b, size, dtype=torch.bool)], 1)[:, None, None, :]
        results.append(drafter.propose(adapter, block, features, cache,
                                       positions=(ctx_pos, starts + torch.arange(size)), attn_mask=mask))
    full, short = results
    assert short.shape == (b, 2, adapter.info.vocab_size)
    assert torch.allclose(short, full[:, :2], atol=1e-5)


def test_drafts_over_a_draft_vocabulary_agree_with_the_whole_vocabulary_row():
    """Greedy decoding reads `Drafts.tokens` / `top_probs` from the K draft-vocabulary columns;
    they must be what the full-vocabulary row (what sampling uses) says."""
    adapter, drafter = _models()
    drafter.draft_vocab = torch.tensor([3, 40, 7, 120, 55, 9, 100, 1])  # any order, a subset
    features = torch.randn(1, 5, 2 * adapter.info.hidden_size)
    block = torch.tensor([[7] + [drafter.mask_token_id] * 7])
    drafts = drafter.draft(adapter, block, features, drafter.new_cache())
    full = drafts.full_logits()                                                       # [1, 7, V]
    assert drafts.logits.shape == (1, 7, 8) and full.shape == (1, 7, adapter.info.vocab_size)
    outside = torch.ones(adapter.info.vocab_size, dtype=torch.bool)
    outside[drafter.draft_vocab] = False
    assert torch.isneginf(full[..., outside]).all()
    assert torch.equal(drafts.tokens(), full.argmax(-1))
    assert set(drafts.tokens().flatten().tolist()) <= set(drafter.draft_vocab.tolist())
    assert torch.allclose(drafts.top_probs(), full.softmax(-1).amax(-1), atol=1e-6)
