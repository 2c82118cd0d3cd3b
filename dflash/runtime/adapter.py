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
from dflash.runtime.lean import LeanCache
from dflash.runtime.packed import rows_of
from dflash.runtime.rollback import CacheRollback


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
        self._vocab_head: tuple[torch.Tensor, Any] | None = None  # (vocabulary, its rows of the head)
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
        if self._vocab_head is None or self._vocab_head[0] is not vocab:  # gathered once, not per draft
            self._vocab_head = (vocab, rows_of(self.head, vocab))
        return self._vocab_head[1](hidden)

    @property
    def _rollback(self) -> CacheRollback:
        """The target's cache layout (one per model: it hooks the recurrent mixers once)."""
        rollback = getattr(self.model, "_dflash_rollback", None)
        if rollback is None:
            rollback = CacheRollback(self.model, self.model_type)
            self.model._dflash_rollback = rollback
        return rollback

    def new_cache(self, batched: bool = False) -> Any:
        """An empty cache that `rollback` can cut back (or, `batched`, one whose rows keep
        rejected drafts as masked holes), or a refusal naming the model type. A target with a
        lean forward (fp16 on CPU) gets that forward's own cache for a single sequence."""
        rollback = self._rollback  # (refuses a target whose cache it cannot roll back)
        lean = getattr(self.model, "_dflash_lean", None)
        if lean is not None and not batched:
            return lean.new_cache()
        return rollback.new_cache(batched)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: Any, logits_to_keep: int = 0, features: bool = True,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> TargetOutput:
        """Run `ids` ([batch, n]) after what `cache` holds; append them to the cache. A ragged
        batch passes `attention_mask` ([batch, cached + n], 0 for slots a row does not own) and
        its own `position_ids`."""
        rollback = self._rollback
        lean = getattr(self.model, "_dflash_lean", None)  # the fp16 CPU target's own forward, on its own cache
        if lean is not None and isinstance(cache, LeanCache):
            if attention_mask is not None or position_ids is not None:
                raise ValueError("a single-sequence cache takes no attention_mask or position_ids")
            logits, kept = lean(ids, cache, logits_to_keep, self.layer_ids if features else ())
            return TargetOutput(logits=logits, features=torch.cat(kept, dim=-1) if features else None)
        if attention_mask is not None and rollback.windowed:
            attention_mask = rollback.window_masks(cache, attention_mask, ids.shape[1], self.embedding.weight.dtype)
        rollback.before_forward(cache)
        try:
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, attention_mask=attention_mask,
                             position_ids=position_ids, output_hidden_states=features, logits_to_keep=logits_to_keep)
        finally:
            rollback.after_forward()
        feats = None
        if features:
            feats = torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1)
        return TargetOutput(logits=out.logits, features=feats)

    def rollback(self, cache: Any, length: int) -> None:
        """Forget every cached position from `length` on (rejected draft tokens). Call it after
        every forward, also when nothing was rejected: sliding-window and recurrent layers
        trim what they recorded for a possible rollback (see dflash/runtime/rollback.py)."""
        self._rollback.rollback(cache, length)

    # --- ragged batches: rows of one cache, each owning some of its slots ----------------------

    def rollback_rows(self, cache: Any, keep: list[int]) -> None:
        """After a batched forward of one block per row: row r keeps `keep[r]` tokens of its
        block. Attention layers leave the rest as holes for the mask; recurrent layers are
        rolled back per row."""
        self._rollback.rollback_rows(cache, keep)

    def cache_merge(self, cache: Any, other: Any, pad_cache: int, pad_other: int) -> None:
        """Append the rows of `other` to `cache`, left-padding `cache` by `pad_cache` slots and
        `other` by `pad_other` (so both span the same length); padded slots hold zeros."""
        self._rollback.merge(cache, other, pad_cache, pad_other)

    def cache_gather(self, cache: Any, rows: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        """Keep `rows` of the cache, and of each only `slots` ([len(rows), n] slot indices)."""
        self._rollback.gather(cache, rows, slots)
