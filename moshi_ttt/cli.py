"""``moshi-ttt <command>``: the command-line entry point (``python -m moshi_ttt`` is the same).

Each command lives next to the code it drives, in a module exposing ``register(subparsers)``
which adds its parser and sets ``func`` (a callable taking the parsed args, returning an exit
code). This file only assembles them; it is the top of the dependency graph.

One style for every command: a config file plus dotted overrides, flags for the common ones.
``train``, ``experiment`` and ``bench cost`` read a typed config (``CONFIG`` + ``--set optim.lr=...``).
Every other command gets ``--config FILE`` (a YAML mapping of its options) and ``--set KEY=VALUE``
here (:func:`add_config_options`): the keys are its flags' names with ``_`` (``--max-files`` ->
``max_files``), typed and checked through ``records.load`` like any config, so a wrong value names
the key and the value. The file is the base, the command line overrides it; one option given both as
a flag and with ``--set`` is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Literal

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
    ConfigValueError,
    MoshiTTTError,
    describe_os_error,
)

# Modules that provide commands, in the order they appear in --help.
COMMAND_MODULES = (
    "moshi_ttt.ttt.demo",
    "moshi_ttt.data.commands",
    "moshi_ttt.train.commands",
    "moshi_ttt.eval.evaluate",
    "moshi_ttt.eval.experiment",
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
    for leaf in _leaf_parsers(parser):
        if not any(a.dest == "set" for a in leaf._actions):  # train, experiment, bench cost: a typed config
            add_config_options(leaf)
    return parser


# ----------------------------------------------------------------------------- config file + --set
_FILE = "options_file"   # dest of --config (``config`` is the positional of train and experiment)
_OWN = {"help", _FILE, "set", "func", "options_parser"}


def _leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that run a command (``bench model`` rather than ``bench``)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for a in subs:
        for p in dict.fromkeys(a.choices.values()):
            yield from _leaf_parsers(p)


def add_config_options(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set KEY=VALUE`` over the options of command parser ``p``."""
    g = p.add_argument_group("config file and overrides (every option, by its name with _)")
    g.add_argument("--config", dest=_FILE, metavar="YAML", default=None,
                   help="a YAML mapping of options, e.g. 'lanes: 2' (the command line overrides it)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set an option, e.g. --set max_files=4 (repeatable)")
    p.set_defaults(options_parser=p)


def _option_type(a: argparse.Action) -> Any:
    """The type a config file gives for option ``a``, from what argparse would accept."""
    if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return bool
    if isinstance(a, argparse.BooleanOptionalAction):
        return bool | None
    if not isinstance(a, (argparse._StoreAction, argparse._AppendAction)):
        return Any
    base: Any = a.type if a.type in (int, float) else str
    if a.choices is not None:
        base = Literal[tuple(a.choices)]
    if a.nargs in ("+", "*") or isinstance(a, argparse._AppendAction):
        base = list[base]
    return base | None if a.default is None or a.nargs == "?" else base


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.dest not in _OWN and a.dest is not argparse.SUPPRESS
            and not isinstance(a, argparse._SubParsersAction)}


def _given(p: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options of ``p`` given on the command line (parsed again with every default suppressed)."""
    saved = {a: a.default for a in p._actions}
    try:
        for a in p._actions:
            a.default = argparse.SUPPRESS
        ns, _ = p.parse_known_args(argv)
    finally:
        for a, d in saved.items():
            a.default = d
    return set(vars(ns))


def apply_config_options(args: argparse.Namespace, argv: list[str]) -> None:
    """Fold ``--config FILE`` and ``--set`` into ``args``: a record of the command's options is
    built from its defaults, the file, the overrides and the flags given, through ``records.load``."""
    from .records import load, read_yaml

    p: argparse.ArgumentParser = args.options_parser
    path, sets = getattr(args, _FILE), list(args.set)
    if path is None and not sets:
        return
    opts = _options(p)
    given = _given(p, _subcommand_args(p, argv))
    twice = sorted(k for k in given & {s.split("=", 1)[0].strip() for s in sets} if k in opts)
    if twice:
        flag = opts[twice[0]].option_strings or [twice[0]]
        raise ConfigValueError(f"{twice[0]}: given both as {flag[-1]} and with --set; give it once")
    data = read_yaml(path, sets)
    unknown = sorted(set(data) - set(opts))
    if unknown:
        raise ConfigValueError(f"{unknown[0]}: unknown option of this command; known: {', '.join(sorted(opts))}")
    # Only what the file and --set give is validated (argparse checked the flags; a flag given wins
    # over the file): a record whose fields are the options, typed from what argparse accepts.
    record = dataclasses.make_dataclass(
        f"{p.prog.replace('moshi-ttt ', '').replace(' ', '_')}_options",
        [(k, _option_type(a), dataclasses.field(default=None)) for k, a in opts.items()])
    chosen = {k: v for k, v in data.items() if k not in given}
    values = load(record, chosen)
    for k in chosen:
        v, a = getattr(values, k), opts[k]
        if v is not None and a.type is not None and a.type not in (int, float, str) and isinstance(v, str):
            try:
                v = a.type(v)  # a path, or a command's own parser of one value
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                raise ConfigValueError(f"{k}: {e}, got {v!r}") from None
        setattr(args, k, v)


def _subcommand_args(p: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` after the command names (``bench model ...`` -> ``...``) for parser ``p``."""
    words = p.prog.split()[1:]
    i = 0
    for w in words:
        if w in argv[i:]:
            i = argv.index(w, i) + 1
    return argv[i:]


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
        if getattr(args, "options_parser", None) is not None:
            apply_config_options(args, argv)
        setup_threads(getattr(args, "threads", None))  # suited to the free CPUs, printed once
        return int(args.func(args) or 0)

    return run_guarded(command, debug)


__all__ = ["main", "build_parser", "classify", "run_guarded", "EXIT_CHECKPOINT", "EXIT_STOPPED"]


if __name__ == "__main__":
    sys.exit(main())
