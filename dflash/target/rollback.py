"""Rolling a target's cache back to the committed length after a partly rejected draft, for
every kind of layer a transformers cache holds.

- Full-attention layers drop the keys and values of the rejected positions.
- Sliding-window layers would have dropped keys that fell out of the window while the block
  was verified, and a crop could not bring them back. Their cache records its past
  (transformers' `activate_past_recording`) until the crop that follows each target forward,
  which removes the rejected positions and only then trims to the window: no key the window
  still needs is ever lost.
- Linear-attention (recurrent) layers, as in Qwen3.5 and Qwen3-Next (Gated DeltaNet), fold
  every token into one fixed-size state that cannot be cropped. Three correct ways exist:
  (1) snapshot the states, and on partial acceptance restore them and run the whole target
  again over the accepted tokens: a second full forward on almost every step;
  (2) keep the state after every block position: B copies of each state, and the chunked
  kernel used for a block does not expose them;
  (3) snapshot the states, and on partial acceptance restore them and advance only the
  linear-attention token mixers over the accepted tokens, from the inputs they received during
  verification (those inputs are exact: every layer below is causal, so a rejected token never
  influenced an accepted one).
  (3) costs one state clone per layer per step plus, on a partial acceptance, the token mixing
  of the recurrent layers over at most B tokens (no MLP, no attention layer, no LM head). It
  is what `CacheRollback` does.

A target whose cache holds any other kind of layer, or recurrent layers of a family whose
mixers have not been proven here, is refused by name rather than decoded wrongly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from dflash.errors import UnsupportedTargetError

FULL_LAYERS = {"DynamicLayer"}
WINDOW_LAYERS = {"DynamicSlidingWindowLayer"}
RECURRENT_LAYERS = {"LinearAttentionLayer"}
# Families whose recurrent mixers take (hidden_states, cache_params) and keep all of their
# state in the cache's conv/recurrent slots: proven by tests/target/test_families.py.
RECURRENT_FAMILIES = {"qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"}


@dataclass
class _Pending:
    """What one forward changed in the recurrent layers, kept until the rollback after it."""

    length: int                                                   # cached length before it
    states: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> mixer input


class CacheRollback:
    """Knows a target's cache layout: makes caches that can be rolled back, and rolls them back."""

    def __init__(self, model: Any, model_type: str) -> None:
        from transformers import DynamicCache

        self.model, self.model_type = model, model_type
        probe = DynamicCache(config=model.config)
        kinds = [type(layer).__name__ for layer in probe.layers]
        unknown = sorted(set(kinds) - FULL_LAYERS - WINDOW_LAYERS - RECURRENT_LAYERS)
        if unknown:
            raise UnsupportedTargetError(
                f"model type {model_type!r}: its cache holds {', '.join(unknown)} layers, which dflash cannot "
                "roll back after a rejected draft, so speculative decoding would be wrong; not supported")
        self.recording = any(k in WINDOW_LAYERS or k in RECURRENT_LAYERS for k in kinds)
        self.recurrent = [i for i, k in enumerate(kinds) if k in RECURRENT_LAYERS]
        self.mixers: dict[int, torch.nn.Module] = {}
        self._capture: dict[int, torch.Tensor] | None = None
        if self.recurrent:
            self._hook_mixers()

    def _hook_mixers(self) -> None:
        if self.model_type not in RECURRENT_FAMILIES:
            raise UnsupportedTargetError(
                f"model type {self.model_type!r}: its recurrent (linear-attention) layers cannot be rolled back "
                "after a rejected draft by dflash yet, so speculative decoding would be wrong; supported hybrid "
                f"families: {', '.join(sorted(RECURRENT_FAMILIES))}")
        for module in self.model.modules():
            idx = getattr(module, "layer_idx", None)
            if idx in self.recurrent and "cache_params" in inspect.signature(module.forward).parameters:
                self.mixers[idx] = module
                module.register_forward_pre_hook(self._record_input, with_kwargs=True)
        missing = sorted(set(self.recurrent) - set(self.mixers))
        if missing:
            raise UnsupportedTargetError(
                f"model type {self.model_type!r}: no recurrent mixer found for layers {missing}; cannot roll back")

    def _record_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._capture is not None:
            self._capture[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if self.recording:
            cache.activate_past_recording()
        return cache

    def before_forward(self, cache: Any) -> None:
        """Snapshot the recurrent states and start recording the mixers' inputs."""
        if not self.recurrent:
            return
        pending = _Pending(length=cache.get_seq_length())
        for i in self.recurrent:
            layer = cache.layers[i]
            if layer.is_recurrent_states_initialized[0]:
                pending.states[i] = (layer.conv_states[0].clone(), layer.recurrent_states[0].clone())
        cache.dflash_pending = pending
        self._capture = pending.inputs

    def after_forward(self) -> None:
        self._capture = None

    @torch.no_grad()
    def rollback(self, cache: Any, length: int) -> None:
        """Keep the first `length` positions. Called after every target forward (also when
        nothing was rejected: recorded pasts are trimmed back to what the next forward needs)."""
        surplus = cache.get_seq_length() - length
        if surplus < 0:
            raise ValueError(f"cannot roll a cache of {cache.get_seq_length()} positions forward to {length}")
        pending = cache.__dict__.pop("dflash_pending", None)
        cache.crop(-surplus)  # also trims recorded pasts (windows, conv states) to what is needed
        if not surplus or not self.recurrent:
            return
        if pending is None or len(pending.states) != len(self.recurrent):
            raise RuntimeError("a recurrent cache can only be rolled back right after a forward that extended it")
        self._readvance(cache, pending, length - pending.length)

    def _readvance(self, cache: Any, pending: _Pending, keep: int) -> None:
        """Put each recurrent layer back as it was before the forward, then advance it over the
        first `keep` tokens of that forward (the anchor and the accepted drafts)."""
        for i, (conv, state) in pending.states.items():
            layer = cache.layers[i]
            layer.conv_states[0] = conv
            layer.recurrent_states[0].copy_(state)
            if keep > 0:
                self.mixers[i](hidden_states=pending.inputs[i][:, :keep], cache_params=cache)
            layer.crop(0)  # trim the recorded conv past to the kernel width
