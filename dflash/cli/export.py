"""`dflash export DRAFTER --for vllm|sglang OUT`: a folder those engines load as is (the released
format: config.json with dflash_config, bf16 model.safetensors), and the serve command to use."""

from __future__ import annotations

import argparse
import json
import shlex

from dflash.config import DEFAULT_TARGET
from dflash.errors import DFlashError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a drafter for vLLM or SGLang and print the serve command",
        description="Validate a drafter (folder or Hub id), write it in the released format vLLM and SGLang "
        "load (config.json with dflash_config.target_layer_ids / mask_token_id, bf16 model.safetensors) and "
        "print the exact serve command. vLLM takes the block from num_speculative_tokens + 1, so the command "
        "carries the block size the drafter was trained for.")
    p.add_argument("drafter", nargs="?", default=None,
                   help="drafter folder or Hub id (default: the one shipped for the embedded target)")
    p.add_argument("out", help="output folder")
    p.add_argument("--for", dest="engine", choices=["vllm", "sglang"], default="vllm", help="default: vllm")
    p.add_argument("--target", default=None, metavar="NAME_OR_PATH",
                   help=f"the target to put in the command (default: the embedded {DEFAULT_TARGET}, as its "
                        "converted safetensors folder)")
    p.set_defaults(func=run)


def serve_command(engine: str, target: str, drafter: str, block_size: int) -> str:
    """The command that serves `target` with `drafter` on that engine."""
    if engine == "vllm":
        spec = json.dumps({"method": "dflash", "model": drafter, "num_speculative_tokens": block_size - 1})
        return f"vllm serve {shlex.quote(target)} --speculative-config {shlex.quote(spec)}"
    return (f"python -m sglang.launch_server --model-path {shlex.quote(target)} --speculative-algorithm DFLASH "
            f"--speculative-draft-model-path {shlex.quote(drafter)} --speculative-num-draft-tokens {block_size}")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dflash.cli.common import resolve_draft_path
    from dflash.model.checkpoint import load_drafter

    source = args.drafter or resolve_draft_path(None, None)
    if source is None:
        raise DFlashError("no drafter given and none ships for the embedded target")
    drafter = load_drafter(source, dtype="float32", device="cpu")  # validates names and shapes
    restricted = drafter.draft_vocab is not None
    drafter.draft_vocab = None  # the engines propose from the whole vocabulary
    out = Path(args.out).expanduser().resolve()
    drafter.save_pretrained(str(out))
    if args.target is None:
        from dflash.runtime.loader import resolve_target

        target = str(resolve_target(None))
    else:
        target = args.target
    c = drafter.config
    print(f"wrote {out}: {c.num_hidden_layers} layer(s), block size {c.block_size}, target layers "
          f"{c.target_layer_ids}, mask token {c.mask_token_id}")
    if restricted:
        print(f"note: {source} proposes from a reduced vocabulary here (draft_vocab.json); {args.engine} proposes "
              "from the whole vocabulary with the same weights")
    print(serve_command(args.engine, target, str(out), c.block_size))
    return 0
