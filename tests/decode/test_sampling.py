"""Sampling: the filters, the acceptance rules, and a statistical test that speculative sampling
leaves the target's distribution unchanged (and that the test would catch a wrong rule)."""

import pytest
import torch
from helpers import marginal_pvalues, tiny_target

import dflash.decode.step as engine
from dflash import DFlashDraftModel, SamplingParams, generate
from dflash.decode.sampling import confident_prefix, greedy_accept, logits_to_probs, rejection_accept, sample
from dflash.model.drafter import Drafts

V = 8


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]))
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))  # 0.5+0.2 < 0.8: keep 3
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.3))  # the top token alone
    assert torch.allclose(p, torch.tensor([1.0, 0, 0, 0, 0]))
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


def test_greedy_accept_counts_leading_matches():
    assert greedy_accept([5, 6, 7], [5, 6, 7, 8]) == 3
    assert greedy_accept([5, 9, 7], [5, 6, 7, 8]) == 1
    assert greedy_accept([9, 6, 7], [5, 6, 7, 8]) == 0


def test_rejection_rule_on_known_distributions():
    """Marginal of the first output token = p exactly, for a q far from p."""
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    q = torch.tensor([[0.1, 0.1, 0.8]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    n = 20000
    for _ in range(n):
        draft = torch.multinomial(q[0], 1, generator=g)
        k, bonus = rejection_accept(draft, q, p, g)
        counts[int(draft) if k == 1 else bonus] += 1
    assert torch.allclose(counts / n, p[0], atol=0.015)


def exact_joint(model, prompt: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """P(t1, t2, t3) of the target's own sampling, [V, V, V]."""
    t1, t2 = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
    seqs = torch.cat([prompt.expand(V * V, -1), t1.reshape(-1, 1), t2.reshape(-1, 1)], dim=1)
    with torch.no_grad():
        logits = model(seqs).logits.float()
    n = prompt.shape[1]
    p1 = logits_to_probs(logits[0, n - 1], params)                          # [V]
    p2 = logits_to_probs(logits[::V, n], params)                            # [V(t1), V]
    p3 = logits_to_probs(logits[:, n + 1], params).view(V, V, V)            # [t1, t2, V]
    return p1[:, None, None] * p2[:, :, None] * p3


def sample_joint(model, drafter, prompt, params, runs: int, seed: int, draft_threshold: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V, V)
    for _ in range(runs):
        stats = generate(model, drafter, prompt, max_new_tokens=3, sampling=params, block_size=3, generator=g,
                         draft_threshold=draft_threshold)
        a, b, c = stats.new_tokens
        counts[a, b, c] += 1
    return counts


class UniformDrafter(DFlashDraftModel):
    """Proposes every token with probability 1/V: q is far from p, yet often hits its mode."""

    def draft(self, target, block_ids, context_features, cache):
        cache.length += context_features.shape[1]
        return Drafts(torch.zeros(1, block_ids.shape[1] - 1, self.config.vocab_size), None, self.config.vocab_size)


class MoodyDrafter(DFlashDraftModel):
    """Sure of token 2 (q = 0.9) on some calls, flat on others, so a confidence threshold
    verifies two, one or no drafts from step to step."""

    calls = 0

    def draft(self, target, block_ids, context_features, cache):
        cache.length += context_features.shape[1]
        MoodyDrafter.calls += 1
        logits = torch.zeros(1, block_ids.shape[1] - 1, self.config.vocab_size)
        sure = [self.calls % 3 != 0, self.calls % 2 == 0]
        for i in range(logits.shape[1]):
            if sure[i % 2]:
                logits[0, i, 2] = 4.15  # e^4.15 / (e^4.15 + 7) ~ 0.9
        return Drafts(logits, None, self.config.vocab_size)


def test_confident_prefix_multiplies_top_probabilities():
    top = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]).amax(-1)
    assert confident_prefix(top, 0.0) == 3
    assert confident_prefix(top, 0.4) == 2    # 0.9, 0.45, 0.36
    assert confident_prefix(top, 0.35) == 3
    assert confident_prefix(top, 0.95) == 0


@pytest.fixture(scope="module")
def tiny_pair():
    model = tiny_target("qwen3", vocab=V, init_std=0.12, seed=3)
    torch.manual_seed(5)
    drafter = DFlashDraftModel.from_target(model, num_layers=1, block_size=4, mask_token_id=7).eval()
    return model, drafter, UniformDrafter(drafter.config).eval()


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.8, top_k=5, top_p=0.9)],
                         ids=["t1", "t0.8-topk5-topp0.9"])
@pytest.mark.parametrize("which", ["untrained", "uniform"])
@pytest.mark.slow
def test_speculative_sampling_preserves_target_distribution(tiny_pair, params, which):
    model, untrained, uniform = tiny_pair
    drafter = untrained if which == "untrained" else uniform
    prompt = torch.tensor([[1, 4, 2, 6, 3]])
    joint = exact_joint(model, prompt, params)
    counts = sample_joint(model, drafter, prompt, params, runs=2500, seed=11)
    # four tests at 1e-3: a correct sampler fails this assert with probability < 0.4 %
    assert min(marginal_pvalues(counts, joint)) > 1e-3


@pytest.mark.slow
def test_confidence_threshold_preserves_target_distribution(tiny_pair):
    """Verifying fewer drafts when the drafter is unsure keeps sampling exact: the rule reads
    the draft distributions, never the drawn tokens."""
    model, untrained, _ = tiny_pair
    drafter = MoodyDrafter(untrained.config).eval()
    params = SamplingParams(temperature=1.0)
    prompt = torch.tensor([[1, 4, 2, 6, 3]])
    counts = sample_joint(model, drafter, prompt, params, runs=2500, seed=13, draft_threshold=0.5)
    assert min(marginal_pvalues(counts, exact_joint(model, prompt, params))) > 1e-3


def exact_match_accept(draft, q, p, generator=None):
    """Wrong: keep a draft when it is the target's likeliest token."""
    n = 0
    while n < draft.shape[0] and int(draft[n]) == int(p[n].argmax()):
        n += 1
    return n, int(sample(p[n], generator))


def resample_from_p_accept(draft, q, p, generator=None):
    """Wrong: the min(1, p/q) test, but a rejected slot is redrawn from p, not max(0, p - q)."""
    n, _ = rejection_accept(draft, q, p, generator)
    return n, int(sample(p[n], generator))


@pytest.mark.parametrize("wrong_rule", [exact_match_accept, resample_from_p_accept])
@pytest.mark.slow
def test_statistical_test_catches_a_wrong_acceptance_rule(tiny_pair, monkeypatch, wrong_rule):
    monkeypatch.setattr(engine, "rejection_accept", wrong_rule)
    model, _, uniform = tiny_pair
    params = SamplingParams(temperature=1.0)
    prompt = torch.tensor([[1, 4, 2, 6, 3]])
    counts = sample_joint(model, uniform, prompt, params, runs=2500, seed=11)
    assert min(marginal_pvalues(counts, exact_joint(model, prompt, params))) < 1e-6
