"""Per-chunk evaluation of held-out files, in either memory mode, into an :class:`EvalResult`.

Every file is played in order, chunk after chunk, through the chunked path of training (``ChunkedLM``),
the memory kept for the whole file (``persistent``) or reset every chunk (``reset``), whatever the model
was trained with. Per file and chunk: the mean cross-entropy (text + audio tokens), text and audio apart,
the loss on the beyond-window recall targets and per ladder rung (synthetic corpora), and the TTT state
drift at the chunk's end. :func:`periodic_evaluator` is the trainer's evaluation callback.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from ..data.dataset import EncodedDataset
from ..data.stream import ChunkStream
from ..model.build import ttt_blocks
from ..model.chunked import ChunkedLM
from ..runtime import PeriodicLog, is_terminal
from ..train.config import TrainConfig
from .results import LOSS_DEFINITION, RUNGS, ChunkResult, Corpus, EvalResult, FileResult, Mode


def _synthetic(dataset: EncodedDataset) -> dict:
    """The synthetic generator's record in ``dataset.json`` ({} for real data)."""
    synth = getattr(dataset, "meta", {}).get("synthetic")
    return synth if isinstance(synth, dict) else {}


def corpus_kind(dataset: EncodedDataset) -> Corpus:
    """``long-memory`` / ``control`` / ``kv`` / ``kv-control`` for a synthetic corpus, else ``real``."""
    synth = _synthetic(dataset)
    if synth.get("task") == "kv":  # the key -> value ladder and its control
        return "kv-control" if synth.get("control") else "kv"
    if synth:
        return "control" if synth.get("control") or synth.get("kind") == "control" else "long-memory"
    return "real"


def _lane_drift(model) -> torch.Tensor | None:
    """Mean over TTT layers of ``|W_state - W_base| / |W_base|`` per lane: [B] or None."""
    drifts = [b.layer.state_drift(b._streaming_state.memory) for b in ttt_blocks(model).values()
              if b._streaming_state is not None]
    return torch.stack(drifts).mean(0) if drifts else None


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
    stream = ChunkStream(SimpleNamespace(files=files, load=dataset.load, layout=getattr(dataset, "layout", None)),
                         lanes, chunk_frames, shuffle=False, epochs=1)
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
            sel = {"text": text, "audio": ~text, "recall": rec, **{f"rung{r}": rr == r for r in RUNGS}}
            sums = {f"{k}_{q}": v for k, s in sel.items() for q, v in (("sum", loss * s), ("n", mask & s))}
            sums["recall_text_n"] = rec & text
            lane = {k: v.flatten(1).double().sum(1).tolist() for k, v in sums.items()}  # each: B floats
            lane_drift = _lane_drift(model)
            for b, fid in enumerate(batch.file_id):
                if fid is not None and bool(batch.active[b]):
                    key = (fid, int(batch.chunk_index[b]))
                    for k, v in lane.items():
                        acc[key][k] += v[b]
                    if lane_drift is not None:
                        drift[key] = float(lane_drift[b])
    model.train(was_training)

    def mean(a: dict[str, float], name: str) -> float | None:
        return a[f"{name}_sum"] / a[f"{name}_n"] if a[f"{name}_n"] else None

    by_file: dict[str, list[ChunkResult]] = defaultdict(list)
    for (fid, ci), a in sorted(acc.items()):
        n = a["text_n"] + a["audio_n"]
        by_file[fid].append(ChunkResult(
            chunk_index=ci, tokens=int(n), loss=(a["text_sum"] + a["audio_sum"]) / n if n else None,
            text_loss=mean(a, "text"), audio_loss=mean(a, "audio"), recall_tokens=int(a["recall_n"]),
            recall_loss=mean(a, "recall"), state_drift=drift.get((fid, ci)),
            # Ladder corpora only: per-rung recall loss (per-token mean) and token counts.
            extra={k: v for r in RUNGS if a[f"rung{r}_n"]
                   for k, v in ((f"rung{r}_loss", mean(a, f"rung{r}")), (f"rung{r}_tokens", int(a[f"rung{r}_n"])))}))
    # The recall targets' chance level: a uniform guess per alphabet, token-weighted (synthetic corpora).
    text_n = sum(a["recall_text_n"] for a in acc.values())
    audio_n = sum(a["recall_n"] for a in acc.values()) - text_n
    nats = _synthetic(dataset).get("chance_nats")
    chance = (text_n * float(nats["text"]) + audio_n * float(nats["audio"])) / (text_n + audio_n) \
        if isinstance(nats, dict) and text_n + audio_n > 0 else None
    frames = {f.file_id: f.num_frames for f in files}
    result = EvalResult(
        arm=arm, train_mode=train_mode or mode, eval_mode=mode, seed=seed, checkpoint=checkpoint,
        data=data or str(getattr(dataset, "root", "unknown")), corpus=corpus or corpus_kind(dataset),
        chunk_frames=chunk_frames, context=int(model.transformer.layers[0].self_attn.context),
        files=[FileResult(fid, frames[fid], chunks) for fid, chunks in by_file.items()],
        recall_chance_nats=chance, corpus_name=corpus_name, loss_definition=LOSS_DEFINITION)
    return EvalResult.from_json(result.to_json())  # validated where it is made, not when the report reads it


def periodic_evaluator(cfg: TrainConfig) -> Callable[[torch.nn.Module, int], dict[str, float]] | None:
    """The trainer's evaluation callback for ``cfg.data.eval`` (None without it).

    Called with the model (training streams parked) and the step: evaluates the monitored files
    in the memory mode the run trains with, writes ``run_dir/eval/step_N.json`` and returns the
    summary (:meth:`EvalResult.summary`) for the metrics log.
    """
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
