"""Flags and loading shared by every subcommand that runs a target (and maybe a drafter)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from dflash.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TARGET
from dflash.errors import DFlashError
from dflash.runtime.loader import CPU_WEIGHTS
from dflash.runtime.packed import apply_cpu_weights


CPU_WEIGHTS_HELP = (
    "how a CPU target computes. gguf: a GGUF target's own quantised weights (Q4_0/Q4_1/Q8_0) through "
    "dflash's native kernels, no conversion, the fastest; fp16: half-precision weights and a lean "
    "forward (Llama-architecture); float32: the model as transformers loads it (a GGUF dequantised "
    "once), the reference precision. Each is a slightly different model; speculative decoding is "
    "exact against plain decoding of the same one. (default: auto = gguf for a GGUF target such as "
    "the embedded default, float32 otherwise)")
COMPILE_HELP = ("with --cpu-weights fp16 on a Llama-architecture target: run its decoding steps through "
                "torch.compile (~25%% faster a step on a 2-core CPU; needs a C++ compiler, which also builds "
                "dflash's native step operators once, ~10 s). Each block length compiles once, ~15 s, before "
                "decoding starts; compiled code is cached on disk (TORCHINDUCTOR_CACHE_DIR, default "
                "~/.cache/dflash/inductor)")


def add_model_arguments(parser: argparse.ArgumentParser, draft: bool = True, compile: bool = True) -> None:
    """--target, --draft, --device, --dtype, --cpu-weights, --compile."""
    group = parser.add_argument_group("models")
    group.add_argument("--target", default=None, metavar="NAME_OR_PATH",
                       help=f"target model: a Hub id, a local folder or a .gguf file "
                            f"(default: the embedded {DEFAULT_TARGET})")
    if draft:
        group.add_argument("--draft", default=None, metavar="NAME_OR_PATH",
                           help="DFlash drafter folder or Hub id (default: the drafter shipped for the "
                                "embedded target)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    group.add_argument("--cpu-weights", default="auto", choices=list(CPU_WEIGHTS), help=CPU_WEIGHTS_HELP)
    if compile:
        group.add_argument("--compile", action="store_true", help=COMPILE_HELP)


# On a CPU every verified token costs a share of a step: verify only drafts likely enough to pay
# for theirs. Measured best (docs/benchmarks.md): 0.1 where 8-bit products have VNNI (an extra
# token ~0.15 of a step), 0.3 on the AVX2 and portable kernels (~0.3 of a step), 0.1 on torch's.
CPU_DRAFT_THRESHOLDS = {"avx512": 0.1, "avx2": 0.3, "portable": 0.3}
CPU_DRAFT_THRESHOLD = 0.1


def add_draft_threshold_argument(group: Any) -> None:
    group.add_argument("--draft-threshold", type=float, default=None, metavar="P",
                       help="verify only the leading drafts whose top probabilities, multiplied up, stay >= P "
                            "(for a batch: the longest such prefix among its rows): shorter blocks where the "
                            "drafter guesses, the same output (default on a CPU: 0.1 on the native AVX-512 "
                            "kernels, 0.3 on AVX2, 0.1 with torch's; 0 = the whole block, the GPU's default)")


def draft_threshold(args: argparse.Namespace, runtime: Any) -> float:
    """--draft-threshold, or its default for what runs the target; refuses one outside [0, 1)."""
    value = getattr(args, "draft_threshold", None)
    if value is None:
        if runtime.info.device.type != "cpu":
            return 0.0
        return CPU_DRAFT_THRESHOLDS.get(getattr(runtime, "isa", None), CPU_DRAFT_THRESHOLD)
    if not 0 <= value < 1:
        raise DFlashError(f"--draft-threshold must be in [0, 1), got {value}")
    return value


def describe_setup(runtime: Any, block_size: int, threshold: float) -> str:
    """One line saying what decodes, so that a figure can be reproduced."""
    kernels = getattr(runtime, "isa", None)
    target = runtime.info.precision + (f" ({kernels} kernels)" if kernels else "")
    draft = f"block {block_size}, draft threshold {threshold:g}" if block_size > 1 else "plain decoding"
    threads = getattr(runtime, "threads", None) or torch.get_num_threads()  # (the native runtime's pool has its own)
    return f"target {target} on {runtime.info.device}, {draft}, {threads} threads"


def add_sampling_arguments(parser: argparse.ArgumentParser, block_size: bool = True) -> None:
    group = parser.add_argument_group("decoding")
    if block_size:
        group.add_argument("--block-size", type=int, default=None,
                           help="tokens per draft block, 1 = plain decoding (default: the drafter's trained size)")
        add_draft_threshold_argument(group)
    group.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                       help=f"stop after this many new tokens (default: {DEFAULT_MAX_NEW_TOKENS})")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    group.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: 0 = off)")
    group.add_argument("--seed", type=int, default=None, help="seed for sampling")


def resolve_draft_path(target: str | None, draft: str | None) -> str | None:
    """The drafter to use: the one given, else the shipped one for the embedded target."""
    if draft is not None:
        return draft
    if target is None or target.lower() == DEFAULT_TARGET:
        from dflash.drafters import default_drafter_path

        shipped = default_drafter_path()
        return str(shipped) if shipped else None
    return None


def load_models(args: argparse.Namespace, need_drafter: bool = True) -> tuple[Any, Any, Any]:
    """(target runtime, tokenizer, drafter or None) from --target/--draft/--device/--dtype/--cpu-weights;
    with --compile, the runtime's steps are compiled before this returns."""
    from dflash.model.drafter import DFlashDraftModel
    from dflash.runtime.loader import load_target

    draft_path = resolve_draft_path(args.target, getattr(args, "draft", None))
    if need_drafter and draft_path is None:
        if args.target is None:
            raise DFlashError("no trained drafter ships for the embedded target yet: pass --draft PATH "
                              "(or --block-size 1 for plain decoding)")
        raise DFlashError(f"--draft is required for target {args.target!r} (or --block-size 1 for plain decoding)")
    runtime, tokenizer = load_target(args.target, dtype=args.dtype, device=args.device,
                                   cpu_weights=getattr(args, "cpu_weights", None),
                                   compile=getattr(args, "compile", False))
    drafter = None
    if draft_path is not None and need_drafter:
        drafter = DFlashDraftModel.from_pretrained(draft_path, dtype=args.dtype, device=runtime.info.device)
        prepare_drafter(drafter, runtime)
    if getattr(args, "compile", False):
        block_size = getattr(args, "block_size", None) or (drafter.block_size if drafter is not None else 1)
        announce_and_compile(runtime, drafter, block_size)
    return runtime, tokenizer, drafter


def prepare_drafter(drafter: Any, runtime: Any) -> Any:
    """Store a drafter's weights for the runtime beside it: Q8_0 through the native kernels beside
    the native GGUF runtime, fp16 beside another CPU target that is not the float32 reference, else
    as loaded. Drafts are checked by the target: only speed (and, slightly, acceptance) changes."""
    info = runtime.info
    if info.device.type != "cpu" or info.precision in ("float32", ""):
        return drafter
    if info.precision.startswith("gguf"):
        from dflash.runtime.gguf import quantize_linears

        quantize_linears(drafter)
        return drafter
    return apply_cpu_weights(drafter, "fp16")


def announce_and_compile(runtime: Any, drafter: Any, block_size: int) -> None:
    """Prepare a `--compile` target's decoding steps now, before any output streams: every block
    length up to `block_size`, with the drafter's features bound when it drafts."""
    if drafter is not None and block_size > 1:
        runtime.bind(drafter.target_layer_ids)
    print("dflash: compiling the target's decoding steps (the first time ~15 s per block length; "
          "cached on disk)...", file=sys.stderr, flush=True)
    seconds = runtime.warmup(range(1, block_size + 1))
    print(f"dflash: compiled in {seconds:.1f} s", file=sys.stderr, flush=True)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def existing_file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    return path
