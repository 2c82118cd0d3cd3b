"""Where a DFlash step's time goes on the compiled fp16 CPU path, and the least that verifying B tokens can cost.

Part 1 decodes GSM8K prompts with the shipped drafter on the compiled fp16 target and times,
per step: the target's forward (verification), the drafter's pass, the cache rollback, and the
rest of the engine's loop. Plain decoding of the same prompts, alternating with DFlash prompt by
prompt, gives the plain step it competes with, so `tau * plain step / DFlash step` is the
speedup these costs allow.

Part 2 is the arithmetic floor of verification. One token reads every weight once (bandwidth
bound); B tokens multiply the arithmetic by B, and past a few rows the products are bound by
the CPU's float32 FMA rate instead. It measures that rate (a 1024^3 float32 product) and the
compiled step at 1 and B tokens, with the time its fp16 products take (torch.profiler), then
prints the floor of the B-token step: that step with its products replaced by their arithmetic
at the measured peak.

    python benchmarks/step_costs.py --prompts 3 --new-tokens 256 --verify-rows 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

from common import cpu_description, drafter as load_drafter, median_ms, prompts as gsm8k_prompts, step_costs, step_runner
from dflash import DFlashDraftModel, generate, load_target
from dflash.cli.common import announce_and_compile
from dflash.runtime.lean import LeanRuntime
from dflash.runtime.packed import PackedFp16Linear


class Timers:
    """Wall time of each call of chosen methods; wraps them until `restore`."""

    def __init__(self, methods: dict[str, tuple[type, str]]) -> None:
        self.calls: dict[str, list[float]] = {name: [] for name in methods}
        self._originals = []
        for name, (owner, attr) in methods.items():
            original = getattr(owner, attr)
            self._originals.append((owner, attr, original))
            setattr(owner, attr, self._timed(name, original))

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls[name].append(time.perf_counter() - start)
        return wrapper

    def restore(self) -> None:
        for owner, attr, original in self._originals:
            setattr(owner, attr, original)


def step_gflop(model: Any, tokens: int) -> float:
    """Arithmetic of the target's matrix products (the LM head included) for `tokens` tokens."""
    return sum(2 * tokens * m.in_features * m.out_features
               for m in model.model.modules() if isinstance(m, PackedFp16Linear)) / 1e9


def products_in_step_ms(model: Any, layer_ids: list[int], prompt: torch.Tensor, tokens: int,
                        repeats: int = 4) -> tuple[float, float]:
    """ms of a compiled step of `tokens` tokens, and of its fp16 products, from one profiled loop
    (torch.profiler; both sides carry its overhead, and machine noise hits both alike)."""
    step = step_runner(model, layer_ids, prompt)(tokens)
    step()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        wall = (time.perf_counter() - start) * 1000 / repeats
    micros = sum(e.cpu_time_total for e in prof.key_averages() if "linear_fp16" in e.key)
    return wall, micros / 1000 / repeats


def fp32_peak_gflops(size: int = 1024) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size ** 3 / median_ms(lambda: a @ b, repeats=21) * 1e3 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3, help="first N GSM8K test prompts (default 3)")
    parser.add_argument("--new-tokens", type=int, default=256, help="new tokens per prompt (default 256)")
    parser.add_argument("--block-size", type=int, default=4, help="DFlash block size (default 4)")
    parser.add_argument("--draft-threshold", type=float, default=0.1, help="as `dflash generate` (default 0.1)")
    parser.add_argument("--verify-rows", type=int, default=8, help="B of the floor in part 2 (default 8)")
    parser.add_argument("--data-dir", default=None, help="datasets folder (default: $DFLASH_DATA_DIR)")
    args = parser.parse_args()

    print(f"cpu: {cpu_description()}", flush=True)
    model, tokenizer = load_target(device="cpu", cpu_weights="fp16", compile=True)
    drafter = load_drafter(cpu_weights="fp16")
    announce_and_compile(model, drafter, max(args.block_size, args.verify_rows))
    prompts = gsm8k_prompts(tokenizer, args.prompts, data_dir=args.data_dir)
    decode = dict(max_new_tokens=args.new_tokens, block_size=args.block_size, draft_threshold=args.draft_threshold)
    generate(model, drafter, prompts[0], **{**decode, "max_new_tokens": 16})  # warm-up

    # plain decoding and DFlash alternate prompt by prompt, so machine noise hits both alike
    timers = Timers({"target forward (verification)": (LeanRuntime, "step"),
                     "draft pass": (DFlashDraftModel, "draft"),
                     "cache rollback": (LeanRuntime, "commit")})
    plain_s = plain_steps = decode_s = steps = tokens = verified = 0
    seconds = dict.fromkeys(timers.calls, 0.0)
    try:
        for ids in prompts:
            stats = generate(model, None, ids, max_new_tokens=args.new_tokens, block_size=1)
            plain_s += stats.decode_time
            plain_steps += len(stats.acceptance_lengths)
            for calls in timers.calls.values():
                calls.clear()
            stats = generate(model, drafter, ids, **decode)
            decode_s += stats.decode_time
            steps += len(stats.acceptance_lengths)
            tokens += sum(stats.acceptance_lengths)
            verified += sum(stats.draft_lengths) + len(stats.draft_lengths)
            for name, calls in timers.calls.items():
                seconds[name] += sum(calls)
                calls.clear()
    finally:
        timers.restore()
    per_step = {name: s * 1000 / steps for name, s in seconds.items()}
    step_ms, plain_ms, tau = decode_s * 1000 / steps, plain_s * 1000 / plain_steps, tokens / steps
    print(f"\n{len(prompts)} GSM8K prompts x {args.new_tokens} tokens, block {args.block_size}, threshold "
          f"{args.draft_threshold}: {steps} DFlash steps, tau {tau:.2f}, {verified / steps:.2f} tokens verified a step")
    print("| part of a DFlash step | ms | share |\n|---|---|---|")
    for name, ms in per_step.items():
        print(f"| {name} | {ms:.2f} | {ms / step_ms:.0%} |")
    rest = step_ms - sum(per_step.values())
    print(f"| the rest of the loop | {rest:.2f} | {rest / step_ms:.0%} |\n| **DFlash step** | **{step_ms:.2f}** | |")
    print(f"plain step {plain_ms:.2f} ms: a DFlash step costs {step_ms / plain_ms:.2f}x one; at tau {tau:.2f} "
          f"that allows {tau * plain_ms / step_ms:.2f}x")

    rows = args.verify_rows
    peak = fp32_peak_gflops()
    costs = step_costs(model, drafter.target_layer_ids, prompts[0], (1, rows), repeats=41)
    print(f"\nfloat32 peak (1024^3 product): {peak:.0f} GFLOP/s")
    print("| compiled step | ms | profiled: ms | of it in fp16 products | their GFLOP | GFLOP/s |\n"
          "|---|---|---|---|---|---|")
    rounds: dict[int, list[tuple[float, float]]] = {1: [], rows: []}
    for _ in range(7):  # alternating 1 and B tokens, so machine noise hits both alike
        for tokens in rounds:
            rounds[tokens].append(products_in_step_ms(model, drafter.target_layer_ids, prompts[0], tokens))
    profiled = {}
    for tokens, pairs in rounds.items():
        profiled[tokens] = wall, products = tuple(statistics.median(x) for x in zip(*pairs))
        gflop = step_gflop(model, tokens)
        print(f"| {tokens} token{'s' if tokens > 1 else ''} | {costs[tokens]:.2f} | {wall:.2f} | {products:.2f} | "
              f"{gflop:.2f} | {gflop / products * 1000:.0f} |")
    (wall_1, _), (wall_b, products_b) = profiled[1], profiled[rows]
    floor = wall_b - products_b + step_gflop(model, rows) / peak * 1000
    print(f"{rows} tokens cost {costs[rows] / costs[1]:.2f}x one ({wall_b / wall_1:.2f}x profiled); with their products "
          f"at the float32 peak, {floor:.2f} ms: {floor / wall_1:.2f}x one (profiled)")


if __name__ == "__main__":
    main()
