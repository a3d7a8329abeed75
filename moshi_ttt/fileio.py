"""Atomic file writes: the one helper every writer of a result, dataset, memory or adapter file uses.

A file is written under a temporary name in its own folder (same file system, so the rename is
atomic) and moved onto its final name only once complete: a crash or a full disk never leaves a
half-written file under the final name, and the earlier version stays intact. The temporary file is
removed when the write fails.

Standard library only: this module sits at the bottom of the dependency graph with ``errors`` and
``records``, so every layer can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved onto ``path`` when the block ends without
    an exception, removed otherwise. The parent folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (a trailing newline, as text tools expect)."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
