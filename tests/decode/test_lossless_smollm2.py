"""Greedy losslessness on the real embedded target (SmolLM2-135M-Instruct, float32, CPU)."""

import pytest
import torch
from helpers import PROMPTS, greedy_reference, oracle_for

from dflash import DFlashDraftModel, chat_input_ids, generate

NEW_TOKENS = 128
BLOCK = 8
pytestmark = [pytest.mark.slow, pytest.mark.real_model]


@pytest.fixture(scope="module")
def cases(smollm):
    """(prompt ids, reference ids from transformers' greedy generate) for 20 prompts."""
    model, tok = smollm
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([chat_input_ids(tok, prompt)])
        out.append((ids, greedy_reference(model, ids, NEW_TOKENS)))
    return out


@pytest.fixture(scope="module")
def random_drafter(smollm):
    torch.manual_seed(1234)
    return DFlashDraftModel.from_target(smollm[0], num_layers=1, block_size=16, mask_token_id=16).eval()


def test_random_drafter_is_lossless(smollm, cases, random_drafter):
    model, _ = smollm
    accepted_one = total = 0
    for ids, reference in cases:
        stats = random_drafter.spec_generate(input_ids=ids, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                             target=model, block_size=4, return_stats=True)
        assert torch.equal(stats.output_ids, reference)
        assert stats.num_new_tokens == NEW_TOKENS
        accepted_one += sum(1 for n in stats.acceptance_lengths if n == 1)
        total += len(stats.acceptance_lengths)
    assert accepted_one / total > 0.8  # an untrained drafter is almost never right


def test_oracle_drafter_accepts_full_blocks_and_is_lossless(smollm, cases, random_drafter):
    model, _ = smollm
    for ids, reference in cases:
        oracle = oracle_for(random_drafter, reference)
        stats = oracle.spec_generate(input_ids=ids, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                     target=model, block_size=BLOCK, return_stats=True)
        assert torch.equal(stats.output_ids, reference)
        # (128 - 1 prefill token) = 15 full blocks of 8 and a last one of 7
        assert stats.acceptance_lengths == [BLOCK] * 15 + [7]


def test_partial_acceptance_rolls_back_correctly(smollm, cases, random_drafter):
    model, _ = smollm
    for ids, reference in cases[:5]:
        oracle = oracle_for(random_drafter, reference, wrong_every=2, wrong_at=3)
        stats = oracle.spec_generate(input_ids=ids, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                     target=model, block_size=BLOCK, return_stats=True)
        assert torch.equal(stats.output_ids, reference)
        assert 4 in stats.acceptance_lengths and BLOCK in stats.acceptance_lengths


def test_plain_engine_equals_generate(smollm, cases):
    model, _ = smollm
    for ids, reference in cases[:5]:
        stats = generate(model, None, ids, max_new_tokens=NEW_TOKENS, block_size=1)
        assert torch.equal(stats.output_ids, reference)
        assert stats.acceptance_lengths == [1] * (NEW_TOKENS - 1)


def test_stop_token_ends_output_inside_a_block(smollm, cases, random_drafter):
    model, _ = smollm
    ids, reference = cases[1]
    new = reference[0, ids.shape[1]:].tolist()
    stop = new[10]
    first = new.index(stop)  # the stop id may occur earlier than index 10
    oracle = oracle_for(random_drafter, reference)
    out = oracle.spec_generate(input_ids=ids, max_new_tokens=NEW_TOKENS, temperature=0.0, target=model,
                               block_size=BLOCK, stop_token_ids=[stop])
    assert out[0, ids.shape[1]:].tolist() == new[: first + 1]


def test_real_stop_token_matches_generate_with_eos(smollm, random_drafter):
    model, tok = smollm
    ids = torch.tensor([chat_input_ids(tok, "Say only the word yes.")])
    reference = greedy_reference(model, ids, 64, eos=2)
    assert reference[0, -1].item() == 2  # SmolLM2 ends its turn with <|im_end|>
    oracle = oracle_for(random_drafter, reference)
    out = oracle.spec_generate(input_ids=ids, max_new_tokens=64, temperature=0.0, target=model,
                               block_size=BLOCK, stop_token_ids=[2])
    assert torch.equal(out, reference)
