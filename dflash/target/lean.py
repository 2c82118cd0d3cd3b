"""A lean forward for Llama-architecture targets on CPU with fp16 weights (`--cpu-weights fp16`).

Why: once the weights are half-size (dflash/target/packed.py), a one-token forward of
SmolLM2-135M spends more time outside the matrix products than in them: ~210 small operators
and their Python dispatch per forward (seven linear calls, two RMSNorms, RoPE on q and k
separately, masks, output bookkeeping per layer). This forward computes the same function with
fewer, larger operators:
- q, k and v in one packed GEMM, gate and up in another (the weights concatenated once);
- RoPE applied to the q and k heads together, RMSNorm through `torch.nn.functional.rms_norm`;
- attention by `scaled_dot_product_attention` with grouped heads, a mask only when a block of
  several tokens follows a cache;
- hidden states kept only for the layers the drafter reads, the LM head only on the positions
  asked for.
It writes to the same cache as the transformers forward, so the two can be mixed (the batched
engine, with its ragged masks, keeps using the transformers forward).

It is the fp16 target's own forward: verification and plain decoding both go through it, so
speculative decoding stays exact against plain decoding of this model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dflash.target.packed import PackedFp16Linear, weight_of

LEAN_MODEL_TYPES = {"llama"}


def _fused(*linears: torch.nn.Module) -> PackedFp16Linear:
    """One packed GEMM computing the (bias-free) linears' outputs side by side."""
    return PackedFp16Linear(torch.cat([weight_of(lin) for lin in linears]))


class LeanLayer:
    """One decoder layer's weights as the lean forward uses them (fused, packed)."""

    def __init__(self, layer: Any, config: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fused(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o, self.down = _fused(attn.o_proj), _fused(mlp.down_proj)
        self.gate_up = _fused(mlp.gate_proj, mlp.up_proj)
        self.norm_in = layer.input_layernorm.weight.detach()
        self.norm_post = layer.post_attention_layernorm.weight.detach()
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.intermediate = config.intermediate_size
        self.scaling = attn.scaling
        self.index = attn.layer_idx


class LeanLlama:
    """The forward of a Llama-architecture causal LM for one or more rows of equal length
    (no padding mask), fed and read like the transformers model by `TargetAdapter`."""

    def __init__(self, model: Any) -> None:
        config = model.config
        bad = [name for name in ("q_proj", "k_proj", "v_proj", "o_proj")
               if getattr(model.model.layers[0].self_attn, name).bias is not None]
        if bad or getattr(config, "mlp_bias", False) or config.hidden_act != "silu":
            raise ValueError("the lean forward covers bias-free SiLU Llama layers only")
        self.config = config
        self.embedding = model.get_input_embeddings()
        self.rotary = model.model.rotary_emb
        self.layers = [LeanLayer(layer, config) for layer in model.model.layers]
        self.norm = model.model.norm.weight.detach()
        self.eps = config.rms_norm_eps
        self.head = model.get_output_embeddings()

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: Any, logits_to_keep: int = 0,
                 feature_layers: list[int] | tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits of the last `logits_to_keep` positions or all, hidden states after each
        layer in `feature_layers`) for `ids` ([b, n]) following what `cache` holds."""
        b, n = ids.shape
        past = cache.get_seq_length()
        hidden = self.embedding(ids)
        positions = torch.arange(past, past + n, device=ids.device).unsqueeze(0)
        cos, sin = self.rotary(hidden, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [1, n, 1, head_dim]: broadcast over heads
        mask = None
        if n > 1 and past:  # a block after a cache: each token sees the past and itself and before
            mask = torch.arange(past + n, device=ids.device) <= torch.arange(past, past + n, device=ids.device)[:, None]
        wanted, features = set(feature_layers), {}
        for layer in self.layers:
            hidden = hidden + self._attention(layer, hidden, cache, cos, sin, mask, b, n)
            x = F.rms_norm(hidden, (hidden.shape[-1],), layer.norm_post, layer.eps)
            gate, up = layer.gate_up(x).split(layer.intermediate, dim=-1)
            hidden = hidden + layer.down(F.silu(gate) * up)
            if layer.index in wanted:
                features[layer.index] = hidden
        hidden = F.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.eps)
        if len(self.layers) - 1 in wanted:  # transformers reports the last layer's state normed
            features[len(self.layers) - 1] = hidden
        logits = self.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return logits, [features[i] for i in feature_layers]

    @staticmethod
    def _attention(layer: LeanLayer, hidden: torch.Tensor, cache: Any, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None, b: int, n: int) -> torch.Tensor:
        x = F.rms_norm(hidden, (hidden.shape[-1],), layer.norm_in, layer.eps)
        qkv = layer.qkv(x).view(b, n, layer.heads + 2 * layer.kv_heads, layer.head_dim)
        qk, v = qkv[:, :, : layer.heads + layer.kv_heads], qkv[:, :, layer.heads + layer.kv_heads:]
        half = layer.head_dim // 2
        qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
        q = qk[:, :, : layer.heads].transpose(1, 2)
        k, v = cache.layers[layer.index].update(qk[:, :, layer.heads:].transpose(1, 2), v.transpose(1, 2))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scaling,
                                             is_causal=mask is None and n > 1, enable_gqa=True)
        return layer.o(out.transpose(1, 2).reshape(b, n, layer.heads * layer.head_dim))


def lean_forward_for(model: Any) -> LeanLlama | None:
    """The lean forward of a packed fp16 CPU target (its weights are the packed ones, fused),
    or None where it does not apply (other architectures keep the transformers forward)."""
    if getattr(model.config, "model_type", None) not in LEAN_MODEL_TYPES:
        return None
    try:
        return LeanLlama(model)
    except (ValueError, AttributeError):
        return None
