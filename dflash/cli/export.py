"""`dflash export DRAFTER --for vllm|sglang OUT`: a folder those engines load as is (the released
format: config.json with dflash_config, bf16 model.safetensors), and the serve command to use.
`dflash export DRAFTER --for llama.cpp OUT.gguf`: one GGUF file llama.cpp's DFlash loads beside the
target's GGUF (dflash/export/llamacpp.py), and the llama-server command."""

from __future__ import annotations

import argparse
import json
import shlex
import textwrap

from dflash.config import DEFAULT_TARGET
from dflash.errors import DFlashError


class _IntermixedParser(argparse.ArgumentParser):
    """Takes positionals on both sides of options, as in `dflash export DRAFTER --for llama.cpp OUT.gguf`:
    plain argparse fills positionals from the first run of them only, so OUT would be left over."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inner:  # parse_known_intermixed_args calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a drafter for vLLM, SGLang or llama.cpp and print the serve command",
        description="\n\n".join(textwrap.fill(paragraph, 100) for paragraph in (
            "Validate a drafter (folder or Hub id), write it in the format the engine loads and print the exact "
            "serve command.",
            "vllm, sglang: the released format (config.json with dflash_config.target_layer_ids / mask_token_id, "
            "bf16 model.safetensors) in the folder OUT. vLLM takes the block from num_speculative_tokens + 1, so "
            "the command carries the block size the drafter was trained for.",
            "llama.cpp: one GGUF file OUT (architecture dflash) for llama-server --spec-type draft-dflash, beside "
            "the target's GGUF: block size, mask token, target layers as llama.cpp counts them (ids + 1), the "
            "target's tokenizer copied from its GGUF, 16-bit weights. No llama.cpp checkout is needed. The target "
            "must be a GGUF of an architecture whose llama.cpp graph hands layer features to a drafter (llama, "
            "qwen3, qwen3moe, gemma4, gpt-oss and a few more; not qwen2).")),
        epilog="examples:\n"
        "  dflash export out/drafter                                  # shipped drafter, for vLLM\n"
        "  dflash export --for llama.cpp drafter.gguf                 # shipped drafter + embedded GGUF target\n"
        "  dflash export my-drafter --for llama.cpp my-drafter.gguf --target Qwen3-8B-Q4_K_M.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("drafter", nargs="?", default=None,
                   help="drafter folder or Hub id (default: the one shipped for the embedded target)")
    p.add_argument("out", help="output folder (vllm, sglang) or .gguf file (llama.cpp)")
    p.add_argument("--for", dest="engine", choices=["vllm", "sglang", "llama.cpp"], default="vllm",
                   help="default: vllm")
    p.add_argument("--target", default=None, metavar="NAME_OR_PATH",
                   help=f"the target to put in the command (default: the embedded {DEFAULT_TARGET}: its "
                        "converted safetensors folder for vllm/sglang, its Q4_1 GGUF for llama.cpp); for "
                        "llama.cpp a .gguf file, whose tokenizer goes into the drafter's GGUF")
    p.add_argument("--outtype", choices=["f16", "bf16", "f32"], default="f16",
                   help="llama.cpp: type of the drafter's weight matrices (default: f16, fast on every CPU; "
                        "norms stay f32)")
    p.__class__ = _IntermixedParser  # the subparser is built by main's parser class; only its parsing changes
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
    if args.engine == "llama.cpp":
        return run_llamacpp(args, source)
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


def run_llamacpp(args: argparse.Namespace, source: str) -> int:
    """Write the drafter as one GGUF file for llama.cpp and print the llama-server command."""
    from pathlib import Path

    from dflash.export import llamacpp
    from dflash.model.checkpoint import load_drafter

    if Path(args.out).suffix.lower() != ".gguf":
        raise DFlashError(f"{args.out}: for llama.cpp the output is one file; name it with .gguf")
    if args.target is None:
        from dflash.runtime.loader import embedded_gguf_path

        target_path = embedded_gguf_path()
    else:
        target_path = Path(args.target)
    target = llamacpp.read_target(target_path)
    drafter = load_drafter(source, dtype="float32", device="cpu")  # validates names and shapes
    c = drafter.config
    llamacpp.check_exportable(c, target)  # before reading weights into a file
    name = f"DFlash drafter for {target.path.stem}"
    out = llamacpp.write_gguf(drafter.state_dict(), c, target, args.out, outtype=args.outtype, name=name)
    print(f"wrote {out}: {c.num_hidden_layers} layer(s), block size {c.block_size}, mask token "
          f"{c.mask_token_id}, target layers {c.target_layer_ids} (llama.cpp counts "
          f"{[i + 1 for i in c.target_layer_ids]}), {args.outtype} weights, tokenizer of {target.path.name}")
    if drafter.draft_vocab is not None:
        print(f"note: {source} proposes from a reduced vocabulary here (draft_vocab.json); llama.cpp proposes "
              "from the whole vocabulary with the same weights")
    print(llamacpp.serve_command(target.path, out, c.block_size))
    return 0
