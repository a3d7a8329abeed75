"""Why does (or doesn't) persistent memory help? Train arm B under a setting, then evaluate it on a
*validation* corpus (its own generator seed, never the experiment's held-out files) with the
memory kept and reset, and print one JSON line: recall-target and later-chunk losses in both
modes, the final gate, memory drift and inner loss before/after a chunk's update.

    python scripts/diagnose_persistence.py NAME [--train-files N] [--set key=value ...]

Findings of this script are summarised in the README ("The experiment").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

from moshi_ttt.data.dataset import EncodedDataset  # noqa: E402
from moshi_ttt.data.synthetic import SynthConfig, write_corpus  # noqa: E402
from moshi_ttt.eval.evaluate import evaluate  # noqa: E402
from moshi_ttt.train.config import load_train_config  # noqa: E402
from moshi_ttt.train.logging import read_metrics  # noqa: E402
from moshi_ttt.train.loop import Trainer, load_trained  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("--root", default="runs/diagnose")
    p.add_argument("--train-files", type=int, default=512)
    p.add_argument("--val-files", type=int, default=16)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    root = Path(a.root)
    train, val = root / f"train{a.train_files}", root / "val"
    if not (train / "index.jsonl").is_file():
        write_corpus(SynthConfig(seed=5000, num_files=a.train_files), train, progress=False)
    if not (val / "index.jsonl").is_file():
        write_corpus(SynthConfig(seed=3000, num_files=a.val_files), val, progress=False)
    run = root / a.name
    t0 = time.time()
    cfg = load_train_config(None, [
        f"run_dir={run}", f"data.train={train}", "data.eval=null", "data.chunk_frames=64", "data.lanes=4",
        "log_every=25", "eval_every=1000000", "ckpt_every=1000000", "progress=false", "ttt.layers=all",
        "ttt.mini_batch_size=8", "optim.warmup_steps=20", *a.set])
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()
    model, _, _ = load_trained(run)
    ds = EncodedDataset(val)
    res = {m: evaluate(model, ds, cfg.data.chunk_frames, lanes=4, mode=m).summary() for m in ("reset", "persistent")}
    last = [m for m in read_metrics(run) if "gate_mean" in m][-1]
    print(json.dumps({
        "name": a.name, "train_files": a.train_files, "sets": a.set, "seconds": round(time.time() - t0),
        "recall_reset": res["reset"]["recall_loss"], "recall_persistent": res["persistent"]["recall_loss"],
        "later_reset": res["reset"]["loss_later_chunks"], "later_persistent": res["persistent"]["loss_later_chunks"],
        "gate": last["gate_mean"], "drift": last.get("ttt_state_drift"),
        "inner_before_after": [last.get("inner_loss_before"), last.get("inner_loss_after")],
        "train_loss": last["loss"]}), flush=True)


if __name__ == "__main__":
    main()
