"""Tiny random-weight targets of each dense family: lossless against their own generate."""

import pytest
import torch
from helpers import greedy_reference, oracle_for, tiny_target

from dflash import DFlashDraftModel, generate

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


def prompts(vocab: int, n: int = 3):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, vocab, (1, length), generator=g) for length in (5, 17, 40)[:n]]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_lossless(family):
    model = tiny_target(family)
    torch.manual_seed(0)
    drafter = DFlashDraftModel.from_target(model, num_layers=2, block_size=8, mask_token_id=3)
    assert drafter.config.hidden_size == model.config.hidden_size
    assert drafter.config.num_target_layers == model.config.num_hidden_layers
    assert drafter.fc.weight.shape == (64, 64 * len(drafter.config.target_layer_ids))
    for ids in prompts(model.config.vocab_size):
        reference = greedy_reference(model, ids, 64)
        random_out = drafter.spec_generate(input_ids=ids, max_new_tokens=64, target=model)
        assert torch.equal(random_out, reference)
        oracle = oracle_for(drafter, reference)
        stats = oracle.spec_generate(input_ids=ids, max_new_tokens=64, target=model, return_stats=True)
        assert torch.equal(stats.output_ids, reference)
        assert stats.acceptance_lengths == [8] * 7 + [7]
        partial = oracle_for(drafter, reference, wrong_every=2, wrong_at=1)
        assert torch.equal(partial.spec_generate(input_ids=ids, max_new_tokens=64, target=model), reference)
        assert torch.equal(generate(model, None, ids, max_new_tokens=64).output_ids, reference)


def test_sliding_window_drafter_is_lossless():
    model = tiny_target("qwen3")
    torch.manual_seed(0)
    drafter = DFlashDraftModel.from_target(model, num_layers=1, block_size=4, mask_token_id=3)
    drafter.config.use_swa, drafter.config.swa_window_size = True, 8
    for layer in drafter.layers:
        layer.self_attn.window = 8
    ids = prompts(128, 3)[2]
    assert torch.equal(drafter.spec_generate(input_ids=ids, max_new_tokens=48, target=model),
                       greedy_reference(model, ids, 48))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lossless_on_cuda_float32():
    model = tiny_target("qwen3").cuda()
    drafter = DFlashDraftModel.from_target(model, num_layers=2, block_size=8, mask_token_id=3).cuda()
    for ids in prompts(128):
        ids = ids.cuda()
        reference = greedy_reference(model, ids, 64)
        assert torch.equal(drafter.spec_generate(input_ids=ids, max_new_tokens=64, target=model).cuda(), reference)
        oracle = oracle_for(drafter, reference)
        assert torch.equal(oracle.spec_generate(input_ids=ids, max_new_tokens=64, target=model).cuda(), reference)
