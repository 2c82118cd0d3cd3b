"""Does storing the drafter's linears in int8 pay on this CPU? One run, same prompts, the two
drafter formats interleaved prompt by prompt (so machine noise hits both alike), on the
compiled fp16 target: tokens/s, tau and the identity of both outputs with plain decoding.

    python benchmarks/drafter_weights.py --prompts 10 --new-tokens 256

int8 here is fbgemm's dynamic product: int8 weights with one scale per output row, activations
quantised per call with one scale for all its rows. Verification could not use it (a row's
result would depend on the other rows of the block); drafting can, since drafts only change
speed. At a drafter's 4-18 rows it multiplies ~2.7x faster than the fp16 product, which at that
size is bound by float32 arithmetic. The result (docs/performance.md): no net gain, so the
package keeps fp16 drafters.
"""

from __future__ import annotations

import argparse
import time

import torch

from dflash import DFlashDraftModel, default_drafter_path, load_target
from dflash.cli.common import announce_and_compile
from dflash.datasets import eval_prompts
from dflash.decode.engine import generate
from dflash.target.loader import chat_input_ids, stop_token_ids
from dflash.target.packed import pack_fp16_linears


class Int8Linear(torch.nn.Module):
    """`nn.Linear` through fbgemm's dynamic int8 product (per-row weight scales)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).double()
        q = torch.quantize_per_channel(w, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(q, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features), self.packed, True)
        return y.view(*x.shape[:-1], self.out_features)


def pack_int8_linears(model: torch.nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, Int8Linear(child))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--draft", default=None, help="drafter folder (default: the shipped one)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    model, tok = load_target(device="cpu", cpu_weights="fp16", compile=True)
    path = args.draft or str(default_drafter_path())
    drafters = {}
    for name, pack in (("fp16", pack_fp16_linears), ("int8", pack_int8_linears)):
        drafters[name] = DFlashDraftModel.from_pretrained(path, device="cpu")
        pack(drafters[name])
    announce_and_compile(model, drafters["fp16"], 4)
    stops = stop_token_ids(tok, model)
    prompts = [torch.tensor([chat_input_ids(tok, t[0])]) for t in eval_prompts("gsm8k", args.data_dir, args.prompts)]
    runs = {"plain": (None, 1), **{name: (d, 4) for name, d in drafters.items()}}  # plain first: the reference
    totals = {name: [0, 0.0, 0, 0] for name in runs}  # tokens, seconds, steps, identical
    for ids in prompts:
        reference = None
        for name, (drafter, block) in runs.items():
            start = time.perf_counter()
            stats = generate(model, drafter, ids, max_new_tokens=args.new_tokens, block_size=block,
                             stop_token_ids=stops, draft_threshold=0.1 if drafter is not None else 0.0)
            seconds = time.perf_counter() - start
            reference = stats.output_ids if reference is None else reference
            t = totals[name]
            t[0] += stats.num_new_tokens
            t[1] += seconds
            t[2] += len(stats.acceptance_lengths) if drafter is not None else stats.num_new_tokens
            t[3] += int(torch.equal(stats.output_ids, reference))
    plain_rate = totals["plain"][0] / totals["plain"][1]
    print(f"{len(prompts)} GSM8K prompts x up to {args.new_tokens} tokens, block 4, threshold 0.1, fp16 compiled target")
    print("| drafter linears | tok/s | vs plain | tau | identical to plain |")
    print("|---|---|---|---|---|")
    for name, (n, s, steps, same) in totals.items():
        rate = n / s
        print(f"| {name if name != 'plain' else '(plain decoding)'} | {rate:.2f} | {rate / plain_rate:.2f}x | "
              f"{n / steps:.2f} | {same}/{len(prompts)} |")


if __name__ == "__main__":
    main()
