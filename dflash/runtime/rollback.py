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

import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from dflash.errors import UnsupportedTargetError
from dflash.runtime.buffers import regrow

FULL_LAYERS = {"DynamicLayer"}
WINDOW_LAYERS = {"DynamicSlidingWindowLayer"}
RECURRENT_LAYERS = {"LinearAttentionLayer"}
# Families whose recurrent mixers take (hidden_states, cache_params) and keep all of their
# state in the cache's conv/recurrent slots: proven by tests/runtime/test_families.py.
RECURRENT_FAMILIES = {"qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"}


@dataclass
class Pending:
    """What one forward changed in the recurrent layers, kept (by the caller, beside its cache)
    until the rollback after it."""

    length: int                                                   # cached length before it
    states: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> mixer input


class _Recorder:
    """A recurrent mixer's forward pre-hook: while `into` is set, it records the mixer's input
    there. One per mixer module however many runtimes wrap its model (kept in `_RECORDERS`, keyed
    weakly by the module), so wrapping a model again adds no hook."""

    def __init__(self) -> None:
        self.into: dict[int, torch.Tensor] | None = None

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.into is not None:
            self.into[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


_RECORDERS: "weakref.WeakKeyDictionary[torch.nn.Module, _Recorder]" = weakref.WeakKeyDictionary()


class CacheRollback:
    """Knows a target's cache layout: makes caches that can be rolled back, and rolls them back.

    Two kinds of cache: a sequence's own (`new_cache()`, cut back with `rollback`) and a
    batched one (`new_cache(batched=True)`) whose rows keep rejected drafts as masked holes:
    there, sliding-window layers keep every key (the window is applied by `window_masks`, in
    token positions, not cache slots) and recurrent layers are rolled back per row
    (`rollback_rows`)."""

    def __init__(self, model: Any, model_type: str) -> None:
        from transformers import DynamicCache

        self.model, self.model_type = model, model_type
        self.config = model.config.get_text_config(decoder=True)
        kinds = [type(layer).__name__ for layer in DynamicCache(config=model.config).layers]
        unknown = sorted(set(kinds) - FULL_LAYERS - WINDOW_LAYERS - RECURRENT_LAYERS)
        if unknown:
            raise UnsupportedTargetError(
                f"model type {model_type!r}: its cache holds {', '.join(unknown)} layers, which dflash cannot "
                "roll back after a rejected draft, so speculative decoding would be wrong; not supported")
        self.windowed = [i for i, k in enumerate(kinds) if k in WINDOW_LAYERS]
        self.recurrent = [i for i, k in enumerate(kinds) if k in RECURRENT_LAYERS]
        self.mixers: dict[int, torch.nn.Module] = {}
        self.recorders: list[_Recorder] = []
        self._scratch: Any = None  # a cache whose recurrent layers host rows being re-advanced
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
                if module not in _RECORDERS:
                    _RECORDERS[module] = _Recorder()
                    module.register_forward_pre_hook(_RECORDERS[module], with_kwargs=True)
                self.recorders.append(_RECORDERS[module])
        missing = sorted(set(self.recurrent) - set(self.mixers))
        if missing:
            raise UnsupportedTargetError(
                f"model type {self.model_type!r}: no recurrent mixer found for layers {missing}; cannot roll back")

    # --- caches ---------------------------------------------------------------------------------

    def new_cache(self, batched: bool = False) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, layer in enumerate(cache.layers):
            full = type(layer).__name__ in FULL_LAYERS
            if full or (batched and i in self.windowed):  # batched: keep every key; the mask applies the window
                cache.layers[i] = _growing_layer_class()()
        if self.recurrent or (self.windowed and not batched):
            cache.activate_past_recording()
        return cache

    def window_masks(self, cache: Any, slots: torch.Tensor, n_new: int, dtype: torch.dtype) -> Any:
        """Attention masks for a batched forward over a cache with holes: `slots` ([b, cached +
        n_new], 1 where a row owns the slot) gives each slot's token position (slots are owned
        in position order); sliding-window layers see the keys within their window counted in
        those positions. Returns what the model takes as `attention_mask`."""
        from transformers.masking_utils import create_causal_mask

        positions = slots.long().cumsum(1) - 1
        window = self.config.sliding_window

        def in_window(batch_idx, head_idx, q_idx, kv_idx):
            return positions[batch_idx, kv_idx] > positions[batch_idx, q_idx] - window

        embeds = torch.empty(slots.shape[0], n_new, 0, dtype=dtype, device=slots.device)
        common = dict(config=self.config, inputs_embeds=embeds, attention_mask=slots, past_key_values=cache)
        windowed = create_causal_mask(**common, and_mask_function=in_window)
        types = set(getattr(self.config, "layer_types", None) or [])
        if len(types) <= 1:
            return windowed
        full = create_causal_mask(**common)
        return {t: windowed if t == "sliding_attention" else full for t in types}

    # --- one forward and what follows it ------------------------------------------------------------

    def before_forward(self, cache: Any) -> Pending | None:
        """Snapshot the recurrent states and start recording the mixers' inputs; the caller
        keeps what this returns for the rollback after the forward (None: nothing to keep)."""
        if not self.recurrent:
            return None
        pending = Pending(length=cache.get_seq_length())
        for i in self.recurrent:
            layer = cache.layers[i]
            if layer.is_recurrent_states_initialized[0]:
                pending.states[i] = (layer.conv_states[0].clone(), layer.recurrent_states[0].clone())
        for recorder in self.recorders:
            recorder.into = pending.inputs
        return pending

    def after_forward(self) -> None:
        for recorder in self.recorders:
            recorder.into = None

    @torch.no_grad()
    def rollback(self, cache: Any, length: int, pending: Pending | None = None) -> None:
        """Keep the first `length` positions of a sequence's cache. Called after every target
        forward with what `before_forward` returned (also when nothing was rejected: recorded
        pasts are trimmed back to what the next forward needs)."""
        surplus = cache.get_seq_length() - length
        if surplus < 0:
            raise ValueError(f"cannot roll a cache of {cache.get_seq_length()} positions forward to {length}")
        if not self.recurrent:
            if surplus or self.windowed:
                cache.crop(-surplus)  # also trims the windows' recorded past
            return
        pending = self._checked(pending)
        if surplus:
            for i, layer in enumerate(cache.layers):
                if i not in pending.states:  # attention layers; recurrent ones are re-advanced
                    layer.crop(-surplus)
        self._readvance(cache, pending, [length - pending.length])

    @torch.no_grad()
    def rollback_rows(self, cache: Any, keep: list[int], pending: Pending | None = None) -> None:
        """Batched cache after a forward of one block per row: row r keeps the first `keep[r]`
        tokens of its block. Attention layers keep the rest as holes (the caller masks them);
        recurrent layers are put back as if only the kept tokens had run."""
        if self.recurrent:
            self._readvance(cache, self._checked(pending), keep)

    def _checked(self, pending: Pending | None) -> Pending:
        if pending is None or len(pending.states) != len(self.recurrent):
            raise RuntimeError("a recurrent cache can only be rolled back right after a forward that extended it")
        return pending

    def _readvance(self, cache: Any, pending: Pending, keep: list[int]) -> None:
        """Rows that kept fewer tokens than the forward ran: put each recurrent layer back as it
        was before the forward, then advance it over those rows' kept tokens (the anchor and the
        accepted drafts). Rows with equal counts advance together."""
        from transformers import DynamicCache

        ran = next(iter(pending.inputs.values())).shape[1]
        rows_by_keep: dict[int, list[int]] = {}
        for row, k in enumerate(keep):
            if k < ran:
                rows_by_keep.setdefault(k, []).append(row)
        if not rows_by_keep:  # all accepted in full: only trim the recorded conv past
            for i in pending.states:
                layer = cache.layers[i]
                layer.conv_states[0] = layer.conv_states[0][..., -layer.conv_kernel_size[0]:]
            return
        device = next(iter(pending.inputs.values())).device
        groups = [(k, torch.tensor(rows, device=device)) for k, rows in rows_by_keep.items()]
        if self._scratch is None:
            self._scratch = DynamicCache(config=self.model.config)
        for i, (conv_before, state_before) in pending.states.items():
            layer = cache.layers[i]
            width = layer.conv_kernel_size[0]
            conv, state = layer.conv_states[0][..., -width:].clone(), layer.recurrent_states[0]
            for k, index in groups:
                part = _layer_holding(self._scratch.layers[i], conv_before[index], state_before[index], width)
                self.mixers[i](hidden_states=pending.inputs[i][index, :k], cache_params=self._scratch)
                conv[index] = _fit_width(part.conv_states[0], width)
                state[index] = part.recurrent_states[0]
            layer.conv_states[0] = conv  # the recorded past, trimmed to the kernel width

    # --- batched caches: rows joining and leaving ---------------------------------------------------

    def merge(self, cache: Any, other: Any, pad_cache: int, pad_other: int) -> None:
        """Append the rows of `other` to `cache`. Attention layers: left-pad `cache` by
        `pad_cache` slots and `other` by `pad_other` (so both span the same length; padded slots
        hold zeros). Recurrent layers: stack the states (conv states at the kernel width)."""
        def pad(t: torch.Tensor, n: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, 0, n, 0)) if n else t

        for i, (mine, theirs) in enumerate(zip(cache.layers, other.layers)):
            if i in self.recurrent:
                width = mine.conv_kernel_size[0]
                mine.conv_states[0] = torch.cat([_fit_width(mine.conv_states[0], width),
                                                 _fit_width(theirs.conv_states[0], width)])
                mine.recurrent_states[0] = torch.cat([mine.recurrent_states[0], theirs.recurrent_states[0]])
            else:
                mine.keys = torch.cat([pad(mine.keys, pad_cache), pad(theirs.keys, pad_other)])
                mine.values = torch.cat([pad(mine.values, pad_cache), pad(theirs.values, pad_other)])

    def gather(self, cache: Any, rows: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        """Keep `rows` of the cache, and of each only `slots` ([len(rows), n] slot indices) in
        the attention layers (recurrent layers have no slots)."""
        for i, layer in enumerate(cache.layers):
            if i in self.recurrent:
                layer.conv_states[0] = layer.conv_states[0][rows]
                layer.recurrent_states[0] = layer.recurrent_states[0][rows]
                continue
            for name in ("keys", "values"):
                t = getattr(layer, name)[rows]
                if slots is not None:
                    index = slots.to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                    t = torch.gather(t, 2, index)
                setattr(layer, name, t)


@functools.cache
def _growing_layer_class() -> type:
    """A full-attention cache layer that appends in place into spare room (doubling when full)
    instead of concatenating: transformers' `DynamicLayer` copies the whole past on every
    forward, which on a CPU costs more than the attention itself once the context is a few
    hundred tokens long. `keys`/`values` stay views of the filled part, so crops (a view of
    fewer positions) and the batched engine's merges and gathers (new tensors, adopted as the
    next buffer) work unchanged."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self._room: tuple[torch.Tensor, torch.Tensor] | None = None

        def room_for(self, new: int, key_like: torch.Tensor, value_like: torch.Tensor,
                     step: int = 256) -> tuple[torch.Tensor, torch.Tensor, int]:
            """(keys buffer, values buffer, n filled): buffers holding the n cached positions with
            room for `new` more, for states shaped like the `*_like` ([batch, heads, *, dim]);
            a new buffer's capacity is a multiple of `step`."""
            if not self.is_initialized:
                self.lazy_initialization(key_like, value_like)
            n = self.get_seq_length()
            room = self._room
            if room is None or room[0].shape[:2] != key_like.shape[:2] or (
                    n and self.keys.data_ptr() != room[0].data_ptr()):  # new tensors (a merge, a gather)
                room = (self.keys, self.values) if n else (None, None)
            self._room = tuple(regrow(buffer, n, n + new, step, like)
                               for buffer, like in zip(room, (key_like, value_like)))
            return self._room[0], self._room[1], n

        def filled(self, length: int) -> None:
            """The first `length` positions of the buffers are the cache (after writing into them)."""
            self.keys, self.values = self._room[0][..., :length, :], self._room[1][..., :length, :]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            new = key_states.shape[-2]
            keys, values, n = self.room_for(new, key_states, value_states)
            keys[..., n:n + new, :] = key_states
            values[..., n:n + new, :] = value_states
            self.filled(n + new)
            return self.keys, self.values

    return GrowingLayer


def _fit_width(conv: torch.Tensor, width: int) -> torch.Tensor:
    """A conv state of exactly `width` columns (short histories are zeros on the left, as the
    causal convolution pads them)."""
    conv = conv[..., -width:]
    return torch.nn.functional.pad(conv, (width - conv.shape[-1], 0)) if conv.shape[-1] < width else conv


def _layer_holding(layer: Any, conv: torch.Tensor, state: torch.Tensor, width: int) -> Any:
    """Load some rows' conv and recurrent states into a scratch recurrent cache layer."""
    layer.record_past = True
    layer.conv_states[0], layer.recurrent_states[0] = conv.clone(), state.clone()
    layer.conv_kernel_size[0], layer.device, layer.dtype = width, conv.device, conv.dtype
    layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
    layer.has_previous_state[0] = True
    return layer
