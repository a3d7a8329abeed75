"""``moshi-ttt train CONFIG.yaml``; under torchrun: ``torchrun --nproc_per_node N -m moshi_ttt.train CONFIG.yaml``
(the same command through the same entry point, ``moshi_ttt.cli``)."""

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
    p.add_argument("--restart", action="store_true",
                   help="start again from step 0 in a run folder that has checkpoints (with --resume: when "
                   "none of them is intact); the old checkpoints and metrics are moved aside, never deleted")
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
    """Entry point of ``moshi-ttt train``; errors are printed by the caller (one line, exit code)."""
    from ..errors import EXIT_SIGINT, EXIT_SIGTERM
    from .config import load_train_config
    from .loop import Trainer, TrainingStopped

    cfg = load_train_config(args.config, args.set)
    if args.quiet:
        cfg.progress = False
    if (hint := missing_data(cfg)) is not None:
        print(f"error: {hint}", file=sys.stderr)
        return 2
    # The evaluation layer gives this command its periodic evaluation (eval/evaluate.py: training
    # imports nothing from evaluation).
    make_evaluator = getattr(args, "make_evaluator", None)
    trainer = Trainer(cfg, resume=args.resume, restart=getattr(args, "restart", False),
                      evaluator=make_evaluator(cfg) if make_evaluator is not None else None)
    try:
        summary = trainer.train()
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        trainer.close()
    if summary.get("already_finished"):
        print(f"nothing to do: the run in {summary['run_dir']} already finished at step {summary['steps']} "
              f"(steps={cfg.steps}); its summary.json is kept. Raise --set steps=N to train further.")
        return 0
    loss = summary["final_loss"]
    loss_txt = f"{loss:.4f}" if isinstance(loss, (int, float)) else "n/a"
    if summary["interrupted"]:
        sig = summary.get("signal") or "SIGINT"
        print(f"interrupted by {sig} at step {summary['steps']} (last loss {loss_txt}); a checkpoint was "
              f"written: continue with --resume; run in {summary['run_dir']}")
        return EXIT_SIGTERM if sig == "SIGTERM" else EXIT_SIGINT
    print(f"done: {summary['steps']} steps, final training loss (text + audio) {loss_txt}, "
          f"{summary['skipped_steps']} skipped; run in {summary['run_dir']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the TTT memory (in-order chunks, resumable, DDP)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
