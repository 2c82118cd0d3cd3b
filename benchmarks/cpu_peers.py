"""The torch CPU paths (float32, fp16, compiled fp16) against transformers generate, llama.cpp and the bandwidth floor.

One run, the same GSM8K prompts for every method, so every figure compares as a ratio:

- transformers `generate` (greedy), float32 and on the fp16-weight target;
- the engine's plain decoding (block size 1) and DFlash with the shipped drafter, float32,
  with `--cpu-weights fp16`, and with `--cpu-weights fp16 --compile` (compile time reported);
- llama.cpp on the same GGUF (the embedded Q4_1 file) through `llama-cpp-python`, when that
  optional extra is installed (pip install -e ".[llamacpp]": it compiles llama.cpp);
- the bandwidth floor: measured memory bandwidth / bytes of weights one forward reads;
- one target step (1 token) against verifying a block, for each weight format.

Every method decodes the same number of new tokens per prompt (no stop tokens), greedy. The
engine's outputs are checked identical to `generate` on the same weights. The native GGUF
runtime (the default CPU path) is measured against llama-server by vs_llama_cpp.py.

    python benchmarks/cpu_peers.py --prompts 10 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from common import cpu_description, drafter as load_drafter, prompts as gsm8k_prompts, step_costs
from dflash import generate, load_target
from dflash.runtime.loader import embedded_gguf_path
from dflash.runtime.packed import PackedFp16Linear


def memory_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    """Best read bandwidth of summing a float32 tensor far larger than any cache."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_forward(model: torch.nn.Module) -> int:
    """Bytes of weights a one-token forward reads: every linear layer (the LM head included)
    in its stored format, plus the norms; the embedding table only for one row."""
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, PackedFp16Linear):
            total += module.in_features * module.out_features * 2
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen or isinstance(module, torch.nn.Embedding):
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def time_hf(model: Any, prompts: list[torch.Tensor], n: int) -> tuple[float, list[list[int]]]:
    outputs, elapsed = [], 0.0
    for ids in prompts:
        t = time.perf_counter()
        out = model.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, eos_token_id=None, pad_token_id=0, top_p=None, top_k=None,
                             temperature=None)
        elapsed += time.perf_counter() - t
        outputs.append(out[0, ids.shape[1]:].tolist())
    return elapsed, outputs


def time_engine(model: Any, drafter: Any, prompts: list[torch.Tensor], n: int, block: int,
                threshold: float = 0.0) -> tuple[float, list[list[int]], list[int]]:
    outputs, elapsed, accepted = [], 0.0, []
    for ids in prompts:
        stats = generate(model, drafter, ids, max_new_tokens=n, block_size=block, draft_threshold=threshold)
        elapsed += stats.total_time
        outputs.append(stats.new_tokens)
        accepted += stats.acceptance_lengths
    return elapsed, outputs, accepted


def llama_cpp_runner(gguf: Path, n: int, threads: int) -> Callable[[torch.Tensor], list[int]] | None:
    """A function decoding n greedy tokens after a prompt ([1, len] ids) with llama.cpp on the
    GGUF (warmed up), or None when llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(ids: torch.Tensor) -> list[int]:
        llm.reset()
        tokens: list[int] = []
        for token in llm.generate(ids[0].tolist(), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            tokens.append(int(token))
            if len(tokens) == n:
                break
        return tokens

    run(torch.arange(1, 17)[None])  # warm-up
    return run


def time_llama_cpp(gguf: Path, prompts: list[torch.Tensor], n: int, threads: int) -> tuple[float, list[list[int]]] | None:
    run = llama_cpp_runner(gguf, n, threads)
    if run is None:
        return None
    outputs, elapsed = [], 0.0
    for ids in prompts:
        t = time.perf_counter()
        outputs.append(run(ids))
        elapsed += time.perf_counter() - t
    return elapsed, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=10, help="first N GSM8K test prompts (default 10)")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    parser.add_argument("--block-size", type=int, default=4, help="DFlash block size (default 4)")
    parser.add_argument("--draft-threshold", type=float, default=0.1,
                        help="DFlash verifies the drafts the drafter is this sure of, multiplied up (default 0.1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for torch and llama.cpp (default: torch's)")
    parser.add_argument("--data-dir", default=None, help="datasets folder (default: $DFLASH_DATA_DIR)")
    parser.add_argument("--output", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, Any] = {"config": vars(args), "cpu": cpu_description()}
    print(f"cpu: {results['cpu']}", flush=True)
    bandwidth = memory_bandwidth_gb_s()
    results["bandwidth_gb_s"] = bandwidth
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s", flush=True)

    variants = {"float32": ("float32", False), "fp16": ("fp16", False), "fp16 compiled": ("fp16", True)}
    models = {name: load_target(device="cpu", cpu_weights=w, compile=c) for name, (w, c) in variants.items()}
    tokenizer = models["float32"][1]
    drafters = {name: load_drafter(cpu_weights=w) for name, (w, _) in variants.items()}  # as `--cpu-weights` does
    prompts = gsm8k_prompts(tokenizer, args.prompts, data_dir=args.data_dir)
    n, total = args.new_tokens, args.new_tokens * len(prompts)

    rows: list[tuple[str, float, str]] = []
    for weights, (model, _) in models.items():
        drafter = drafters[weights]
        if variants[weights][1]:
            model.bind(drafter.target_layer_ids)
            results[f"compile_s_{weights}"] = model.warmup(range(1, args.block_size + 1))
            print(f"[{weights}] compiled the decoding steps in {results[f'compile_s_{weights}']:.1f} s", flush=True)
        weight_bytes = weight_bytes_per_forward(model.model)
        floor_ms = weight_bytes / bandwidth / 1e6
        costs = step_costs(model, drafter.target_layer_ids, prompts[0], tuple(sorted({1, 4, 8, 16, args.block_size})))
        results[f"step_ms_{weights}"] = costs
        results[f"floor_ms_{weights}"] = floor_ms
        print(f"[{weights}] one step {costs[1]:.1f} ms (bandwidth floor {floor_ms:.1f} ms); verify "
              + ", ".join(f"{k}: {v:.1f} ms = {v / costs[1]:.2f}x" for k, v in costs.items() if k > 1), flush=True)
        generate(model, drafter, prompts[0], max_new_tokens=8, block_size=args.block_size)  # warm-up
        hf_time, hf_out = time_hf(model, prompts, n)
        plain_time, plain_out, _ = time_engine(model, None, prompts, n, 1)
        dflash_time, dflash_out, accepted = time_engine(model, drafter, prompts, n, args.block_size,
                                                        args.draft_threshold)
        tau = sum(accepted) / len(accepted)
        same = sum(a == b == c for a, b, c in zip(hf_out, plain_out, dflash_out))
        results[weights] = {"generate_tok_s": total / hf_time, "plain_tok_s": total / plain_time,
                            "dflash_tok_s": total / dflash_time, "tau": tau, "identical": same,
                            "floor_tok_s": 1000 / floor_ms}
        rows += [(f"transformers generate ({weights})", total / hf_time, ""),
                 (f"engine plain ({weights})", total / plain_time, f"identical to generate {same}/{len(prompts)}"),
                 (f"DFlash block {args.block_size}, threshold {args.draft_threshold} ({weights})", total / dflash_time,
                  f"tau {tau:.2f}, {total / dflash_time / (total / plain_time):.2f}x plain"),
                 (f"bandwidth floor, plain ({weights})", 1000 / floor_ms, f"{weight_bytes / 1e6:.0f} MB/forward")]
        print(rows[-4:], flush=True)

    llama = time_llama_cpp(embedded_gguf_path(), prompts, n, args.threads)
    if llama is None:
        print("llama.cpp: llama-cpp-python is not installed; skipped")
    else:
        llama_time, llama_out = llama
        agree = sum(a == b for a, b in zip(llama_out, plain_out))
        results["llama_cpp_tok_s"] = total / llama_time
        rows.append(("llama.cpp Q4_1 GGUF", total / llama_time,
                     f"same tokens as the engine ({weights}) {agree}/{len(prompts)}"))

    reference = results.get("llama_cpp_tok_s") or results["float32"]["generate_tok_s"]
    name = "llama.cpp" if "llama_cpp_tok_s" in results else "generate (float32)"
    print(f"\n{len(prompts)} GSM8K prompts x {n} new tokens, {args.threads} threads\n")
    print(f"| method | tok/s | vs {name} | note |\n|---|---|---|---|")
    for method, speed, note in rows:
        print(f"| {method} | {speed:.2f} | {speed / reference:.2f}x | {note} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
