"""Every target family of the seeds' model table, as tiny random-weight targets built from the
transformers config classes: speculative output equals the target's own greedy `generate`.

Dense (Llama, Qwen2/3, Mistral, GLM-4), MoE (Qwen3-MoE, GLM-4-MoE), MoE with alternating
sliding-window attention and sinks (gpt-oss), multi-head latent attention + MoE (DeepSeek-V3,
the Kimi-K2.5 architecture) and hybrid linear-attention (Qwen3.5, Qwen3.5-MoE, Qwen3-Next).
"""

import pytest
import torch
from helpers import FAMILY_CONFIGS, RowOracle, greedy_reference, oracle_for, tiny_target

from dflash import DFlashDraftModel, generate
from dflash.decode.batch import BatchEngine, BatchRequest
from dflash.errors import UnsupportedTargetError

FAMILIES = list(FAMILY_CONFIGS)
WINDOWED = {"gpt_oss", "mistral"}                        # sliding-window layers
HYBRID = {"qwen3_5", "qwen3_5_moe", "qwen3_next"}        # recurrent (Gated DeltaNet) layers


def prompts(vocab: int, n: int = 3):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, vocab, (1, length), generator=g) for length in (5, 17, 40)[:n]]


def drafter_for(model, block_size: int = 8) -> DFlashDraftModel:
    torch.manual_seed(0)
    return DFlashDraftModel.from_target(model, num_layers=2, block_size=block_size, mask_token_id=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_lossless(family):
    model = tiny_target(family)
    drafter = drafter_for(model)
    assert drafter.config.hidden_size == model.config.hidden_size
    assert drafter.config.num_target_layers == model.config.num_hidden_layers
    assert drafter.fc.weight.shape == (64, 64 * len(drafter.config.target_layer_ids))
    if family in WINDOWED:  # the decode runs far past the window: crops must keep what it needs
        from transformers import DynamicCache
        kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
        assert model.config.sliding_window < 40 and "DynamicSlidingWindowLayer" in kinds
    if family in HYBRID:
        assert "linear_attention" in model.config.layer_types
    for ids in prompts(model.config.vocab_size):
        reference = greedy_reference(model, ids, 64)
        assert torch.equal(generate(model, None, ids, max_new_tokens=64).output_ids, reference)
        random_out = drafter.spec_generate(input_ids=ids, max_new_tokens=64, target=model)
        assert torch.equal(random_out, reference)
        stats = oracle_for(drafter, reference).spec_generate(input_ids=ids, max_new_tokens=64, target=model,
                                                             return_stats=True)
        assert torch.equal(stats.output_ids, reference)
        assert stats.acceptance_lengths == [8] * 7 + [7]
        # every second block is wrong at its 2nd draft: acceptance stops mid-block (2 of 8 kept),
        # so attention caches are cropped and recurrent states rolled back and re-advanced
        partial = oracle_for(drafter, reference, wrong_every=2, wrong_at=1)
        stats = partial.spec_generate(input_ids=ids, max_new_tokens=64, target=model, return_stats=True)
        assert torch.equal(stats.output_ids, reference)
        assert 2 in stats.acceptance_lengths and 8 in stats.acceptance_lengths


@pytest.mark.parametrize("family", ["qwen3_5", "gpt_oss"])
def test_rollback_is_what_makes_it_exact(family, monkeypatch):
    """With the recurrent re-advance (or the window's recorded past) switched off, a mid-block
    rejection breaks the output: the tests above would catch a broken rollback."""
    import dflash.runtime.rollback as rollback

    model = tiny_target(family)
    ids = prompts(model.config.vocab_size)[1]
    reference = greedy_reference(model, ids, 64)
    if family in HYBRID:
        monkeypatch.setattr(rollback.CacheRollback, "_readvance", lambda self, *a: None)
    else:
        monkeypatch.setattr(rollback.CacheRollback, "new_cache",
                            lambda self, batched=False: __import__("transformers").DynamicCache(config=self.model.config))
    partial = oracle_for(drafter_for(model), reference, wrong_every=2, wrong_at=1)
    if family in HYBRID:
        out = partial.spec_generate(input_ids=ids, max_new_tokens=64, target=model)
        assert not torch.equal(out, reference)
    else:  # transformers refuses to crop a window it no longer holds
        with pytest.raises(RuntimeError, match="the sliding window size was already reached"):
            partial.spec_generate(input_ids=ids, max_new_tokens=64, target=model)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_batched_equals_alone(family):
    """Ragged rows joining at different steps, random and partly-wrong oracle drafts: each row
    equals the target's own decode. Windowed layers see their window in token positions across
    the holes; recurrent layers are rolled back per row."""
    model = tiny_target(family)
    ids = prompts(model.config.vocab_size)
    refs = [greedy_reference(model, p, 48) for p in ids]
    random_drafter = drafter_for(model, block_size=4)
    odd_rows_wrong = lambda rid, start: rid % 2 == 1 and start % 2 == 1  # noqa: E731
    for drafter in (random_drafter, RowOracle.wrapping(random_drafter, refs, odd_rows_wrong)):
        engine = BatchEngine(model, drafter, block_size=4, stop_token_ids=[], max_batch_size=3)
        drafter.engine = engine
        out, steps = {i: [] for i in range(len(ids))}, 0
        while steps == 0 or not engine.idle:
            if steps < len(ids):  # one joins per step: rows of different lengths and phases
                engine.add(BatchRequest(steps, ids[steps][0].tolist(), 48))
            for o in engine.step():
                out[o.rid] += o.tokens
            steps += 1
        for i, p in enumerate(ids):
            assert out[i] == refs[i][0, p.shape[1]:].tolist(), (family, type(drafter).__name__, i)


def test_unproven_recurrent_family_is_refused_by_name():
    """A hybrid family whose recurrent mixers dflash has not proven is refused, not decoded wrongly."""
    from transformers import AutoModelForCausalLM, Lfm2Config

    config = Lfm2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
                        pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, 128, (1, 6))
    with pytest.raises(UnsupportedTargetError, match="lfm2"):
        generate(model, None, ids, max_new_tokens=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_on_cuda_float32(family):
    model = tiny_target(family).cuda()
    drafter = drafter_for(model).cuda()
    for ids in prompts(model.config.vocab_size):
        ids = ids.cuda()
        reference = greedy_reference(model, ids, 64)
        assert torch.equal(drafter.spec_generate(input_ids=ids, max_new_tokens=64, target=model).cuda(), reference)
        partial = oracle_for(drafter, reference, wrong_every=2, wrong_at=1)
        assert torch.equal(partial.spec_generate(input_ids=ids, max_new_tokens=64, target=model).cuda(), reference)


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
