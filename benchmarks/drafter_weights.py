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

import torch
from compare_drafters import compiled_target, interleaved_runs

from dflash import DFlashDraftModel, default_drafter_path
from dflash.runtime.packed import pack_fp16_linears


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
    path = args.draft or str(default_drafter_path())
    model, tokenizer = compiled_target()
    drafters = {}
    for name, pack in (("fp16", pack_fp16_linears), ("int8", pack_int8_linears)):
        drafters[name] = DFlashDraftModel.from_pretrained(path, device="cpu")
        pack(drafters[name])
    interleaved_runs(model, tokenizer, drafters, prompts=args.prompts, new_tokens=args.new_tokens,
                     data_dir=args.data_dir)


if __name__ == "__main__":
    main()
