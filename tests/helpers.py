"""Test doubles and tiny models shared by the suite."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dflash import DFlashDraftModel
from dflash.model.drafter import Drafts

# the shared datasets: $DFLASH_DATA_DIR, else ../shared/datasets beside the checkout
DATA_DIR = Path(os.environ.get("DFLASH_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))

# 20 varied prompts: arithmetic, reasoning, code, facts, writing, chat.
PROMPTS = [
    "What is 17 times 23?",
    "Natalia sold clips to 48 friends in April and half as many in May. How many clips did she sell in total?",
    "Write a Python function that reverses a string.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into French and Spanish.",
    "What is the capital of Australia?",
    "Write a haiku about autumn leaves.",
    "How do I sort a list of dictionaries by a key in Python?",
    "Summarise the plot of Romeo and Juliet.",
    "What is the derivative of x^3 + 2x?",
    "List the planets of the solar system in order.",
    "Write a SQL query that counts rows in a table named users.",
    "Why is the sky blue?",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "Suggest a name for a coffee shop run by cats.",
    "What are the main differences between TCP and UDP?",
    "Write a short motivational message for a student before an exam.",
    "Convert 100 degrees Fahrenheit to Celsius, showing the steps.",
    "hello",
]


class OracleDrafter(DFlashDraftModel):
    """Proposes the target's own continuation (taken from a reference decode), so greedy
    verification accepts every block in full; `wrong_every` > 0 corrupts one proposal in some
    steps so that acceptance stops mid-block and the caches are rolled back."""

    def __init__(self, config, reference: torch.Tensor, wrong_every: int = 0, wrong_at: int = 2) -> None:
        super().__init__(config)
        self.reference = reference.flatten().tolist()  # prompt + reference continuation
        self.wrong_every, self.wrong_at, self.calls = wrong_every, wrong_at, 0

    @torch.no_grad()
    def draft(self, target, block_ids, context_features, cache, positions=None, attn_mask=None):
        start = cache.length + context_features.shape[1]
        cache.length = start  # consume the context as the real drafter does
        size = block_ids.shape[1]
        want = [self.reference[i] if i < len(self.reference) else 0 for i in range(start + 1, start + size)]
        self.calls += 1
        if self.wrong_every and self.calls % self.wrong_every == 0 and self.wrong_at < len(want):
            want[self.wrong_at] = (want[self.wrong_at] + 1) % self.config.vocab_size
        logits = torch.full((1, size - 1, self.config.vocab_size), -1e4, device=block_ids.device)
        logits[0, torch.arange(size - 1), torch.tensor(want)] = 0.0
        return Drafts(logits, None, self.config.vocab_size)


class RowOracle(DFlashDraftModel):
    """The batched oracle: proposes each row's true continuation (`refs[rid]`: prompt +
    reference), with draft 2 made wrong wherever `wrong(rid, start)` holds, so that rows accept
    different numbers of tokens in the same step. Set `engine` to the BatchEngine it drafts for."""

    @classmethod
    def wrapping(cls, drafter: DFlashDraftModel, refs, wrong) -> "RowOracle":
        oracle = cls(drafter.config)
        oracle.load_state_dict(drafter.state_dict())
        oracle.refs, oracle.wrong, oracle.engine = refs, wrong, None
        return oracle.eval()

    def draft(self, target_adapter, block_ids, context_features, cache, positions=None, attn_mask=None):
        logits = super().draft(target_adapter, block_ids, context_features, cache, positions, attn_mask).full_logits()
        starts = [cache.length] if positions is None else positions[1][:, 0].tolist()  # (one row: its cache's)
        for b, start in enumerate(starts):
            rid = self.engine.rows[b].request.rid
            ref = self.refs[rid][0]
            for k in range(1, block_ids.shape[1]):
                tok = int(ref[start + k]) if start + k < ref.shape[0] else 0
                if k == 2 and self.wrong(rid, start):
                    tok = (tok + 1) % target_adapter.info.vocab_size
                logits[b, k - 1] = -1e4
                logits[b, k - 1, tok] = 1e4
        return Drafts(logits, None, target_adapter.info.vocab_size)


def oracle_for(drafter: DFlashDraftModel, reference: torch.Tensor, **kw) -> OracleDrafter:
    oracle = OracleDrafter(drafter.config, reference, **kw)
    return oracle.to(drafter.device)


def greedy_reference(model, input_ids: torch.Tensor, max_new_tokens: int, eos: int | None = None) -> torch.Tensor:
    """The target's own greedy decoding through transformers' generate."""
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=max_new_tokens, min_new_tokens=0 if eos is not None else max_new_tokens,
                         eos_token_id=eos, pad_token_id=0, top_p=None, top_k=None, temperature=None)
    return out


# Per-family sizes on top of the common tiny shape: a few experts, short windows and small
# linear-attention heads, so that every code path (routing, sliding windows, recurrent state,
# latent attention) runs in seconds on CPU.
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_LINEAR = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
               linear_num_key_heads=2, linear_num_value_heads=4)
_HYBRID_LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "mistral": ("MistralConfig", dict(sliding_window=16)),
    "glm4": ("Glm4Config", {}),
    "qwen3_moe": ("Qwen3MoeConfig", _MOE),
    "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        n_shared_experts=1, first_k_dense_replace=1)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
                                      sliding_window=8)),  # alternating sliding / full layers, sinks
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                              kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                              qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4, head_dim=8,
                                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "qwen3_5": ("Qwen3_5TextConfig", dict(_LINEAR, layer_types=_HYBRID_LAYERS)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(_LINEAR, **_MOE, shared_expert_intermediate_size=32,
                                                 layer_types=_HYBRID_LAYERS)),
    "qwen3_next": ("Qwen3NextConfig", dict(_LINEAR, **_MOE, shared_expert_intermediate_size=32,
                                           layer_types=_HYBRID_LAYERS)),
}


def tiny_config(family: str, vocab: int = 128, **overrides):
    """A 4-layer, 64-wide config of a transformers family (random weights: seconds on CPU)."""
    import transformers

    cls_name, extra = FAMILY_CONFIGS[family]
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
              tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    kw.update(extra)
    kw.update(overrides)
    return getattr(transformers, cls_name)(**kw)


def tiny_target(family: str = "llama", seed: int = 0, init_std: float = 0.1, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config.initializer_range = init_std
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


# ragged token-id prompts for the batched engine (lengths 1 to 11)
BATCH_PROMPTS = [[5, 9, 13], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [21, 22, 23, 24, 25], [40, 41],
                 [60, 61, 62, 63, 64, 65, 66], [90, 91, 92, 93], [100] * 9]


def run_all(engine, requests, join_every=0):
    """Feed requests (all at once, or one every `join_every` steps); collect tokens per id."""
    out = {r.rid: [] for r in requests}
    done = {}
    pending = list(requests)
    steps = 0
    while pending or not engine.idle:
        if pending and (join_every == 0 or steps % join_every == 0):
            batch = pending if join_every == 0 else pending[:1]
            for r in batch:
                engine.add(r)
            pending = pending[len(batch):]
        for o in engine.step():
            out[o.rid] += o.tokens
            if o.finished:
                done[o.rid] = o.stats
        steps += 1
    return out, done


def tiny_gguf(path, arch="llama", kind="Q4_0", layers=1):
    """A random GGUF of a Llama-architecture family (`arch`: llama; qwen2 adds q/k/v biases, qwen3
    q/k norms) with hidden size 64, 4 heads of 16, 2 key/value heads, vocabulary 96, and `kind`
    linear weights, for the native runtime."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(96)
    writer.add_context_length(256)
    writer.add_rope_freq_base(10000.0)
    writer.add_key_length(16)
    writer.add_value_length(16)
    rng = np.random.default_rng(0)

    def add(name, shape, qtype):
        values = rng.standard_normal(shape).astype(np.float32) * (0.2 if len(shape) == 2 else 1.0)
        if qtype == "F32":
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, quants.quantize(values, GGMLQuantizationType[qtype]),
                              raw_dtype=GGMLQuantizationType[qtype])

    add("token_embd.weight", (96, 64), "Q8_0")
    add("output_norm.weight", (64,), "F32")
    for i in range(layers):
        for name, shape in (("attn_q", (64, 64)), ("attn_k", (32, 64)), ("attn_v", (32, 64)),
                            ("attn_output", (64, 64)), ("ffn_gate", (128, 64)), ("ffn_up", (128, 64)),
                            ("ffn_down", (64, 128))):
            add(f"blk.{i}.{name}.weight", shape, kind)
        if arch == "qwen2":
            for name, size in (("attn_q", 64), ("attn_k", 32), ("attn_v", 32)):
                add(f"blk.{i}.{name}.bias", (size,), "F32")
        if arch == "qwen3":
            add(f"blk.{i}.attn_q_norm.weight", (16,), "F32")
            add(f"blk.{i}.attn_k_norm.weight", (16,), "F32")
        add(f"blk.{i}.attn_norm.weight", (64,), "F32")
        add(f"blk.{i}.ffn_norm.weight", (64,), "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def chi2_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square test, cells with expectation < 5 pooled into one."""
    if observed[expected_probs == 0].sum() > 0:
        return 0.0  # a token the target can never produce was produced
    n = observed.sum()
    expected = expected_probs * n
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = keep.sum() - 1
    if df < 1:
        return 1.0  # a single possible outcome, and only it was seen
    return float(torch.special.gammaincc(df / 2.0, stat / 2.0))


def marginal_pvalues(counts: torch.Tensor, joint: torch.Tensor) -> tuple[float, ...]:
    """p-values of sampled first-three-token counts ([V, V, V]) against the exact joint
    distribution: t1, t2, t3 and the pair (t1, t2)."""
    return (chi2_pvalue(counts.sum((1, 2)), joint.sum((1, 2))),
            chi2_pvalue(counts.sum((0, 2)), joint.sum((0, 2))),
            chi2_pvalue(counts.sum((0, 1)), joint.sum((0, 1))),
            chi2_pvalue(counts.sum(2).flatten(), joint.sum(2).flatten()))
