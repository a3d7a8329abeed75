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
import traceback
from collections.abc import Callable

from .errors import (
    EXIT_CHECKPOINT,
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_DEVICE,
    EXIT_INTERNAL,
    EXIT_IO,
    EXIT_SIGINT,
    EXIT_STOPPED,
    EXIT_WEIGHTS,
    USER_OS_ERRNOS,
    MoshiTTTError,
    describe_os_error,
)

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
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks instead of one-line errors (also after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def classify(e: BaseException) -> tuple[int, str]:
    """An exception a user can cause -> (exit code, one-line message); anything else is internal (70)."""
    from .data.report import DataError

    if isinstance(e, MoshiTTTError):  # ConfigValueError, TTTConfigError included: exit code 2
        return e.exit_code, str(e)
    if isinstance(e, DataError):
        return EXIT_DATA, str(e)
    name = type(e).__name__
    msg = " ".join(str(e).split())[:500]
    if name == "AudioInputError":  # model/generate.py's input error (a ValueError)
        return EXIT_DATA, msg
    if name == "OutOfMemoryError" or "out of memory" in msg.lower():
        return EXIT_DEVICE, f"out of device memory ({msg[:200]}); lower data.lanes or data.chunk_frames"
    if isinstance(e, OSError) and (e.errno in USER_OS_ERRNOS):
        return EXIT_IO, describe_os_error(e)
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return EXIT_IO, msg  # raised with a message only (no errno): the message names the path
    if name == "SafetensorError":  # raised for I/O failures and for corrupt files alike
        low = msg.lower()
        if "no space" in low or "os error 28" in low or "os { code: 28" in low:
            return EXIT_IO, f"disk full while writing a safetensors file ({msg})"
        return EXIT_WEIGHTS, f"unreadable or corrupt safetensors file ({msg})"
    if isinstance(e, (RuntimeError, AssertionError)) and (
            "device string" in msg or "Expected one of" in msg or "not compiled with CUDA" in msg
            or "no CUDA GPUs" in msg or "CUDA driver" in msg):
        return EXIT_DEVICE, f"device problem: {msg}"
    return EXIT_INTERNAL, f"internal error ({name}: {msg}); rerun with --debug for the traceback and report it"


def run_guarded(func: Callable[[], int | None], debug: bool) -> int:
    """Run a command: its exit code, or one clear line and the code of the error's kind."""
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the whole point: no traceback for a user's mistake
        code, msg = classify(e)
        if debug:
            traceback.print_exc()
        print(f"error: {msg}", file=sys.stderr)
        return code


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` anywhere on the command line, or ``MOSHI_TTT_DEBUG=1``."""
    return "--debug" in argv or os.environ.get("MOSHI_TTT_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    # moshi torch.compiles a few small functions; on CPU that costs ~18 s and buys nothing.
    # Any non-empty value disables it; export NO_TORCH_COMPILE= (empty) to keep compiling.
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    # --debug is accepted after the command name too (subparsers do not know it).
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    from .runtime import setup_threads

    def command() -> int:
        setup_threads(getattr(args, "threads", None))  # suited to the free CPUs, printed once
        return int(args.func(args) or 0)

    return run_guarded(command, debug)


__all__ = ["main", "build_parser", "classify", "run_guarded", "EXIT_CHECKPOINT", "EXIT_STOPPED"]


if __name__ == "__main__":
    sys.exit(main())
