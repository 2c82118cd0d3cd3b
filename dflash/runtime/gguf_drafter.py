"""A DFlash drafter's pass through the native kernels, beside the native GGUF runtime.

Why: the drafter is one or two small layers, and run by torch each pass is ~70 small operators
(norms, rotary, attention, concatenations) at a few microseconds each: ~1.1 ms of a ~1.5 ms draft
pass on a 2-core CPU went to dispatching them, more than the products themselves. The native
pass (csrc/gguf_llama.cpp, `dfl_draft`) is one call: the drafter's linear layers in Q8_0 blocks
(what `QuantizedLinear` computes), everything else in float32, each row's draft cache a native
sequence of its own (rows joining and leaving need no masks or compaction).

Its drafts equal the torch drafter's up to float rounding (norms, rotary tables, attention sums);
drafts are checked by the target, so only acceptance could change, and outputs never do.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from dflash.runtime.gguf import _Config, library, set_linear, set_vector

from dflash.model.drafter import DFlashDraftModel, Drafts

if TYPE_CHECKING:
    from dflash.decode.step import Row

_BUILT: "weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], NativeDrafter]]" = weakref.WeakKeyDictionary()


def _q8_blocks(linear: torch.nn.Module) -> np.ndarray:
    """A linear layer's weight as Q8_0 blocks ([out, in / 32 * 34] bytes): a `QuantizedLinear`'s
    own, else quantised from the weight it computes with."""
    from gguf import GGMLQuantizationType, quants

    from dflash.runtime.packed import weight_of

    blocks = getattr(linear, "blocks", None)
    return blocks if blocks is not None else quants.quantize(weight_of(linear).numpy(), GGMLQuantizationType.Q8_0)


def supported(drafter: Any) -> bool:
    """Whether the native pass computes this drafter: a CPU drafter with the default rotary, no
    sliding window, no attention biases, widths the 32-value blocks divide, and the standard pass (a subclass that
    overrides `draft`, such as a test's oracle, keeps its own)."""
    if not isinstance(drafter, DFlashDraftModel) or type(drafter).draft is not DFlashDraftModel.draft:
        return False
    c = drafter.config
    widths = (c.hidden_size, len(c.target_layer_ids) * c.hidden_size, c.num_attention_heads * c.head_dim,
              c.intermediate_size)
    rope = (c.rope_scaling or {}).get("rope_type", "default")
    return (drafter.device.type == "cpu" and not c.use_swa and not c.attention_bias and rope == "default" and c.head_dim % 2 == 0
            and all(w % 32 == 0 for w in widths))


class NativeDrafter:
    """A drafter's weights loaded into a native model (`dfl_draft` runs it)."""

    def __init__(self, drafter: DFlashDraftModel) -> None:
        c = drafter.config
        self.lib = lib = library()
        self.config = _Config(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                              kv_heads=c.num_key_value_heads, head_dim=c.head_dim, ffn=c.intermediate_size,
                              vocab=0, neox_rope=1, eps=c.rms_norm_eps, rope_base=c.rope_theta)
        self.handle = lib.dfl_model_new(ctypes.byref(self.config))
        weakref.finalize(self, lib.dfl_model_free, self.handle)

        def linear(layer: int, which: int, modules: list[torch.nn.Module]) -> None:
            blocks = [_q8_blocks(m) for m in modules]
            if not set_linear(lib, self.handle, layer, which, ["Q8_0"] * len(blocks), blocks, modules[0].in_features):
                raise RuntimeError(f"the native kernels refused the drafter's linear layer {which} of layer {layer}")

        def vector(layer: int, which: int, values: torch.Tensor) -> None:
            set_vector(lib, self.handle, layer, which, values.detach().float().numpy())

        linear(-1, 5, [drafter.fc])
        vector(-1, 6, drafter.hidden_norm.weight)
        vector(-1, 5, drafter.norm.weight)
        for i, layer in enumerate(drafter.layers):
            attn, mlp = layer.self_attn, layer.mlp
            linear(i, 0, [attn.q_proj, attn.k_proj, attn.v_proj])
            linear(i, 1, [attn.o_proj])
            linear(i, 2, [mlp.gate_proj, mlp.up_proj])
            linear(i, 3, [mlp.down_proj])
            vector(i, 0, layer.input_layernorm.weight)
            vector(i, 1, layer.post_attention_layernorm.weight)
            vector(i, 2, attn.q_norm.weight)
            vector(i, 3, attn.k_norm.weight)

    @classmethod
    def of(cls, drafter: DFlashDraftModel) -> "NativeDrafter":
        """The native copy of `drafter`, built once and again only after its weights change."""
        version = tuple(p._version for p in drafter.parameters())
        built = _BUILT.get(drafter)
        if built is None or built[0] != version:
            built = (version, cls(drafter))
            _BUILT[drafter] = built
        return built[1]


def _free(lib: Any, seqs: list[int]) -> None:
    for seq in seqs:
        lib.dfl_seq_free(seq)
    seqs.clear()


class NativeDraftRows:
    """The draft caches of the rows being decoded, in their order (`DraftRows`' interface): one
    native sequence per row."""

    def __init__(self, drafter: DFlashDraftModel, runtime: Any) -> None:
        self.drafter, self.runtime = drafter, runtime
        self.native = NativeDrafter.of(drafter)
        self.lib = self.native.lib
        self.hidden = drafter.config.hidden_size
        self.seqs: list[int] = []
        weakref.finalize(self, _free, self.lib, self.seqs)

    def add(self) -> None:
        self.seqs.append(self.lib.dfl_seq_new())

    def keep(self, index: list[int]) -> None:
        keep = set(index)
        for i, seq in enumerate(self.seqs):
            if i not in keep:
                self.lib.dfl_seq_free(seq)
        self.seqs[:] = [self.seqs[i] for i in index]

    def compact(self) -> None:
        """(Nothing to squeeze: a row's cache is its own.)"""

    def draft(self, rows: Sequence["Row"], block: torch.Tensor) -> "Drafts":
        """One draft pass for every row (`block`: [rows, n], anchors then masks); each row's new
        context features go into its cache and are taken from the row."""
        b, n = block.shape
        full = self.drafter.full_block(block) if n < self.drafter.block_size else block
        counts = [0 if row.context is None else int(row.context.shape[0]) for row in rows]
        parts = [row.context.reshape(-1, row.context.shape[-1]) for row in rows if row.context is not None]
        features = torch.cat(parts).float().contiguous() if parts else torch.empty(0)
        for row in rows:
            row.context = None
        embeds = self.runtime.embed(full).float().contiguous()
        out = torch.empty(b, full.shape[1], self.hidden)
        vocab = self.drafter.draft_vocab
        head = self.runtime.head_rows(vocab)
        logits = torch.empty(b, n - 1, head.n)
        best = torch.empty(b, n - 1, dtype=torch.long)
        top = torch.empty(b, n - 1)
        code = self.lib.dfl_draft(self.native.handle, b, (ctypes.c_void_p * b)(*self.seqs),
                                  (ctypes.c_int * b)(*counts), features.data_ptr(), full.shape[1],
                                  embeds.data_ptr(), out.data_ptr(), head.handle, 1, n - 1,
                                  logits.data_ptr(), best.data_ptr(), top.data_ptr())
        if code != 0:
            raise RuntimeError(f"the native draft pass refused its arguments (code {code})")
        return Drafts(logits, vocab, self.runtime.info.vocab_size, best, top)
