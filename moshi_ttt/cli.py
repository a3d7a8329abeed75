"""``moshi-ttt <command>``: the command-line entry point.

Each command lives next to the code it drives, in a module exposing ``register(subparsers)``
which adds its parser and sets ``func`` (a callable taking the parsed args, returning an exit
code). This file only assembles them; it is the top of the dependency graph.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that provide commands, in the order they appear in --help.
COMMAND_MODULES = (
    "moshi_ttt.ttt.demo",
    "moshi_ttt.data.commands",
    "moshi_ttt.train.commands",
    "moshi_ttt.eval.commands",
    "moshi_ttt.model.generate",
    "moshi_ttt.bench.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moshi-ttt",
        description="Long-term TTT-MLP memory for Moshi: train on long recordings, stream, "
        "evaluate, benchmark. Every command runs on CPU with a tiny preset by default; "
        "real weights and data come from local paths given in a config.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # moshi torch.compiles a few small functions; on CPU that costs ~18 s and buys nothing.
    # Any non-empty value disables it; export NO_TORCH_COMPILE= (empty) to keep compiling.
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .runtime import setup_threads

    setup_threads(getattr(args, "threads", None))  # suited to the free CPUs, printed once
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
