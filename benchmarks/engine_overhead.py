"""Engine figures on the embedded target, measured in ONE run so they compare as ratios:

- tokens/s of transformers `generate` (greedy) vs this engine's plain decoding (block size 1),
  same prompts, same number of new tokens, outputs checked identical;
- the per-step cost of drafting with a 1-layer drafter relative to one target forward, and
  the cost of verifying a block of B tokens relative to one plain step.

    python benchmarks/engine_overhead.py --prompts 5 --new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dflash import DFlashDraftModel, TargetAdapter, chat_input_ids, generate, load_target

PROMPTS = ["What is 17 times 23?", "Write a Python function that reverses a string.",
           "Why is the sky blue?", "Give me three tips for sleeping better.",
           "Summarise the plot of Romeo and Juliet."]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    model, tok = load_target(device="cpu")
    prompts = [torch.tensor([chat_input_ids(tok, p)]) for p in PROMPTS[: args.prompts]]

    hf_time = engine_time = 0.0
    identical = 0
    generate(model, None, prompts[0], max_new_tokens=8)  # warm-up
    for ids in prompts:
        t = time.perf_counter()
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.new_tokens,
                             eos_token_id=None, pad_token_id=0, top_p=None, top_k=None, temperature=None)
        hf_time += time.perf_counter() - t
        stats = generate(model, None, ids, max_new_tokens=args.new_tokens)
        engine_time += stats.total_time
        identical += torch.equal(stats.output_ids, ref)
    n = args.new_tokens * len(prompts)
    print(f"transformers generate: {n / hf_time:.2f} tok/s; engine plain (block 1): {n / engine_time:.2f} tok/s; "
          f"ratio engine/generate {hf_time / engine_time:.2f}x; identical {identical}/{len(prompts)}")

    torch.manual_seed(0)
    drafter = DFlashDraftModel.from_target(model, num_layers=1, block_size=16, mask_token_id=16)
    adapter = TargetAdapter(model, drafter.config.target_layer_ids)
    cache = adapter.new_cache()
    out = adapter.forward(prompts[0], cache, logits_to_keep=1)
    length = cache.get_seq_length()
    draft_cache = drafter.new_cache(capacity=4096)
    drafter.propose(adapter, torch.zeros(1, 16, dtype=torch.long), out.features, draft_cache)

    def step(k):
        def run():
            adapter.forward(torch.zeros(1, k, dtype=torch.long), cache, features=True)
            adapter.rollback(cache, length)
        return run

    def draft(b):
        def run():
            drafter.propose(adapter, torch.zeros(1, b, dtype=torch.long), out.features[:, :4], draft_cache)
            draft_cache.length -= 4
        return run

    one = median_ms(step(1), args.repeats)
    print(f"one target forward (1 token, {length}-token cache): {one:.1f} ms")
    for b in (4, 8, 16):
        verify, drafting = median_ms(step(b), args.repeats), median_ms(draft(b), args.repeats)
        print(f"block {b:2d}: verify {verify:.1f} ms = {verify / one:.2f}x one step; "
              f"1-layer draft pass {drafting:.1f} ms = {drafting / one:.2f}x one target forward")


if __name__ == "__main__":
    main()
