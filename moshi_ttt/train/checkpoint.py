"""Training checkpoints: atomic, verified, resumable.

A checkpoint is a folder ``run_dir/checkpoints/step_000123/``:

    trainable.safetensors   every trainable parameter (TTT, LoRA, or all)
    adapter/                TTT (+LoRA) weights and config, loadable by generate / eval
    stream.safetensors      the carried per-lane state: TTT memory, attention KV caches, offsets
    trainer.pt              optimizer, scheduler, sampler position, RNG states, counters, delay tails
    config.json             the training config (``records.dump`` of ``TrainConfig``)
    manifest.json           sha256 of every file above, written last (:class:`Manifest`)

It is written into ``step_000123.tmp`` and renamed, so a crash never leaves a half checkpoint
under a final name (a stale ``.tmp`` is cleared on the next write or resume); the free space is
checked first. The manifest lets ``find_resumable`` detect a corrupted one (a clear message naming
the file) and fall back to the previous one. Pruning keeps the newest ``keep_last`` by step number
and never the one just written; a resume never restarts silently (see :func:`resume_point`).
Checkpoints written before the config moved to ``config.json`` carry it in ``trainer.pt``;
:func:`saved_config` reads either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import EXIT_CHECKPOINT, EXIT_IO, ConfigValueError, MoshiTTTError, describe_os_error
from ..records import dump, load

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONFIG = "config.json"


@dataclass
class Manifest:
    """``manifest.json``: the step and the sha256 of every file of the checkpoint (relative paths)."""

    step: int
    files: dict[str, str] = field(default_factory=dict)


class CheckpointError(MoshiTTTError, RuntimeError):
    """A checkpoint is missing or corrupted; the message names the folder and file (exit code 4)."""

    exit_code = EXIT_CHECKPOINT


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_STEP_RE = re.compile(r"^step_(\d+)$")
# Room kept free beyond the checkpoint's own size (metrics, logs, the file system's own needs).
FREE_SPACE_MARGIN = 8 << 20


class CheckpointWriteError(CheckpointError):
    """The file system refused the checkpoint (disk full, read-only): exit code 6. The partial
    folder is removed; the earlier checkpoints are untouched."""

    exit_code = EXIT_IO


def ckpt_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Completed checkpoint folders ``(step, path)``, oldest first, ordered by step *number*
    (``.tmp`` and ``.corrupt`` folders are not checkpoints)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def clear_stale_tmp(run_dir: str | Path) -> list[Path]:
    """Remove ``step_*.tmp`` folders: what a crash during a checkpoint write leaves behind. They
    never hold a complete checkpoint (the rename to the final name is the last act)."""
    folder = Path(run_dir) / "checkpoints"
    removed = []
    if folder.is_dir():
        for p in folder.glob("step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_free_space(folder: Path, need_bytes: int) -> None:
    """Raise :class:`CheckpointWriteError` if ``folder``'s file system has less than ``need_bytes``."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise CheckpointWriteError(
            f"{folder}: not enough free space for a checkpoint ({free / 2**20:.1f} MiB free, about "
            f"{need_bytes / 2**20:.1f} MiB needed); free space or move run_dir. Earlier checkpoints are intact.")


def write_checkpoint(run_dir: str | Path, step: int, writer, keep_last: int,
                     expected_bytes: int | None = None) -> Path:
    """``writer(folder)`` writes the files; we add the manifest, rename atomically, prune.

    Before writing, stale ``.tmp`` folders are cleared and the free space is checked against
    ``expected_bytes`` (default: the size of the newest checkpoint). A write the file system
    refuses raises :class:`CheckpointWriteError` and removes the partial folder.
    """
    final = ckpt_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_tmp(run_dir)
    if expected_bytes is None:
        done = list_checkpoints(run_dir)
        expected_bytes = _folder_bytes(done[-1][1]) if done else 0
    check_free_space(final.parent, int(expected_bytes * 1.1) + FREE_SPACE_MARGIN)
    try:
        tmp.mkdir(parents=True)
        writer(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = Manifest(step, {str(p.relative_to(tmp)): _sha256(p) for p in files})
        (tmp / MANIFEST).write_text(json.dumps(dump(manifest), indent=1))
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            what = describe_os_error(e) if isinstance(e, OSError) else " ".join(str(e).split())[:300]
            raise CheckpointWriteError(f"writing checkpoint step {step} failed: {what}; the partial folder "
                                       "was removed, earlier checkpoints are intact") from e
        raise
    if final.exists():  # the same step written again (e.g. after a resume): swap, then delete
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    prune(run_dir, keep_last, protect=final)
    return final


def prune(run_dir: str | Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints by step number; never ``protect`` (the
    one just written, i.e. the newest good one)."""
    done = list_checkpoints(run_dir)
    removed = []
    for _, p in done[:-keep_last] if keep_last > 0 else []:
        if protect is not None and p.resolve() == protect.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def verify_checkpoint(folder: Path) -> Manifest:
    """Check every file against the manifest; raise ``CheckpointError`` naming the problem."""
    mf = folder / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the checkpoint was not completed)")
    try:
        manifest = load(Manifest, json.loads(mf.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigValueError) as e:
        raise CheckpointError(f"{mf}: unreadable ({e})") from e
    for rel, digest in manifest.files.items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{folder}: file {rel} is missing")
        if _sha256(p) != digest:
            raise CheckpointError(f"{folder}: file {rel} is corrupted (sha256 mismatch)")
    return manifest


def scan_checkpoints(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(newest checkpoint that verifies, [(newer corrupt checkpoint, reason), ...])``."""
    corrupt = []
    for _, ck in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ck)
            return ck, corrupt
        except CheckpointError as e:
            corrupt.append((ck, str(e)))
    return None, corrupt


def find_resumable(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; corrupted ones are reported and skipped."""
    good, corrupt = scan_checkpoints(run_dir)
    for _, reason in corrupt:
        log.warning("skipping checkpoint: %s; trying the previous one", reason)
        print(f"warning: {reason}; using the previous checkpoint")
    return good


def move_aside(run_dir: str | Path, names: tuple[str, ...] = ("checkpoints", "metrics.jsonl", "summary.json",
                                                             "eval", "tb")) -> Path | None:
    """Move a run's outputs into ``run_dir/restarted_<n>/`` (nothing is deleted); the folder or None."""
    run_dir = Path(run_dir)
    present = [run_dir / n for n in names if (run_dir / n).exists()]
    if not present:
        return None
    n = 1
    while (run_dir / f"restarted_{n}").exists():
        n += 1
    dest = run_dir / f"restarted_{n}"
    dest.mkdir()
    for p in present:
        os.replace(p, dest / p.name)
    return dest


def resume_point(run_dir: str | Path, restart: bool) -> Path | None:
    """Where ``--resume`` continues: the newest intact checkpoint, or None for step 0.

    Never restarts silently: checkpoints that all fail verification raise :class:`CheckpointError`
    unless ``restart`` (then the run's outputs are moved aside first, so the new run's checkpoints
    are not pruned in favour of the old ones). Corrupt checkpoints newer than the intact one are
    renamed ``step_N.corrupt`` (kept for inspection, out of the way of resume and pruning).
    """
    removed = clear_stale_tmp(run_dir)
    for p in removed:
        print(f"note: removed {p} (an unfinished checkpoint write)")
    if not list_checkpoints(run_dir):
        return None
    good, corrupt = scan_checkpoints(run_dir)
    if good is None:
        if not restart:
            raise CheckpointError(
                f"none of the {len(corrupt)} checkpoint(s) in {Path(run_dir) / 'checkpoints'} is intact "
                f"(newest: {corrupt[0][1]}); nothing to resume. Give --restart to start again from step 0 "
                "(the old checkpoints and metrics are moved aside, not deleted)")
        dest = move_aside(run_dir)
        print(f"warning: no intact checkpoint; starting again from step 0 (old outputs moved to {dest})")
        return None
    for ck, reason in corrupt:
        bad = ck.with_name(ck.name + ".corrupt")
        shutil.rmtree(bad, ignore_errors=True)
        os.replace(ck, bad)
        print(f"warning: {reason}; moved to {bad.name}, resuming from the previous checkpoint")
    return good


def write_config(folder: Path, config: Any) -> None:
    """The training config record of a checkpoint, as JSON (inside the folder being written)."""
    (folder / CONFIG).write_text(json.dumps(dump(config), indent=2))


def saved_config(ck: Path) -> dict[str, Any]:
    """The training config a checkpoint was written with, as plain data: ``config.json``, or the
    ``config`` entry of ``trainer.pt`` in checkpoints written before the JSON file existed."""
    path = ck / CONFIG
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable ({e})") from e
    else:
        data = torch.load(ck / "trainer.pt", map_location="cpu", weights_only=False).get("config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{ck}: no training config ({CONFIG}, or 'config' in trainer.pt)")
    return data


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
