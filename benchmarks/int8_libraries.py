"""Library int8 products against the native runtime's kernels, at the target's shapes.

For each linear shape of SmolLM2-135M and 1, 4 and 8 rows: the median time of torchao's int8
dynamic-activation / int8-weight layer (eager, and compiled by inductor), and of the native
kernels on the same weights as Q8_0 and Q4_1 blocks; and whether a block of rows gives each row
bit-identically what that row alone gives (what lossless speculative decoding by construction
needs). torchao is not a dependency: install it beside the package to run this
(`pip install --no-deps torchao`).

    python benchmarks/int8_libraries.py
"""

from __future__ import annotations

import statistics
import time

import torch
from common import cpu_description
from gguf import GGMLQuantizationType, quants

from dflash.runtime.gguf import NativeLinear, library, select_isa

SHAPES = {"q/o 576x576": (576, 576), "gate+up 576x3072": (576, 3072), "down 1536x576": (1536, 576)}
ROWS = (1, 4, 8)


def median_us(fn, x: torch.Tensor, repeats: int = 200) -> float:
    for _ in range(20):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def row_exact(fn, x: torch.Tensor) -> bool:
    """A block of rows gives every row exactly what that row alone gives."""
    block = fn(x)
    return all(torch.equal(block[i: i + 1], fn(x[i: i + 1])) for i in range(x.shape[0]))


def native(weight: torch.Tensor, kind: str):
    blocks = quants.quantize(weight.numpy(), GGMLQuantizationType[kind])
    return NativeLinear(library(), kind, blocks, weight.shape[1])


def main() -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    library().dfl_set_threads(threads)  # as the native runtime sets them: every core, its best kernels
    isa = select_isa()
    print(f"# {cpu_description()}; torch and native threads {threads}; native kernels {isa}")
    print("| shape | rows | torchao eager us | torchao compiled us | native Q8_0 us | native Q4_1 us | row-exact: torchao eager / compiled / native |")
    print("|---|---|---|---|---|---|---|")
    for name, (k, n) in SHAPES.items():
        layer = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
        weight = layer[0].weight.detach().clone()
        quantize_(layer, Int8DynamicActivationInt8WeightConfig())
        torch._dynamo.reset()  # one compiled graph per shape and row count, none evicted
        compiled = torch.compile(layer, dynamic=False)
        q8, q4 = native(weight, "Q8_0"), native(weight, "Q4_1")
        for rows in ROWS:
            x = torch.randn(rows, k)
            with torch.no_grad():
                cells = [median_us(layer, x), median_us(compiled, x), median_us(q8, x), median_us(q4, x)]
                exact = [row_exact(layer, x), row_exact(compiled, x), row_exact(q8, x)]
            print(f"| {name} | {rows} | " + " | ".join(f"{c:.1f}" for c in cells) + " | "
                  + " / ".join("yes" if e else "no" for e in exact) + " |", flush=True)


if __name__ == "__main__":
    main()
