"""Training checkpoints: atomic, verified, resumable.

A checkpoint is a folder ``run_dir/checkpoints/step_000123/``:

    trainable.safetensors   every trainable parameter (TTT, LoRA, or all)
    adapter/                TTT (+LoRA) weights and config, loadable by generate / eval
    stream.safetensors      the carried per-lane state: TTT memory, attention KV caches, offsets
    trainer.pt              optimizer, scheduler, sampler position, RNG states, counters, delay tails
    manifest.json           sha256 of every file above, written last

It is written into ``step_000123.tmp`` and renamed, so a crash never leaves a half checkpoint
under a final name; the manifest lets ``find_resumable`` detect a corrupted one (a clear message
naming the file) and fall back to the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or corrupted; the message names the folder and file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ckpt_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def write_checkpoint(run_dir: str | Path, step: int, writer, keep_last: int) -> Path:
    """``writer(folder)`` writes the files; we add the manifest, rename atomically, prune."""
    final = ckpt_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    writer(tmp)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {"step": step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(Path(run_dir) / "checkpoints", keep_last)
    return final


def _prune(folder: Path, keep_last: int) -> None:
    done = sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """Check every file against the manifest; raise ``CheckpointError`` naming the problem."""
    mf = folder / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the checkpoint was not completed)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mf}: unreadable ({e})") from e
    for rel, digest in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{folder}: file {rel} is missing")
        if _sha256(p) != digest:
            raise CheckpointError(f"{folder}: file {rel} is corrupted (sha256 mismatch)")
    return manifest


def find_resumable(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; corrupted ones are reported and skipped."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    for ck in sorted((p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
                     reverse=True):
        try:
            verify_checkpoint(ck)
            return ck
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s; trying the previous one", e)
            print(f"warning: {e}; using the previous checkpoint")
    return None


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
