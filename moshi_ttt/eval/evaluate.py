"""Evaluate a trained checkpoint on held-out files, chunk after chunk, in either memory mode.

Every file is played in order through the chunked path of training, the memory kept across the file
('persistent') or reset every chunk ('reset'), whatever the model was trained with. Per file and chunk: the
per-token loss (cross-entropy in nats averaged over all text and audio tokens; training logs the text loss
plus the audio loss instead), text and audio apart, the loss on beyond-window recall targets (synthetic
corpora) with its chance level and per ladder rung, and the TTT state drift. ``moshi-ttt eval`` writes
eval_<mode>.json in RUN/eval/<checkpoint>-<data folder>/ (or --out DIR); :func:`periodic_evaluator` is the
trainer's evaluation callback.

Example:
    moshi-ttt eval runs/tiny_cpu --data data/synth/eval
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from ..data.dataset import EncodedDataset
from ..data.ladder import RUNG_NAMES
from ..data.report import DataError
from ..data.stream import ChunkStream
from ..errors import ConfigValueError
from ..model.build import ttt_blocks
from ..model.chunked import ChunkedLM
from ..runtime import PeriodicLog, is_terminal
from ..train.config import TrainConfig
from .results import LOSS_DEFINITION, Corpus, EvalResult, Mode


def corpus_kind(dataset: EncodedDataset) -> Corpus:
    """``long-memory`` / ``control`` / ``kv`` / ``kv-control`` for a synthetic corpus, else ``real``."""
    if (synth := dataset.meta.get("synthetic", {})).get("task") == "kv":  # the key -> value ladder and its control
        return "kv-control" if synth.get("control") else "kv"
    if synth:
        return "control" if synth.get("control") or synth.get("kind") == "control" else "long-memory"
    return "real"


@torch.no_grad()
def evaluate(model, dataset: EncodedDataset, chunk_frames: int, lanes: int = 4, mode: Mode = "persistent",
             max_files: int | None = None, progress: bool = False, *, arm: str = "B",
             train_mode: Mode | None = None, seed: int = 0, checkpoint: str = "unknown", data: str | None = None,
             corpus: Corpus | None = None, corpus_name: str | None = None) -> EvalResult:
    """Evaluate ``model`` on the first ``max_files`` files of ``dataset`` in chunks of ``chunk_frames``.

    mode: "persistent" keeps the memory across a file's chunks, "reset" resets it every chunk, "none" is
    for models without TTT. The keyword arguments describe the evaluated weights in the result
    (``train_mode`` defaults to ``mode``, ``data`` to the dataset's folder, ``corpus`` to :func:`corpus_kind`).
    """
    was_training = model.training
    model.eval()
    files = dataset.files[:max_files] if max_files else dataset.files
    # The stream needs only ``files``, ``load`` and ``layout``: the first ``max_files`` files.
    stream = ChunkStream(SimpleNamespace(files=files, load=dataset.load, layout=dataset.layout), lanes, chunk_frames,
                         shuffle=False, epochs=1)
    device = next(model.parameters()).device
    acc: dict[tuple[str, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))  # (file, chunk) -> sums
    drift: dict[tuple[str, int], float] = {}
    # A bar on a terminal; in a log file, a line a minute instead (never silent, never a bar's redraws).
    log = PeriodicLog(f"eval ({mode}) chunks", every_s=60.0) if progress else None
    with ChunkedLM(model, lanes, reset_every=chunk_frames if mode == "reset" else None) as run:
        for batch in tqdm(stream, disable=not (progress and is_terminal()), desc=f"eval ({mode})", unit="chunk"):
            if log is not None:
                log.update(1)
            batch = batch.to(device)
            # Per frame: recall target (0/1) and, in ladder corpora, its rung; the runner carries them in its
            # delay tail and gives each token those of its *target* frame.
            rung = batch.recall_rung if batch.recall_rung is not None else torch.zeros_like(batch.codes[:, 0])
            out = run.step(batch.codes, batch.reset, batch.valid,
                           labels=torch.stack([batch.recall_mask.long(), rung.to(device).long()], 1))
            tl, rr = out.losses, out.target_labels[:, 1]                                    # [B, 1 + dep_q, C]
            mask = torch.cat([tl.text_mask[:, None], tl.audio_mask], 1)
            loss = torch.cat([tl.text[:, None], tl.audio], 1) * mask
            text = torch.zeros_like(mask)
            text[:, 0] = True
            rec = (out.target_labels[:, 0] > 0) & mask
            sel = {"text": text, "audio": ~text, "recall": rec, **{f"rung{r}": rr == r for r in RUNG_NAMES}}
            sums = {f"{k}_{q}": v for k, s in sel.items() for q, v in (("sum", loss * s), ("n", mask & s))}
            sums["recall_text_n"] = rec & text
            lane = {k: v.flatten(1).double().sum(1).tolist() for k, v in sums.items()}  # each: B floats
            # Mean over TTT layers of |W_state - W_base| / |W_base| per lane.
            drifts = [b.layer.state_drift(b._streaming_state.memory) for b in ttt_blocks(model).values()
                      if b._streaming_state is not None]
            lane_drift = torch.stack(drifts).mean(0).tolist() if drifts else None
            for b, fid in enumerate(batch.file_id):
                if fid is not None and bool(batch.active[b]):
                    key = (fid, int(batch.chunk_index[b]))
                    for k, v in lane.items():
                        acc[key][k] += v[b]
                    if lane_drift is not None:
                        drift[key] = lane_drift[b]
    model.train(was_training)

    def mean(a: dict[str, float], name: str) -> float | None:
        return a[f"{name}_sum"] / a[f"{name}_n"] if a[f"{name}_n"] else None

    by_file: dict[str, list[dict]] = defaultdict(list)
    for (fid, ci), a in sorted(acc.items()):
        n = a["text_n"] + a["audio_n"]
        by_file[fid].append({
            "chunk_index": ci, "tokens": int(n), "loss": (a["text_sum"] + a["audio_sum"]) / n if n else None,
            "text_loss": mean(a, "text"), "audio_loss": mean(a, "audio"), "recall_tokens": int(a["recall_n"]),
            "recall_loss": mean(a, "recall"), "state_drift": drift.get((fid, ci)),
            # Ladder corpora only: per-rung recall loss (per-token mean) and token counts.
            **{k: v for r in RUNG_NAMES if a[f"rung{r}_n"]
               for k, v in ((f"rung{r}_loss", mean(a, f"rung{r}")), (f"rung{r}_tokens", int(a[f"rung{r}_n"])))}})
    # The recall targets' chance level: a uniform guess per alphabet, token-weighted (synthetic corpora).
    text_n = sum(a["recall_text_n"] for a in acc.values())
    audio_n = sum(a["recall_n"] for a in acc.values()) - text_n
    nats = dataset.meta.get("synthetic", {}).get("chance_nats")
    frames = {f.file_id: f.num_frames for f in files}
    return EvalResult.from_json({  # validated where it is made, not when the report reads it
        "arm": arm, "train_mode": train_mode or mode, "eval_mode": mode, "seed": seed, "checkpoint": checkpoint,
        "data": data or str(dataset.root), "corpus": corpus or corpus_kind(dataset),
        "chunk_frames": chunk_frames, "context": int(model.transformer.layers[0].self_attn.context),
        "files": [{"file_id": fid, "num_frames": frames[fid], "chunks": chunks} for fid, chunks in by_file.items()],
        "recall_chance_nats": (text_n * float(nats["text"]) + audio_n * float(nats["audio"])) / (text_n + audio_n)
        if isinstance(nats, dict) and text_n + audio_n > 0 else None,
        "corpus_name": corpus_name, "loss_definition": LOSS_DEFINITION})


def periodic_evaluator(cfg: TrainConfig) -> Callable[[torch.nn.Module, int], dict[str, float]] | None:
    """The trainer's evaluation callback for ``cfg.data.eval`` (None without it): evaluates the monitored
    files in the memory mode the run trains with, writes ``run_dir/eval/step_N.json`` and returns the
    summary (:meth:`EvalResult.summary`) for the metrics log."""
    if not cfg.data.eval:
        return None
    dataset = EncodedDataset(cfg.data.eval)

    def run(model: torch.nn.Module, step: int) -> dict[str, float]:
        mode: Mode = ("persistent" if cfg.ttt.persistent_states else "reset") if model.ttt_layers else "none"
        res = evaluate(model, dataset, cfg.data.chunk_frames, lanes=cfg.data.lanes, mode=mode,
                       max_files=cfg.data.eval_max_files, seed=cfg.seed,
                       checkpoint=f"{cfg.run_dir} (training, step {step})")
        res.save(Path(cfg.run_dir) / "eval" / f"step_{step:07d}.json")
        return {k: v for k, v in res.summary().items() if v is not None}

    return run


# ---- moshi-ttt eval ---------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """Entry point of ``moshi-ttt eval``; errors are printed by the caller (one line, exit code)."""
    from ..train.loop import load_trained
    from .report import fmt_loss

    for opt, value in [("--chunk-frames", args.chunk_frames), ("--lanes", args.lanes),
                       ("--max-files", args.max_files)]:
        if value is not None and value < 1:  # 0 or negative never falls back to a default silently
            raise ConfigValueError(f"{opt} must be >= 1, got {value}")
    model, cfg, ck = load_trained(args.checkpoint, device=args.device)
    ds = EncodedDataset(args.data)
    if (rows := ds.layout.num_rows) != model.num_codebooks:
        raise DataError(str(args.data), f"codes have {rows} rows, the model of {ck} expects "
                        f"{model.num_codebooks} (1 text + n_q audio): data of another layout")
    if len(ds) == 0:
        raise DataError(str(args.data), "no usable file in the dataset")
    chunk = args.chunk_frames if args.chunk_frames is not None else cfg.data.chunk_frames
    train_mode = ("persistent" if cfg.ttt.persistent_states else "reset") if model.ttt_layers else "none"
    modes = ["none"] if train_mode == "none" else ["reset", "persistent"] if args.mode == "both" else [args.mode]
    # Beside the run by default: RUN/eval/<checkpoint>-<data folder>, one folder per checkpoint and dataset.
    out = Path(args.out or Path(ck).parent.parent / "eval" / f"{Path(ck).name}-{Path(args.data).resolve().name}")
    print(f"evaluating {ck} on {args.data} ({corpus_kind(ds)} corpus, {len(ds.files)} files, chunks of {chunk} "
          "frames)")
    for mode in modes:
        res = evaluate(model, ds, chunk, args.lanes, mode, args.max_files, progress=not args.quiet,
                       arm={"reset": "A", "persistent": "B"}.get(train_mode, "C"), train_mode=train_mode,
                       seed=cfg.seed, checkpoint=str(ck), data=str(args.data))
        path = res.save(out / f"eval_{mode}.json")
        s, chance = res.summary(), res.recall_chance_nats
        recall = "" if s["recall_loss"] is None else f", recall-target loss {fmt_loss(s['recall_loss'])}" + (
            f" (chance {chance:.4f})" if chance is not None else "")
        print(f"memory {mode:10s} per-token loss {fmt_loss(s['loss'])} (chunks >= 1: "
              f"{fmt_loss(s['loss_later_chunks'])}){recall} -> {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="per-chunk evaluation of a checkpoint (JSON beside the run)", description=__doc__,
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
    # `train` (registered before this module, see cli.COMMAND_MODULES) evaluates through this layer.
    sub.choices["train"].set_defaults(make_evaluator=periodic_evaluator)
