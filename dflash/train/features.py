"""Frozen target features for training: one no-grad forward per sequence that runs only the
target layers the drafter reads, optionally cached on disk for later epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dflash.target.adapter import TargetAdapter


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
    def compute(self, ids: torch.Tensor) -> torch.Tensor:
        """Features of one sequence (ids: [n]) on the target's device."""
        ids = ids[None].to(self.adapter.device)
        layers = getattr(self.decoder, "layers", None)
        if layers is None:  # an unusual layout: run the whole model
            out = self.adapter.model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        else:
            self.decoder.layers = layers[: self.keep]
            try:
                out = self.decoder(input_ids=ids, output_hidden_states=True, use_cache=False)
            finally:
                self.decoder.layers = layers
        return torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1)

    def __call__(self, ids: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """Features of one sequence, from the disk cache when `key` was computed before (stored
        in bfloat16 to halve the disk: a small, stated approximation)."""
        if self.cache_dir is None or key is None:
            return self.compute(ids)
        path = self.cache_dir / f"{key.replace('/', '_')}-{len(ids)}.pt"
        if path.exists():
            return torch.load(path).to(self.adapter.device, self.adapter.embedding.weight.dtype)
        feats = self.compute(ids)
        tmp = path.with_suffix(".tmp")
        torch.save(feats.to("cpu", torch.bfloat16), tmp)
        tmp.replace(path)
        return feats
