"""Training throughput on a CPU: conversations a minute for each way of computing the target's
features and the drafter's products, in one run on the same conversations.

Each configuration continues the shipped drafter for a few optimizer steps (4 conversations
each) over the same rows, after one warm-up step; "cached" reads the features a first pass
stored on disk (later epochs of a `--feature-cache` run).

    python benchmarks/train_throughput.py --steps 6
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import cpu_description

from dflash import default_drafter_path
from dflash.datasets import data_dir as default_data_dir
from dflash.train import trainer as T

CONFIGS = {  # name: trainer flags
    "float32 features": ["--cpu-weights", "float32"],
    "native features": ["--cpu-weights", "gguf"],
    "native + bf16 drafter": ["--cpu-weights", "gguf", "--cpu-bf16", "on"],
    "native + soft targets": ["--cpu-weights", "gguf", "--soft-weight", "0.5"],
    "cached features": ["--cpu-weights", "gguf", "--feature-cache", "{cache}"],
    "cached + bf16 drafter": ["--cpu-weights", "gguf", "--feature-cache", "{cache}", "--cpu-bf16", "on"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per configuration (default 6)")
    p.add_argument("--data", default=None, help="conversations (default: DATA_DIR/regen/pools-even.jsonl.gz)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    a = p.parse_args()
    data = a.data or str(Path(default_data_dir() or "../shared/datasets") / "regen" / "pools-even.jsonl.gz")
    work = Path(tempfile.mkdtemp(prefix="dflash-throughput-"))
    cache = work / "features"
    print(f"# {cpu_description()}; {a.steps} steps x 4 conversations, anchors 128, block 4, loss vocabulary 8192")
    try:
        if any("{cache}" in flags for name in a.configs for flags in CONFIGS[name]):
            fill = make_trainer(data, work / "fill", ["--cpu-weights", "gguf", "--feature-cache", str(cache)], a.steps)
            for _ in range(a.steps + 1):  # the first epoch stores what the cached runs read
                fill.train_step()
            del fill
        for name in a.configs:
            flags = [f.replace("{cache}", str(cache)) for f in CONFIGS[name]]
            trainer = make_trainer(data, work / name.replace(" ", "-"), flags, a.steps)
            trainer.train_step()  # warm-up: first-call allocations, the head's gather
            start = time.perf_counter()
            for _ in range(a.steps):
                trainer.train_step()
            seconds = time.perf_counter() - start
            print(f"{name:24s} {60 * 4 * a.steps / seconds:7.1f} conversations/min  ({seconds / a.steps:.2f} s/step)",
                  flush=True)
            del trainer
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_trainer(data: str, out: Path, flags: list[str], steps: int) -> T.Trainer:
    parser = argparse.ArgumentParser()
    T.add_arguments(parser)
    args = parser.parse_args(["--data", data, "--out", str(out), "--init-from", str(default_drafter_path()),
                              "--anchors-per-seq", "128", "--loss-vocab", "8192", "--max-steps", str(steps + 1),
                              "--lr", "1e-4", "--no-progress", "--device", "cpu", *flags])
    return T.Trainer(args)


if __name__ == "__main__":
    main()
