"""`dflash bench` / `python -m dflash.benchmark`: acceptance length, speedup and throughput on the
standard datasets, locally (DFlash vs plain decoding in one process, optionally under torchrun)
or against any OpenAI-compatible server. The reference benchmark's flag names work as they are.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from dflash.cli.common import COMPILE_HELP, CPU_WEIGHTS_HELP, add_draft_threshold_argument, draft_threshold
from dflash.config import DEFAULT_TARGET
from dflash.datasets import DATA_DIR_ENV, EVAL_SETS
from dflash.errors import DFlashError
from dflash.runtime.loader import CPU_WEIGHTS

SERVER_BACKENDS = ("openai", "vllm", "sglang", "llamacpp")
DEFAULT_MAX_NEW_TOKENS = 256
EXAMPLES = """examples:
  dflash bench --dataset gsm8k --max-samples 20                   # embedded target + shipped drafter
  dflash bench --dataset all --max-samples 50 --output results.json --markdown results.md --plots plots/
  torchrun --nproc_per_node 2 -m dflash.benchmark --dataset gsm8k --max-samples 64
  dflash bench --backend vllm --base-url http://127.0.0.1:8000 --dataset gsm8k --concurrency 1,2,4,8
  dflash bench --backend llamacpp --base-url http://127.0.0.1:8080 --max-samples 8   # llama-server --metrics
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="transformers", choices=("transformers", "local") + SERVER_BACKENDS,
                   help="transformers/local: decode in this process; openai/vllm/sglang/llamacpp: send HTTP "
                        "requests to --base-url (default: transformers). Acceptance comes from the server: "
                        "vLLM's and llama-server's /metrics counters (start llama-server with --metrics), "
                        "else llama-server's per-response timings (draft_n, draft_n_accepted)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", nargs="+", default=["gsm8k"], metavar="NAME",
                   help=f"{', '.join(EVAL_SETS)}, `all`, or a JSONL file of `turns` (default: gsm8k)")
    g.add_argument("--max-samples", "--num-prompts", dest="max_samples", type=int, default=None, metavar="N",
                   help="first N prompts of each dataset (default: all)")
    g.add_argument("--data-dir", default=None, help=f"datasets folder (default: ${DATA_DIR_ENV}, then the Hub)")
    g = p.add_argument_group("models")
    g.add_argument("--model", "--target", dest="target", default=None, metavar="NAME_OR_PATH",
                   help=f"target model (local; default: the embedded {DEFAULT_TARGET}) or the model name sent to "
                        "the server (default: the first it lists)")
    g.add_argument("--draft-model", "--draft", dest="draft", default=None, metavar="NAME_OR_PATH",
                   help="DFlash drafter (local; default: the one shipped for the embedded target)")
    g.add_argument("--device", default=None, help="cpu, cuda ... (local; default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="local compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--cpu-weights", default="auto", choices=list(CPU_WEIGHTS),
                   help="local: " + CPU_WEIGHTS_HELP + "; both sides of the speedup use it")
    g.add_argument("--compile", action="store_true", help="local: " + COMPILE_HELP)
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"per turn (default: {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--block-size", type=int, default=None, help="draft block (local; default: the drafter's)")
    add_draft_threshold_argument(g)
    g.add_argument("--enable-thinking", action="store_true", help="ask the chat template for thinking mode")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--no-baseline", action="store_true", help="local: skip plain decoding (no speedup)")
    g.add_argument("--peers", default="", metavar="LIST",
                   help="local: also time these, comma-separated: hf (transformers generate), hf-lookup "
                        "(its prompt-lookup drafting)")
    g = p.add_argument_group("server backends")
    g.add_argument("--base-url", default=None, help="the server, e.g. http://127.0.0.1:8000")
    g.add_argument("--baseline-url", default=None,
                   help="a second server of the same target without drafting: gives speedup per concurrency")
    g.add_argument("--concurrency", default="1", metavar="N[,N...]",
                   help="requests in flight; a list such as 1,2,4,8 sweeps (default: 1)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (default: $OPENAI_API_KEY)")
    g = p.add_argument_group("results")
    g.add_argument("--output", default=None, metavar="FILE.json", help="every figure and the configuration")
    g.add_argument("--markdown", default=None, metavar="FILE.md", help="the table as Markdown")
    g.add_argument("--plots", default=None, metavar="DIR", help="PNG plots (acceptance histogram; concurrency)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark tau, speedup and throughput on the standard datasets",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def check(args: argparse.Namespace) -> list[int]:
    """Refuse what cannot work; returns the concurrency levels."""
    if args.max_samples is not None and args.max_samples < 1:
        raise DFlashError("--max-samples must be at least 1")
    if args.max_new_tokens < 1:
        raise DFlashError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise DFlashError("--temperature must not be negative")
    if args.block_size is not None and args.block_size < 1:
        raise DFlashError("--block-size must be at least 1")
    try:
        levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    except ValueError:
        raise DFlashError(f"--concurrency takes numbers such as 1 or 1,2,4,8, not {args.concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise DFlashError("--concurrency levels must be at least 1")
    if args.backend in SERVER_BACKENDS and not args.base_url:
        raise DFlashError(f"--backend {args.backend} needs --base-url (e.g. http://127.0.0.1:8000)")
    return levels


def load_prompts(args: argparse.Namespace) -> dict[str, list[list[str]]]:
    from dflash.datasets import eval_prompts

    names = list(EVAL_SETS) if [n.lower() for n in args.dataset] == ["all"] else args.dataset
    return {Path(n).stem if n.endswith(".jsonl") else n: eval_prompts(n, args.data_dir, args.max_samples)
            for n in names}


def run(args: argparse.Namespace) -> int:
    levels = check(args)
    prompts = load_prompts(args)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    if args.backend in SERVER_BACKENDS:
        result = run_server(args, levels, prompts)
    else:
        result = run_in_process(args, prompts)
    if result is None:  # a torchrun rank other than 0
        return 0
    result["config"] = {**config, **result.get("config", {})}
    if args.output:
        from dflash.bench.report import write_json
        write_json(args.output, result)
        print(f"results: {args.output}")
    return 0


def _progress(total: int, disabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=disabled, dynamic_ncols=True)


def run_in_process(args: argparse.Namespace, prompts: dict[str, list[list[str]]]) -> dict[str, Any] | None:
    from dflash.bench import report
    from dflash.bench.local import TransformersGenerate, gather, run_local, shard
    from dflash.cli.common import load_models
    from dflash.decode.sampling import SamplingParams
    from dflash.distributed import close_distributed, init_distributed
    from dflash.runtime.loader import stop_token_ids

    d, device = init_distributed(args.device)
    if d.joined:
        args.device = str(device)
    try:
        sampling = SamplingParams(args.temperature)
        need_drafter = args.block_size != 1
        runtime, tokenizer, drafter = load_models(args, need_drafter=need_drafter)
        block_size = 1 if not need_drafter else (args.block_size or drafter.block_size)
        stops = stop_token_ids(tokenizer, runtime)
        peers = []
        for name in filter(None, (x.strip() for x in args.peers.split(","))):
            if name not in ("hf", "hf-lookup"):
                raise DFlashError(f"--peers: unknown peer {name!r} (hf, hf-lookup)")
            peers.append(TransformersGenerate(runtime.model, args.max_new_tokens, sampling, stops,
                                              prompt_lookup=10 if name == "hf-lookup" else 0))
        mine = sum(len(shard(items)) for items in prompts.values())
        with _progress(mine, args.no_progress or not d.main, "bench") as bar:
            records = run_local(runtime, drafter, tokenizer, prompts, block_size=block_size,
                                max_new_tokens=args.max_new_tokens, sampling=sampling, stops=stops,
                                baseline=not args.no_baseline and block_size > 1, peers=peers,
                                enable_thinking=args.enable_thinking, seed=args.seed, progress=bar.update,
                                draft_threshold=draft_threshold(args, runtime))
        records = gather(records)
    finally:
        close_distributed(d)
    if records is None:
        return None
    summary = report.summarize_local(records, block_size)
    columns = [c for c, _ in report.LOCAL_COLUMNS]
    rows = report.local_rows(summary)
    report.print_table(f"DFlash, block size {block_size}, {args.max_new_tokens} new tokens, "
                       f"temperature {args.temperature}", columns, rows)
    for name, s in summary.items():
        for peer, p in s.get("peers", {}).items():
            print(f"{name}: {peer} {p['tokens_per_s']:.1f} tok/s; dflash is {p['dflash_speedup_over']:.2f}x faster")
    if args.markdown:
        Path(args.markdown).write_text(report.markdown_table(columns, rows))
    if args.plots:
        print(f"plot: {report.plot_histograms(summary, Path(args.plots) / 'acceptance_histogram.png')}")
    return {"config": {"block_size": block_size, "world_size": d.world,
                       "drafter": getattr(getattr(drafter, "config", None), "name_or_path", None) or args.draft,
                       "device": str(runtime.info.device)},
            "datasets": summary, "prompts": records}


def run_server(args: argparse.Namespace, levels: list[int], prompts: dict[str, list[list[str]]]) -> dict[str, Any]:
    from dflash.bench import report
    from dflash.bench.http import run_http

    total = sum(len(v) for v in prompts.values())
    summaries, raw = [], []
    for level in levels:
        row: dict[str, Any] = {}
        for label, url in (("dflash", args.base_url), ("baseline", args.baseline_url)):
            if url is None:
                continue
            with _progress(total, args.no_progress, f"{label} c={level}") as bar:
                result = run_http(url, args.target, prompts, level, max_tokens=args.max_new_tokens,
                                  temperature=args.temperature, api_key=args.api_key,
                                  enable_thinking=args.enable_thinking, seed=args.seed, progress=bar.update)
            s = report.summarize_http(result)
            raw.append({"label": label, "concurrency": level, "model": result["model"], "records": result["records"]})
            if label == "dflash":
                row = s
            else:
                row["baseline_tokens_per_s"] = s["tokens_per_s"]
                row["speedup"] = row["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else None
        summaries.append(row)
    columns = [c for c, _ in report.HTTP_COLUMNS]
    rows = report.http_rows(summaries)
    report.print_table(f"{args.backend} server at {args.base_url}, {args.max_new_tokens} max tokens", columns, rows)
    if args.markdown:
        Path(args.markdown).write_text(report.markdown_table(columns, rows))
    if args.plots:
        print(f"plot: {report.plot_concurrency(summaries, Path(args.plots) / 'concurrency.png')}")
    return {"levels": summaries, "requests": raw}


def main(argv: list[str] | None = None) -> int:
    """`python -m dflash.benchmark` (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="python -m dflash.benchmark", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DFlashError as exc:
        print(f"dflash bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndflash bench: interrupted", file=sys.stderr)
        return 130
