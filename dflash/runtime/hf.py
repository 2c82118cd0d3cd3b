"""Runtimes over a Hugging Face causal LM: what they share (`ModelRuntime`: the facts, the
embedding table, the LM head, training features) and the transformers forward itself
(`TransformersRuntime`).

Any causal LM whose forward takes `past_key_values` and returns hidden states works; families
whose cache cannot be rolled back after a rejected draft are refused by name
(dflash/runtime/rollback.py).

A cache made for one row (`new_cache()`) is a transformers cache cut back by length after each
step. A cache made for several rows is a ragged batch: each row owns some slots of one
transformers cache (its prompt, left-padded to the batch's length when it joined, then the tokens
it kept of each block); rejected drafts stay behind as holes an attention mask hides, joining rows
are prefilled alone and merged in, leaving rows are gathered out, and the holes are squeezed out
when they outgrow the useful part. The engine sees none of it: it names rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from dflash.errors import UnsupportedTargetError
from dflash.runtime import buffers
from dflash.runtime.base import StepOutput, TargetInfo
from dflash.runtime.packed import PackedFp16Linear, rows_of, weight_of
from dflash.runtime.rollback import CacheRollback


def text_config(model: Any) -> Any:
    """The language model's config (multimodal models nest it)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


class ModelRuntime:
    """What every runtime over a transformers model shares: its facts, embedding table and LM
    head, the feature binding, and training features computed by the runtime's own prefill (so
    training sees the numbers decoding computes). Subclasses supply the cache and the forward."""

    exact_blocks = False  # blocks and single tokens may differ by float rounding (~1e-6)

    def __init__(self, model: Any) -> None:
        self.model = model  # the transformers model (export and training read it)
        config = text_config(model)
        self.embedding = model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise UnsupportedTargetError(f"{type(model).__name__} has no LM head: load it as a causal LM")
        self.info = TargetInfo(
            model_type=getattr(config, "model_type", type(model).__name__),
            name=getattr(model.config, "_name_or_path", "") or "",
            vocab_size=self.embedding.weight.shape[0], hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            max_positions=getattr(config, "max_position_embeddings", None) or 1 << 30,
            device=self.embedding.weight.device, dtype=self.embedding.weight.dtype,
            precision="fp16" if isinstance(self.head, PackedFp16Linear) else str(self.embedding.weight.dtype)[6:])
        self.feature_layers: tuple[int, ...] = ()
        self._vocab_head: tuple[torch.Tensor, Any] | None = None  # (vocabulary, its rows of the head)

    def bind(self, feature_layers: Sequence[int]) -> None:
        self.feature_layers = tuple(feature_layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def lm_head(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every token, or of the token ids in `vocab` only (in that order). The rows of
        a vocabulary are gathered once per runtime, not per call (a drafter's is fixed)."""
        hidden = hidden.to(self.info.dtype)
        if vocab is None:
            return self.head(hidden)
        if self._vocab_head is None or self._vocab_head[0] is not vocab:
            self._vocab_head = (vocab, rows_of(self.head, vocab))
        return self._vocab_head[1](hidden)

    def draft_rows(self, drafter: Any) -> None:
        """(The drafter's own pass runs beside torch targets.)"""
        return None

    def head_weight(self) -> torch.Tensor:
        """The weight the head computes with, as float32 (packed fp16: its fp16 values)."""
        return weight_of(self.head)

    @torch.no_grad()
    def features(self, seqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each sequence prefilled alone, as decoding prefills a prompt: [1, n_i, F] each."""
        out = []
        for ids in seqs:
            cache = self.new_cache()
            out.append(self.prefill(cache, ids.to(self.info.device))[1].features)
        return out

    def warmup(self, block_sizes: Sequence[int]) -> float:
        return 0.0  # nothing to prepare

    def new_cache(self, max_rows: int = 1) -> Any:  # pragma: no cover - subclasses
        raise NotImplementedError

    def prefill(self, cache: Any, ids: torch.Tensor, *, logits: bool = False) -> tuple[int, StepOutput]:
        raise NotImplementedError  # pragma: no cover


def step_output(logits: torch.Tensor, features: torch.Tensor | None, want_logits: bool) -> StepOutput:
    """A StepOutput of a forward's logits ([r, n, V]) and features."""
    return StepOutput(tokens=logits.argmax(-1), logits=logits if want_logits else None, features=features)


@dataclass
class TransformersCache:
    """A TransformersRuntime cache: the transformers cache and the rows' bookkeeping."""

    batched: bool                             # made for several rows (ragged, masked)
    hf: Any = None                            # the transformers cache; None while empty
    ids: list[int] = field(default_factory=list)       # row ids, in the cache's batch order
    lengths: list[int] = field(default_factory=list)   # committed tokens per row
    owned: torch.Tensor | None = None         # batched: [rows, slots] bool, the slots each row owns
    pending: Any = None                       # what the last step left for its commit
    ran: int = 0                              # tokens of that step; 0 once committed
    next_id: int = 0

    def index(self, rows: Sequence[int]) -> list[int]:
        """Batch positions of row ids."""
        try:
            return [self.ids.index(r) for r in rows]
        except ValueError:
            raise KeyError(f"rows {list(rows)}: this cache holds {self.ids}") from None


class TransformersRuntime(ModelRuntime):
    """The target's own transformers forward, behind the runtime interface."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.rollback = CacheRollback(model, self.info.model_type)  # refuses a cache it cannot roll back

    def new_cache(self, max_rows: int = 1) -> TransformersCache:
        return TransformersCache(batched=max_rows > 1)

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, hf: Any, logits_to_keep: int = 0, mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """(logits, features, what the rollback needs) of `ids` ([b, n]) after what `hf` holds. A
        ragged batch passes `mask` ([b, cached + n], 0 for slots a row does not own) and positions."""
        if mask is not None and self.rollback.windowed:
            mask = self.rollback.window_masks(hf, mask, ids.shape[1], self.info.dtype)
        pending = self.rollback.before_forward(hf)
        try:
            out = self.model(input_ids=ids, past_key_values=hf, use_cache=True, attention_mask=mask,
                             position_ids=positions, output_hidden_states=bool(self.feature_layers),
                             logits_to_keep=logits_to_keep)
        finally:
            self.rollback.after_forward()
        feats = torch.cat([out.hidden_states[i + 1] for i in self.feature_layers], -1) if self.feature_layers else None
        return out.logits, feats, pending

    def prefill(self, cache: TransformersCache, ids: torch.Tensor, *,
                logits: bool = False) -> tuple[int, StepOutput]:
        if cache.ran:
            raise RuntimeError("commit the last step before adding a row")
        if cache.ids and not cache.batched:
            raise ValueError("this cache holds one row: drop it, or make the cache with max_rows > 1")
        ids = ids.reshape(1, -1).to(self.info.device)
        n = ids.shape[1]
        hf = self.rollback.new_cache(cache.batched)
        out, feats, _ = self._forward(ids, hf, logits_to_keep=1)  # (a prompt is never rolled back)
        if cache.batched:
            self._join(cache, hf, n)
        else:
            cache.hf = hf
        row, cache.next_id = cache.next_id, cache.next_id + 1
        cache.ids.append(row)
        cache.lengths.append(n)
        return row, step_output(out, feats, logits)

    def _join(self, cache: TransformersCache, hf: Any, n: int) -> None:
        """Append a prefilled row to a ragged cache, left-padding the shorter side."""
        device = self.info.device
        if cache.hf is None:
            cache.hf, cache.owned = hf, torch.ones(1, n, dtype=torch.bool, device=device)
            return
        t = cache.owned.shape[1]
        self.rollback.merge(cache.hf, hf, max(0, n - t), max(0, t - n))
        pad = torch.zeros(len(cache.ids), max(0, n - t), dtype=torch.bool, device=device)
        mine = torch.cat([torch.zeros(1, max(0, t - n), dtype=torch.bool, device=device),
                          torch.ones(1, n, dtype=torch.bool, device=device)], dim=1)
        cache.owned = torch.cat([torch.cat([pad, cache.owned], dim=1), mine])

    def step(self, cache: TransformersCache, rows: Sequence[int], ids: torch.Tensor, *,
             logits: bool = False) -> StepOutput:
        """A ragged cache steps all of its rows at once (`rows` in any order)."""
        if cache.ran:
            raise RuntimeError("commit the last step first")
        order = cache.index(rows)
        if sorted(order) != list(range(len(cache.ids))):
            raise ValueError(f"a step runs every row of the cache {cache.ids}, got {list(rows)}")
        ids = ids.to(self.info.device)
        n = ids.shape[1]
        if cache.batched:
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            b = len(order)
            mask = torch.cat([cache.owned, torch.ones(b, n, dtype=torch.bool, device=cache.owned.device)], dim=1)
            starts = torch.tensor(cache.lengths, device=self.info.device)
            positions = starts[:, None] + torch.arange(n, device=self.info.device)
            out, feats, cache.pending = self._forward(ids[inverse.to(ids.device)], cache.hf, mask=mask.long(),
                                                      positions=positions)
            back = torch.tensor(order, device=out.device)
            out, feats = out[back], None if feats is None else feats[back]
        else:
            out, feats, cache.pending = self._forward(ids, cache.hf)
        cache.ran = n
        return step_output(out, feats, logits)

    def commit(self, cache: TransformersCache, rows: Sequence[int], keep: Sequence[int]) -> None:
        if not cache.ran:
            raise RuntimeError("nothing to commit: no step since the last commit")
        by_index = [0] * len(cache.ids)
        for i, k in zip(cache.index(rows), keep):
            if not 0 <= k <= cache.ran:
                raise ValueError(f"keep {k} is outside the step's 0..{cache.ran} tokens")
            by_index[i] = int(k)
        if cache.batched:
            self.rollback.rollback_rows(cache.hf, by_index, cache.pending)
            device = cache.owned.device
            kept = torch.arange(cache.ran, device=device) < torch.tensor(by_index, device=device)[:, None]
            cache.owned = torch.cat([cache.owned, kept], dim=1)
            self._compact(cache)
        else:
            self.rollback.rollback(cache.hf, cache.lengths[0] + by_index[0], cache.pending)
        cache.lengths = [n + k for n, k in zip(cache.lengths, by_index)]
        cache.pending, cache.ran = None, 0

    def drop(self, cache: TransformersCache, rows: Sequence[int]) -> None:
        """Also after a step that failed or was abandoned before its commit: its block is
        forgotten first, and if even that fails the cache is emptied (every row gone). Rows the
        cache no longer holds are ignored."""
        if cache.ran:
            try:
                self.commit(cache, cache.ids, [0] * len(cache.ids))
            except Exception:
                cache.ids = []
        keep = [i for i, row in enumerate(cache.ids) if row not in set(rows)]
        if not keep:
            cache.hf, cache.owned, cache.ids, cache.lengths, cache.pending, cache.ran = None, None, [], [], None, 0
            return
        if cache.batched:
            index = torch.tensor(keep, device=self.info.device)
            self.rollback.gather(cache.hf, index)
            cache.owned = cache.owned[index]
        cache.ids = [cache.ids[i] for i in keep]
        cache.lengths = [cache.lengths[i] for i in keep]

    def _compact(self, cache: TransformersCache) -> None:
        """Squeeze the holes out once they are most of the cache."""
        cache.owned, slots = buffers.compacted(cache.owned)
        if slots is not None:
            self.rollback.gather(cache.hf, torch.arange(len(cache.ids), device=self.info.device), slots)

