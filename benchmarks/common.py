"""Setup the benchmark scripts share: the CPU, evaluation prompts, a drafter, step timings.

The machine's description, prompts of an evaluation set in the chat template, a drafter stored
as `--cpu-weights` stores it, and the median cost of target steps of k tokens."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dflash import DFlashDraftModel, chat_input_ids, default_drafter_path
from dflash.datasets import eval_prompts
from dflash.runtime.packed import apply_cpu_weights


def cpu_description() -> str:
    """The CPU's model name, its core count and the widest vector ISA torch uses on it."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch kernels {torch.backends.cpu.get_cpu_capability()}"


def prompts(tokenizer: Any, count: int, dataset: str = "gsm8k", skip: int = 0,
            data_dir: str | None = None) -> list[torch.Tensor]:
    """Prompts `skip` .. `skip + count - 1` of an evaluation set (first user turn) in the chat
    template, each a [1, length] tensor of token ids."""
    rows = eval_prompts(dataset, data_dir, limit=skip + count)[skip:]
    return [torch.tensor([chat_input_ids(tokenizer, turns[0])]) for turns in rows]


def drafter(path: str | None = None, cpu_weights: str | None = "fp16") -> DFlashDraftModel:
    """A drafter (default: the shipped one) on the CPU, its linears stored as `--cpu-weights`
    stores them beside a non-float32 target."""
    model = DFlashDraftModel.from_pretrained(path or str(default_drafter_path()), device="cpu")
    return apply_cpu_weights(model, cpu_weights)


def median_ms(fn: Callable[[], Any], repeats: int = 11) -> float:
    """Median wall time of `fn` in ms, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def step_runner(runtime: Any, layer_ids: list[int], prompt: torch.Tensor) -> Callable[[int], Callable[[], None]]:
    """After prefilling `prompt` ([1, length]) on `runtime`: for k, a function running one target
    step of k tokens (with the features of `layer_ids`, as verification asks) and rolling the
    cache back."""
    runtime.bind(layer_ids)
    cache = runtime.new_cache()
    row, _ = runtime.prefill(cache, prompt[0])

    def step(k: int) -> Callable[[], None]:
        ids = torch.full((1, k), 28, dtype=torch.long)

        def run() -> None:
            runtime.step(cache, [row], ids)
            runtime.commit(cache, [row], [0])
        return run
    return step


def step_costs(runtime: Any, layer_ids: list[int], prompt: torch.Tensor, blocks: tuple[int, ...],
               repeats: int = 11) -> dict[int, float]:
    """Median ms of one target step of k tokens after the prompt, for k in `blocks`."""
    step = step_runner(runtime, layer_ids, prompt)
    return {k: median_ms(step(k), repeats) for k in blocks}
