"""`dflash data` (regenerate responses with the target) and `dflash train` (train a drafter).
Flag parsing and one call each; the work lives in dflash/train/data.py and trainer.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from dflash.cli.common import add_model_arguments
from dflash.errors import DFlashError


def register(subparsers: argparse._SubParsersAction) -> None:
    from dflash.train import trainer

    p = subparsers.add_parser(
        "data",
        help="regenerate training responses with the target itself",
        description="Answer prompt pools with the target (greedy by default) and append each finished "
        "conversation to OUT as gzipped JSON lines {id, source, messages, finish, new_tokens}. Rerunning "
        "the same command resumes: ids already in OUT are skipped. Ids are row indices in the "
        "concatenation of the pools given.",
    )
    p.add_argument("pools", nargs="+", metavar="POOL",
                   help="a JSONL file of rows with `turns`, a NAME in the data directory (DIR/train/NAME.jsonl), "
                        "or a Hugging Face Hub dataset id")
    p.add_argument("--out", required=True, help="output file (.jsonl.gz or .jsonl); appended to")
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $DFLASH_DATA_DIR)")
    # --target, --device, --dtype, --cpu-weights (default auto: the native GGUF runtime for a GGUF target on a
    # CPU, the fastest; answers are decoded through the runtime interface, so every choice works)
    add_model_arguments(p, draft=False, compile=False)
    p.add_argument("--max-new-tokens", type=int, default=512, help="reply length cap per turn (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--num-prompts", "--limit", dest="limit", type=int, default=None,
                   help="answer at most this many of the selected rows")
    p.add_argument("--offset", type=int, default=0, help="first row index (default 0)")
    p.add_argument("--stride", type=int, default=1, help="take every STRIDE-th row, e.g. --offset 1 --stride 2 for odd rows")
    p.add_argument("--batch-size", type=int, default=8,
                   help="conversations decoded together, as rows of one cache (default 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_data)

    t = subparsers.add_parser(
        "train",
        help="train a DFlash drafter for a target",
        description=trainer.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    trainer.add_arguments(t)
    t.set_defaults(func=run_train)


def run_data(args: argparse.Namespace) -> int:
    from dflash.runtime.loader import load_target
    from dflash.train.data import done_ids, find_pool, regenerate, select

    if args.max_new_tokens < 1 or args.batch_size < 1 or args.stride < 1 or args.offset < 0:
        raise DFlashError("--max-new-tokens, --batch-size and --stride must be at least 1, --offset at least 0")
    if args.temperature < 0 or (args.limit is not None and args.limit < 0):
        raise DFlashError("--temperature and --num-prompts must not be negative")
    rows = [r for name in args.pools for r in find_pool(name, args.data_dir)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = select(rows, args.offset, args.stride, args.limit, done_ids(out))
    print(f"dflash data: {len(rows)} rows in the pools, {len(todo)} to answer -> {out}", flush=True)
    if not todo:
        return 0
    runtime, tokenizer = load_target(args.target, dtype=args.dtype, device=args.device, cpu_weights=args.cpu_weights)
    print(f"dflash data: target {runtime.info.precision} on {runtime.info.device}", flush=True)
    n = regenerate(todo, runtime, tokenizer, out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, seed=args.seed, progress=not args.no_progress)
    print(f"dflash data: wrote {n} conversations to {out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from dflash.train.trainer import train

    train(args)
    return 0
