"""The on-disk "encoded dataset": one format for encoded real recordings and the synthetic corpus.

Layout of a dataset directory::

    dataset.json          layout (n_q, dep_q, card, text_card, ids, frame_rate) + what produced it
    index.jsonl           one line per file: {"file_id", "path", "num_frames", "source"}
    codes/<file_id>.safetensors   (its metadata holds the sha256 of its tensors, checked on load)
        codes        [1 + n_q, T] int32 on disk, int64 when loaded (moshi's layout: row 0 text,
                     rows 1..dep_q the Moshi (left) channel, rows dep_q+1..n_q the user channel)
        recall_mask  [T] uint8, optional: frames whose Moshi tokens (rows 0..dep_q) can only be
                     predicted from memory beyond the attention window (synthetic corpus)
        recall_rung  [T] uint8, optional: per frame, the rung of its recall target (key -> value
                     ladder: 1 within attention's reach, 2 beyond it in the same training span, 3
                     across spans; 0 = not a measured target); ``recall_mask == (recall_rung > 0)``

Every file is written to a temporary name and moved into place (``os.replace``), so a crash never
leaves a half-written file under a final name. A writer stopped by an error writes ``dataset.json``
with ``"complete": false`` and removes ``index.jsonl``: a partial dataset never looks complete, and
:class:`EncodedDataset` refuses it with a message saying so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..fileio import atomic_path, atomic_write_text
from .report import DataError, Report

FORMAT = "moshi-ttt-encoded/1"
INDEX_NAME = "index.jsonl"
META_NAME = "dataset.json"
CODES_DIR = "codes"


@dataclass(frozen=True)
class CodesLayout:
    """Shape and vocabulary of moshi's code tensor ``[1 + n_q, T]``.

    Attributes:
        n_q: audio codebooks in total (Moshi's + the user's).
        dep_q: codebooks of the Moshi (left) channel, the ones the model generates.
        card: audio codebook size.
        text_card: text vocabulary size.
        text_padding_id: moshi's ``existing_text_padding_id``.
        end_of_text_padding_id: moshi's ``LMModel.end_of_text_padding_id`` (0).
        zero_token_id: moshi's ``LMModel.zero_token_id`` (-1): masked out of the loss; used for
            padding past the end of a file.
        frame_rate: frames per second (Mimi: 12.5).
    """

    n_q: int
    dep_q: int
    card: int
    text_card: int
    text_padding_id: int = 3
    end_of_text_padding_id: int = 0
    zero_token_id: int = -1
    frame_rate: float = 12.5

    def __post_init__(self) -> None:
        if not 0 < self.dep_q <= self.n_q:
            raise ValueError(f"CodesLayout: need 0 < dep_q <= n_q, got dep_q={self.dep_q}, n_q={self.n_q}")
        for name in ("text_padding_id", "end_of_text_padding_id"):
            if not 0 <= getattr(self, name) < self.text_card:
                raise ValueError(f"CodesLayout: {name}={getattr(self, name)} outside [0, {self.text_card})")

    @property
    def num_rows(self) -> int:
        return 1 + self.n_q

    @classmethod
    def from_lm_kwargs(cls, lm_kwargs: dict[str, Any], frame_rate: float = 12.5) -> CodesLayout:
        """Layout of a moshi ``LMModel`` built from these kwargs (e.g. ``tiny_lm_kwargs()``)."""
        return cls(
            n_q=int(lm_kwargs["n_q"]),
            dep_q=int(lm_kwargs["dep_q"]),
            card=int(lm_kwargs["card"]),
            text_card=int(lm_kwargs["text_card"]),
            text_padding_id=int(lm_kwargs.get("existing_text_padding_id", 3)),
            frame_rate=frame_rate,
        )

    @classmethod
    def preset(cls, name: str) -> CodesLayout:
        """``"tiny"`` (the CPU preset) or ``"7b"`` (Moshi 7B)."""
        from ..model import presets

        if name == "tiny":
            return cls.from_lm_kwargs(presets.tiny_lm_kwargs())
        if name == "7b":
            return cls.from_lm_kwargs(presets.moshi_7b_lm_kwargs())
        raise ValueError(f"unknown layout preset {name!r} (expected 'tiny' or '7b')")

    def check_codes(self, codes: torch.Tensor) -> str | None:
        """Return what is wrong with ``codes`` [1 + n_q, T], or None if it fits this layout."""
        if codes.dim() != 2 or codes.shape[0] != self.num_rows:
            return f"codes have shape {tuple(codes.shape)}, expected [{self.num_rows}, T]"
        if codes.numel() == 0:
            return None
        lo = self.zero_token_id
        text, audio = codes[0], codes[1:]
        if int(text.min()) < lo or int(text.max()) >= self.text_card:
            return f"text tokens outside [{lo}, {self.text_card}): [{int(text.min())}, {int(text.max())}]"
        if audio.numel() and (int(audio.min()) < lo or int(audio.max()) >= self.card):
            return f"audio codes outside [{lo}, {self.card}): [{int(audio.min())}, {int(audio.max())}]"
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors``: what a codes file holds."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through :func:`moshi_ttt.fileio.atomic_path`."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


@dataclass
class FileEntry:
    """One line of ``index.jsonl``. ``path`` is relative to the dataset directory."""

    file_id: str
    path: str
    num_frames: int
    source: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodedFile:
    """A loaded file: ``codes`` [1 + n_q, T] int64, ``recall_mask`` [T] bool or None,
    ``recall_rung`` [T] int64 or None (ladder corpora: the rung of each frame's recall target)."""

    file_id: str
    codes: torch.Tensor
    recall_mask: torch.Tensor | None = None
    recall_rung: torch.Tensor | None = None

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[-1])


class EncodedDataset:
    """Read access to an encoded dataset directory.

    Args:
        root: the dataset directory (holding ``index.jsonl`` and ``dataset.json``).
        verify: open every codes file's header now (cheap: no tensor data is read) and leave out,
            with a message in ``report``, the files that are missing, unreadable or of the wrong
            shape.
        strict: raise :class:`DataError` on the first such file instead.
        report: where problems go (a new :class:`Report` by default).

    Attributes:
        layout: the :class:`CodesLayout` from ``dataset.json``.
        meta: the whole ``dataset.json`` (``produced_by``, ``synthetic`` settings, ...).
        files: the usable :class:`FileEntry` s, in index order.
    """

    def __init__(self, root: str | Path, *, verify: bool = True, strict: bool = False, report: Report | None = None):
        self.root = Path(root)
        self.report = report if report is not None else Report(strict=strict)
        meta_path = self.root / META_NAME
        index_path = self.root / INDEX_NAME
        if not index_path.is_file():
            incomplete = False
            try:
                incomplete = json.loads(meta_path.read_text(encoding="utf-8")).get("complete") is False
            except (OSError, ValueError, AttributeError):
                pass
            if incomplete:
                raise DataError(str(self.root), "incomplete dataset: the command that wrote it stopped "
                                "before the end (see prepare_report.json); run it again")
            raise DataError(str(index_path), "no index.jsonl: not an encoded dataset "
                            "(write one with `moshi-ttt prepare` or `moshi-ttt synth`)")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
            self.layout = CodesLayout(**self.meta["layout"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(str(meta_path), f"missing or malformed dataset.json ({e})") from e
        self.files: list[FileEntry] = []
        self._digests: dict[str, str] = {}  # file_id -> sha256 written with the codes (when verified)
        seen: set[str] = set()
        for lineno, line in enumerate(index_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            src = f"{index_path}:{lineno}"
            try:
                d = json.loads(line)
                entry = FileEntry(str(d["file_id"]), str(d["path"]), int(d["num_frames"]), dict(d.get("source", {})))
            except (ValueError, KeyError, TypeError) as e:
                self.report.add(src, f"malformed index line ({e})", kind="bad index line")
                continue
            if entry.file_id in seen:
                self.report.add(src, f"duplicate file_id {entry.file_id!r}", kind="bad index line")
                continue
            if entry.num_frames < 1:
                self.report.add(src, f"{entry.file_id!r} has {entry.num_frames} frames", kind="empty file")
                continue
            if verify:
                problem = self._verify(entry)
                if problem is not None:
                    self.report.add(str(self.root / entry.path), problem, kind="bad codes file")
                    continue
            seen.add(entry.file_id)
            self.files.append(entry)
        self._by_id = {f.file_id: f for f in self.files}

    def _verify(self, entry: FileEntry) -> str | None:
        path = self.root / entry.path
        if not path.is_file():
            return "codes file is missing"
        try:
            with safe_open(str(path), framework="pt") as f:
                digest = (f.metadata() or {}).get("sha256")
                if digest is not None:
                    self._digests[entry.file_id] = digest
                if "codes" not in f.keys():
                    return "codes file has no 'codes' tensor"
                shape = tuple(f.get_slice("codes").get_shape())
                mask_shape = tuple(f.get_slice("recall_mask").get_shape()) if "recall_mask" in f.keys() else None
                rung_shape = tuple(f.get_slice("recall_rung").get_shape()) if "recall_rung" in f.keys() else None
        except Exception as e:  # safetensors raises several types for a corrupt header
            return f"codes file is unreadable ({type(e).__name__}: {e})"
        if shape != (self.layout.num_rows, entry.num_frames):
            return f"codes shape {shape} != expected {(self.layout.num_rows, entry.num_frames)} from the index"
        if mask_shape is not None and mask_shape != (entry.num_frames,):
            return f"recall_mask shape {mask_shape} != ({entry.num_frames},)"
        if rung_shape is not None and rung_shape != (entry.num_frames,):
            return f"recall_rung shape {rung_shape} != ({entry.num_frames},)"
        return None

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[FileEntry]:
        return iter(self.files)

    def __getitem__(self, key: int | str) -> FileEntry:
        return self.files[key] if isinstance(key, int) else self._by_id[key]

    @property
    def file_ids(self) -> list[str]:
        return [f.file_id for f in self.files]

    @property
    def total_frames(self) -> int:
        return sum(f.num_frames for f in self.files)

    def load(self, file_id: str) -> EncodedFile:
        """Load one file. Raises :class:`DataError` naming the file if it is missing or corrupt."""
        entry = self._by_id.get(file_id)
        if entry is None:
            raise DataError(str(self.root), f"no file with file_id {file_id!r}")
        path = self.root / entry.path
        try:
            tensors = load_file(str(path))
        except Exception as e:
            raise DataError(str(path), f"cannot load codes file ({type(e).__name__}: {e})") from e
        if "codes" not in tensors:
            raise DataError(str(path), "codes file has no 'codes' tensor")
        digest = self._digests.get(file_id)
        if digest is not None and tensors_sha256(tensors) != digest:
            raise DataError(str(path), "codes file is corrupted (its sha256 does not match the one written "
                            "with it); re-create it with `moshi-ttt prepare` / `synth`")
        codes = tensors["codes"].long()
        problem = self.layout.check_codes(codes)
        if problem is None and codes.shape[-1] != entry.num_frames:
            problem = f"{codes.shape[-1]} frames, index says {entry.num_frames}"
        if problem is not None:
            raise DataError(str(path), problem)
        mask = tensors.get("recall_mask")
        if mask is not None and mask.numel() and int(mask.max()) > 1:
            raise DataError(str(path), f"recall_mask holds {int(mask.max())}, expected 0 or 1")
        rung = tensors.get("recall_rung")
        if rung is not None and tuple(rung.shape) != (entry.num_frames,):
            raise DataError(str(path), f"recall_rung shape {tuple(rung.shape)} != ({entry.num_frames},)")
        return EncodedFile(file_id, codes, None if mask is None else mask.bool(),
                           None if rung is None else rung.long())


class EncodedDatasetWriter:
    """Writes an encoded dataset; ``index.jsonl`` and ``dataset.json`` are written by ``close()``.

    Args:
        root: output directory (created).
        layout: the code layout every file must fit.
        produced_by: free-form description stored in ``dataset.json`` (tool, Mimi identity, ...).
        extra_meta: more top-level keys for ``dataset.json`` (e.g. ``synthetic`` settings).
    """

    def __init__(self, root: str | Path, layout: CodesLayout, produced_by: dict[str, Any],
                 extra_meta: dict[str, Any] | None = None):
        self.root = Path(root)
        self.layout = layout
        self.produced_by = produced_by
        self.extra_meta = dict(extra_meta or {})
        self.entries: list[FileEntry] = []
        self._ids: set[str] = set()
        (self.root / CODES_DIR).mkdir(parents=True, exist_ok=True)
        # Until close(): marked incomplete, so a kill mid-write never leaves an old index that
        # looks like it describes the files being rewritten.
        self._write_meta(complete=False)
        (self.root / INDEX_NAME).unlink(missing_ok=True)

    def add(self, file_id: str, codes: torch.Tensor, recall_mask: torch.Tensor | None = None,
            source: dict[str, Any] | None = None, recall_rung: torch.Tensor | None = None) -> FileEntry:
        """Write ``codes`` [1 + n_q, T] (and ``recall_mask`` [T], ``recall_rung`` [T] in 0..255)."""
        if file_id in self._ids:
            raise ValueError(f"duplicate file_id {file_id!r}")
        problem = self.layout.check_codes(codes)
        if problem is not None:
            raise ValueError(f"{file_id}: {problem}")
        T = int(codes.shape[-1])
        tensors = {"codes": codes.to(torch.int32)}
        if recall_mask is not None:
            if tuple(recall_mask.shape) != (T,):
                raise ValueError(f"{file_id}: recall_mask shape {tuple(recall_mask.shape)} != ({T},)")
            tensors["recall_mask"] = recall_mask.to(torch.uint8)
        if recall_rung is not None:
            if tuple(recall_rung.shape) != (T,):
                raise ValueError(f"{file_id}: recall_rung shape {tuple(recall_rung.shape)} != ({T},)")
            if recall_rung.numel() and (int(recall_rung.min()) < 0 or int(recall_rung.max()) > 255):
                raise ValueError(f"{file_id}: recall_rung outside [0, 255]")
            tensors["recall_rung"] = recall_rung.to(torch.uint8)
        rel = f"{CODES_DIR}/{file_id}.safetensors"
        metadata = {"format": FORMAT, "file_id": file_id, "layout": json.dumps(self.layout.to_json()),
                    "sha256": tensors_sha256(tensors)}
        atomic_save_file(tensors, self.root / rel, metadata)
        entry = FileEntry(file_id, rel, T, dict(source or {}))
        self.entries.append(entry)
        self._ids.add(file_id)
        return entry

    def _write_meta(self, complete: bool) -> None:
        meta = {"format": FORMAT, "layout": self.layout.to_json(), "produced_by": self.produced_by,
                "num_files": len(self.entries), "num_frames": sum(e.num_frames for e in self.entries),
                "complete": complete, **self.extra_meta}
        atomic_write_text(self.root / META_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def close(self, complete: bool = True) -> None:
        """Write ``dataset.json`` and ``index.jsonl``; ``complete=False`` (after an error) writes
        ``dataset.json`` marked incomplete and no index, so the folder is not taken for a dataset."""
        if not complete:
            (self.root / INDEX_NAME).unlink(missing_ok=True)
        self._write_meta(complete)
        if complete:
            lines = [json.dumps(asdict(e), sort_keys=True) for e in self.entries]
            atomic_write_text(self.root / INDEX_NAME, "".join(line + "\n" for line in lines))

    def __enter__(self) -> EncodedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # stopped by an error: mark the output incomplete (the files written so far stay)
            self.close(complete=False)
        except OSError:
            pass  # the folder may be what failed; the original error is what matters
