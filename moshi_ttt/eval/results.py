"""The evaluation result: one typed record per (arm, evaluation mode), written by ``evaluate()``.

JSON ``moshi-ttt-eval`` version 1: the fields of :class:`EvalResult`, per file those of :class:`FileResult`,
per chunk those of :class:`ChunkResult`. (De)serialised by :mod:`moshi_ttt.records` (pydantic), strictly: an
error names the bad value by its JSON path (``files[2].chunks[5].recall_loss``), so an evaluator bug is found
where it is made. Unknown keys (newer evaluators; the ladder's ``rung{r}_loss`` / ``rung{r}_tokens``) are kept
as attributes and written back. The record owns the per-file reductions the statistics read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_serializer
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

from .. import records
from ..errors import ConfigValueError
from ..fileio import atomic_write_text

Mode = Literal["persistent", "reset", "none"]
Corpus = Literal["kv", "kv-control", "long-memory", "control", "real"]  # also the report's order
LOSS_DEFINITION = "per-token loss: cross-entropy in nats averaged over all text and audio tokens"
Count = Annotated[int, Field(ge=0)]  # records.load validates in strict JSON mode: a JSON true is no integer
Positive = Annotated[int, Field(ge=1)]
Text = Annotated[str, Field(min_length=1)]


class SchemaError(ConfigValueError):
    """An evaluation JSON is invalid; ``field`` is the JSON path of the bad value."""

    def __init__(self, field_path: str, problem: str, source: str | None = None):
        super().__init__(f"{source + ': ' if source else ''}{field_path}: {problem}")
        self.field, self.problem, self.source = field_path, problem, source


def _fail(loc: tuple[str | int, ...], value: Any, problem: str) -> ValidationError:
    """A validation error at ``loc`` below the record being validated (pydantic prefixes the rest)."""
    return ValidationError.from_exception_data("result", [InitErrorDetails(
        type=PydanticCustomError("invalid", problem), loc=loc, input=value)])


class _Open:
    """Unknown keys are kept (as attributes) and written back; ``_OPTIONAL`` fields only when not None."""

    __pydantic_config__ = ConfigDict(extra="allow", allow_inf_nan=False)
    _OPTIONAL: tuple[str, ...] = ()

    @model_serializer(mode="wrap")
    def _with_extra(self, handler: Any) -> dict[str, Any]:
        known = {f.name for f in fields(self)}  # type: ignore[arg-type]
        return {**{k: v for k, v in handler(self).items() if v is not None or k not in self._OPTIONAL},
                **{k: v for k, v in vars(self).items() if k not in known}}


def _wmean(pairs: list[tuple[float | None, float]]) -> float | None:
    """Token-weighted mean of ``(mean, tokens)`` pairs; pairs with no tokens enter no mean."""
    pairs = [(v, n) for v, n in pairs if n and v is not None]
    return sum(v * n for v, n in pairs) / den if (den := sum(n for _, n in pairs)) else None


@dataclass
class ChunkResult(_Open):
    """Token means (nats) of one chunk of one file; a mean is None iff it has no token (0/0 enters no mean).
    ``state_drift``: the fast weights' relative distance from their initial value (None without TTT)."""

    chunk_index: Count
    tokens: Count
    loss: float | None
    text_loss: float | None = None
    audio_loss: float | None = None
    recall_tokens: Count = 0
    recall_loss: float | None = None
    state_drift: float | None = None

    @field_validator("loss", "recall_loss")
    @classmethod
    def _null_iff_no_tokens(cls, v: float | None, info: ValidationInfo) -> float | None:
        n = info.data.get("tokens" if info.field_name == "loss" else "recall_tokens", 0)
        if (v is None) != (n == 0):  # a 0/0 written as 0.0, or a lost mean: an evaluator bug either way
            raise ValueError(f"is null but {n} tokens" if v is None else "must be null when there are no tokens")
        return v


@dataclass
class FileResult(_Open):
    """All chunks of one evaluated file, ``chunk_index`` strictly increasing."""

    file_id: Text
    num_frames: Positive
    chunks: Annotated[list[ChunkResult], Field(min_length=1)]

    @field_validator("chunks")
    @classmethod
    def _increasing(cls, chunks: list[ChunkResult]) -> list[ChunkResult]:
        # Later-chunk metrics select on chunk_index: duplicates or disorder would double count.
        for i in range(1, len(chunks)):
            if chunks[i].chunk_index <= chunks[i - 1].chunk_index:
                raise _fail((i, "chunk_index"), chunks[i].chunk_index, "chunk indices must be strictly increasing")
        return chunks

    def later_chunk_loss(self) -> float | None:
        """Loss over chunks ``>= 1`` (chunk 0 starts from the learned initial weights in every mode)."""
        return _wmean([(c.loss, c.tokens) for c in self.chunks if c.chunk_index >= 1])

    def recall_loss(self) -> float | None:
        """Recall-target loss over every chunk (None when the file has no recall target)."""
        return _wmean([(c.recall_loss, c.recall_tokens) for c in self.chunks])

    def metric(self, name: str) -> float | None:
        """A reduction by name: ``later_chunk_loss``, ``recall_loss`` or ``rung{r}_loss`` (ladder rung ``r``)."""
        if not (name.startswith("rung") and name.endswith("_loss")):
            return getattr(self, name)()
        return _wmean([(getattr(c, name, None), getattr(c, f"{name[:-5]}_tokens", 0)) for c in self.chunks])


@dataclass
class EvalResult(_Open):
    """One arm's trained weights under one memory mode on one corpus. arm: "A" (TTT trained with resets),
    "B" (trained persistent), "C" (no TTT) by convention; train_mode / eval_mode: the TTT state in training
    / here ("none": no TTT, for both or neither); recall_chance_nats: token-weighted loss of a uniform guess
    on the recall targets (synthetic corpora); corpus_name: the corpus's name in an experiment."""

    arm: Text
    train_mode: Mode
    eval_mode: Mode
    seed: int
    checkpoint: Text
    data: Text
    corpus: Corpus
    chunk_frames: Positive
    context: Positive
    files: Annotated[list[FileResult], Field(min_length=1)]
    recall_chance_nats: float | None = None
    corpus_name: str | None = None
    loss_definition: str | None = None
    format: Literal["moshi-ttt-eval"] = "moshi-ttt-eval"
    version: Literal[1] = 1
    _OPTIONAL = ("recall_chance_nats", "corpus_name", "loss_definition")

    @field_validator("eval_mode")
    @classmethod
    def _none_for_both(cls, v: str, info: ValidationInfo) -> str:
        if (v == "none") != (info.data.get("train_mode") == "none"):
            raise ValueError(f"is {v!r} but train_mode is {info.data.get('train_mode')!r}: 'none' (no TTT) "
                             "must be used for both or neither")
        return v

    @field_validator("files")
    @classmethod
    def _unique(cls, files: list[FileResult]) -> list[FileResult]:
        ids = [f.file_id for f in files]
        if (dup := next((i for i, fid in enumerate(ids) if fid in ids[:i]), None)) is not None:
            raise _fail((dup, "file_id"), ids[dup], f"duplicate file id (also files[{ids.index(ids[dup])}])")
        return files

    @property
    def condition(self) -> tuple[str, str]:
        """``(train_mode, eval_mode)``: what the report's contrasts are defined on."""
        return (self.train_mode, self.eval_mode)

    @property
    def label(self) -> str:
        """Display name: ``"B-persistent"``, ``"A-reset"``; just the arm for the no-TTT arm."""
        return self.arm if self.eval_mode == "none" else f"{self.arm}-{self.eval_mode}"

    def file_metric(self, name: str) -> dict[str, float | None]:
        """``{file_id: value}`` of one per-file reduction (see :meth:`FileResult.metric`)."""
        return {f.file_id: f.metric(name) for f in self.files}

    def summary(self) -> dict[str, float | None]:
        """Token-weighted means over all files: loss, loss of chunks >= 1 and of chunk 0, recall loss."""
        chunks = [c for f in self.files for c in f.chunks]
        return {"loss": _wmean([(c.loss, c.tokens) for c in chunks]),
                "loss_later_chunks": _wmean([(c.loss, c.tokens) for c in chunks if c.chunk_index >= 1]),
                "loss_first_chunk": _wmean([(c.loss, c.tokens) for c in chunks if c.chunk_index == 0]),
                "recall_loss": _wmean([(c.recall_loss, c.recall_tokens) for c in chunks])}

    @classmethod
    def from_json(cls, data: dict[str, Any] | str, source: str | None = None) -> EvalResult:
        """Validate a parsed JSON object (or a JSON string); raises :class:`SchemaError`."""
        try:
            return records.load(cls, json.loads(data) if isinstance(data, str) else data)
        except ConfigValueError as e:  # "path: problem; ..." from records: the first one, as a SchemaError
            path, _, problem = str(e).split("; ")[0].partition(": ")
            raise SchemaError(path, problem, source) from None
        except json.JSONDecodeError as e:
            raise SchemaError("<root>", f"not valid JSON ({e})", source) from None

    def to_json(self) -> dict[str, Any]:
        return records.dump(self)

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read and validate a file; errors name the file and the field."""
        return cls.from_json(Path(path).read_text(), source=str(path))

    def save(self, path: str | Path) -> Path:
        """Write atomically: the experiment skips evaluations whose file exists, so none is ever partial."""
        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return Path(path)
