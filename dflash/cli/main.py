"""The `dflash` command: parse flags, build objects, make one call. No decoding logic here.

Subcommands live in their own modules (`dflash/cli/*.py` and the packages they drive); each
exposes `register(subparsers)` that adds its parser and sets `func`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dflash.errors import DFlashError

# module path of each subcommand group, imported only when present (one place to add one)
SUBCOMMAND_MODULES = (
    "dflash.cli.generate",
    "dflash.train.cli",
    "dflash.bench.cli",
    "dflash.serve.cli",
    "dflash.cli.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflash",
        description="Lossless speculative decoding with DFlash block-diffusion drafters. "
        "Without --target, commands use the embedded SmolLM2-135M-Instruct and its shipped drafter.",
    )
    from dflash import __version__

    parser.add_argument("--version", action="version", version=f"dflash {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part of the package is not there (yet)
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DFlashError as exc:
        print(f"dflash {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndflash {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dflash generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
