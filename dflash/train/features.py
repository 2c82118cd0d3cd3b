"""Frozen target features for training: one no-grad forward per sequence that runs only the
target layers the drafter reads, optionally cached on disk for later epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dflash.runtime.adapter import TargetAdapter


class TargetFeatures:
    """`features(ids)` -> [1, n, len(layer_ids) * hidden], exactly what decoding feeds the drafter.

    Layers past the deepest one read are skipped, except one: a Hugging Face decoder applies its
    final norm to the last hidden state it returns, so the deepest layer read must not be last.
    """

    def __init__(self, target: Any, layer_ids: list[int], cache_dir: str | Path | None = None) -> None:
        self.adapter = TargetAdapter.wrap(target, layer_ids)
        self.layer_ids = list(layer_ids)
        self.decoder = target.get_decoder() if hasattr(target, "get_decoder") else None
        self.keep = min(max(layer_ids) + 2, self.adapter.num_layers)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def compute(self, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Features of a few sequences (each ids: [n]) on the target's device, in one forward:
        right-padded, so causal attention keeps every real position blind to the padding."""
        n = max(len(ids) for ids in seqs)
        batch = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, ids in enumerate(seqs):
            batch[i, : len(ids)] = ids
        batch = batch.to(self.adapter.device)
        layers = getattr(self.decoder, "layers", None)
        if layers is None:  # an unusual layout: run the whole model
            out = self.adapter.model(input_ids=batch, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        else:
            self.decoder.layers = layers[: self.keep]
            try:
                out = self.decoder(input_ids=batch, output_hidden_states=True, use_cache=False)
            finally:
                self.decoder.layers = layers
        feats = torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1)
        return [feats[i: i + 1, : len(ids)] for i, ids in enumerate(seqs)]

    def many(self, seqs: list[torch.Tensor], keys: list[str | None]) -> list[torch.Tensor]:
        """Features of a few sequences ([1, n_i, F] each): cached ones from disk, the rest in one
        batched forward (stored in bfloat16 to halve the disk: a small, stated approximation)."""
        out = [self._load(ids, key) for ids, key in zip(seqs, keys)]
        missing = [i for i, f in enumerate(out) if f is None]
        if missing:
            for i, feats in zip(missing, self.compute([seqs[i] for i in missing])):
                out[i] = feats
                self._store(seqs[i], keys[i], feats)
        return out

    def __call__(self, ids: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """Features of one sequence, [1, n, F]."""
        return self.many([ids], [key])[0]

    def _path(self, ids: torch.Tensor, key: str | None) -> Path | None:
        if self.cache_dir is None or key is None:
            return None
        return self.cache_dir / f"{key.replace('/', '_')}-{len(ids)}.pt"

    def _load(self, ids: torch.Tensor, key: str | None) -> torch.Tensor | None:
        path = self._path(ids, key)
        if path is None or not path.exists():
            return None
        return torch.load(path).to(self.adapter.device, self.adapter.embedding.weight.dtype)

    def _store(self, ids: torch.Tensor, key: str | None, feats: torch.Tensor) -> None:
        path = self._path(ids, key)
        if path is not None:
            tmp = path.with_suffix(".tmp")
            torch.save(feats.to("cpu", torch.bfloat16).clone(), tmp)
            tmp.replace(path)
