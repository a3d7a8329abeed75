"""Per-chunk evaluation of held-out files, in either memory mode.

Every held-out file is played in order, chunk after chunk, through the same chunked path as
training (``ChunkedLM``), with the memory either kept for the whole file (``persistent``) or reset
every chunk (``reset``), whatever the model was trained with. For each file and chunk we record
the mean cross-entropy (text + audio tokens), text and audio separately, the loss on the
beyond-window recall targets (synthetic corpus), and the TTT state drift at the chunk's end.
The output is the ``moshi-ttt-eval`` JSON read by the experiment's statistics and report.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import torch
from tqdm import tqdm

from ..data.dataset import EncodedDataset
from ..data.stream import ChunkStream
from ..model.build import ttt_blocks
from ..model.chunked import ChunkedLM
from ..runtime import PeriodicLog, is_terminal

EvalMode = Literal["persistent", "reset", "none"]
RUNGS = (1, 2, 3)  # the ladder's measured rungs (moshi_ttt.data.ladder)


LOSS_DEFINITION = "per-token loss: cross-entropy in nats averaged over all text and audio tokens"


def corpus_kind(dataset: EncodedDataset) -> str:
    """``long-memory`` or ``control`` for a synthetic corpus (from its ``dataset.json``), else ``real``."""
    synth = getattr(dataset, "meta", {}).get("synthetic")
    if isinstance(synth, dict):
        if synth.get("task") == "kv":  # the key -> value ladder and its control
            return "kv-control" if synth.get("control") else "kv"
        return "control" if synth.get("control") or synth.get("kind") == "control" else "long-memory"
    return "real"


def recall_chance_nats(dataset: EncodedDataset, text_n: float, audio_n: float) -> float | None:
    """Token-weighted chance level of the recall targets (uniform guess per alphabet), or None.

    Known only for the synthetic corpus, whose ``dataset.json`` records ``chance_nats`` per stream.
    """
    synth = getattr(dataset, "meta", {}).get("synthetic")
    nats = synth.get("chance_nats") if isinstance(synth, dict) else None
    if not isinstance(nats, dict) or text_n + audio_n <= 0:
        return None
    return (text_n * float(nats["text"]) + audio_n * float(nats["audio"])) / (text_n + audio_n)


def _lane_drift(model) -> torch.Tensor | None:
    """Mean over TTT layers of ``|W_state - W_base| / |W_base|`` per lane: [B] or None."""
    drifts = [b.layer.state_drift(b._streaming_state.memory) for b in ttt_blocks(model).values()
              if b._streaming_state is not None]
    return torch.stack(drifts).mean(0) if drifts else None


@torch.no_grad()
def evaluate(model, dataset: EncodedDataset, chunk_frames: int, lanes: int = 4, mode: EvalMode = "persistent",
             max_files: int | None = None, progress: bool = False, meta: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset``; returns the ``moshi-ttt-eval`` dict (see ``eval.schema``).

    mode: "persistent" keeps the memory across a file's chunks, "reset" resets it every chunk,
    "none" is for models without TTT (same numbers as either).
    """
    was_training = model.training
    model.eval()
    files = dataset.files[:max_files] if max_files else dataset.files

    class _Subset:  # the stream only needs ``files`` and ``load``
        def __init__(self):
            self.files, self.layout = files, getattr(dataset, "layout", None)

        def load(self, file_id):
            return dataset.load(file_id)

    stream = ChunkStream(_Subset(), lanes, chunk_frames, shuffle=False, epochs=1)
    device = next(model.parameters()).device
    acc: dict[tuple[str, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    recall_text_n = recall_audio_n = 0.0
    num_frames = {f.file_id: f.num_frames for f in files}
    with ChunkedLM(model, lanes, reset_every=chunk_frames if mode == "reset" else None) as runner:
        # A bar on a terminal; in a log file, a line a minute instead (never silent, never a bar's redraws).
        log = PeriodicLog(f"eval ({mode}) chunks", every_s=60.0) if progress else None
        for batch in tqdm(stream, disable=not (progress and is_terminal()), desc=f"eval ({mode})", unit="chunk"):
            if log is not None:
                log.update(1)
            batch = batch.to(device)
            # Per frame: recall target (0/1) and, in ladder corpora, its rung; the runner carries them
            # in its delay tail and gives each token those of its *target* frame.
            rung = batch.recall_rung if batch.recall_rung is not None else torch.zeros_like(batch.codes[:, 0])
            labels = torch.stack([batch.recall_mask.long(), rung.to(device).long()], 1)       # [B, 2, C]
            out = runner.step(batch.codes, batch.reset, batch.valid, labels=labels)
            tl = out.losses
            rec, rr = out.target_labels[:, 0].bool(), out.target_labels[:, 1]              # [B, 1 + dep_q, C]
            drift = _lane_drift(model)
            for b, fid in enumerate(batch.file_id):
                if fid is None or not bool(batch.active[b]):
                    continue
                a = acc[(fid, int(batch.chunk_index[b]))]
                a["text_sum"] += float(tl.text[b].sum())
                a["text_n"] += float(tl.text_mask[b].sum())
                a["audio_sum"] += float(tl.audio[b].sum())
                a["audio_n"] += float(tl.audio_mask[b].sum())
                rt, ra = rec[b, 0] & tl.text_mask[b], rec[b, 1:] & tl.audio_mask[b]
                a["recall_sum"] += float((tl.text[b] * rt).sum() + (tl.audio[b] * ra).sum())
                a["recall_n"] += float(rt.sum() + ra.sum())
                recall_text_n += float(rt.sum())
                recall_audio_n += float(ra.sum())
                for r in RUNGS:
                    mt, ma = (rr[b, 0] == r) & tl.text_mask[b], (rr[b, 1:] == r) & tl.audio_mask[b]
                    n_r = float(mt.sum() + ma.sum())
                    if n_r:
                        a[f"rung{r}_sum"] += float((tl.text[b] * mt).sum() + (tl.audio[b] * ma).sum())
                        a[f"rung{r}_n"] += n_r
                if drift is not None:
                    a["drift"] = float(drift[b])
    if was_training:
        model.train()

    by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (fid, ci), a in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        n = a["text_n"] + a["audio_n"]
        by_file[fid].append({
            "chunk_index": ci,
            "loss": (a["text_sum"] + a["audio_sum"]) / n if n else None,
            "text_loss": a["text_sum"] / a["text_n"] if a["text_n"] else None,
            "audio_loss": a["audio_sum"] / a["audio_n"] if a["audio_n"] else None,
            "tokens": int(n),
            "recall_loss": a["recall_sum"] / a["recall_n"] if a["recall_n"] else None,
            "recall_tokens": int(a["recall_n"]),
            "state_drift": a.get("drift"),
            # Ladder corpora only: per-rung recall loss (per-token mean) and token counts.
            **{k: v for r in RUNGS if a.get(f"rung{r}_n")
               for k, v in ((f"rung{r}_loss", a[f"rung{r}_sum"] / a[f"rung{r}_n"]),
                            (f"rung{r}_tokens", int(a[f"rung{r}_n"])))},
        })
    chance = recall_chance_nats(dataset, recall_text_n, recall_audio_n)
    return {
        "format": "moshi-ttt-eval", "version": 1, "eval_mode": mode, "chunk_frames": chunk_frames,
        "loss_definition": LOSS_DEFINITION,
        **({"recall_chance_nats": chance} if chance is not None else {}),
        "context": getattr(model.transformer.layers[0].self_attn, "context", None),
        **(meta or {}),
        "files": [{"file_id": fid, "num_frames": num_frames[fid], "chunks": chunks}
                  for fid, chunks in by_file.items()],
    }


def summarize(result: dict[str, Any]) -> dict[str, float | None]:
    """Token-weighted means over all files: loss on chunks >= 1, recall loss, first-chunk loss."""
    def wmean(key: str, n_key: str, pred) -> float | None:
        num = den = 0.0
        for f in result["files"]:
            for c in f["chunks"]:
                if pred(c) and c[key] is not None and c[n_key]:
                    num += c[key] * c[n_key]
                    den += c[n_key]
        return num / den if den else None

    return {"loss": wmean("loss", "tokens", lambda c: True),
            "loss_later_chunks": wmean("loss", "tokens", lambda c: c["chunk_index"] >= 1),
            "loss_first_chunk": wmean("loss", "tokens", lambda c: c["chunk_index"] == 0),
            "recall_loss": wmean("recall_loss", "recall_tokens", lambda c: True)}
