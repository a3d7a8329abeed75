"""``moshi-ttt eval CHECKPOINT --data DIR``: per-chunk losses of held-out files, JSON out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = """Evaluate a trained checkpoint on held-out files, chunk after chunk, in either memory mode.

Reports per file and chunk the loss (text, audio), the loss on beyond-window recall targets
(synthetic corpus), and the TTT state drift; --mode both runs the memory kept across the file
('persistent') and reset every chunk ('reset'), whatever the model was trained with."""


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
    from .evaluate import evaluate, summarize

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
    if not model.ttt_layers:
        modes = ["none"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        res = evaluate(model, ds, chunk, lanes=args.lanes, mode=mode, max_files=args.max_files,
                       progress=not args.quiet,
                       meta={"checkpoint": str(ck), "data": str(args.data), "seed": cfg.seed,
                             "train_mode": ("persistent" if cfg.ttt.persistent_states else "reset")
                             if model.ttt_layers else "none", "arm": args.arm, "corpus": args.corpus})
        res["context"] = int(model.transformer.layers[0].self_attn.context)
        path = out / f"eval_{mode}.json"
        path.write_text(json.dumps(res, indent=1))
        s = summarize(res)
        print(f"{mode:10s} loss {s['loss']:.4f}  later chunks {s['loss_later_chunks']}  "
              f"recall {s['recall_loss']}  -> {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="per-chunk evaluation of a checkpoint (JSON)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder (newest checkpoint) or checkpoints/step_N")
    p.add_argument("--data", required=True, help="encoded dataset folder of held-out files")
    p.add_argument("--mode", choices=["persistent", "reset", "both"], default="both")
    p.add_argument("--chunk-frames", type=int, default=None, help="default: the training chunk length")
    p.add_argument("--lanes", type=int, default=4)
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--out", default="eval_out", help="output folder for eval_<mode>.json")
    p.add_argument("--arm", default="B", help="arm label written into the JSON")
    p.add_argument("--corpus", default="real", help="corpus label written into the JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    from . import experiment

    experiment.register(sub)
