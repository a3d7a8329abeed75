"""moshi-finetune's data format: a JSONL manifest of stereo wavs, a word-alignment JSON beside each.

Manifest, one JSON object per line (other keys are kept but unused)::

    {"path": "relative/or/absolute.wav", "duration": 123.4}

``path`` is relative to the manifest's folder unless absolute. Beside each wav, the alignment of
the same stem (``foo.wav`` -> ``foo.json``)::

    {"alignments": [["hello", [0.48, 0.80], "SPEAKER_MAIN"], ...]}

Each entry is ``[word, [start_sec, end_sec], speaker]``. Channel convention: left = Moshi
(whose words are labelled ``SPEAKER_MAIN`` by moshi-finetune's ``annotate.py``), right = user.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import DataError, Report


@dataclass
class ManifestEntry:
    """One usable manifest line.

    Attributes:
        path: the wav, resolved (manifest-relative paths made absolute).
        rel: ``path`` as written in the manifest (used for file ids and messages).
        duration: the ``duration`` field, if any (seconds; informative only).
        line: 1-based line number in the manifest.
        extra: the other keys of the line.
    """

    path: Path
    rel: str
    duration: float | None
    line: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def alignment_path(self) -> Path:
        return alignment_path(self.path)


@dataclass
class Word:
    """One aligned word: ``text`` spoken by ``speaker`` from ``start`` to ``end`` seconds."""

    text: str
    start: float
    end: float
    speaker: str


def alignment_path(wav: Path) -> Path:
    """The alignment JSON beside a wav (same stem, ``.json``), as moshi-finetune expects."""
    return Path(wav).with_suffix(".json")


def read_manifest(manifest: str | Path, report: Report) -> list[ManifestEntry]:
    """Parse a JSONL manifest; bad lines go to ``report`` (action ``skipped``) and are left out.

    Raises :class:`DataError` only if the manifest itself cannot be read.
    """
    manifest = Path(manifest)
    try:
        text = manifest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(str(manifest), f"cannot read manifest ({e})") from e
    base = manifest.resolve().parent
    entries: list[ManifestEntry] = []
    first_line: dict[Path, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines carry nothing
        src = f"{manifest}:{lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            report.add(src, f"not JSON ({e.msg} at column {e.colno}): {line[:80]!r}", kind="bad manifest line")
            continue
        if not isinstance(d, dict) or not isinstance(d.get("path"), str) or not d["path"]:
            report.add(src, f"expected an object with a string 'path', got {line[:80]!r}", kind="bad manifest line")
            continue
        duration = d.get("duration")
        if duration is not None and not (isinstance(duration, (int, float)) and math.isfinite(duration)
                                         and duration >= 0):
            report.add(src, f"'duration' is not a non-negative number ({duration!r}); ignored",
                       action="note", kind="bad duration field")
            duration = None
        rel = d["path"]
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        path = Path(*path.parts)  # normalise separators, keep symlinks as given
        key = path.resolve()
        if key in first_line:
            report.add(src, f"duplicate of line {first_line[key]} ({rel})", kind="duplicate")
            continue
        first_line[key] = lineno
        extra = {k: v for k, v in d.items() if k not in ("path", "duration")}
        entries.append(ManifestEntry(path, rel, None if duration is None else float(duration), lineno, extra))
    return entries


def read_alignment(path: str | Path) -> list[Word]:
    """Parse an alignment JSON into :class:`Word` s (file order).

    Raises :class:`DataError` naming the file if it is missing, not JSON, or not of the form
    ``{"alignments": [[word, [start, end], speaker], ...]}`` with finite times.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "alignment JSON is missing (expected beside the wav, same stem)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(str(path), f"cannot read alignment JSON ({e})") from e
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"alignment is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from e
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
        raise DataError(str(path), "alignment JSON has no 'alignments' list")
    words: list[Word] = []
    for i, item in enumerate(data["alignments"]):
        word = _parse_word(item)
        if word is None:
            raise DataError(str(path), f"alignments[{i}] = {json.dumps(item)[:80]} is not "
                            "[word, [start_sec, end_sec], speaker] with finite times")
        words.append(word)
    return words


def _parse_word(item: Any) -> Word | None:
    if not (isinstance(item, (list, tuple)) and len(item) == 3):
        return None
    text, ts, speaker = item
    if not isinstance(text, str) or not isinstance(speaker, str):
        return None
    if not (isinstance(ts, (list, tuple)) and len(ts) == 2):
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in ts):
        return None
    return Word(text, float(ts[0]), float(ts[1]), speaker)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_id_for(rel: str) -> str:
    """A file id from a manifest path: the path without suffix, '/' -> '__', other odd chars -> '_'."""
    p = Path(rel)
    parts = [part for part in p.with_suffix("").parts if part not in ("/", "..", ".")]
    fid = "__".join(_UNSAFE.sub("_", part) for part in parts).strip("._")
    return fid or "file"
