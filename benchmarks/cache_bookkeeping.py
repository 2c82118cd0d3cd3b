"""What a step's cache and RoPE bookkeeping costs outside the compiled graph, before and after
the lean forward got its own cache (docs/performance.md, "The lean forward's own cache").

Before: a transformers cache whose 30 layers each hand out their buffers (`room_for`), remake
views of their filled part after the forward (`filled`) and again at the rollback (`crop`), and
the model's rotary module called on the step's positions. After: `LeanCache` (one length for all
layers) and the lean forward's RoPE table. Both run on the fp16 SmolLM2 target, alternating step
by step in one process: 4 tokens after a 300-token prefix, then a rollback to 2 of them.

    python benchmarks/cache_bookkeeping.py --steps 300
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dflash import load_target
from dflash.runtime.rollback import CacheRollback


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="steps of each kind (default 300)")
    p.add_argument("--prefix", type=int, default=300, help="cached positions before each step (default 300)")
    args = p.parse_args()
    runtime, _ = load_target(None, cpu_weights="fp16")
    lean = runtime.lean
    rollback = CacheRollback(runtime.model, "llama")
    new = lean.new_cache()
    lean(torch.randint(100, 9000, (1, args.prefix)), new, logits_to_keep=1)
    old = rollback.new_cache()  # a transformers cache, filled to the same length
    like = lean.norm.new_empty((1, lean.kv_heads, 0, lean.head_dim))
    for layer in lean.layers:
        old.layers[layer.index].room_for(args.prefix, like, like, 2048)
        old.layers[layer.index].filled(args.prefix)

    def before(n: int = 4, keep: int = 2) -> None:
        past = old.get_seq_length()
        for layer in lean.layers:
            old.layers[layer.index].room_for(n, like, like, 2048)
        cos, sin = lean.rotary(lean.norm, torch.arange(past, past + n)[None])
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (as the lean forward used them)
        for layer in lean.layers:
            old.layers[layer.index].filled(past + n)
        rollback.rollback(old, past + keep)

    def after(n: int = 4, keep: int = 2) -> None:
        past = new.length
        new.room_for(1, n)
        lean.rope(past, n)
        new.length = past + n
        new.length = past + keep  # (LeanRuntime.commit)

    times: dict[str, list[float]] = {"transformers cache, rotary module": [], "LeanCache, RoPE table": []}
    for _ in range(args.steps):
        for name, step in zip(times, (before, after)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name}: {statistics.median(values) * 1e3:.3f} ms a step (median of {args.steps})")


if __name__ == "__main__":
    main()
