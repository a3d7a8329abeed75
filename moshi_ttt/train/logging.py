"""Metrics: one JSON line per logged step (``metrics.jsonl``) and TensorBoard scalars."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text


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
        for i, line, rec in _lines(self.path):
            try:
                s = int(rec["step"])  # type: ignore[index]
            except (ValueError, KeyError, TypeError):
                bad.append(i)
                continue
            if s <= step:
                keep.append(line)
            else:
                later += 1
        if bad:
            print(f"note: {self.path}: dropped {len(bad)} unreadable line(s) (line {bad[0]}: a write cut short)")
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        return len(bad) + later

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _lines(path: Path) -> Iterator[tuple[int, str, dict[str, Any] | None]]:
    """``(line number, line, record or None)`` for each non-blank line of a ``metrics.jsonl``; a
    line that is not a JSON object (an append cut short) gives None."""
    for i, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            yield i, line, rec if isinstance(rec, dict) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (none if it is missing); a partial line (an
    interrupted append) is skipped. The one reader of training metrics (training, eval reports)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [rec for _, _, rec in _lines(path) if rec is not None] if path.is_file() else []
