"""The DFlash draft network: a few Qwen3-shaped layers that fill a block of masks in one pass.

Reading order: norm, rotary embedding, draft KV cache, attention with KV injection, MLP, layer,
model. The drafter owns no embedding table and no LM head: the caller embeds the block with the
target's table and turns hidden states into logits with the target's head.

KV injection: in every layer the keys and values are [context ; block], where the context is
the fused target features of committed positions (`fc` + `hidden_norm`, computed once per
position) and the block is the layer's own hidden states. Queries come from the block only and
attend to the whole context and to the whole block (bidirectional).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dflash.config import DFlashConfig, default_target_layer_ids
from dflash.runtime.buffers import regrow

if TYPE_CHECKING:  # only for type hints: the engine imports this module, not the reverse
    from dflash.decode.engine import GenerationStats


class RMSNorm(nn.Module):
    """Normalised in float32 (torch's fused `rms_norm`), scaled by the weight in the input's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions; scaled variants come from transformers' own
    rope initialisers so a drafter matches its target's rope exactly."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        rope_type = (config.rope_scaling or {}).get("rope_type", "default")
        self.attention_scaling = 1.0
        if rope_type == "default":
            exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
            inv_freq = 1.0 / (config.rope_theta ** exponents)
        else:
            from transformers import Qwen3Config
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            hf_config = Qwen3Config.from_dict(config.to_dict())
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [n] or [batch, n] -> cos, sin: [batch or 1, 1, n, head_dim]
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        freqs = positions.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class DraftCache:
    """Keys and values of the committed context, per layer, in buffers grown by
    dflash/runtime/buffers.py's rule.

    A draft pass writes the new context entries and then the block's entries after them; only
    `length` advances past the context, so the block is dropped (cropped) for free: the next
    pass overwrites it.
    """

    GROWTH_STEP = 64

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, capacity: int = 256) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v ([batch, kv_heads, n, head_dim]) after the committed context and return
        everything from position 0 to the end of what was written."""
        end = self.length + k.shape[2]
        self.keys[layer] = regrow(self.keys[layer], self.length, end, self.GROWTH_STEP)
        self.values[layer] = regrow(self.values[layer], self.length, end, self.GROWTH_STEP)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    # ragged batches: the batch engine tracks which slots each row owns
    def add_rows(self, n: int) -> None:
        """n more rows, owning none of the existing slots (zeros there)."""
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                store[i] = torch.cat([t, t.new_zeros((n,) + t.shape[1:])])

    def gather(self, rows: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        """Keep `rows`, and of each only `slots` ([len(rows), n], n becomes the length)."""
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                t = t[rows]
                if slots is not None:
                    index = slots.to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                    t = torch.gather(t[:, :, : self.length], 2, index)
                store[i] = t
        if slots is not None:
            self.length = slots.shape[1]


class DFlashAttention(nn.Module):
    def __init__(self, config: DFlashConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.window = config.swa_window_size if config.use_swa else None

    def forward(
        self,
        x: torch.Tensor,            # [batch, n_block, hidden]: block hidden states
        context: torch.Tensor,      # [batch, n_ctx, hidden]: fused target features (new ones)
        block_rope: tuple[torch.Tensor, torch.Tensor],
        context_rope: tuple[torch.Tensor, torch.Tensor],
        cache: DraftCache | None,
        attn_mask: torch.Tensor | None,  # [batch or 1, 1, n_block, keys] bool, True = may attend
    ) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        kv_in = torch.cat([context, x], dim=1)
        m = kv_in.shape[1]
        k = self.k_norm(self.k_proj(kv_in).view(b, m, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(kv_in).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, *block_rope)
        cos = torch.cat([context_rope[0], block_rope[0]], dim=2)
        sin = torch.cat([context_rope[1], block_rope[1]], dim=2)
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)
            if self.window is not None:  # block queries see only the last `window` context keys
                context_len = k.shape[2] - n
                first = max(0, context_len - self.window)
                k, v = k[:, :, first:], v[:, :, first:]
                if attn_mask is not None:
                    attn_mask = attn_mask[..., first:]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class DFlashMLP(nn.Module):
    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: DFlashConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DFlashAttention(config, layer_idx)
        self.mlp = DFlashMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, context, block_rope, context_rope, cache, attn_mask) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), context, block_rope, context_rope, cache, attn_mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class Drafts:
    """What a draft pass proposes: logits over the drafter's own vocabulary ([b, n, K]), whose
    column j stands for token `vocab[j]` (`vocab` None: K is the whole vocabulary).

    Greedy decoding needs only each position's best token and its probability, which the K
    columns give directly; the [b, n, V] row of the whole vocabulary (-inf outside the draft
    vocabulary) is built only where sampling needs it. With an 8192-token draft vocabulary and
    V = 49,152, scattering into that row and reading it back cost ~0.5 ms a step on a 2-core CPU.
    """

    logits: torch.Tensor
    vocab: torch.Tensor | None
    vocab_size: int
    best: torch.Tensor | None = None  # [b, n] column of the largest logit, where the pass found it
    top: torch.Tensor | None = None   # [b, n] its probability, likewise

    def tokens(self) -> torch.Tensor:
        """The most likely token id at each position ([b, n])."""
        best = self.logits.argmax(-1) if self.best is None else self.best
        return best if self.vocab is None else self.vocab[best]

    def top_probs(self) -> torch.Tensor:
        """The probability of that token ([b, n]): a drafter's confidence, without a full softmax."""
        return (self.logits.amax(-1) - self.logits.logsumexp(-1)).exp() if self.top is None else self.top

    def full_logits(self) -> torch.Tensor:
        """Logits over the whole vocabulary ([b, n, V]): tokens outside the draft vocabulary get
        -inf, so they are never proposed."""
        if self.vocab is None:
            return self.logits
        logits = self.logits.new_full((*self.logits.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.vocab, self.logits)


class DFlashDraftModel(nn.Module):
    """The DFlash drafter. `forward` maps a block's embeddings plus new context features to the
    block's hidden states; `draft` turns a block of [anchor, mask, ...] into `Drafts` (`propose`:
    the same as logits over the whole vocabulary); `spec_generate` decodes losslessly with a
    target (the reference's interface)."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(len(config.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        # Token ids drafts are chosen from (None = the whole vocabulary). A drafter trained with a
        # frequent-token loss proposes from those tokens only: its LM head shrinks by vocab/K.
        self.draft_vocab: torch.Tensor | None = None

    # --- properties the engine needs ---------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def target_layer_ids(self) -> list[int]:
        return self.config.target_layer_ids

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device  # (not a linear layer's: those may be packed, weightless)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    # --- the network ---------------------------------------------------------------------------

    def forward(
        self,
        noise_embedding: torch.Tensor,   # [batch, n_block, hidden]: embedded block tokens
        target_hidden: torch.Tensor,     # [batch, n_ctx, len(ids) * hidden]: raw target features
        context_positions: torch.Tensor,  # [n_ctx] or [batch, n_ctx]
        block_positions: torch.Tensor,    # [n_block] or [batch, n_block]
        cache: DraftCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states of the block ([batch, n_block, hidden], final norm applied).

        With a cache the new context is appended to it (and kept), the block is not. Without
        a cache (training) `attn_mask` says which keys ([context ; block]) each query sees.
        """
        context = self.hidden_norm(self.fc(target_hidden))
        dtype = noise_embedding.dtype
        block_rope = self.rotary_emb(block_positions, dtype)
        context_rope = self.rotary_emb(context_positions, dtype)
        x = noise_embedding
        for layer in self.layers:
            x = layer(x, context, block_rope, context_rope, cache, attn_mask)
        if cache is not None:
            cache.length += target_hidden.shape[1]
        return self.norm(x)

    def new_cache(self, batch: int = 1, capacity: int = 256) -> DraftCache:
        c = self.config
        return DraftCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim,
                          self.dtype, self.device, capacity)

    @torch.no_grad()
    def draft(
        self,
        target: Any,                # a TargetRuntime (dflash/runtime/base.py): embedding table and LM head
        block_ids: torch.Tensor,    # [b, B]: anchor then masks
        context_features: torch.Tensor,  # [b, n_new, len(ids) * hidden]
        cache: DraftCache,
        positions: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([b, n_new], [b, B]) for ragged rows
        attn_mask: torch.Tensor | None = None,  # [b, 1, B, keys] bool: which cached/new keys each row sees
    ) -> Drafts:
        """Drafts for block positions 1..B-1 (logits [b, B-1, K]) in one pass. One sequence
        needs no positions (they follow the cache); a ragged batch passes its own, and a mask
        hiding the slots a row does not own.

        A block shorter than the trained one is drafted as a full trained block, of which the
        first B-1 drafts are returned: the masks attend to each other, so a drafter trained on
        16-token blocks guesses worse in a 4-token one (draft 1 right 0.32 of the time against
        0.52, teacher-forced on GSM8K answers). The extra masks cost draft-layer rows only.
        """
        n_ctx, n_block = context_features.shape[1], block_ids.shape[1]
        extra = self.block_size - n_block
        if extra > 0:
            block_ids = self.full_block(block_ids)
            if positions is not None:
                tail = positions[1][..., -1:] + torch.arange(1, extra + 1, device=positions[1].device)
                positions = (positions[0], torch.cat([positions[1], tail], dim=-1))
            if attn_mask is not None:  # the extra masks are block keys every row sees
                attn_mask = torch.cat([attn_mask, attn_mask.new_ones(*attn_mask.shape[:-1], extra)], dim=-1)
        if positions is None:
            start = cache.length + n_ctx
            span = torch.arange(cache.length, start + block_ids.shape[1], device=self.device)
            positions = (span[:n_ctx], span[n_ctx:])
        noise = target.embed(block_ids).to(self.dtype)
        hidden = self(noise, context_features.to(self.dtype), positions[0], positions[1], cache, attn_mask)
        return self.drafts_of(target, hidden[:, 1:n_block])

    def full_block(self, block_ids: torch.Tensor) -> torch.Tensor:
        """A block ([b, B]) extended with masks to the trained block size (see `draft`)."""
        extra = self.block_size - block_ids.shape[1]
        return torch.cat([block_ids, block_ids.new_full((block_ids.shape[0], extra), self.mask_token_id)], 1)

    def drafts_of(self, target: Any, hidden: torch.Tensor) -> Drafts:
        """The drafts of block hidden states ([b, n, hidden], final norm applied) through the
        target's head, over the draft vocabulary if there is one."""
        vocab_size = target.info.vocab_size
        if self.draft_vocab is None:
            return Drafts(target.lm_head(hidden), None, vocab_size)
        if self.draft_vocab.device != hidden.device:  # moved once: the target caches its rows by identity
            self.draft_vocab = self.draft_vocab.to(hidden.device)
        return Drafts(target.lm_head(hidden, vocab=self.draft_vocab), self.draft_vocab, vocab_size)

    def propose(self, target: Any, block_ids: torch.Tensor, context_features: torch.Tensor, cache: DraftCache,
                positions: tuple[torch.Tensor, torch.Tensor] | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`draft`'s logits over the whole vocabulary ([b, B-1, V])."""
        return self.draft(target, block_ids, context_features, cache, positions, attn_mask).full_logits()

    # --- construction and checkpoints --------------------------------------------------------

    @classmethod
    def from_target(
        cls,
        target: Any,
        num_layers: int = 1,
        block_size: int = 16,
        mask_token_id: int | None = None,
        target_layer_ids: list[int] | None = None,
        intermediate_size: int | None = None,
    ) -> "DFlashDraftModel":
        """A freshly initialised drafter sized for `target` (a Hugging Face causal LM).

        `mask_token_id` defaults to the target vocabulary's last id; pick a token that never
        appears in real text when the tokenizer has one (any id works: its embedding is learnt
        against).
        """
        tc = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
        heads = tc.num_attention_heads
        layers = tc.num_hidden_layers
        rope = getattr(tc, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or getattr(tc, "rope_scaling", None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        vocab = target.get_input_embeddings().weight.shape[0]
        config = DFlashConfig(
            hidden_size=tc.hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            intermediate_size=intermediate_size or tc.intermediate_size,
            vocab_size=vocab,
            num_target_layers=layers,
            target_layer_ids=target_layer_ids or default_target_layer_ids(layers, num_layers),
            mask_token_id=vocab - 1 if mask_token_id is None else mask_token_id,
            block_size=block_size,
            rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=getattr(tc, "max_position_embeddings", 40960),
        )
        model = cls(config)
        model.reset_parameters()
        weight = target.get_input_embeddings().weight
        return model.to(device=weight.device, dtype=torch.float32 if weight.device.type == "cpu" else weight.dtype)

    @staticmethod
    def _initialise(root: nn.Module, std: float) -> None:
        """Normal(0, std) linear weights, zero biases, unit norms: the usual initialisation for such stacks."""
        for module in root.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Initialise every weight afresh (see `_initialise`)."""
        self._initialise(self, std)
        # fc sums len(ids) feature blocks: keep its output scale independent of their number
        nn.init.normal_(self.fc.weight, std=std / math.sqrt(len(self.config.target_layer_ids)))

    def add_layers(self, n: int, std: float = 0.02) -> None:
        """Append n layers that start as identities (their attention and MLP output projections
        are zero), so a trained drafter deepens without forgetting: training then grows them."""
        for _ in range(n):
            layer = DFlashDecoderLayer(self.config, len(self.layers))
            self._initialise(layer, std)
            nn.init.zeros_(layer.self_attn.o_proj.weight)
            nn.init.zeros_(layer.mlp.down_proj.weight)
            self.layers.append(layer.to(self.device, self.dtype))
        self.config.num_hidden_layers = len(self.layers)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None) -> "DFlashDraftModel":
        """Load a released-format drafter from a folder or a Hub id (see dflash.model.checkpoint)."""
        from dflash.model.checkpoint import load_drafter

        return load_drafter(name_or_path, dtype=dtype, device=device)

    def save_pretrained(self, path: str) -> None:
        """Write config.json and bf16 model.safetensors in the released format."""
        from dflash.model.checkpoint import save_drafter

        save_drafter(self, path)

    # --- decoding (the reference's interface) ------------------------------------------------

    def spec_generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        target: Any = None,
        stop_token_ids: list[int] | None = None,
        top_p: float = 1.0,
        top_k: int = 0,
        block_size: int | None = None,
        return_stats: bool = False,
        generator: torch.Generator | None = None,
        draft_threshold: float = 0.0,
    ) -> "torch.Tensor | GenerationStats":
        """Speculative decoding with `target`: prompt + new token ids ([1, n + new]), exactly
        what the target alone would produce (greedy) or a sample from its distribution."""
        from dflash.decode.engine import generate
        from dflash.decode.sampling import SamplingParams

        if target is None:
            raise TypeError("spec_generate needs target= (the model this drafter was trained for)")
        stats = generate(
            target, self, input_ids,
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k),
            block_size=self.block_size if block_size is None else block_size,
            stop_token_ids=stop_token_ids,
            generator=generator,
            draft_threshold=draft_threshold,
        )
        return stats if return_stats else stats.output_ids
