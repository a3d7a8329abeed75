"""``moshi-ttt train CONFIG.yaml``; also ``torchrun --nproc_per_node N -m moshi_ttt.train CONFIG.yaml``."""

from __future__ import annotations

import argparse
import sys

HELP = """Train the TTT memory on long recordings, in order, chunk after chunk.

Each step takes one chunk per lane (a lane plays one file after another), resets the memory of the
lanes whose file starts, carries attention keys/values and the TTT memory from the previous chunk,
and backpropagates within the chunk. Checkpoints (run_dir/checkpoints) hold everything to continue
exactly: --resume picks the newest intact one. Metrics: run_dir/metrics.jsonl and TensorBoard
(run_dir/tb). Ctrl-C writes a checkpoint and stops.

Config: YAML with sections model, data, ttt, lora, optim, loss (see configs/tiny_cpu.yaml and
configs/moshi7b_finetune.yaml); --set overrides any key, e.g. --set optim.lr=1e-3 --set ttt.layers=all.
Multi-GPU: torchrun --nproc_per_node 8 -m moshi_ttt.train CONFIG.yaml (DDP; lanes are per process).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (defaults apply to missing keys)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set steps=500")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def missing_data(cfg) -> str | None:
    """One line saying how to make the data when a configured dataset folder does not exist yet."""
    from pathlib import Path

    for key, path, n, seed in (("data.train", cfg.data.train, 48, 0), ("data.eval", cfg.data.eval, 16, 1)):
        if path and not (Path(path) / "index.jsonl").is_file():
            return (f"no dataset at {path} ({key}): make the synthetic corpus with `moshi-ttt synth --out {path} "
                    f"--num-files {n} --seed {seed}`, or encode recordings with `moshi-ttt prepare MANIFEST --out "
                    f"{path}` (see the README, section Training)")
    return None


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError, load_train_config
    from .loop import Trainer, TrainingStopped

    try:
        cfg = load_train_config(args.config, args.set)
        if args.quiet:
            cfg.progress = False
        if (hint := missing_data(cfg)) is not None:
            print(f"error: {hint}", file=sys.stderr)
            return 2
        trainer = Trainer(cfg, resume=args.resume)
        summary = trainer.train()
        trainer.close()
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    print(f"done: {summary['steps']} steps, final training loss (text + audio) {summary['final_loss']:.4f}, "
          f"{summary['skipped_steps']} skipped; run in {summary['run_dir']}")
    return 130 if summary["interrupted"] else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the TTT memory (in-order chunks, resumable, DDP)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.train", description=HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
