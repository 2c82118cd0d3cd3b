"""Limits and mistakes: context end, tiny budgets, stop tokens, and clear refusals."""

import pytest
import torch
from helpers import greedy_reference, oracle_for, tiny_target

from dflash import DFlashDraftModel, TransformersRuntime, generate
from dflash.errors import DFlashError, IncompatibleDrafterError


@pytest.fixture(scope="module")
def pair():
    model = tiny_target("llama", max_position_embeddings=64)
    torch.manual_seed(0)
    return model, DFlashDraftModel.from_target(model, num_layers=1, block_size=8, mask_token_id=3)


def test_prompt_near_the_end_of_the_context(pair):
    model, drafter = pair
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(1))
    reference = greedy_reference(model, ids, 4)
    oracle = oracle_for(drafter, reference)
    stats = oracle.spec_generate(input_ids=ids, max_new_tokens=50, target=model, return_stats=True)
    assert stats.num_new_tokens == 4  # positions 60..63 fill the 64-position context
    assert torch.equal(stats.output_ids, reference)
    with pytest.raises(DFlashError, match="context holds 64"):
        drafter.spec_generate(input_ids=torch.ones(1, 64, dtype=torch.long), max_new_tokens=5, target=model)


@pytest.mark.parametrize("budget", [1, 2, 3, 7, 9])
def test_max_new_tokens_below_or_near_the_block(pair, budget):
    model, drafter = pair
    ids = torch.tensor([[5, 6, 7, 8]])
    reference = greedy_reference(model, ids, budget)
    oracle = oracle_for(drafter, reference)
    out = oracle.spec_generate(input_ids=ids, max_new_tokens=budget, target=model)
    assert torch.equal(out, reference) and out.shape[1] == 4 + budget


def test_stop_token_first_token_and_mid_block(pair):
    model, drafter = pair
    ids = torch.tensor([[5, 6, 7, 8]])
    reference = greedy_reference(model, ids, 30)
    new = reference[0, 4:].tolist()
    oracle = oracle_for(drafter, reference)
    stats = oracle.spec_generate(input_ids=ids, max_new_tokens=30, target=model, stop_token_ids=[new[0]],
                                 return_stats=True)
    assert stats.new_tokens == [new[0]] and stats.finish_reason == "stop"
    stop = new[12]
    out = oracle.spec_generate(input_ids=ids, max_new_tokens=30, target=model, stop_token_ids=[stop])
    assert out[0, 4:].tolist() == new[: new.index(stop) + 1]


def test_user_mistakes_are_refused_clearly(pair):
    model, drafter = pair
    with pytest.raises(DFlashError, match="prompt is empty"):
        drafter.spec_generate(input_ids=torch.zeros(1, 0, dtype=torch.long), target=model)
    with pytest.raises(DFlashError, match="exceeds the 8 this drafter was trained for"):
        drafter.spec_generate(input_ids=torch.tensor([[1, 2]]), target=model, block_size=9)
    with pytest.raises(DFlashError, match="max_new_tokens must be at least 1"):
        drafter.spec_generate(input_ids=torch.tensor([[1, 2]]), target=model, max_new_tokens=0)
    with pytest.raises(DFlashError, match="one sequence"):
        drafter.spec_generate(input_ids=torch.ones(2, 3, dtype=torch.long), target=model)
    with pytest.raises(DFlashError, match="needs a drafter"):
        generate(model, None, torch.tensor([[1, 2]]), max_new_tokens=4, block_size=4)


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size=32, head_dim=8), "hidden size 32"),
    (dict(vocab_size=100), "vocabulary 100"),
    (dict(num_hidden_layers=2), "trained on a 2-layer target"),
])
def test_mismatched_drafter_is_refused(pair, change, message):
    model, _ = pair
    other = tiny_target("llama", **change)
    wrong = DFlashDraftModel.from_target(other, num_layers=1, block_size=4, mask_token_id=3)
    with pytest.raises(IncompatibleDrafterError, match=message):
        wrong.spec_generate(input_ids=torch.tensor([[1, 2, 3]]), target=model)


def test_confidence_threshold_shortens_blocks_and_keeps_greedy_output(monkeypatch):
    """A random drafter is unsure: with a threshold most blocks shrink to the anchor alone; an
    oracle is sure: full blocks. Either way the output is plain decoding's."""
    model = tiny_target("llama")
    torch.manual_seed(2)
    drafter = DFlashDraftModel.from_target(model, num_layers=1, block_size=8).eval()
    ids = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    reference = greedy_reference(model, ids, 40)
    sizes = []
    step = TransformersRuntime.step

    def counting(self, cache, rows, block, **kwargs):
        sizes.append(block.shape[1])
        return step(self, cache, rows, block, **kwargs)
    monkeypatch.setattr(TransformersRuntime, "step", counting)
    stats = generate(model, drafter, ids, max_new_tokens=40, block_size=8, draft_threshold=0.5)
    assert torch.equal(stats.output_ids, reference)
    assert sizes and max(sizes) < 8 and sizes.count(1) > len(sizes) // 2
    sizes.clear()
    oracle = oracle_for(drafter, reference)
    stats = oracle.spec_generate(input_ids=ids, max_new_tokens=40, target=model, block_size=8,
                                 draft_threshold=0.5, return_stats=True)
    assert torch.equal(stats.output_ids, reference)
    assert stats.acceptance_lengths[:4] == [8, 8, 8, 8]
    with pytest.raises(DFlashError, match="draft_threshold"):
        generate(model, drafter, ids, max_new_tokens=4, block_size=8, draft_threshold=1.0)
