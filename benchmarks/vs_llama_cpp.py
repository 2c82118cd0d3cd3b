"""DFlash against llama.cpp, prompt by prompt, so that the machine's drift cancels out.

`cpu_peers.py` times each method over all its prompts in turn; on the shared 2-core machines
llama.cpp's speed moved by up to 30 % between such runs (79.6 to 103.5 tok/s). Here every
prompt is decoded by llama.cpp (the embedded Q4_1 GGUF), by DFlash (compiled fp16 target,
shipped drafter) and by the engine's plain decoding on the same target, back to back, in an
order that rotates from prompt to prompt. Each decodes the same number of new tokens (no stop
tokens). The report gives each method's tokens/s over all prompts and the DFlash / llama.cpp
ratio, over all prompts and per prompt (median and range).

    pip install llama-cpp-python     # the peer (compiles llama.cpp, ~15 min on 2 cores)
    python benchmarks/vs_llama_cpp.py --prompts 20 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cpu_peers import cpu_description, llama_cpp_runner
from dflash import DFlashDraftModel, chat_input_ids, default_drafter_path, generate, load_target
from dflash.cli.common import announce_and_compile
from dflash.datasets import eval_prompts
from dflash.runtime.loader import embedded_gguf_path
from dflash.runtime.packed import apply_cpu_weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=20, help="first N GSM8K test prompts (default 20)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    p.add_argument("--block-size", type=int, default=4, help="DFlash block size (default 4)")
    p.add_argument("--draft-threshold", type=float, default=0.1, help="DFlash draft threshold (default 0.1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for all (default: torch's)")
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $DFLASH_DATA_DIR)")
    p.add_argument("--output", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu: {cpu_description()}", flush=True)

    model, tokenizer = load_target(device="cpu", cpu_weights="fp16", compile=True)  # before the drafter
    drafter = apply_cpu_weights(DFlashDraftModel.from_pretrained(str(default_drafter_path()), device="cpu"), "fp16")
    announce_and_compile(model, drafter, args.block_size)
    llama = llama_cpp_runner(embedded_gguf_path(), args.new_tokens, args.threads)
    if llama is None:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python")
    n = args.new_tokens

    def engine(drafter_or_none: DFlashDraftModel | None, block: int, threshold: float):
        def run(ids: torch.Tensor) -> list[int]:
            return generate(model, drafter_or_none, ids, max_new_tokens=n, block_size=block,
                            draft_threshold=threshold).new_tokens
        return run

    methods = {"llama.cpp Q4_1": llama,
               f"DFlash block {args.block_size} (fp16 compiled)": engine(drafter, args.block_size, args.draft_threshold),
               "engine plain (fp16 compiled)": engine(None, 1, 0.0)}
    names = list(methods)
    questions = [turns[0] for turns in eval_prompts("gsm8k", args.data_dir, limit=args.prompts)]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i, question in enumerate(questions):
        ids = torch.tensor([chat_input_ids(tokenizer, question)])
        order = names[i % len(names):] + names[: i % len(names)]  # each method goes first as often
        for name in order:
            start = time.perf_counter()
            tokens = methods[name](ids)
            seconds[name].append(time.perf_counter() - start)
            assert len(tokens) == n, (name, len(tokens))
        print(f"prompt {i + 1}/{len(questions)}: " + ", ".join(f"{name} {n / seconds[name][-1]:.1f} tok/s"
                                                            for name in names), flush=True)

    llama_name, dflash_name, plain_name = names
    rates = {name: n * len(questions) / sum(seconds[name]) for name in names}
    per_prompt = [b / a for a, b in zip(seconds[dflash_name], seconds[llama_name])]  # DFlash rate / llama.cpp rate
    print(f"\n{len(questions)} GSM8K prompts x {n} new tokens, {args.threads} threads, interleaved\n")
    print("| method | tok/s | vs llama.cpp |")
    print("|---|---|---|")
    for name in names:
        print(f"| {name} | {rates[name]:.2f} | {rates[name] / rates[llama_name]:.2f}x |")
    print(f"\nDFlash / llama.cpp per prompt: median {statistics.median(per_prompt):.2f}x, "
          f"range {min(per_prompt):.2f}-{max(per_prompt):.2f}x; DFlash / plain {rates[dflash_name] / rates[plain_name]:.2f}x")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"config": vars(args), "cpu": cpu_description(), "tok_s": rates, "seconds": seconds,
                       "dflash_vs_llama_per_prompt": per_prompt}, f, indent=2)


if __name__ == "__main__":
    main()
