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
bookkeeping is a few integer updates) and serves the single-sequence engine; the batched engine,
with its ragged masks and per-layer caches, keeps the transformers forward.

It is the fp16 target's own forward: verification and plain decoding both go through it, so
speculative decoding stays exact against plain decoding of this model.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from dflash.runtime import native
from dflash.runtime.packed import PackedFp16Linear, weight_of

LEAN_MODEL_TYPES = {"llama"}
COMPILED_MAX_TOKENS = 16  # longer inputs (prompts) take the eager forward
COMPILED_CAPACITY_STEP = 2048  # cache buffers of compiled graphs grow by this (a new graph each time)
EAGER_CAPACITY_STEP = 256
ROPE_TABLE_STEP = 2048


def _grown(needed: int, step: int) -> int:
    """A new buffer's size: twice what is needed, rounded up to a multiple of `step`."""
    return -(-2 * needed // step) * step


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
    (no padding mask), fed and read like the transformers model by `TargetAdapter`."""

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
        """An empty cache for this forward (the single-sequence engine's; rolled back by length)."""
        step = COMPILED_CAPACITY_STEP if self.compiled is not None else EAGER_CAPACITY_STEP
        return LeanCache(len(self.layers), self.kv_heads, self.head_dim, self.norm.dtype, self.norm.device, step)

    def rope(self, past: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ([1, n, 1, head_dim]) of positions past..past+n-1, sliced from a table
        computed once by the model's own rotary module (per position, the same numbers as
        calling it on those positions: ~0.3 ms a step saved)."""
        if self._rope_table is None or past + n > self._rope_table[0].shape[1]:
            positions = torch.arange(_grown(past + n, ROPE_TABLE_STEP), device=self.norm.device)
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
    ~1 ms a step on the 2-core CPU. Here a forward and a rollback move one integer. It answers
    what `CacheRollback.rollback` asks of a cache (`get_seq_length`, `crop`)."""

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

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions; a negative value drops that many (as
        transformers' caches read it)."""
        self.length = max(0, self.length + max_length if max_length < 0 else min(self.length, max_length))

    def room_for(self, batch: int, new: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The buffers, with room for `new` positions after the cached ones (grown to a multiple of
        `step`, the cached positions copied over, when they have not)."""
        rows = self.rooms[0][0].shape[0] if self.rooms else batch
        if rows != batch and self.length:
            raise ValueError(f"this cache holds {rows} rows; got {batch}")
        if rows != batch or self.length + new > self.capacity:
            shape = (batch, self.kv_heads, _grown(self.length + new, self.step), self.head_dim)
            rooms = [(torch.empty(shape, dtype=self.dtype, device=self.device),
                      torch.empty(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]
            for (keys, values), (old_keys, old_values) in zip(rooms, self.rooms if self.length else []):
                keys[:, :, :self.length] = old_keys[:, :, :self.length]
                values[:, :, :self.length] = old_values[:, :, :self.length]
            self.rooms = rooms
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


def compile_steps(model: Any, feature_layers: list[int] | None, block_size: int) -> float:
    """Run every step shape a decoding will ask of a compiled target once, so compilation
    happens here rather than mid-stream: plain one-token steps, and with a drafter's
    `feature_layers` every block length up to `block_size` (a threshold or the token budget can
    shorten a block). Returns the seconds it took."""
    from dflash.runtime.adapter import TargetAdapter

    start = time.perf_counter()
    runs = [([], [1])] + ([(feature_layers, range(1, block_size + 1))] if feature_layers else [])
    prompt = torch.zeros(1, COMPILED_MAX_TOKENS + 1, dtype=torch.long, device=model.device)  # eager
    for layer_ids, lengths in runs:
        adapter = TargetAdapter(model, layer_ids)
        cache = adapter.new_cache()
        adapter.forward(prompt, cache, logits_to_keep=1, features=bool(layer_ids))
        for n in lengths:
            adapter.forward(prompt[:, :n], cache, features=bool(layer_ids))
            adapter.rollback(cache, prompt.shape[1])
    return time.perf_counter() - start


def lean_forward_for(model: Any) -> LeanLlama | None:
    """The lean forward of a packed fp16 CPU target (its weights are the packed ones, fused),
    or None where it does not apply (other architectures keep the transformers forward)."""
    if getattr(model.config, "model_type", None) not in LEAN_MODEL_TYPES:
        return None
    try:
        return LeanLlama(model)
    except (ValueError, AttributeError):
        return None
