"""The native GGUF runtime: a Llama-architecture target run from its GGUF file, its linear
weights kept in the file's block quantisation (Q4_0, Q4_1, Q8_0), one native call per decoding
step (csrc/gguf_llama.cpp, built once with the machine's C++ compiler).

Why: on a CPU a decoding step is bound by reading the weights, and a block drafter wants a step
that verifies several tokens for little more than the cost of one. The native kernels unpack
each quantised weight block once and apply it to every row of the block (llama.cpp's CPU
products unpack it once per row), and read ~3x fewer bytes than float16 weights.

The model computed is the one llama.cpp computes from the same file: activations quantised per
32 values to 8 bits, integer dot products per block, float32 elsewhere. Every row is computed
on its own, in an order that does not depend on the other rows of the call, so a block of
tokens gives bit for bit what running them one at a time gives (`exact_blocks`): speculative
decoding through this runtime is token-identical to plain decoding through it, always.

Kernel paths: AVX-512 with VNNI, AVX2 (with FMA and F16C), or portable C++, chosen from what the
CPU reports; `DFLASH_ISA=avx2` (or `portable`) forces a lesser one (tests use it to check both).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dflash.errors import DFlashError, UnsupportedTargetError
from dflash.runtime.base import StepOutput, TargetInfo

SOURCE = Path(__file__).with_name("csrc") / "gguf_llama.cpp"
ISAS = ("portable", "avx2", "avx512")
SUPPORTED_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}  # linear weights; norms are F32
EMBEDDING_TYPES = {"F32": 0, **SUPPORTED_TYPES}
ARCHITECTURES = {  # GGUF architecture -> (transformers model_type, rotary pairs as NeoX halves)
    "llama": ("llama", False),
    "qwen2": ("qwen2", True),
    "qwen3": ("qwen3", True),
}


class _Config(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("heads", ctypes.c_int32),
                ("kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("ffn", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("neox_rope", ctypes.c_int32), ("eps", ctypes.c_float),
                ("rope_base", ctypes.c_double)]


_LIBRARY: dict[str, Any] = {}


def library() -> Any:
    """The native runtime's library: built on first use for this CPU, cached by source and CPU."""
    if "lib" in _LIBRARY:
        return _LIBRARY["lib"]
    from dflash.runtime.loader import cache_dir
    from dflash.runtime.native import compile_library, cpu_flags

    # built with -march=native: keyed by what the CPU can do
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    path = cache_dir() / "native" / key / "libdflash_gguf.so"
    if not path.exists():
        compile_library(SOURCE, path, ["-O3", "-march=native", "-ffp-contract=off", "-pthread", "-std=c++17"],
                        "the native GGUF runtime", "--cpu-weights float32 runs without one")
    lib = ctypes.CDLL(str(path))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.dfl_model_new.restype = p
    lib.dfl_model_new.argtypes = [ctypes.POINTER(_Config)]
    lib.dfl_model_free.argtypes = [p]
    lib.dfl_set_linear.argtypes = [p, i, i, i, ctypes.POINTER(i), ctypes.POINTER(p), ctypes.POINTER(i), i]
    lib.dfl_set_vector.argtypes = [p, i, i, ctypes.POINTER(f), i]
    lib.dfl_set_embedding.argtypes = [p, i, p, i, i]
    lib.dfl_embed.argtypes = [p, i, p, p]
    lib.dfl_seq_new.restype = p
    lib.dfl_seq_free.argtypes = [p]
    lib.dfl_seq_length.argtypes = [p]
    lib.dfl_seq_set_length.argtypes = [p, i]
    lib.dfl_forward.argtypes = [p, i, ctypes.POINTER(p), i, p, i, p, p, i, ctypes.POINTER(i), p]
    lib.dfl_set_isa.argtypes = [i]
    lib.dfl_set_threads.argtypes = [i]
    lib.dfl_linear_new.restype = p
    lib.dfl_linear_new.argtypes = [i, p, i, i]
    lib.dfl_linear_free.argtypes = [p]
    lib.dfl_linear.argtypes = [p, p, i, p]
    lib.dfl_draft.argtypes = [p, i, ctypes.POINTER(p), ctypes.POINTER(i), p, i, p, p, p, i, i, p, p, p]
    _LIBRARY["lib"] = lib
    select_isa()  # the best kernels from the start (or $DFLASH_ISA), not only once a runtime is made
    return lib


def select_isa(name: str | None = None) -> str:
    """Use the kernel path `name` (default: $DFLASH_ISA, else the best the CPU has); returns the
    path in force. A path the CPU lacks is refused."""
    lib = library()
    best = lib.dfl_isa_detect()
    name = name or os.environ.get("DFLASH_ISA") or ISAS[best]
    if name not in ISAS:
        raise DFlashError(f"DFLASH_ISA={name!r}: choose from {', '.join(ISAS)}")
    if ISAS.index(name) > best:
        raise DFlashError(f"this CPU has no {name} kernels (best: {ISAS[best]})")
    return ISAS[lib.dfl_set_isa(ISAS.index(name))]


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer stored in a GGUF file, read once (~10 s) and cached as a tokenizer folder."""
    from transformers import AutoTokenizer

    from dflash.runtime.loader import cache_dir, gguf_key

    path = Path(path)
    folder = cache_dir() / "tokenizers" / f"{path.stem}-{gguf_key(path)}"
    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(folder))
    print(f"dflash: reading the tokenizer of {path.name} once (~10 s); cached in {folder}", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".saving-"))
    try:
        tokenizer.save_pretrained(str(partial))
        os.replace(partial, folder)  # whole or not at all
    except OSError:
        pass  # another process saved it first
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return tokenizer


class GGUFFile:
    """A GGUF file's metadata and tensors (memory-mapped), read with the `gguf` package."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError) as error:
            raise DFlashError(f"{self.path} is not a readable GGUF file: {error}") from error
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = str(self.field("general.architecture", ""))

    def field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.architecture}.{key}", default)

    def tensor(self, name: str) -> Any:
        if name not in self.tensors:
            raise UnsupportedTargetError(f"{self.path.name} has no tensor {name!r}")
        return self.tensors[name]


def _type_name(tensor: Any) -> str:
    return tensor.tensor_type.name


def _main_type(gguf: GGUFFile) -> str:
    """The type most of a file's layer weights have (what "a Q4_1 GGUF" means)."""
    kinds = [_type_name(t) for name, t in gguf.tensors.items() if name.startswith("blk.") and name.endswith(".weight")
             and len(t.shape) == 2]
    return max(set(kinds), key=kinds.count) if kinds else "?"


def set_linear(lib: Any, handle: int, layer: int, which: int, kinds: list[str], blocks: list[np.ndarray],
               k: int) -> bool:
    """Load a native model's linear layer (`which`, see dfl_set_linear) from matrices of GGUF
    blocks ([rows, k / 32 blocks] each) placed side by side in its output."""
    arrays = [np.ascontiguousarray(b) for b in blocks]  # kept alive until repacked
    n = len(arrays)
    types = (ctypes.c_int * n)(*[SUPPORTED_TYPES[kind] for kind in kinds])
    data = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
    rows = (ctypes.c_int * n)(*[int(a.shape[0]) for a in arrays])
    return lib.dfl_set_linear(handle, layer, which, n, types, data, rows, k) == 0


def set_vector(lib: Any, handle: int, layer: int, which: int, values: Any) -> None:
    """Load a native model's vector (`which`, see dfl_set_vector: norms, biases)."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    lib.dfl_set_vector(handle, layer, which, values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), values.size)


class NativeLinear:
    """Some rows of a GGUF matrix as a linear layer run by the native kernels (no gradient)."""

    def __init__(self, lib: Any, kind: str, blocks: np.ndarray, k: int) -> None:
        blocks = np.ascontiguousarray(blocks)
        self.lib, self.n, self.k = lib, blocks.shape[0], k
        self.handle = lib.dfl_linear_new(SUPPORTED_TYPES[kind], blocks.ctypes.data, self.n, k)
        if not self.handle:
            raise UnsupportedTargetError(f"the native kernels cannot run {kind} rows of width {k}")
        weakref.finalize(self, lib.dfl_linear_free, self.handle)

    @classmethod
    def rows_of(cls, tensor: Any, rows: torch.Tensor | None) -> "NativeLinear":
        kind = _type_name(tensor)
        if kind not in SUPPORTED_TYPES:
            raise UnsupportedTargetError(f"{tensor.name} is {kind}: the native kernels run {', '.join(SUPPORTED_TYPES)}")
        data = np.asarray(tensor.data)
        return cls(library(), kind, data if rows is None else data[rows.cpu().numpy()], int(tensor.shape[0]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, self.k).float().contiguous()
        out = torch.empty(flat.shape[0], self.n)
        self.lib.dfl_linear(self.handle, flat.data_ptr(), flat.shape[0], out.data_ptr())
        return out.view(*x.shape[:-1], self.n)


class QuantizedLinear(torch.nn.Module):
    """A drop-in `nn.Linear` (inference only) whose weight is quantised to Q8_0 blocks and run by
    the native kernels: a drafter beside the native runtime reads half the bytes of fp16 weights,
    on every core, in one call. Drafts are checked by the target: only acceptance can change."""

    def __init__(self, linear: torch.nn.Module) -> None:
        from gguf import GGMLQuantizationType, quants

        from dflash.runtime.packed import weight_of

        super().__init__()
        weight = weight_of(linear).numpy()
        self.out_features, self.in_features = weight.shape
        self.blocks = quants.quantize(weight, GGMLQuantizationType.Q8_0)  # (kept: a native drafter reads them)
        self.native = NativeLinear(library(), "Q8_0", self.blocks, self.in_features)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.native(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=Q8_0 (native)"


def quantize_linears(model: torch.nn.Module) -> int:
    """Replace every linear layer of a CPU float32 model (a drafter) whose width the Q8_0 blocks
    divide by a `QuantizedLinear`, in place; returns how many. Shared weights (a tied head) stay."""
    from dflash.runtime.packed import PackedFp16Linear

    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (torch.nn.Linear, PackedFp16Linear)) and child.in_features % 32 == 0:
                setattr(module, name, QuantizedLinear(child))
                count += 1
    return count


class _Cache:
    """The native runtime's cache: one native sequence (keys and values of every layer, a
    length) per row. Rows are dict keys; a step's block length is kept for `commit`."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.seqs: dict[int, int] = {}
        self.pending: dict[int, int] = {}
        self.next_row = 0
        self._finalizer = weakref.finalize(self, _free_all, lib, self.seqs)

    def add(self) -> int:
        row = self.next_row
        self.next_row += 1
        self.seqs[row] = self.lib.dfl_seq_new()
        return row

    def length(self, row: int) -> int:
        return self.lib.dfl_seq_length(self.seqs[row])


def _free_all(lib: Any, seqs: dict[int, int]) -> None:
    for seq in seqs.values():
        lib.dfl_seq_free(seq)
    seqs.clear()


class GGUFRuntime:
    """A GGUF target run by the native kernels (see the module docstring)."""

    exact_blocks = True

    def __init__(self, path: str | Path, isa: str | None = None, threads: int | None = None) -> None:
        self.file = gguf = GGUFFile(path)
        arch = gguf.architecture
        if arch not in ARCHITECTURES:
            raise UnsupportedTargetError(
                f"the native GGUF runtime runs {', '.join(ARCHITECTURES)} models; {gguf.path.name} is {arch!r} "
                "(use --cpu-weights float32)")
        scaling = gguf.arch_field("rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise UnsupportedTargetError(f"{gguf.path.name}: rotary scaling {scaling!r} is not supported by the "
                                         "native GGUF runtime (use --cpu-weights float32)")
        model_type, neox = ARCHITECTURES[arch]
        hidden = int(gguf.arch_field("embedding_length"))
        heads = int(gguf.arch_field("attention.head_count"))
        embedding = gguf.tensor("token_embd.weight")
        vocab = int(embedding.shape[1])
        self.config = _Config(
            layers=int(gguf.arch_field("block_count")), hidden=hidden, heads=heads,
            kv_heads=int(gguf.arch_field("attention.head_count_kv", heads)),
            head_dim=int(gguf.arch_field("attention.key_length", hidden // heads)),
            ffn=int(gguf.arch_field("feed_forward_length")), vocab=vocab, neox_rope=int(neox),
            eps=float(gguf.arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_base=float(gguf.arch_field("rope.freq_base", 10000.0)))
        self.info = TargetInfo(model_type=model_type, name=str(gguf.path), vocab_size=vocab, hidden_size=hidden,
                               num_layers=self.config.layers,
                               max_positions=int(gguf.arch_field("context_length", 1 << 30)),
                               device=torch.device("cpu"), dtype=torch.float32,
                               precision="gguf " + _main_type(gguf).lower())
        self.lib = library()
        self.isa = select_isa(isa)
        self.threads = threads or torch.get_num_threads()  # (torch's count: every core by default)
        self.lib.dfl_set_threads(self.threads)  # the native pool's, for every native runtime of the process
        # The pool owns the cores from now on: torch's work beside it (a drafter's small operators)
        # runs on one thread, whose OpenMP workers would otherwise spin on the pool's cores after
        # each operator (measured: DFlash 166 -> 282 tok/s on the 2-core machine).
        torch.set_num_threads(1)
        self.handle = self.lib.dfl_model_new(ctypes.byref(self.config))
        weakref.finalize(self, self.lib.dfl_model_free, self.handle)
        self._load_weights()
        self.bind(())
        self._logits = torch.empty(0)
        self._vocab_head: tuple[torch.Tensor | None, NativeLinear] | None = None
        self._head_name = "output.weight" if "output.weight" in gguf.tensors else "token_embd.weight"  # tied

    # --- loading -------------------------------------------------------------------------------

    def _load_weights(self) -> None:
        gguf, c = self.file, self.config
        embedding = gguf.tensor("token_embd.weight")
        kind = _type_name(embedding)
        if kind not in EMBEDDING_TYPES:
            raise UnsupportedTargetError(f"{gguf.path.name}: token_embd.weight is {kind}; the native GGUF runtime "
                                         f"reads {', '.join(EMBEDDING_TYPES)}")
        data = np.ascontiguousarray(embedding.data)
        self.lib.dfl_set_embedding(self.handle, EMBEDDING_TYPES[kind], data.ctypes.data, c.vocab, c.hidden)
        for i in range(c.layers):
            self._linear(i, 0, [f"blk.{i}.attn_q.weight", f"blk.{i}.attn_k.weight", f"blk.{i}.attn_v.weight"])
            self._linear(i, 1, [f"blk.{i}.attn_output.weight"])
            self._linear(i, 2, [f"blk.{i}.ffn_gate.weight", f"blk.{i}.ffn_up.weight"])
            self._linear(i, 3, [f"blk.{i}.ffn_down.weight"])
            self._vector(i, 0, f"blk.{i}.attn_norm.weight")
            self._vector(i, 1, f"blk.{i}.ffn_norm.weight")
            if f"blk.{i}.attn_q_norm.weight" in gguf.tensors:
                self._vector(i, 2, f"blk.{i}.attn_q_norm.weight")
                self._vector(i, 3, f"blk.{i}.attn_k_norm.weight")
            if f"blk.{i}.attn_q.bias" in gguf.tensors:
                bias = np.concatenate([self._floats(f"blk.{i}.attn_{x}.bias") for x in "qkv"])
                self._set_vector(i, 4, bias)
        self._vector(-1, 5, "output_norm.weight")
        self._linear(-1, 4, ["output.weight" if "output.weight" in gguf.tensors else "token_embd.weight"])

    def _floats(self, name: str) -> np.ndarray:
        tensor = self.file.tensor(name)
        if _type_name(tensor) != "F32":
            raise UnsupportedTargetError(f"{self.file.path.name}: {name} is {_type_name(tensor)}, expected F32")
        return np.ascontiguousarray(tensor.data, dtype=np.float32).reshape(-1)

    def _vector(self, layer: int, which: int, name: str) -> None:
        self._set_vector(layer, which, self._floats(name))

    def _set_vector(self, layer: int, which: int, values: np.ndarray) -> None:
        set_vector(self.lib, self.handle, layer, which, values)

    def _linear(self, layer: int, which: int, names: list[str]) -> None:
        tensors = [self.file.tensor(name) for name in names]
        for name, tensor in zip(names, tensors):
            if _type_name(tensor) not in SUPPORTED_TYPES:
                raise UnsupportedTargetError(
                    f"{self.file.path.name}: {name} is {_type_name(tensor)}; the native GGUF runtime runs "
                    f"{', '.join(SUPPORTED_TYPES)} weights (use --cpu-weights float32)")
        if not set_linear(self.lib, self.handle, layer, which, [_type_name(t) for t in tensors],
                          [t.data for t in tensors], int(tensors[0].shape[0])):
            raise UnsupportedTargetError(f"{self.file.path.name}: could not load {names}")

    # --- the runtime interface -------------------------------------------------------------------

    def bind(self, feature_layers: Sequence[int]) -> None:
        layers = tuple(int(i) for i in feature_layers)
        if any(not 0 <= i < self.info.num_layers for i in layers):
            raise DFlashError(f"feature layers {layers} outside the target's {self.info.num_layers} layers")
        self.feature_layers = layers
        self._layer_array = (ctypes.c_int * max(len(layers), 1))(*layers)  # what each step passes

    def new_cache(self, max_rows: int = 1) -> _Cache:
        return _Cache(self.lib)

    def _run(self, cache: _Cache, rows: Sequence[int], ids: torch.Tensor, head: int,
             logits: bool) -> StepOutput:
        """One native call running `ids` ([rows, n]) after each row's cached tokens. `head`: 0 no
        LM head (training features), 1 the last position of each row (a prompt), 2 every position
        (a verified block). The logits stay in a buffer reused between calls unless asked for."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(len(rows), -1).contiguous()
        n_rows, per_row = ids.shape
        for row in rows:
            if row not in cache.seqs:
                raise DFlashError(f"row {row} is not in this cache")
            if cache.length(row) + per_row > self.info.max_positions:
                raise DFlashError(f"the target's context holds {self.info.max_positions} tokens")
        head_rows = 0 if head == 0 else n_rows if head == 1 else n_rows * per_row
        vocab = self.info.vocab_size
        if self._logits.numel() < head_rows * vocab:
            self._logits = torch.empty(head_rows * vocab)
        tokens = torch.empty(head_rows, dtype=torch.long)
        n_feat = len(self.feature_layers)
        features = torch.empty(n_rows * per_row, n_feat * self.info.hidden_size) if n_feat else None
        seqs = (ctypes.c_void_p * n_rows)(*[cache.seqs[row] for row in rows])
        code = self.lib.dfl_forward(self.handle, n_rows, seqs, per_row, ids.data_ptr(), head,
                                    self._logits.data_ptr(), tokens.data_ptr(), n_feat, self._layer_array,
                                    features.data_ptr() if features is not None else None)
        if code != 0:
            raise DFlashError(f"the native GGUF runtime refused the step (code {code})")
        for row in rows:
            cache.pending[row] = per_row
        shape = (n_rows, 0) if head == 0 else (n_rows, 1) if head == 1 else (n_rows, per_row)
        out_logits = self._logits[: head_rows * vocab].view(*shape, vocab).clone() if logits else None
        return StepOutput(tokens=tokens.view(shape), logits=out_logits,
                          features=features.view(n_rows, per_row, -1) if features is not None else None)

    def prefill(self, cache: _Cache, ids: torch.Tensor, *, logits: bool = False) -> tuple[int, StepOutput]:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if ids.shape[1] == 0:
            raise DFlashError("the prompt is empty: give at least one token")
        row = cache.add()
        try:
            out = self._run(cache, [row], ids, head=1, logits=logits)
        except Exception:
            self.drop(cache, [row])
            raise
        cache.pending.pop(row, None)
        return row, out

    def step(self, cache: _Cache, rows: Sequence[int], ids: torch.Tensor, *, logits: bool = False) -> StepOutput:
        return self._run(cache, rows, ids, head=2, logits=logits)

    def commit(self, cache: _Cache, rows: Sequence[int], keep: Sequence[int]) -> None:
        for row, kept in zip(rows, keep):
            block = cache.pending.pop(row, 0)
            if not 0 <= kept <= block:
                raise DFlashError(f"row {row} cannot keep {kept} of a {block}-token block")
            self.lib.dfl_seq_set_length(cache.seqs[row], cache.length(row) - (block - kept))

    def drop(self, cache: _Cache, rows: Sequence[int]) -> None:
        for row in rows:
            seq = cache.seqs.pop(row, None)
            cache.pending.pop(row, None)
            if seq is not None:
                self.lib.dfl_seq_free(seq)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        flat = torch.as_tensor(ids, dtype=torch.long).reshape(-1).contiguous()
        out = torch.empty(flat.numel(), self.info.hidden_size)
        self.lib.dfl_embed(self.handle, flat.numel(), flat.data_ptr(), out.data_ptr())
        return out.view(*ids.shape, self.info.hidden_size)

    def lm_head(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """The head's rows for `vocab` (all without one) as quantised in the file, through the
        native kernels: a drafter's draft-vocabulary logits with the target's own numbers."""
        return self.head_rows(vocab)(hidden)

    def head_rows(self, vocab: torch.Tensor | None) -> NativeLinear:
        """The head's rows for `vocab` (all without one) as a native linear layer, gathered once
        for the drafter's vocabulary, not per draft."""
        if self._vocab_head is None or self._vocab_head[0] is not vocab:
            self._vocab_head = (vocab, NativeLinear.rows_of(self.file.tensor(self._head_name), vocab))
        return self._vocab_head[1]

    def draft_rows(self, drafter: Any) -> Any | None:
        """The native draft pass (dflash/runtime/gguf_drafter.py) for a drafter it supports."""
        from dflash.runtime import gguf_drafter

        return gguf_drafter.NativeDraftRows(drafter, self) if gguf_drafter.supported(drafter) else None

    def head_weight(self) -> torch.Tensor:
        """The LM head dequantised to float32, [vocab, hidden]: training's differentiable head
        (decoding runs the quantised rows; the two differ by the activations' 8-bit rounding)."""
        from gguf import dequantize

        tensor = self.file.tensor(self._head_name)
        return torch.from_numpy(np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))

    def features(self, seqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.feature_layers:
            raise DFlashError("bind the drafter's feature layers first")
        out = []
        for ids in seqs:
            cache = self.new_cache()
            row = cache.add()
            out.append(self._run(cache, [row], torch.as_tensor(ids).reshape(1, -1), head=0, logits=False).features)
            self.drop(cache, [row])
        return out

    def warmup(self, block_sizes: Sequence[int]) -> float:
        return 0.0  # nothing to compile: the kernels are built with the library
