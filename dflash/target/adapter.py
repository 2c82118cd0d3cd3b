"""The target seen by the engine: one forward that returns logits and the fused features the
drafter reads, a cache that can be rolled back to a committed length, and the shared embedding
table and LM head.

Any Hugging Face causal LM whose forward takes `past_key_values` and returns hidden states
works; families whose cache cannot simply be cropped are refused here, by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dflash.errors import IncompatibleDrafterError, UnsupportedTargetError


@dataclass
class TargetOutput:
    logits: torch.Tensor             # [batch, n_kept, vocab]
    features: torch.Tensor | None    # [batch, n, len(layer_ids) * hidden], or None if not asked


class TargetAdapter:
    """Wraps a Hugging Face causal LM for speculative decoding."""

    def __init__(self, model: Any, layer_ids: list[int] | None = None) -> None:
        self.model = model
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.layer_ids = list(layer_ids or [])
        self.embedding = model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise UnsupportedTargetError(f"{type(model).__name__} has no LM head: load it as a causal LM")

    @classmethod
    def wrap(cls, target: Any, layer_ids: list[int] | None = None) -> "TargetAdapter":
        if isinstance(target, TargetAdapter):
            if layer_ids is not None and target.layer_ids != list(layer_ids):
                return cls(target.model, layer_ids)
            return target
        return cls(target, layer_ids)

    # --- facts -----------------------------------------------------------------------------

    @property
    def model_type(self) -> str:
        return getattr(self.config, "model_type", type(self.model).__name__)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.embedding.weight.shape[0]

    @property
    def max_positions(self) -> int:
        return getattr(self.config, "max_position_embeddings", None) or 1 << 30

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def check_drafter(self, config: Any) -> None:
        """Refuse a drafter built for another target before it decodes garbage slowly."""
        problems = []
        if config.hidden_size != self.hidden_size:
            problems.append(f"hidden size {config.hidden_size} != target's {self.hidden_size}")
        if config.vocab_size != self.vocab_size:
            problems.append(f"vocabulary {config.vocab_size} != target's {self.vocab_size}")
        if config.num_target_layers != self.num_layers:
            problems.append(f"trained on a {config.num_target_layers}-layer target, this one has {self.num_layers}")
        elif max(config.target_layer_ids) >= self.num_layers:
            problems.append(f"target_layer_ids {config.target_layer_ids} exceed the target's {self.num_layers} layers")
        if problems:
            raise IncompatibleDrafterError(
                f"this drafter does not fit target {self.model_type} "
                f"({getattr(self.model.config, '_name_or_path', '') or 'unnamed'}): " + "; ".join(problems)
            )

    # --- what the engine calls ---------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def lm_head(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every token, or of the token ids in `vocab` only (in that order)."""
        hidden = hidden.to(self.head.weight.dtype)
        if vocab is None:
            return self.head(hidden)
        bias = None if self.head.bias is None else self.head.bias[vocab]
        return torch.nn.functional.linear(hidden, self.head.weight[vocab], bias)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if not getattr(cache, "is_croppable", True):
            raise UnsupportedTargetError(
                f"model type {self.model_type!r}: its cache cannot be rolled back after a rejected "
                "draft, so speculative decoding would be wrong; it is not supported yet"
            )
        return cache

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: Any, logits_to_keep: int = 0,
                features: bool = True) -> TargetOutput:
        """Run `ids` ([batch, n]) after what `cache` holds; append them to the cache."""
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True,
                         output_hidden_states=features, logits_to_keep=logits_to_keep)
        feats = None
        if features:
            feats = torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1)
        return TargetOutput(logits=out.logits, features=feats)

    def rollback(self, cache: Any, length: int) -> None:
        """Forget every cached position from `length` on (rejected draft tokens)."""
        surplus = cache.get_seq_length() - length
        if surplus > 0:
            cache.crop(-surplus)  # transformers >= 5.2x: a negative count of tokens to drop
