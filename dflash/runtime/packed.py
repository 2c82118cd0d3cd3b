"""Half-size weights for CPU targets: every linear layer's weight stored in float16 in fbgemm's
packed layout, multiplied with float32 activations and float32 accumulation.

Why: on a CPU a one-token forward is bound by reading the weights, and this machine kind has
no fast bf16/fp16 arithmetic. fbgemm's fp16 GEMM converts the weights to float32 in registers
(F16C), so it reads half the bytes and still computes in float32 (docs/performance.md, "The
fp16 lean path").

What changes: the weights are rounded to float16 once (the target is a slightly different
model from the float32 one; speculative decoding is exact against plain decoding of this same
model). What stays exact: each output row depends on its own input row only (no per-batch
activation scales, unlike int8 dynamic quantization), so verifying a block gives the numbers of
running its tokens one by one, which is what keeps speculation lossless. Bit for bit on
AVX-512 CPUs; on AVX2 ones fbgemm picks its kernel by the row count, and a row's numbers move by
an ulp or two (~5e-7, as with MKL's float32 products there): outputs stay identical except
where two logits tie that closely.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import torch

from dflash.errors import DFlashError
from dflash.runtime import native

CPU_WEIGHT_FORMATS = ("float32", "fp16")

class PackedFp16Linear(torch.nn.Module):
    """A drop-in `nn.Linear` (inference only) computing `x @ weight.T + bias` with the weight
    packed as float16.

    `keep` is the float32 weight to keep as `.weight` when another module shares it (a tied
    embedding / LM head) so gathers of a few rows (a drafter's smaller vocabulary) still work;
    otherwise none is kept, freeing the memory.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 keep: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._packed = torch.ops.quantized.linear_prepack_fp16(
            weight.detach().float(), None if bias is None else bias.detach().float())
        self.weight = keep
        self.bias = bias
        # with dflash's native operators loaded, the product runs through them (the only way
        # compiled steps can call it, and cheaper per call): the weights then hold a slot there
        self.slot = native.hold(self._packed, self.out_features) if native.loaded() else None
        if self.slot is not None:
            weakref.finalize(self, native.release, self.slot)

    @classmethod
    def of(cls, linear: torch.nn.Linear, keep_weight: bool = False) -> "PackedFp16Linear":
        return cls(linear.weight, linear.bias, linear.weight if keep_weight else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.slot is not None:
            y = torch.ops.dflash_native.linear_fp16(x.reshape(-1, self.in_features), self.slot)
        else:
            y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features), self._packed)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16 (fbgemm packed)"


def pack_fp16_linears(model: torch.nn.Module) -> int:
    """Replace every `nn.Linear` of `model` in place by a `PackedFp16Linear`; returns how many.

    The model must be a float32 model on the CPU (fbgemm is a CPU library).
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise DFlashError("fp16 CPU weights need PyTorch's fbgemm backend, which this build lacks")
    params = list(model.parameters())
    if params and (params[0].device.type != "cpu" or params[0].dtype != torch.float32):
        raise DFlashError(f"fp16 CPU weights need a float32 model on the CPU, got {params[0].dtype} on "
                          f"{params[0].device}: drop --cpu-weights or load with --device cpu --dtype float32")
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear)
              for p in m.parameters(recurse=False)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:  # a drafter's smaller vocabulary gathers rows of it
        shared.add(id(head.weight))
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, PackedFp16Linear.of(child, keep_weight=id(child.weight) in shared))
                count += 1
    return count


def apply_cpu_weights(model: Any, cpu_weights: str | None, compile: bool = False) -> Any:
    """Store a CPU model's linear weights as `cpu_weights` (one of CPU_WEIGHT_FORMATS): a target
    or a drafter. float32 (or None) leaves the model as it is. `compile` (a target whose steps
    will be compiled: dflash/runtime/lean.py) loads dflash's native operators first, so the packed
    weights hold slots there; the runtime itself is chosen by `dflash.runtime.loader.runtime_for`."""
    if compile and cpu_weights != "fp16":
        raise DFlashError("--compile applies to the lean fp16 forward: add --cpu-weights fp16")
    if cpu_weights in (None, "float32"):
        return model
    if cpu_weights != "fp16":
        raise DFlashError(f"unknown CPU weight format {cpu_weights!r}; choose from {', '.join(CPU_WEIGHT_FORMATS)}")
    if compile:  # compiled steps call the product through the native operators
        native.load()
    else:  # cheaper calls where a compiler is at hand; torch's own operator otherwise
        native.try_load()
    pack_fp16_linears(model)
    return model


def weight_of(linear: torch.nn.Module) -> torch.Tensor:
    """The float32 weight a linear layer computes with (for a packed one: its fp16 values)."""
    if isinstance(linear, PackedFp16Linear):
        return torch.ops.quantized.linear_unpack_fp16(linear._packed)[0].float()
    return linear.weight.detach().float()


def rows_of(linear: torch.nn.Module, rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function computing only the output `rows` of `linear` (in that order), with the
    weights stored the way `linear` stores them (plain or packed fp16)."""
    weight = linear.weight.detach()[rows]
    bias = None if linear.bias is None else linear.bias.detach()[rows]
    if isinstance(linear, PackedFp16Linear):
        return PackedFp16Linear(weight, bias)
    return functools.partial(torch.nn.functional.linear, weight=weight, bias=bias)
