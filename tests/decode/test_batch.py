"""Batched decoding with continuous batching: every sequence decodes exactly as it does alone."""

import pytest
import torch

from dflash import DFlashDraftModel, generate
from dflash.decode.batch import BatchEngine, BatchRequest
from dflash.decode.sampling import SamplingParams
from helpers import BATCH_PROMPTS as PROMPTS
from helpers import RowOracle, greedy_reference, oracle_for, run_all, tiny_target

@pytest.mark.parametrize("join_every", [0, 3])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_random_drafter_batch_equals_plain_greedy(family, join_every):
    target = tiny_target(family)
    torch.manual_seed(1)
    drafter = DFlashDraftModel.from_target(target, num_layers=1, block_size=4)
    engine = BatchEngine(target, drafter, block_size=4, stop_token_ids=[], max_batch_size=4)
    requests = [BatchRequest(i, p, 40) for i, p in enumerate(PROMPTS)]
    out, done = run_all(engine, requests, join_every)
    for i, p in enumerate(PROMPTS):
        want = greedy_reference(target, torch.tensor([p]), 40)[0, len(p):].tolist()
        assert out[i] == want, i
        assert done[i].output_ids[0].tolist() == p + want


def test_oracle_drafter_accepts_in_full_and_in_part_per_row():
    """Rows accept different numbers of drafts each step (ragged), and still match."""
    target = tiny_target("llama")
    torch.manual_seed(2)
    base = DFlashDraftModel.from_target(target, num_layers=1, block_size=6)
    refs = {i: greedy_reference(target, torch.tensor([p]), 48) for i, p in enumerate(PROMPTS[:4])}

    # odd rows get draft 2 wrong every other step
    drafter = RowOracle.wrapping(base, refs, lambda rid, start: rid % 2 == 1 and start % 4 == 3)
    engine = BatchEngine(target, drafter, block_size=6, stop_token_ids=[], max_batch_size=4)
    drafter.engine = engine
    out, done = run_all(engine, [BatchRequest(i, p, 48) for i, p in enumerate(PROMPTS[:4])])
    for i, p in enumerate(PROMPTS[:4]):
        assert out[i] == refs[i][0, len(p):].tolist(), i
    lengths = {i: set(done[i].acceptance_lengths) for i in done}
    assert 6 in lengths[0] and 6 in lengths[2]          # whole blocks accepted
    assert 2 in lengths[1] and 6 in lengths[1]          # and partial ones (draft 2 wrong), same batch


def test_stop_tokens_budgets_and_cancel():
    target = tiny_target("llama")
    torch.manual_seed(3)
    drafter = DFlashDraftModel.from_target(target, num_layers=1, block_size=4)
    ref = greedy_reference(target, torch.tensor([PROMPTS[1]]), 30)[0, len(PROMPTS[1]):].tolist()
    stop = ref[7]
    engine = BatchEngine(target, drafter, block_size=4, stop_token_ids=[stop], max_batch_size=3)
    requests = [BatchRequest("stop", PROMPTS[1], 30), BatchRequest("short", PROMPTS[0], 5),
                BatchRequest("gone", PROMPTS[2], 30), BatchRequest("late", PROMPTS[3], 6)]
    for r in requests:
        engine.add(r)
    out = {r.rid: [] for r in requests}
    done = {}
    steps = 0
    while not engine.idle:
        for o in engine.step():
            out[o.rid] += o.tokens
            if o.finished:
                done[o.rid] = o.stats
        steps += 1
        if steps == 2:
            assert engine.cancel("gone") is not None and engine.cancel("nobody") is None
    assert out["stop"] == ref[: ref.index(stop) + 1] and done["stop"].finish_reason == "stop"
    assert len(out["short"]) == 5 and done["short"].finish_reason == "length"
    assert "gone" not in done
    late_ref = greedy_reference(target, torch.tensor([PROMPTS[3]]), 6)[0, len(PROMPTS[3]):].tolist()
    assert out["late"] == late_ref[: late_ref.index(stop) + 1] if stop in late_ref else out["late"] == late_ref


def test_plain_batched_decoding_block_1():
    target = tiny_target("qwen2")
    engine = BatchEngine(target, None, block_size=1, stop_token_ids=[], max_batch_size=8)
    out, _ = run_all(engine, [BatchRequest(i, p, 20) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        assert out[i] == greedy_reference(target, torch.tensor([p]), 20)[0, len(p):].tolist()


def test_sampling_rows_are_reproducible_and_mix_with_greedy():
    """A sampled row with a seeded generator draws what the single-sequence engine draws with
    the same seed, next to greedy rows, until the budget's end (where the single engine drafts
    shorter blocks and so draws fewer random numbers: another, equally exact, sample)."""
    target = tiny_target("llama")
    torch.manual_seed(4)
    drafter = DFlashDraftModel.from_target(target, num_layers=1, block_size=4)
    params = SamplingParams(temperature=0.8, top_k=20)
    engine = BatchEngine(target, drafter, block_size=4, stop_token_ids=[], max_batch_size=4)
    requests = [BatchRequest("s", PROMPTS[0], 24, params, torch.Generator().manual_seed(7)),
                BatchRequest("g", PROMPTS[1], 24)]
    out, _ = run_all(engine, requests)
    alone = generate(target, drafter, torch.tensor([PROMPTS[0]]), max_new_tokens=24, sampling=params, block_size=4,
                     generator=torch.Generator().manual_seed(7))
    assert len(out["s"]) == 24 and out["s"][:16] == alone.new_tokens[:16]
    assert out["g"] == greedy_reference(target, torch.tensor([PROMPTS[1]]), 24)[0, len(PROMPTS[1]):].tolist()


def test_compaction_keeps_outputs_exact():
    from dflash.runtime import buffers as B

    target = tiny_target("llama")
    torch.manual_seed(5)
    drafter = DFlashDraftModel.from_target(target, num_layers=1, block_size=8)  # random: holes pile up
    engine = BatchEngine(target, drafter, block_size=8, stop_token_ids=[], max_batch_size=4)
    widths = []
    original = B.compacted

    def spy(owned, slack=2.0):
        owned2, slots = original(owned, slack=0.5)
        if slots is not None:
            widths.append((owned.shape[1], owned2.shape[1]))
        return owned2, slots

    B.compacted = spy
    try:
        out, _ = run_all(engine, [BatchRequest(i, p, 60) for i, p in enumerate(PROMPTS[:4])])
    finally:
        B.compacted = original
    assert widths and all(after < before for before, after in widths)
    for i, p in enumerate(PROMPTS[:4]):
        assert out[i] == greedy_reference(target, torch.tensor([p]), 60)[0, len(p):].tolist()
