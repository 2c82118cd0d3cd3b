"""The runtime contract (dflash/runtime/base.py), checked the same way for every runtime: a block
computes what its tokens compute one by one, `commit` rewinds, rows sharing a cache compute what
each computes alone, `drop` frees a row, and training features are decoding's.

Runtimes whose `exact_blocks` is True are held to bit-for-bit equality; the others to float
rounding (1e-4). To check another runtime, add one line to RUNTIMES: a name and a function
returning a fresh runtime over a 4-layer Llama (any vocabulary of at least 64 tokens).
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_gguf, tiny_target

from dflash.runtime.base import TargetRuntime


def _transformers():
    from dflash.runtime.hf import TransformersRuntime

    return TransformersRuntime(tiny_target("llama"))


def _lean():
    from dflash.runtime.loader import runtime_for

    return runtime_for(tiny_target("llama"), "fp16")


def _gguf():
    import tempfile
    from pathlib import Path

    from dflash.runtime.gguf import GGUFRuntime

    return GGUFRuntime(tiny_gguf(Path(tempfile.mkdtemp()) / "tiny.gguf", kind="Q4_1", layers=4))


RUNTIMES = [
    ("transformers-float32", _transformers),
    ("lean-fp16", _lean),
    ("native-gguf", _gguf),
]
LAYERS = [0, 3]  # a middle layer and the last one (reported after the final norm)


@pytest.fixture(params=[factory for _, factory in RUNTIMES], ids=[name for name, _ in RUNTIMES])
def runtime(request):
    rt = request.param()
    assert isinstance(rt, TargetRuntime)
    rt.bind(LAYERS)
    return rt


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(seed))


def same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def one_by_one(rt, prompt: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, V], features [n, F]) of `tokens` run one token per step after `prompt`."""
    cache = rt.new_cache()
    row, _ = rt.prefill(cache, prompt)
    logits, features = [], []
    for token in tokens:
        out = rt.step(cache, [row], token.view(1, 1), logits=True)
        rt.commit(cache, [row], [1])
        logits.append(out.logits[0, 0])
        features.append(out.features[0, 0])
    return torch.stack(logits), torch.stack(features)


def test_outputs_are_what_was_asked(runtime):
    cache = runtime.new_cache()
    row, out = runtime.prefill(cache, ids(7, 0))
    assert out.tokens.shape == (1, 1) and out.logits is None
    assert out.features.shape == (1, 7, len(LAYERS) * runtime.info.hidden_size)
    out = runtime.step(cache, [row], ids(3, 1)[None], logits=True)
    assert out.logits.shape == (1, 3, runtime.info.vocab_size)
    assert torch.equal(out.tokens, out.logits.argmax(-1))
    runtime.commit(cache, [row], [3])
    runtime.bind([])
    assert runtime.step(cache, [row], ids(1, 2)[None]).features is None


def test_a_block_equals_its_tokens_one_by_one(runtime):
    prompt, block = ids(9, 3), ids(5, 4)
    cache = runtime.new_cache()
    row, _ = runtime.prefill(cache, prompt)
    out = runtime.step(cache, [row], block[None], logits=True)
    logits, features = one_by_one(runtime, prompt, block)
    same(out.logits[0], logits, runtime.exact_blocks)
    same(out.features[0], features, runtime.exact_blocks)


@pytest.mark.parametrize("keep", [0, 2])
def test_commit_rewinds(runtime, keep):
    """Step a block, keep part of it, step again: the same numbers as running the kept tokens
    and the new block straight through."""
    prompt, first, second = ids(6, 5), ids(5, 6), ids(3, 7)
    cache = runtime.new_cache()
    row, _ = runtime.prefill(cache, prompt)
    runtime.step(cache, [row], first[None])
    runtime.commit(cache, [row], [keep])
    out = runtime.step(cache, [row], second[None], logits=True)
    runtime.commit(cache, [row], [3])
    logits, features = one_by_one(runtime, prompt, torch.cat([first[:keep], second]))
    same(out.logits[0], logits[keep:], runtime.exact_blocks)
    same(out.features[0], features[keep:], runtime.exact_blocks)


def test_rows_in_one_cache_equal_each_row_alone(runtime):
    """Two rows of different lengths, stepped together, keeping different counts."""
    prompts, blocks, keeps = [ids(4, 8), ids(11, 9)], [ids(4, 10), ids(4, 11)], [1, 4]
    cache = runtime.new_cache(max_rows=2)
    rows = [runtime.prefill(cache, p)[0] for p in prompts]
    first = runtime.step(cache, rows, torch.stack(blocks), logits=True)
    runtime.commit(cache, rows, keeps)
    then = torch.stack([ids(2, 12), ids(2, 13)])
    second = runtime.step(cache, rows[::-1], then.flip(0), logits=True).logits.flip(0)  # any order of rows
    runtime.commit(cache, rows[::-1], [2, 2])
    for i in range(2):
        logits, _ = one_by_one(runtime, prompts[i], torch.cat([blocks[i], then[i]]))
        same(first.logits[i], logits[:4], runtime.exact_blocks)
        logits, _ = one_by_one(runtime, prompts[i], torch.cat([blocks[i][:keeps[i]], then[i]]))
        same(second[i], logits[keeps[i]:], runtime.exact_blocks)


def test_drop_frees_a_row(runtime):
    prompts = [ids(5, 14), ids(8, 15), ids(3, 16)]
    cache = runtime.new_cache(max_rows=2)
    a, _ = runtime.prefill(cache, prompts[0])
    b, _ = runtime.prefill(cache, prompts[1])
    runtime.step(cache, [a, b], torch.stack([ids(2, 17), ids(2, 18)]))
    runtime.commit(cache, [a, b], [2, 1])
    runtime.drop(cache, [a])
    c, _ = runtime.prefill(cache, prompts[2])  # takes the dropped row's place
    block = torch.stack([ids(3, 19), ids(3, 20)])
    out = runtime.step(cache, [b, c], block, logits=True)
    runtime.commit(cache, [b, c], [3, 3])
    same(out.logits[0], one_by_one(runtime, prompts[1], torch.cat([ids(2, 18)[:1], block[0]]))[0][1:],
         runtime.exact_blocks)
    same(out.logits[1], one_by_one(runtime, prompts[2], block[1])[0], runtime.exact_blocks)
    runtime.drop(cache, [b, c])
    d, _ = runtime.prefill(cache, prompts[0])  # an emptied cache takes new rows
    assert d not in (b, c)


def test_training_features_are_decodings(runtime):
    """`features` of whole sequences: what decoding computes for them, prefilled (the prompt) or
    stepped token by token (the reply)."""
    seqs = [ids(12, 21), ids(5, 22)]
    got = runtime.features(seqs)
    for seq, feats in zip(seqs, got):
        assert feats.shape == (1, len(seq), len(LAYERS) * runtime.info.hidden_size)
        prefilled = runtime.prefill(runtime.new_cache(), seq)[1].features
        same(feats, prefilled, True)
        _, stepped = one_by_one(runtime, seq[:2], seq[2:])
        same(feats[0, 2:], stepped, runtime.exact_blocks)
