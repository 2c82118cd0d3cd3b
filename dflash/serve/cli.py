"""`dflash serve` (an OpenAI-compatible server) and `dflash chat` (a terminal chat), both on the
DFlash engine. `--speculative-config` is read as vLLM spells it, so a vLLM command line carries
over."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dflash.cli.common import (add_draft_threshold_argument, add_model_arguments, add_sampling_arguments, draft_threshold,
                               load_models)
from dflash.config import DEFAULT_TARGET
from dflash.errors import DFlashError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible API (chat, completions, streaming, metrics)",
        description="Serve the target with DFlash speculative decoding over the OpenAI API: "
        "/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics (Prometheus). "
        "Greedy answers are token-identical to the target's own greedy decoding.",
        epilog="example: dflash serve --port 8000 --api-key secret\n"
               "         dflash serve --target Qwen/Qwen3-8B --speculative-config "
               "'{\"method\": \"dflash\", \"model\": \"z-lab/Qwen3-8B-DFlash-b16\", \"num_speculative_tokens\": 15}'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_positional", nargs="?", default=None, metavar="TARGET",
                   help="target model, as `vllm serve TARGET` takes it (same as --target)")
    add_model_arguments(p)
    p.add_argument("--block-size", type=int, default=None,
                   help="draft block size, 1 = plain decoding (default: the drafter's trained size)")
    add_draft_threshold_argument(p)
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='vLLM style: {"method": "dflash", "model": DRAFTER, "num_speculative_tokens": N} '
                        "(block size N + 1)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the target name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="sequences decoded together per step (continuous batching; default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests queued or running before new ones get 503 (default 64)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)

    c = subparsers.add_parser("chat", help="chat in the terminal (multi-turn, streaming)",
                              description="An interactive chat on the DFlash engine. Commands: /reset clears the "
                              "history, /stats toggles per-reply statistics, /exit (or Ctrl-D) quits.")
    add_model_arguments(c)
    add_sampling_arguments(c)
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=run_chat)


def apply_speculative_config(args: argparse.Namespace) -> None:
    """Fold vLLM's --speculative-config into --draft / --block-size."""
    if args.speculative_config is None:
        return
    try:
        spec = json.loads(args.speculative_config)
    except json.JSONDecodeError as exc:
        raise DFlashError(f"--speculative-config is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise DFlashError("--speculative-config must be a JSON object")
    method = str(spec.get("method", "dflash")).lower()
    if method != "dflash":
        raise DFlashError(f"--speculative-config method {method!r}: this server runs DFlash drafters only")
    if spec.get("model"):
        if args.draft and args.draft != spec["model"]:
            raise DFlashError("--draft and --speculative-config name different drafters")
        args.draft = spec["model"]
    n = spec.get("num_speculative_tokens")
    if n is not None:
        if not isinstance(n, int) or n < 0:
            raise DFlashError("num_speculative_tokens must be a whole number >= 0")
        if args.block_size is not None and args.block_size != n + 1:
            raise DFlashError("--block-size and num_speculative_tokens disagree (block size = tokens + 1)")
        args.block_size = n + 1


def build(args: argparse.Namespace) -> tuple[Any, str]:
    """(scheduler, served model name) from the flags."""
    from dflash.serve.metrics import ServerMetrics
    from dflash.serve.scheduler import Scheduler
    from dflash.runtime.loader import stop_token_ids

    if getattr(args, "model_positional", None):
        if args.target and args.target != args.model_positional:
            raise DFlashError("give the target once: as TARGET or as --target")
        args.target = args.model_positional
    block = getattr(args, "block_size", None)
    if block is not None and block < 1:
        raise DFlashError("--block-size must be at least 1")
    runtime, tokenizer, drafter = load_models(args, need_drafter=block != 1)
    block = 1 if drafter is None else (block or drafter.block_size)
    if drafter is not None and block > drafter.block_size:
        raise DFlashError(f"--block-size {block} exceeds the {drafter.block_size} this drafter was trained for")
    scheduler = Scheduler(runtime, drafter if block > 1 else None, tokenizer, block_size=block,
                          stop_token_ids=stop_token_ids(tokenizer, runtime),
                          draft_threshold=draft_threshold(args, runtime),
                          max_queue=getattr(args, "max_queue", 64),
                          max_batch_size=getattr(args, "max_batch_size", 8), metrics=ServerMetrics())
    name = getattr(args, "served_model_name", None) or args.target or DEFAULT_TARGET
    return scheduler, name


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from dflash.serve.app import create_app

    apply_speculative_config(args)
    if args.max_queue < 1 or args.max_batch_size < 1 or not 0 < args.port < 65536:
        raise DFlashError("--max-queue and --max-batch-size must be at least 1 and --port in 1..65535")
    scheduler, name = build(args)
    aliases = tuple(x for x in (args.target, DEFAULT_TARGET if args.target is None else None) if x)
    app = create_app(scheduler, name, api_key=args.api_key, aliases=aliases)
    print(f"dflash serve: {name} (block size {scheduler.block_size}) on http://{args.host}:{args.port}/v1",
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        scheduler.close()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from dflash.cli.common import make_generator
    from dflash.decode.engine import GenerationStats, stream
    from dflash.decode.sampling import SamplingParams
    from dflash.decode.text import IncrementalDetokenizer
    from dflash.runtime.loader import chat_input_ids, stop_token_ids

    try:
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k)
    except ValueError as exc:
        raise DFlashError(str(exc)) from None
    runtime, tokenizer, drafter = load_models(args, need_drafter=args.block_size != 1)
    block = 1 if drafter is None else (args.block_size or drafter.block_size)
    stops = stop_token_ids(tokenizer, runtime)
    generator = make_generator(args.seed, runtime.info.device)
    history: list[dict[str, str]] = []
    show_stats = False
    print("dflash chat: /reset clears the history, /stats toggles statistics, /exit quits", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if line == "/stats":
            show_stats = not show_stats
            print(f"(statistics {'on' if show_stats else 'off'})")
            continue
        history.append({"role": "user", "content": line})
        ids = chat_input_ids(tokenizer, history, system=args.system)
        stats = GenerationStats()
        detokenizer = IncrementalDetokenizer(tokenizer)  # decodes only the new tokens of each step
        reply = ""
        sys.stdout.write("assistant> ")
        try:
            for _ in stream(runtime, drafter, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling,
                            block_size=block, stop_token_ids=stops, generator=generator, stats=stats,
                            draft_threshold=draft_threshold(args, runtime)):
                text = detokenizer.add(stats.new_tokens[detokenizer.seen:])
                reply += text
                sys.stdout.write(text)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the chat
            print(" [interrupted]")
        reply += detokenizer.add(stats.new_tokens[detokenizer.seen:]) + detokenizer.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
        if show_stats:
            print(f"({stats.num_new_tokens} tokens, tau {stats.tau:.2f}, {stats.tokens_per_s:.1f} tok/s)")
