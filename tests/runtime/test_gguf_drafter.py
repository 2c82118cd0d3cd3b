"""The drafter's native pass beside the native GGUF runtime: the function the torch drafter
computes (with the same Q8_0 linears), row by row independent of the other rows of the call,
and what decoding picks by default."""

from __future__ import annotations

import pytest
import torch

from dflash import DFlashDraftModel
from dflash.config import DFlashConfig
from dflash.decode.drafting import DraftRows
from dflash.decode.step import Row
from dflash.decode.sampling import SamplingParams
from dflash.decode.stats import GenerationStats
from dflash.runtime import gguf as native
from dflash.runtime.gguf_drafter import NativeDraftRows, supported

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def runtime():
    from dflash.runtime.loader import embedded_gguf_path

    rt = native.GGUFRuntime(embedded_gguf_path(), threads=2)
    rt.bind([1, 14, 27])
    return rt


def _random_drafter(layers: int, bias: bool = False) -> DFlashDraftModel:
    """A random drafter shaped for SmolLM2 (widths as the shipped one; `layers` deep)."""
    torch.manual_seed(layers)
    config = DFlashConfig(hidden_size=576, num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                          head_dim=64, intermediate_size=1536, vocab_size=49152, num_target_layers=30,
                          target_layer_ids=[1, 14, 27], mask_token_id=16, block_size=4, rms_norm_eps=1e-5,
                          rope_theta=100000.0, attention_bias=bias)
    drafter = DFlashDraftModel(config).eval()
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0.0, 0.05) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return drafter


def _rows(runtime, prompts):
    """A Row per prompt, prefilled: its context is the prompt's features."""
    cache = runtime.new_cache()
    rows = []
    for ids in prompts:
        rid, out = runtime.prefill(cache, ids)
        rows.append(Row(rid, SamplingParams(), None, GenerationStats(), 64, int(out.tokens[0, -1]), ids.numel(),
                        out.features[0]))
    return rows


def _passes(draft_rows, runtime, rows, steps=3, mask=16):
    """Draft `steps` times; between passes each row gets 1..3 new context rows (a verified block's
    features, taken here from the features of the row's own prompt)."""
    contexts = [row.context.clone() for row in rows]
    for row in rows:
        draft_rows.add()
    logits = []
    for s in range(steps):
        block = torch.full((len(rows), 4), mask, dtype=torch.long)
        block[:, 0] = torch.tensor([row.anchor for row in rows])
        drafts = draft_rows.draft(rows, block)
        if drafts.best is not None:  # (the native pass finds each position's best token and its probability)
            assert torch.equal(drafts.best, drafts.logits.argmax(-1))
            expected = (drafts.logits.amax(-1) - drafts.logits.logsumexp(-1)).exp()
            assert torch.allclose(drafts.top, expected, rtol=1e-5, atol=1e-7)
        logits.append(drafts.logits.clone())
        for i, row in enumerate(rows):
            new = 1 + (s + i) % 3
            row.context = contexts[i][s: s + new]
            row.length += new
    return torch.stack(logits)


@pytest.mark.real_model
@pytest.mark.parametrize("layers", [1, 2])
def test_native_pass_computes_the_drafters_function(runtime, layers):
    """Over several passes with a growing cache, the native pass gives the torch drafter's logits
    (its linears quantised to the same Q8_0 blocks) up to float rounding, and the same drafts."""
    from dflash.runtime.gguf import quantize_linears

    drafter = _random_drafter(layers)
    quantize_linears(drafter)
    assert supported(drafter)
    prompts = [torch.arange(100, 140), torch.arange(300, 317)]
    ours = torch.stack([_passes(NativeDraftRows(drafter, runtime), runtime, _rows(runtime, [p]))[:, 0] for p in prompts])
    theirs = torch.stack([_passes(DraftRows(drafter, runtime), runtime, _rows(runtime, [p]))[:, 0] for p in prompts])
    assert ours.shape == theirs.shape == (2, 3, 3, 49152)
    assert (ours - theirs).abs().max() < 1e-3 * theirs.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.95


@pytest.mark.real_model
def test_rows_of_one_pass_equal_each_row_alone(runtime):
    """Rows with different contexts in one native pass give bit for bit what each gives alone;
    a row leaving (`keep`) leaves the others' caches as they were."""
    from dflash.drafters import default_drafter_path

    drafter = DFlashDraftModel.from_pretrained(str(default_drafter_path()), device="cpu")
    prompts = [torch.arange(100, 140), torch.arange(300, 317), torch.arange(500, 529)]
    together = _passes(NativeDraftRows(drafter, runtime), runtime, _rows(runtime, prompts))
    for i, p in enumerate(prompts):
        alone = _passes(NativeDraftRows(drafter, runtime), runtime, _rows(runtime, [p]))
        # (row i's context counts follow (s + i) % 3 together, (s + 0) % 3 alone: compare the first pass)
        assert torch.equal(together[0, i], alone[0, 0])
    rows = NativeDraftRows(drafter, runtime)
    live = _rows(runtime, prompts)
    _passes(rows, runtime, live, steps=1)
    rows.keep([0, 2])
    block = torch.full((2, 4), 16, dtype=torch.long)
    block[:, 0] = torch.tensor([live[0].anchor, live[2].anchor])
    context = live[2].context.clone()
    after = rows.draft([live[0], live[2]], block).logits
    reference = NativeDraftRows(drafter, runtime)
    solo = _rows(runtime, [prompts[2]])
    _passes(reference, runtime, solo, steps=1)
    solo[0].context = context  # (what row 2 was given after its first pass above)
    assert torch.equal(after[1], reference.draft(solo, block[1:]).logits[0])


def test_decoding_picks_the_native_pass_for_a_standard_drafter(runtime):
    """The native runtime offers its pass for a standard drafter, not for one that overrides
    `draft` (a test's oracle) or runs elsewhere."""
    drafter = _random_drafter(1, False)
    assert isinstance(runtime.draft_rows(drafter), NativeDraftRows)

    class Own(DFlashDraftModel):
        def draft(self, *args, **kwargs):
            return super().draft(*args, **kwargs)

    assert runtime.draft_rows(Own(drafter.config)) is None
    assert runtime.draft_rows(_random_drafter(1, bias=True)) is None  # (o_proj's bias: not in the native pass)


def test_native_copy_follows_the_drafters_weights():
    """The native copy is built once per drafter and built again after its weights change (a
    training loop that evaluates by decoding must not draft with stale weights)."""
    from dflash.runtime.gguf_drafter import NativeDrafter

    drafter = _random_drafter(1)
    first = NativeDrafter.of(drafter)
    assert NativeDrafter.of(drafter) is first
    with torch.no_grad():
        drafter.layers[0].mlp.down_proj.weight.mul_(0.5)
    assert NativeDrafter.of(drafter) is not first
