"""`dflash generate PROMPT`: stream one reply, optionally with stats and a plain-decoding comparison."""

from __future__ import annotations

import argparse
import sys

from dflash.cli.common import (add_model_arguments, add_sampling_arguments, describe_setup, draft_threshold,
                               load_models, make_generator)
from dflash.errors import DFlashError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate a reply to one prompt, streaming it",
        description="Generate a reply with DFlash speculative decoding (the chat template is applied). "
        "Greedy output is token-identical to the target's own greedy decoding.",
    )
    p.add_argument("prompt", help="the user message")
    p.add_argument("--system", default=None, help="system message (default: the chat template's own)")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--stats", action="store_true", help="print acceptance lengths, tau and tokens/s")
    p.add_argument("--compare", action="store_true",
                   help="also decode plainly (block size 1) and print the speedup and whether outputs match")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dflash.decode.engine import GenerationStats, generate, stream
    from dflash.decode.sampling import SamplingParams
    from dflash.decode.text import IncrementalDetokenizer
    from dflash.runtime.loader import chat_input_ids, stop_token_ids

    if not args.prompt.strip():
        raise DFlashError("the prompt is empty")
    try:
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k)
    except ValueError as exc:
        raise DFlashError(str(exc)) from None
    plain_only = args.block_size == 1 and not args.compare
    runtime, tokenizer, drafter = load_models(args, need_drafter=not plain_only)
    block_size = 1 if plain_only else (args.block_size or drafter.block_size)
    ids = chat_input_ids(tokenizer, args.prompt, system=args.system)
    stops = stop_token_ids(tokenizer, runtime)
    options = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, stop_token_ids=stops)
    threshold = draft_threshold(args, runtime)

    if args.stats or args.compare:  # first calls pay one-off costs: keep them out of the timings
        generate(runtime, drafter, ids, block_size=block_size, max_new_tokens=2, sampling=sampling)
    stats = GenerationStats()
    generator = make_generator(args.seed, runtime.info.device)
    detokenizer = IncrementalDetokenizer(tokenizer)  # decodes only the new tokens of each step
    for _ in stream(runtime, drafter, ids, block_size=block_size, generator=generator, stats=stats,
                    draft_threshold=threshold, **options):
        sys.stdout.write(detokenizer.add(stats.new_tokens[detokenizer.seen:]))
        sys.stdout.flush()
    sys.stdout.write(detokenizer.flush() + "\n")

    if args.stats or args.compare:
        print(f"[setup] {describe_setup(runtime, block_size, threshold)}")
    if args.stats:
        print_stats("dflash" if block_size > 1 else "plain", stats)
    if args.compare:
        # Timed apart from the streamed reply (whose time includes printing it), each method twice
        # in the order dflash, plain, plain, dflash, so the machine's drift hits both alike.
        def timed(spec: bool) -> GenerationStats:
            return generate(runtime, drafter if spec else None, ids, block_size=block_size if spec else 1,
                            generator=make_generator(args.seed, runtime.info.device),
                            draft_threshold=threshold if spec else 0.0, **options)

        runs = {True: [], False: []}
        for spec in (True, False, False, True):
            runs[spec].append(timed(spec))
        if args.stats:
            print_stats("plain", runs[False][0])
        rate = {spec: sum(r.num_new_tokens for r in rs) / sum(r.total_time for r in rs) for spec, rs in runs.items()}
        same = all(r.new_tokens == stats.new_tokens for r in runs[False])
        print(f"[compare] dflash {rate[True]:.1f} tok/s vs plain {rate[False]:.1f} tok/s (two runs each, "
              f"after the reply): speedup {rate[True] / rate[False]:.2f}x; outputs identical: {'yes' if same else 'no'}"
              + ("" if sampling.greedy else " (sampling: identical outputs are not expected)"))
    return 0


def print_stats(label: str, stats) -> None:
    lengths = " ".join(map(str, stats.acceptance_lengths))
    print(f"[{label}] new tokens {stats.num_new_tokens}, target forwards {len(stats.acceptance_lengths) + 1}, "
          f"tau {stats.tau:.2f}, prefill {stats.prefill_time * 1000:.0f} ms, "
          f"decode {stats.decode_time:.2f} s, {stats.tokens_per_s:.1f} tok/s (end to end)")
    if stats.block_size > 1:
        print(f"[{label}] acceptance lengths: {lengths}")
