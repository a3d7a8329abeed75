"""``moshi-ttt eval CHECKPOINT --data DIR``: per-chunk losses of held-out files, JSON out."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = """Evaluate a trained checkpoint on held-out files, chunk after chunk, in either memory mode.

Reports per file and chunk the per-token loss (cross-entropy in nats averaged over all text and audio
tokens; training logs the text loss plus the audio loss instead), text and audio separately, the loss on
beyond-window recall targets (synthetic corpus) with its chance level, and the TTT state drift; --mode
both runs the memory kept across the file ('persistent') and reset every chunk ('reset'), whatever the
model was trained with. Output: eval_<mode>.json in RUN/eval/<checkpoint>-<data folder>/ (or --out DIR).

Example:
    moshi-ttt eval runs/tiny_cpu --data data/synth/eval"""


def default_out(checkpoint: Path, data: str | Path) -> Path:
    """``RUN/eval/<checkpoint>-<data folder>``: beside the run, one folder per checkpoint and dataset."""
    return checkpoint.parent.parent / "eval" / f"{checkpoint.name}-{Path(data).resolve().name}"


def check_args(args: argparse.Namespace) -> None:
    """Ranges of the numeric options (0 or negative never falls back to a default silently)."""
    from ..errors import ConfigValueError

    for opt, value in (("--chunk-frames", args.chunk_frames), ("--lanes", args.lanes),
                       ("--max-files", args.max_files)):
        if value is not None and value < 1:
            raise ConfigValueError(f"{opt} must be >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``moshi-ttt eval``; errors are printed by the caller (one line, exit code)."""
    from ..data.dataset import EncodedDataset
    from ..data.report import DataError
    from ..train.loop import load_trained
    from .evaluate import corpus_kind, evaluate
    from .report import fmt_loss

    check_args(args)
    model, cfg, ck = load_trained(args.checkpoint, device=args.device)
    ds = EncodedDataset(args.data)
    rows = ds.layout.num_rows
    if rows != model.num_codebooks:
        raise DataError(str(args.data), f"codes have {rows} rows, the model of {ck} expects "
                        f"{model.num_codebooks} (1 text + n_q audio): data of another layout")
    if len(ds) == 0:
        raise DataError(str(args.data), "no usable file in the dataset")
    chunk = args.chunk_frames if args.chunk_frames is not None else cfg.data.chunk_frames
    modes = ["reset", "persistent"] if args.mode == "both" else [args.mode]
    train_mode = "persistent" if cfg.ttt.persistent_states else "reset"
    if not model.ttt_layers:
        modes, train_mode = ["none"], "none"
    corpus = corpus_kind(ds)
    out = Path(args.out) if args.out else default_out(Path(ck), args.data)
    print(f"evaluating {ck} on {args.data} ({corpus} corpus, {len(ds.files)} files, chunks of {chunk} frames)")
    for mode in modes:
        res = evaluate(model, ds, chunk, lanes=args.lanes, mode=mode, max_files=args.max_files,
                       progress=not args.quiet, arm={"reset": "A", "persistent": "B"}.get(train_mode, "C"),
                       train_mode=train_mode, seed=cfg.seed,
                       checkpoint=str(ck), data=str(args.data), corpus=corpus)
        path = res.save(out / f"eval_{mode}.json")
        s, chance = res.summary(), res.recall_chance_nats
        recall = "" if s["recall_loss"] is None else f", recall-target loss {fmt_loss(s['recall_loss'])}" + (
            f" (chance {chance:.4f})" if chance is not None else "")
        print(f"memory {mode:10s} per-token loss {fmt_loss(s['loss'])} (chunks >= 1: "
              f"{fmt_loss(s['loss_later_chunks'])}){recall} -> {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="per-chunk evaluation of a checkpoint (JSON beside the run)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder (its newest checkpoint) or RUN/checkpoints/step_N")
    p.add_argument("--data", required=True, help="encoded dataset folder of held-out files (from synth or prepare)")
    p.add_argument("--mode", choices=["persistent", "reset", "both"], default="both",
                   help="memory kept across each file's chunks, reset every chunk, or both (default: both)")
    p.add_argument("--chunk-frames", type=int, default=None,
                   help="frames per chunk (12.5 per second; default: the training chunk length)")
    p.add_argument("--lanes", type=int, default=4, help="files evaluated side by side (batch size; default 4)")
    p.add_argument("--max-files", type=int, default=None, help="evaluate only the first N files (default: all)")
    p.add_argument("--out", default=None,
                   help="output folder for eval_<mode>.json (default: RUN/eval/<checkpoint>-<data folder>)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: the training device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    from . import experiment
    from .evaluate import periodic_evaluator

    experiment.register(sub)
    # `train` (registered before this module, see cli.COMMAND_MODULES) evaluates through this layer.
    sub.choices["train"].set_defaults(make_evaluator=periodic_evaluator)
