"""Frozen target features for training, computed by the target's runtime (the numbers decoding
feeds the drafter), optionally cached on disk for later epochs.

With `soft=True` the target's last layer (its final-normed hidden state, as every runtime hands
it out) rides along with the features: the target's own next-token distribution at each
position is then one product with the head away, for the soft-target loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dflash.runtime.loader import as_runtime


class TargetFeatures:
    """`features(ids)` -> [1, n, len(layer_ids) * hidden], exactly what decoding feeds the drafter:
    the runtime's own `features` (each sequence prefilled as decoding prefills a prompt), then the
    last layer's hidden state where `soft`. Binds those layers on the runtime."""

    def __init__(self, target: Any, layer_ids: list[int], cache_dir: str | Path | None = None,
                 soft: bool = False) -> None:
        self.runtime = as_runtime(target)
        self.layer_ids = list(layer_ids) + ([self.runtime.info.num_layers - 1] if soft else [])
        self.runtime.bind(self.layer_ids)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def compute(self, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Features of a few sequences (each ids: [n]) on the target's device."""
        if self.runtime.feature_layers != tuple(self.layer_ids):  # someone else bound the runtime since
            self.runtime.bind(self.layer_ids)
        return self.runtime.features(seqs)

    def many(self, seqs: list[torch.Tensor], keys: list[str | None]) -> list[torch.Tensor]:
        """Features of a few sequences ([1, n_i, F] each): cached ones from disk, the rest computed
        (stored in bfloat16 to halve the disk: a small, stated approximation)."""
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
        layers = "_".join(map(str, self.layer_ids))
        return self.cache_dir / f"{key.replace('/', '_')}-{len(ids)}-L{layers}.pt"

    def _load(self, ids: torch.Tensor, key: str | None) -> torch.Tensor | None:
        path = self._path(ids, key)
        if path is None or not path.exists():
            return None
        return torch.load(path).to(self.runtime.info.device, self.runtime.info.dtype)

    def _store(self, ids: torch.Tensor, key: str | None, feats: torch.Tensor) -> None:
        path = self._path(ids, key)
        if path is not None:
            tmp = path.with_suffix(".tmp")
            torch.save(feats.to("cpu", torch.bfloat16).clone(), tmp)
            tmp.replace(path)

