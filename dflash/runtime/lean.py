"""A lean forward for Llama-architecture targets on CPU with fp16 weights (`--cpu-weights fp16`).

Why: once the weights are half-size (dflash/runtime/packed.py), a one-token forward of
SmolLM2-135M spends more time outside the matrix products than in them: ~210 small operators
and their Python dispatch per forward (seven linear calls, two RMSNorms, RoPE on q and k
separately, masks, output bookkeeping per layer). This forward computes the same function with
fewer, larger operators:
- q, k and v in one packed GEMM, gate and up in another (the weights concatenated once);
- RoPE applied to the q and k heads together, RMSNorm through `torch.nn.functional.rms_norm`;
- attention by `scaled_dot_product_attention` with grouped heads, a mask only when a block of
  several tokens follows a cache;
- hidden states kept only for the layers the drafter reads, the LM head only on the positions
  asked for.
It keeps its own cache (`LeanCache`: fixed-capacity buffers and one length, so a step's cache
bookkeeping is a few integer updates). `LeanRuntime` puts it behind the runtime interface
(dflash/runtime/base.py), one LeanCache per row.

It is the fp16 target's own forward: verification and plain decoding both go through it, so
speculative decoding stays exact against plain decoding of this model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from dflash.errors import DFlashError
from dflash.runtime import native
from dflash.runtime.base import StepOutput
from dflash.runtime.buffers import grown, regrow
from dflash.runtime.hf import ModelRuntime, step_output
from dflash.runtime.packed import PackedFp16Linear, weight_of

LEAN_MODEL_TYPES = {"llama"}
COMPILED_MAX_TOKENS = 16  # longer inputs (prompts) take the eager forward
COMPILED_CAPACITY_STEP = 2048  # cache buffers of compiled graphs grow by this (a new graph each time)
EAGER_CAPACITY_STEP = 256
ROPE_TABLE_STEP = 2048


def _fused(*linears: torch.nn.Module) -> PackedFp16Linear:
    """One packed GEMM computing the (bias-free) linears' outputs side by side."""
    return PackedFp16Linear(torch.cat([weight_of(lin) for lin in linears]))


class LeanLayer:
    """One decoder layer's weights as the lean forward uses them (fused, packed)."""

    def __init__(self, layer: Any, config: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fused(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o, self.down = _fused(attn.o_proj), _fused(mlp.down_proj)
        self.gate_up = _fused(mlp.gate_proj, mlp.up_proj)
        self.norm_in = layer.input_layernorm.weight.detach()
        self.norm_post = layer.post_attention_layernorm.weight.detach()
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.intermediate = config.intermediate_size
        self.scaling = attn.scaling
        self.index = attn.layer_idx


class LeanLlama:
    """The forward of a Llama-architecture causal LM for one or more rows of equal length
    (no padding mask), fed and read like the transformers model by `LeanRuntime`."""

    def __init__(self, model: Any) -> None:
        config = model.config
        bad = [name for name in ("q_proj", "k_proj", "v_proj", "o_proj")
               if getattr(model.model.layers[0].self_attn, name).bias is not None]
        if bad or getattr(config, "mlp_bias", False) or config.hidden_act != "silu":
            raise ValueError("the lean forward covers bias-free SiLU Llama layers only")
        self.config = config
        self.embedding = model.get_input_embeddings()
        self.rotary = model.model.rotary_emb
        self.layers = [LeanLayer(layer, config) for layer in model.model.layers]
        self.norm = model.model.norm.weight.detach()
        self.eps = config.rms_norm_eps
        self.head = model.get_output_embeddings()
        self.kv_heads = config.num_key_value_heads
        self.head_dim = self.layers[0].head_dim
        # the cache write + attention: the native operator where loaded (before packing, so the
        # linears hold native slots too), else the same calls from Python
        self.attend = torch.ops.dflash_native.attend_cached if native.loaded() else _attend_cached
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.compiled = None
        self.compile_seconds: dict[tuple, float] = {}  # per compiled input shape

    def compile(self) -> None:
        """Run the layers as a `torch.compile`d graph: inductor fuses the small operators
        between the matrix products (which stay fbgemm's, called through the native
        `dflash_native::linear_fp16`, dflash/runtime/native.py) and drops their Python dispatch.
        Blocks of up to COMPILED_MAX_TOKENS tokens use it (one graph per block length, compiled on
        first use and cached on disk by inductor); prompts keep the eager forward."""
        import os

        import torch._dynamo

        from dflash.runtime.loader import cache_dir

        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        # kept across sessions. torch writes its /tmp default into the variable the first time it
        # asks (loading the target already does), so only a value other than that is the user's
        current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
        linears = [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        if any(getattr(linear, "slot", None) is None for linear in linears + [self.head]):
            raise RuntimeError("compiling needs the target packed after dflash's native operators loaded "
                               "(apply_cpu_weights(model, 'fp16', compile=True) does it in that order)")
        limit = torch._dynamo.config.recompile_limit  # one graph per block length and capacity
        torch._dynamo.config.recompile_limit = max(limit, 4 * COMPILED_MAX_TOKENS)
        self.compiled = torch.compile(self._run, dynamic=False, options={"split_reductions": False})

    def new_cache(self) -> "LeanCache":
        """An empty cache for one sequence of this forward (rolled back by length)."""
        step = COMPILED_CAPACITY_STEP if self.compiled is not None else EAGER_CAPACITY_STEP
        return LeanCache(len(self.layers), self.kv_heads, self.head_dim, self.norm.dtype, self.norm.device, step)

    def rope(self, past: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ([1, n, 1, head_dim]) of positions past..past+n-1, sliced from a table
        computed once by the model's own rotary module (per position, the same numbers as
        calling it on those positions: ~0.3 ms a step saved)."""
        if self._rope_table is None or past + n > self._rope_table[0].shape[1]:
            positions = torch.arange(grown(past + n, ROPE_TABLE_STEP), device=self.norm.device)
            cos, sin = self.rotary(self.norm, positions[None])  # (the first argument only gives the dtype)
            self._rope_table = (cos.unsqueeze(2), sin.unsqueeze(2))
        cos, sin = self._rope_table
        return cos[:, past:past + n], sin[:, past:past + n]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: "LeanCache", logits_to_keep: int = 0,
                 feature_layers: list[int] | tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits of the last `logits_to_keep` positions or all, hidden states after each
        layer in `feature_layers`) for `ids` ([b, n]) following what `cache` holds."""
        b, n = ids.shape
        past = cache.length
        compiled = self.compiled is not None and n <= COMPILED_MAX_TOKENS and past > 0  # steps, not prompts
        rooms = cache.room_for(b, n)  # each layer's key/value buffers, with room for n more positions
        positions = torch.arange(past, past + n, device=ids.device)
        cos, sin = self.rope(past, n)
        mask = None
        if n > 1 and past:  # a block after a cache: each token sees the past, itself and the block before it
            mask = torch.arange(cache.capacity, device=ids.device) <= positions[:, None]
        feature_layers = tuple(feature_layers)
        hidden = self.embedding(ids)  # (outside the graph: `ids` may be a view with any strides)
        args = (hidden, cos, sin, mask, rooms, positions, logits_to_keep, feature_layers)
        shape = (b, n, cache.capacity, logits_to_keep, feature_layers) if compiled else None
        if not compiled:
            logits, features = self._run(*args)
        elif shape in self.compile_seconds:
            logits, features = self.compiled(*args)
        else:  # the first call of a shape compiles it (or reads it from inductor's disk cache)
            start = time.perf_counter()
            logits, features = self.compiled(*args)
            self.compile_seconds[shape] = time.perf_counter() - start
        cache.length = past + n
        return logits, features

    def _run(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
             rooms: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor, logits_to_keep: int,
             feature_layers: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The layers over the embedded tokens `hidden` ([b, n, hidden]), each writing its new
        keys and values into its buffers at `positions`."""
        b, n = hidden.shape[:2]
        features = {}
        for layer, (keys, values) in zip(self.layers, rooms):
            x = F.rms_norm(hidden, (hidden.shape[-1],), layer.norm_in, layer.eps)
            qkv = layer.qkv(x).view(b, n, layer.heads + 2 * layer.kv_heads, layer.head_dim)
            qk, v = qkv[:, :, : layer.heads + layer.kv_heads], qkv[:, :, layer.heads + layer.kv_heads:]
            half = layer.head_dim // 2
            qk = (qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin).transpose(1, 2)
            out = self.attend(qk[:, : layer.heads], qk[:, layer.heads:], v.transpose(1, 2), keys, values,
                         positions, mask, layer.scaling)
            hidden = hidden + layer.o(out.transpose(1, 2).reshape(b, n, layer.heads * layer.head_dim))
            x = F.rms_norm(hidden, (hidden.shape[-1],), layer.norm_post, layer.eps)
            gate, up = layer.gate_up(x).split(layer.intermediate, dim=-1)
            hidden = hidden + layer.down(F.silu(gate) * up)
            if layer.index in feature_layers:
                features[layer.index] = hidden
        hidden = F.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.eps)
        if len(self.layers) - 1 in feature_layers:  # transformers reports the last layer's state normed
            features[len(self.layers) - 1] = hidden
        logits = self.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return logits, [features[i] for i in feature_layers]


class LeanCache:
    """The lean forward's cache: every layer's keys and values in buffers of one capacity, and
    one length for all layers. Why not a transformers cache: there each layer holds views of its
    filled part, and remaking 60 views after every forward and 60 more at every rollback cost
    ~1 ms a step on the 2-core CPU. Here a forward and a rollback move one integer."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 step: int) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device, self.step = dtype, device, step
        self.length = 0
        self.rooms: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: keys, values [b, kv_heads, capacity, d]

    @property
    def capacity(self) -> int:
        return self.rooms[0][0].shape[2] if self.rooms else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def room_for(self, batch: int, new: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The buffers, with room for `new` positions after the cached ones (regrown by
        dflash/runtime/buffers.py's rule, the cached positions copied over, when they have not)."""
        rows = self.rooms[0][0].shape[0] if self.rooms else batch
        if rows != batch and self.length:
            raise ValueError(f"this cache holds {rows} rows; got {batch}")
        if rows != batch:
            self.rooms = []
        like = torch.empty(batch, self.kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
        old = self.rooms or [(None, None)] * self.num_layers
        self.rooms = [(regrow(keys, self.length, self.length + new, self.step, like),
                       regrow(values, self.length, self.length + new, self.step, like)) for keys, values in old]
        return self.rooms

    def keys(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s cached keys ([b, kv_heads, length, d])."""
        return self.rooms[layer][0][:, :, :self.length]

    def values(self, layer: int) -> torch.Tensor:
        return self.rooms[layer][1][:, :, :self.length]


def _attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   positions: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Write the new keys/values ([b, kv_heads, n, d]) into the cache buffers at `positions`
    (consecutive) and attend over everything cached up to the last of them. `mask` ([n,
    capacity]) for a block after a cache; none for one token, causal for a prompt. (Where the
    native operators are loaded, their `attend_cached` does this: the same calls in C++.)"""
    past, n = int(positions[0]), k.shape[2]
    keys[:, :, past:past + n] = k
    values[:, :, past:past + n] = v
    return F.scaled_dot_product_attention(
        q, keys[:, :, :past + n], values[:, :, :past + n], attn_mask=None if mask is None else mask[:, :past + n],
        scale=scale, is_causal=mask is None and n > 1, enable_gqa=True)


@dataclass
class LeanRows:
    """A LeanRuntime cache: one LeanCache per row, and the tokens the last step ran per row."""

    rows: dict[int, LeanCache] = field(default_factory=dict)
    ran: dict[int, int] = field(default_factory=dict)
    next_id: int = 0


class LeanRuntime(ModelRuntime):
    """The lean fp16 forward of a packed Llama-architecture target behind the runtime interface.

    A step runs its rows one after another, each on its own cache: a row's numbers then never
    depend on the other rows (fbgemm's AVX2 kernels change an ulp or two with the row count), so
    a row decodes in a batch exactly as alone, rows of any lengths need no padding mask, and the
    compiled graphs keep their one-row shapes. (Batching rows into one product is the faster
    layout for many rows; it would need per-row attention and would give up that exactness.)"""

    def __init__(self, model: Any, compile: bool = False) -> None:
        super().__init__(model)
        self.lean = LeanLlama(model)
        if compile:
            self.lean.compile()

    def new_cache(self, max_rows: int = 1) -> LeanRows:
        return LeanRows()

    def _run(self, row: LeanCache, ids: torch.Tensor, logits_to_keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, kept = self.lean(ids, row, logits_to_keep, self.feature_layers)
        return logits, torch.cat(kept, dim=-1) if kept else None

    def prefill(self, cache: LeanRows, ids: torch.Tensor, *, logits: bool = False) -> tuple[int, StepOutput]:
        row = self.lean.new_cache()
        out, feats = self._run(row, ids.reshape(1, -1).to(self.info.device), 1)
        rid, cache.next_id = cache.next_id, cache.next_id + 1
        cache.rows[rid] = row
        return rid, step_output(out, feats, logits)

    def step(self, cache: LeanRows, rows: Sequence[int], ids: torch.Tensor, *, logits: bool = False) -> StepOutput:
        if cache.ran:
            raise RuntimeError("commit the last step first")
        outs = [self._run(cache.rows[r], ids[i:i + 1], 0) for i, r in enumerate(rows)]
        cache.ran = {r: ids.shape[1] for r in rows}
        if len(outs) == 1:  # (the single-sequence engine: no copies)
            return step_output(*outs[0], logits)
        feats = None if outs[0][1] is None else torch.cat([f for _, f in outs])
        return step_output(torch.cat([o for o, _ in outs]), feats, logits)

    def commit(self, cache: LeanRows, rows: Sequence[int], keep: Sequence[int]) -> None:
        for r, k in zip(rows, keep):
            ran = cache.ran.pop(r)
            if not 0 <= k <= ran:
                raise ValueError(f"keep {k} is outside the step's 0..{ran} tokens")
            cache.rows[r].length -= ran - int(k)
        if cache.ran:
            raise ValueError(f"rows {sorted(cache.ran)} ran in the step and were not committed")

    def drop(self, cache: LeanRows, rows: Sequence[int]) -> None:
        """Also after a step abandoned before its commit (its block is forgotten); rows the cache
        no longer holds are ignored."""
        if cache.ran:
            self.commit(cache, list(cache.ran), [0] * len(cache.ran))
        for r in rows:
            cache.rows.pop(r, None)

    def warmup(self, block_sizes: Sequence[int]) -> float:
        """Compile (or read from inductor's disk cache) every step shape a decoding with the bound
        features will ask for: each block length in `block_sizes` (a threshold or the token budget
        can shorten a block). Returns the seconds it took; nothing to do when not compiled."""
        if self.lean.compiled is None:
            return 0.0
        start = time.perf_counter()
        cache = self.new_cache()
        row, _ = self.prefill(cache, torch.zeros(COMPILED_MAX_TOKENS + 1, dtype=torch.long))  # (eager)
        for n in sorted(set(block_sizes)):
            self.step(cache, [row], torch.zeros(1, n, dtype=torch.long, device=self.info.device))
            self.commit(cache, [row], [0])
        return time.perf_counter() - start


def lean_runtime(model: Any, compile: bool = False) -> LeanRuntime | None:
    """The lean runtime of a packed fp16 CPU target, or None where the lean forward does not
    apply (other architectures keep the transformers forward; `compile` then is refused)."""
    runtime = None
    if getattr(model.config, "model_type", None) in LEAN_MODEL_TYPES:
        try:
            runtime = LeanRuntime(model, compile)
        except (ValueError, AttributeError):
            pass
    if runtime is None and compile:
        raise DFlashError(f"--compile covers Llama-architecture targets (the lean forward), not "
                          f"{getattr(model.config, 'model_type', type(model).__name__)!r}")
    return runtime
