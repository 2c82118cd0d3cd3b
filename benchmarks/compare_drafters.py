"""Drafters and draft thresholds against plain decoding, interleaved prompt by prompt, on the default CPU target.

One run, the same prompts, every drafter and plain decoding back to back on each prompt (machine
noise hits all alike): tokens/s, the ratio to plain decoding, tau and the identity of each
output with plain decoding. Use it to choose among trained drafters (depth, block size, checkpoints), and the
draft threshold (several thresholds: every drafter runs at each).

    python benchmarks/compare_drafters.py --draft runs/a/drafter runs/b/drafter --prompts 20 --skip 100
    python benchmarks/compare_drafters.py --draft-threshold 0 0.05 0.1 0.2 --prompts 20 --skip 100

`--skip` starts past the prompts a final report uses (GSM8K's first 100), so choosing a drafter
here does not tune it to the report's prompts.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

import torch

from common import cpu_description, prompts as eval_inputs
from dflash import DFlashDraftModel, default_drafter_path, load_target
from dflash.cli.common import prepare_drafter
from dflash.decode.engine import generate
from dflash.runtime.loader import stop_token_ids


def interleaved_runs(model: Any, tokenizer: Any, drafters: dict[str, Any], *, dataset: str = "gsm8k",
                     prompts: int = 10, skip: int = 0, new_tokens: int = 256, block_size: int = 4,
                     thresholds: Sequence[float] = (0.1,), data_dir: str | None = None) -> None:
    """Decode each prompt with plain decoding, then with every drafter at every threshold; print
    one table row each."""
    stops = stop_token_ids(tokenizer, model)
    inputs = eval_inputs(tokenizer, prompts, dataset, skip, data_dir)
    runs = {"(plain decoding)": (None, 0.0)}  # plain first: the reference
    for path, drafter in drafters.items():
        for threshold in thresholds:
            runs[path if len(thresholds) == 1 else f"{path}, threshold {threshold:g}"] = (drafter, threshold)
    totals = {name: [0, 0.0, 0, 0] for name in runs}  # tokens, seconds, steps, identical
    for ids in inputs:
        reference = None
        for name, (drafter, threshold) in runs.items():
            start = time.perf_counter()
            stats = generate(model, drafter, ids, max_new_tokens=new_tokens,
                             block_size=block_size if drafter is not None else 1, stop_token_ids=stops,
                             draft_threshold=threshold)
            seconds = time.perf_counter() - start
            reference = stats.output_ids if reference is None else reference
            t = totals[name]
            t[0] += stats.num_new_tokens
            t[1] += seconds
            t[2] += len(stats.acceptance_lengths) if drafter is not None else stats.num_new_tokens
            t[3] += int(torch.equal(stats.output_ids, reference))
    plain_rate = totals["(plain decoding)"][0] / totals["(plain decoding)"][1]
    print(f"{len(inputs)} {dataset} prompts (from #{skip}) x up to {new_tokens} tokens, block {block_size}, "
          f"threshold {', '.join(f'{t:g}' for t in thresholds)}, target {model.info.precision}")
    print("| drafter | tok/s | vs plain | tau | identical to plain |")
    print("|---|---|---|---|---|")
    for name, (n, s, steps, same) in totals.items():
        rate = n / s
        print(f"| {name} | {rate:.2f} | {rate / plain_rate:.2f}x | {n / steps:.2f} | {same}/{len(inputs)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft", nargs="+", default=None, help="drafter folders (default: the shipped one)")
    p.add_argument("--dataset", default="gsm8k")
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--skip", type=int, default=0, help="start at this prompt of the set")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--draft-threshold", type=float, nargs="+", default=[0.1],
                   help="one or more thresholds; each drafter runs at each (default 0.1)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    print(f"cpu: {cpu_description()}", flush=True)
    model, tokenizer = load_target(device="cpu")  # the product's default: the native runtime on the GGUF
    drafters = {path: prepare_drafter(DFlashDraftModel.from_pretrained(path, device="cpu"), model)
                for path in args.draft or [str(default_drafter_path())]}
    interleaved_runs(model, tokenizer, drafters, dataset=args.dataset, prompts=args.prompts, skip=args.skip,
                     new_tokens=args.new_tokens, block_size=args.block_size, thresholds=args.draft_threshold,
                     data_dir=args.data_dir)


if __name__ == "__main__":
    main()
