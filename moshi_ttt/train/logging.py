"""Metrics: one JSON line per logged step (``metrics.jsonl``) and TensorBoard scalars."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
                except ImportError:  # tensorboard is a dependency; keep training if it is broken
                    print("warning: tensorboard unavailable; logging to metrics.jsonl only")

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self._tb is not None:
            step = int(metrics["step"])
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> int:
        """On resume: keep the lines of steps <= ``step`` (the later ones will be logged again).

        A partial or unreadable line (what a kill or a full disk during an append leaves) is
        dropped with a note, never fatal. Rewritten atomically. Returns the number of lines dropped.
        """
        if not self.enabled or not self.path.is_file():
            return 0
        keep, bad, later = [], [], 0
        raw = self.path.read_bytes().decode("utf-8", errors="replace")
        for i, ln in enumerate(raw.splitlines(), 1):
            if not ln.strip():
                continue
            try:
                rec = json.loads(ln)
                s = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                bad.append(i)
                continue
            if s <= step:
                keep.append(ln)
            else:
                later += 1
        if bad:
            print(f"note: {self.path}: dropped {len(bad)} unreadable line(s) (line {bad[0]}: a write cut short)")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)
        return len(bad) + later

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a partial line (an interrupted append) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.is_file():
        for ln in path.read_text(errors="replace").splitlines():
            if ln.strip():
                try:
                    out.append(json.loads(ln))
                except ValueError:
                    continue
    return out
