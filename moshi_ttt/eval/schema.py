"""The evaluation-result JSON: one file per (arm, evaluation mode), read and written here.

The evaluator writes one :class:`EvalResult` per trained arm and evaluation mode; the statistics,
plots and report (``stats.py``, ``plots.py``, ``report.py``) read only these objects. Layout::

    {"format": "moshi-ttt-eval", "version": 1,
     "arm": "B", "train_mode": "persistent", "eval_mode": "persistent", "seed": 0,
     "checkpoint": "path", "data": "path", "corpus": "long-memory",
     "chunk_frames": 64, "context": 32,
     "files": [{"file_id": "f003", "num_frames": 256,
                "chunks": [{"chunk_index": 0, "loss": 3.2, "text_loss": 3.1, "audio_loss": 3.3,
                            "tokens": 190, "recall_loss": 2.9, "recall_tokens": 12,
                            "state_drift": 0.05}, ...]}],
     "per_position": {"bins": [0, 16, 32], "loss": [3.4, 3.2, 3.1]}}   # optional

Validation is strict and every error names the offending field by its JSON path (for example
``files[2].chunks[5].recall_loss``), so an evaluator bug is found where it is made, not as a NaN
in a table. Unknown keys are kept in ``extra`` and written back, so newer evaluators can add
fields without breaking this reader.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMAT = "moshi-ttt-eval"
VERSION = 1

Mode = Literal["persistent", "reset", "none"]
Corpus = Literal["long-memory", "control", "kv", "kv-control", "real"]
MODES: tuple[str, ...] = ("persistent", "reset", "none")
CORPORA: tuple[str, ...] = ("long-memory", "control", "kv", "kv-control", "real")


class SchemaError(ValueError):
    """An evaluation JSON is invalid; ``field`` is the JSON path of the bad value."""

    def __init__(self, field_path: str, problem: str, source: str | None = None):
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field_path}: {problem}")
        self.field = field_path
        self.problem = problem
        self.source = source


# ---- small typed readers: each names the field it rejects ------------------------------------


def _get(obj: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise SchemaError(_join(path, key), "missing")
    return obj[key]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _as_mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SchemaError(path or "<root>", f"expected an object, got {type(value).__name__}")
    return value


def _as_int(value: Any, path: str, minimum: int | None = None) -> int:
    # bool is an int subclass in Python; a JSON true is never a count.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise SchemaError(path, f"expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SchemaError(path, f"must be >= {minimum}, got {value}")
    return value


def _as_float(value: Any, path: str, nullable: bool = False) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number or null" if nullable else "a number"
        raise SchemaError(path, f"expected {kind}, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise SchemaError(path, f"must be finite, got {value}")
    return value


def _as_str(value: Any, path: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise SchemaError(path, f"expected a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        raise SchemaError(path, f"must be one of {list(choices)}, got {value!r}")
    return value


def _extra(obj: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in known}


# ---- dataclasses ------------------------------------------------------------------------------


@dataclass
class ChunkResult:
    """Losses of one chunk of one file (token means over the chunk's scored tokens).

    Attributes:
        chunk_index: position of the chunk in its file, 0 for the first.
        loss: mean loss over the chunk's ``tokens`` scored tokens (text and audio, as trained);
            None iff ``tokens == 0`` (such a chunk enters no mean).
        text_loss, audio_loss: the text-stream and audio-stream parts (None if not measured).
        tokens: number of scored tokens (the weight of this chunk in token-weighted means).
        recall_loss: mean loss over the recall-target tokens of the chunk; None iff
            ``recall_tokens == 0``.
        recall_tokens: number of recall-target tokens in the chunk.
        state_drift: distance of the TTT fast weights from their learned initial value at the end
            of the chunk (None without TTT).
    """

    chunk_index: int
    loss: float | None
    tokens: int
    text_loss: float | None = None
    audio_loss: float | None = None
    recall_loss: float | None = None
    recall_tokens: int = 0
    state_drift: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("chunk_index", "loss", "text_loss", "audio_loss", "tokens", "recall_loss", "recall_tokens",
             "state_drift")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, path: str = "chunk") -> None:
        """Check types and consistency; raise :class:`SchemaError` naming the bad field."""
        _as_int(self.chunk_index, _join(path, "chunk_index"), minimum=0)
        _as_float(self.loss, _join(path, "loss"), nullable=True)
        _as_int(self.tokens, _join(path, "tokens"), minimum=0)
        # A chunk without scored tokens has no defined loss (0/0); any other null loss is a bug.
        if self.tokens > 0 and self.loss is None:
            raise SchemaError(_join(path, "loss"), f"is null but tokens = {self.tokens}")
        if self.tokens == 0 and self.loss is not None:
            raise SchemaError(_join(path, "loss"), "must be null when tokens is 0")
        _as_float(self.text_loss, _join(path, "text_loss"), nullable=True)
        _as_float(self.audio_loss, _join(path, "audio_loss"), nullable=True)
        _as_int(self.recall_tokens, _join(path, "recall_tokens"), minimum=0)
        _as_float(self.recall_loss, _join(path, "recall_loss"), nullable=True)
        _as_float(self.state_drift, _join(path, "state_drift"), nullable=True)
        if self.recall_tokens > 0 and self.recall_loss is None:
            raise SchemaError(_join(path, "recall_loss"), f"is null but recall_tokens = {self.recall_tokens}")
        if self.recall_tokens == 0 and self.recall_loss is not None:
            # Usually a 0/0 written as 0.0: it would enter no mean, but it signals an evaluator bug.
            raise SchemaError(_join(path, "recall_loss"), "must be null when recall_tokens is 0")

    @classmethod
    def from_json(cls, obj: Any, path: str = "chunk") -> ChunkResult:
        obj = _as_mapping(obj, path)
        out = cls.__new__(cls)
        out.chunk_index = _as_int(_get(obj, "chunk_index", path), _join(path, "chunk_index"), minimum=0)
        out.loss = _as_float(_get(obj, "loss", path), _join(path, "loss"), nullable=True)
        out.tokens = _as_int(_get(obj, "tokens", path), _join(path, "tokens"), minimum=0)
        out.text_loss = _as_float(obj.get("text_loss"), _join(path, "text_loss"), nullable=True)
        out.audio_loss = _as_float(obj.get("audio_loss"), _join(path, "audio_loss"), nullable=True)
        out.recall_tokens = _as_int(obj.get("recall_tokens", 0), _join(path, "recall_tokens"), minimum=0)
        out.recall_loss = _as_float(obj.get("recall_loss"), _join(path, "recall_loss"), nullable=True)
        out.state_drift = _as_float(obj.get("state_drift"), _join(path, "state_drift"), nullable=True)
        out.extra = _extra(obj, cls._KEYS)
        out.validate(path)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"chunk_index": self.chunk_index, "loss": self.loss, "text_loss": self.text_loss,
                "audio_loss": self.audio_loss, "tokens": self.tokens, "recall_loss": self.recall_loss,
                "recall_tokens": self.recall_tokens, "state_drift": self.state_drift, **self.extra}


@dataclass
class FileResult:
    """All chunks of one evaluated file, in order (``chunk_index`` strictly increasing)."""

    file_id: str
    num_frames: int
    chunks: list[ChunkResult]
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("file_id", "num_frames", "chunks")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, path: str = "file") -> None:
        _as_str(self.file_id, _join(path, "file_id"))
        _as_int(self.num_frames, _join(path, "num_frames"), minimum=1)
        if not isinstance(self.chunks, list) or not self.chunks:
            raise SchemaError(_join(path, "chunks"), "expected a non-empty list")
        previous = -1
        for i, chunk in enumerate(self.chunks):
            cpath = f"{_join(path, 'chunks')}[{i}]"
            if not isinstance(chunk, ChunkResult):
                raise SchemaError(cpath, f"expected a ChunkResult, got {type(chunk).__name__}")
            chunk.validate(cpath)
            # Later-chunk metrics select on chunk_index: duplicates or disorder would double count.
            if chunk.chunk_index <= previous:
                raise SchemaError(_join(cpath, "chunk_index"), "chunk indices must be strictly increasing, "
                                  f"got {chunk.chunk_index} after {previous}")
            previous = chunk.chunk_index

    @classmethod
    def from_json(cls, obj: Any, path: str = "file") -> FileResult:
        obj = _as_mapping(obj, path)
        chunks_raw = _get(obj, "chunks", path)
        if not isinstance(chunks_raw, list):
            raise SchemaError(_join(path, "chunks"), f"expected a list, got {type(chunks_raw).__name__}")
        out = cls.__new__(cls)
        out.file_id = _as_str(_get(obj, "file_id", path), _join(path, "file_id"))
        out.num_frames = _as_int(_get(obj, "num_frames", path), _join(path, "num_frames"), minimum=1)
        out.chunks = [ChunkResult.from_json(c, f"{_join(path, 'chunks')}[{i}]") for i, c in enumerate(chunks_raw)]
        out.extra = _extra(obj, cls._KEYS)
        out.validate(path)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"file_id": self.file_id, "num_frames": self.num_frames,
                "chunks": [c.to_json() for c in self.chunks], **self.extra}


@dataclass
class PerPosition:
    """Mean loss by frame position within a chunk: ``loss[i]`` covers positions from ``bins[i]``."""

    bins: list[int]
    loss: list[float]

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, path: str = "per_position") -> None:
        if not isinstance(self.bins, list) or not self.bins:
            raise SchemaError(_join(path, "bins"), "expected a non-empty list")
        if not isinstance(self.loss, list) or len(self.loss) != len(self.bins):
            n = len(self.loss) if isinstance(self.loss, list) else "not a list"
            raise SchemaError(_join(path, "loss"), f"expected {len(self.bins)} numbers (one per bin), got {n}")
        for i, b in enumerate(self.bins):
            _as_int(b, f"{_join(path, 'bins')}[{i}]", minimum=0)
            if i and b <= self.bins[i - 1]:
                raise SchemaError(f"{_join(path, 'bins')}[{i}]", "bins must be strictly increasing")
        for i, v in enumerate(self.loss):
            _as_float(v, f"{_join(path, 'loss')}[{i}]")

    @classmethod
    def from_json(cls, obj: Any, path: str = "per_position") -> PerPosition:
        obj = _as_mapping(obj, path)
        bins, loss = _get(obj, "bins", path), _get(obj, "loss", path)
        if not isinstance(bins, list) or not isinstance(loss, list):
            raise SchemaError(path, "bins and loss must be lists")
        out = cls.__new__(cls)
        out.bins = [_as_int(b, f"{_join(path, 'bins')}[{i}]", minimum=0) for i, b in enumerate(bins)]
        out.loss = [_as_float(v, f"{_join(path, 'loss')}[{i}]") for i, v in enumerate(loss)]
        out.validate(path)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"bins": list(self.bins), "loss": list(self.loss)}


@dataclass
class EvalResult:
    """One evaluation run: one arm (trained weights) under one evaluation mode on one corpus.

    Attributes:
        arm: arm name, by convention "A" (TTT trained with resets), "B" (TTT trained persistent),
            "C" (no TTT).
        train_mode: how the arm's TTT state was handled in training: "persistent", "reset" or
            "none" (no TTT).
        eval_mode: how it is handled in this evaluation; "none" iff ``train_mode`` is "none".
        seed: training seed of the arm.
        checkpoint, data: paths of the evaluated weights and of the evaluation data.
        corpus: "long-memory" (synthetic, needs memory), "control" (same, without the long-range
            dependence), "kv" / "kv-control" (the key -> value ladder and its control) or "real".
        chunk_frames, context: chunk length and attention context (frames) of the evaluation.
        files: per-file, per-chunk results; file ids unique.
        per_position: optional mean loss by position within a chunk.
    """

    arm: str
    train_mode: Mode
    eval_mode: Mode
    seed: int
    checkpoint: str
    data: str
    corpus: Corpus
    chunk_frames: int
    context: int
    files: list[FileResult]
    per_position: PerPosition | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("format", "version", "arm", "train_mode", "eval_mode", "seed", "checkpoint", "data", "corpus",
             "chunk_frames", "context", "files", "per_position")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def condition(self) -> tuple[str, str]:
        """``(train_mode, eval_mode)``: what the report's contrasts are defined on."""
        return (self.train_mode, self.eval_mode)

    @property
    def label(self) -> str:
        """Display name: ``"B-persistent"``, ``"A-reset"``; just the arm for the no-TTT arm."""
        return self.arm if self.eval_mode == "none" else f"{self.arm}-{self.eval_mode}"

    def validate(self) -> None:
        _as_str(self.arm, "arm")
        _as_str(self.train_mode, "train_mode", MODES)
        _as_str(self.eval_mode, "eval_mode", MODES)
        if (self.train_mode == "none") != (self.eval_mode == "none"):
            raise SchemaError("eval_mode", f"is {self.eval_mode!r} but train_mode is {self.train_mode!r}: "
                                           "'none' (no TTT) must be used for both or neither")
        _as_int(self.seed, "seed")
        _as_str(self.checkpoint, "checkpoint")
        _as_str(self.data, "data")
        _as_str(self.corpus, "corpus", CORPORA)
        _as_int(self.chunk_frames, "chunk_frames", minimum=1)
        _as_int(self.context, "context", minimum=1)
        if not isinstance(self.files, list) or not self.files:
            raise SchemaError("files", "expected a non-empty list")
        seen: dict[str, int] = {}
        for i, f in enumerate(self.files):
            if not isinstance(f, FileResult):
                raise SchemaError(f"files[{i}]", f"expected a FileResult, got {type(f).__name__}")
            f.validate(f"files[{i}]")
            if f.file_id in seen:
                raise SchemaError(f"files[{i}].file_id",
                                  f"duplicate file id {f.file_id!r} (also files[{seen[f.file_id]}])")
            seen[f.file_id] = i
        if self.per_position is not None:
            self.per_position.validate("per_position")

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> EvalResult:
        """Build from a parsed JSON object or a JSON string; raises :class:`SchemaError`."""
        obj = json.loads(data) if isinstance(data, str) else data
        obj = _as_mapping(obj, "")
        fmt = _get(obj, "format", "")
        if fmt != FORMAT:
            raise SchemaError("format", f"expected {FORMAT!r}, got {fmt!r}")
        version = _as_int(_get(obj, "version", ""), "version")
        if version != VERSION:
            raise SchemaError("version", f"unsupported version {version} (this reader knows {VERSION})")
        files_raw = _get(obj, "files", "")
        if not isinstance(files_raw, list):
            raise SchemaError("files", f"expected a list, got {type(files_raw).__name__}")
        pp = obj.get("per_position")
        # The constructor validates the whole record (``__post_init__``).
        return cls(
            arm=_as_str(_get(obj, "arm", ""), "arm"),
            train_mode=_as_str(_get(obj, "train_mode", ""), "train_mode", MODES),  # type: ignore[arg-type]
            eval_mode=_as_str(_get(obj, "eval_mode", ""), "eval_mode", MODES),  # type: ignore[arg-type]
            seed=_as_int(_get(obj, "seed", ""), "seed"),
            checkpoint=_as_str(_get(obj, "checkpoint", ""), "checkpoint"),
            data=_as_str(_get(obj, "data", ""), "data"),
            corpus=_as_str(_get(obj, "corpus", ""), "corpus", CORPORA),  # type: ignore[arg-type]
            chunk_frames=_as_int(_get(obj, "chunk_frames", ""), "chunk_frames", minimum=1),
            context=_as_int(_get(obj, "context", ""), "context", minimum=1),
            files=[FileResult.from_json(f, f"files[{i}]") for i, f in enumerate(files_raw)],
            per_position=None if pp is None else PerPosition.from_json(pp),
            extra=_extra(obj, cls._KEYS),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``json.dumps`` it, or use :meth:`save`)."""
        out: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "arm": self.arm, "train_mode": self.train_mode,
            "eval_mode": self.eval_mode, "seed": self.seed, "checkpoint": self.checkpoint, "data": self.data,
            "corpus": self.corpus, "chunk_frames": self.chunk_frames, "context": self.context,
            "files": [f.to_json() for f in self.files],
        }
        if self.per_position is not None:
            out["per_position"] = self.per_position.to_json()
        out.update(self.extra)
        return out

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read and validate a file; errors name the file and the field."""
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except SchemaError as e:
            raise SchemaError(e.field, e.problem, source=str(path)) from None
        except json.JSONDecodeError as e:
            raise SchemaError("<root>", f"not valid JSON ({e})", source=str(path)) from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # allow_nan=False: NaN is not JSON; validation already rejected non-finite values.
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return path
