"""The Moshi text stream: words of the Moshi channel tokenised and placed on the 12.5 Hz frame grid.

Moshi's text stream (inner monologue) has one token per frame. A word starting at ``start``
seconds puts its first token at frame ``floor(start * frame_rate)`` and its next tokens on the
following frames; the frame just before a word's first token carries the end-of-padding id (0)
when it would otherwise be padding; every other frame is text padding
(``existing_text_padding_id`` = 3). This is the convention of moshi-finetune's ``Interleaver``
(``keep_main_only=True``), with one difference: when a word's tokens run into the next word's
start frame we shift the next word rather than cut the first one, so no token is lost (a word that
cannot fit before the end of the file is reported, never dropped silently).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .manifest import Word
from .report import Report


class Tokenizer(Protocol):
    """What we need of ``sentencepiece.SentencePieceProcessor``."""

    def encode(self, text: str) -> list[int]: ...  # noqa: D102


@dataclass
class TextConfig:
    """How words become the text stream.

    Attributes:
        frame_rate: frames per second of the code grid (Mimi: 12.5).
        text_padding_id: moshi's ``existing_text_padding_id``.
        end_of_text_padding_id: moshi's ``end_of_text_padding_id`` (0).
        main_speaker: speaker label of the Moshi (left) channel's words.
        end_tolerance_sec: words may end this far past the audio without a warning (aligners
            round timestamps).
        unknown_id: the id written for characters the tokenizer does not know (default: see
            :func:`unknown_substitute`; never a control id).
    """

    frame_rate: float = 12.5
    text_padding_id: int = 3
    end_of_text_padding_id: int = 0
    main_speaker: str = "SPEAKER_MAIN"
    end_tolerance_sec: float = 0.5
    unknown_id: int | None = None


def place_tokens(words: Sequence[tuple[float, Sequence[int]]], num_frames: int, frame_rate: float,
                 text_padding_id: int, end_of_text_padding_id: int) -> tuple[torch.Tensor, int]:
    """Lay tokenised words on the frame grid.

    Args:
        words: ``(start_sec, token_ids)`` per word, sorted by start.
        num_frames: T, length of the grid.

    Returns:
        ``(text [T] int64, dropped)`` where ``dropped`` counts tokens that did not fit before T.
    """
    text = torch.full((num_frames,), text_padding_id, dtype=torch.long)
    cursor = 0  # first frame not yet taken by an earlier word's tokens
    dropped = 0
    for start, tokens in words:
        if not tokens:
            continue
        # 1e-6: a start of exactly k / frame_rate seconds lands on frame k despite float rounding.
        first = max(int(math.floor(start * frame_rate + 1e-6)), cursor, 0)
        # Mark the end of the padding run before this word (moshi's convention).
        if 0 < first < num_frames and text[first - 1] == text_padding_id:
            text[first - 1] = end_of_text_padding_id
        n_fit = max(0, min(len(tokens), num_frames - first))
        if n_fit:
            text[first:first + n_fit] = torch.as_tensor(tokens[:n_fit], dtype=torch.long)
        dropped += len(tokens) - n_fit
        cursor = first + len(tokens)
    return text, dropped


def select_words(words: Sequence[Word], duration: float, cfg: TextConfig, source: str, report: Report) -> list[Word]:
    """The main speaker's words, sorted by start, checked against the audio duration.

    Problems go to ``report`` as warnings (the file is kept): words with ``end < start`` are
    dropped; words starting at or after the end of the audio are dropped; words that start inside
    but end past it (beyond ``end_tolerance_sec``) are kept and reported; no word for
    ``main_speaker`` while other speakers have words means the text stream will be padding only.
    """
    if not words:
        report.add(source, "the alignment has no words; the text stream is padding only",
                   action="warning", kind="empty alignment")
    main = [w for w in words if w.speaker == cfg.main_speaker]
    negative = [w for w in main if w.start < 0 or w.end < 0]
    if negative:
        w = negative[0]
        report.add(source, f"{len(negative)} word(s) with negative times (first: {w.text!r} {w.start:.2f}-"
                   f"{w.end:.2f} s); their tokens start at frame 0", action="warning", kind="negative times")
    if words and not main:
        speakers = sorted({w.speaker for w in words})
        report.add(source, f"no words for speaker {cfg.main_speaker!r} (speakers present: {speakers}); "
                   "the text stream is padding only (set the main speaker label?)",
                   action="warning", kind="no main-speaker words")
    backwards = [w for w in main if w.end < w.start]
    if backwards:
        w = backwards[0]
        report.add(source, f"{len(backwards)} word(s) end before they start (first: {w.text!r} "
                   f"{w.start:.2f}-{w.end:.2f} s); dropped", action="warning", kind="malformed alignment")
    main = sorted((w for w in main if w.end >= w.start), key=lambda w: w.start)
    late = [w for w in main if w.start >= duration]
    overhang = [w for w in main if w.start < duration and w.end > duration + cfg.end_tolerance_sec]
    if late or overhang:
        last = max(late + overhang, key=lambda w: w.end)
        what = []
        if late:
            what.append(f"{len(late)} word(s) start after the end and are dropped")
        if overhang:
            what.append(f"{len(overhang)} word(s) run past the end and are kept")
        report.add(source, f"alignment past the end of the audio ({duration:.2f} s; last word "
                   f"{last.text!r} ends at {last.end:.2f} s): " + ", ".join(what),
                   action="warning", kind="alignment past end")
    return [w for w in main if w.start < duration]


def text_stream(words: Sequence[Word], tokenizer: Tokenizer, num_frames: int, duration: float,
                cfg: TextConfig, source: str, report: Report, text_card: int | None = None) -> torch.Tensor:
    """Tokenise the main speaker's words and place them: returns ``text`` [num_frames] int64.

    Each word is stripped and encoded on its own (sentencepiece adds the word-start marker), as
    moshi-finetune does. ``text_card`` (if given) bounds the token ids: a larger tokenizer than the
    model's text vocabulary is a configuration error and raises ``ValueError``.
    """
    kept = select_words(words, duration, cfg, source, report)
    tokenised = [(w.start, list(tokenizer.encode(w.text.strip()))) for w in kept if w.text.strip()]
    tokenised = _replace_unknown(tokenised, kept, tokenizer, cfg, source, report)
    if text_card is not None:
        for _, toks in tokenised:
            if toks and max(toks) >= text_card:
                raise ValueError(f"{source}: tokenizer produced id {max(toks)} >= text_card {text_card}; "
                                 "the tokenizer does not match the model's text vocabulary")
    text, dropped = place_tokens(tokenised, num_frames, cfg.frame_rate, cfg.text_padding_id,
                                 cfg.end_of_text_padding_id)
    if dropped:
        report.add(source, f"{dropped} text token(s) of the last words do not fit before the end of the "
                   f"audio ({num_frames} frames) and are dropped", action="warning", kind="alignment past end")
    return text


def _tokenizer_unk_id(tokenizer: Tokenizer) -> int | None:
    fn = getattr(tokenizer, "unk_id", None)
    try:
        return int(fn()) if callable(fn) else None
    except (TypeError, ValueError, RuntimeError):
        return None


def unknown_substitute(tokenizer: Tokenizer, cfg: TextConfig) -> int:
    """The id that stands for characters the tokenizer does not know.

    ``cfg.unknown_id`` if set; else the tokenizer's own unknown id when it is not one of the text
    stream's control ids; else (sentencepiece's default ``unk_id=0`` is moshi's end-of-padding id)
    the piece of a known placeholder ("?", "-", "'", "."), or the first ordinary piece. Never a
    control id: an unknown character must not read as "padding ends here" or as padding.
    """
    control = {cfg.text_padding_id, cfg.end_of_text_padding_id}
    if cfg.unknown_id is not None:
        if cfg.unknown_id in control:
            raise ValueError(f"TextConfig.unknown_id={cfg.unknown_id} is a control id of the text stream")
        return cfg.unknown_id
    unk = _tokenizer_unk_id(tokenizer)
    if unk is not None and unk not in control:
        return unk
    special = set(control) | ({unk} if unk is not None else set())
    for ch in ("?", "-", "'", "."):
        ids = [i for i in tokenizer.encode(ch) if i not in special]
        if ids and len(ids) == len(tokenizer.encode(ch)):
            return ids[-1]
    is_ordinary = getattr(tokenizer, "is_unknown", None), getattr(tokenizer, "is_control", None)
    size = getattr(tokenizer, "vocab_size", lambda: 0)()
    for i in range(size):
        if i in special or any(f is not None and f(i) for f in is_ordinary):
            continue
        return i
    raise ValueError("the tokenizer has no ordinary piece to stand for unknown characters; set TextConfig.unknown_id")


def _replace_unknown(tokenised: list[tuple[float, list[int]]], kept: Sequence[Word], tokenizer: Tokenizer,
                     cfg: TextConfig, source: str, report: Report) -> list[tuple[float, list[int]]]:
    """Map the tokenizer's unknown id to :func:`unknown_substitute`, with one warning per file."""
    unk = _tokenizer_unk_id(tokenizer)
    if unk is None or not any(unk in toks for _, toks in tokenised):
        return tokenised
    sub = unknown_substitute(tokenizer, cfg)
    chars = sorted({c for w in kept for c in w.text.strip() if unk in tokenizer.encode(c)})
    n = sum(toks.count(unk) for _, toks in tokenised)
    report.add(source, f"{n} token(s) of characters the tokenizer does not know ({''.join(chars)[:40]!r}); "
               f"written as id {sub}", action="warning", kind="unknown characters")
    return [(start, [sub if t == unk else t for t in toks]) for start, toks in tokenised]


def interleave(text: torch.Tensor, moshi_codes: torch.Tensor, user_codes: torch.Tensor) -> torch.Tensor:
    """Moshi's code layout: ``[text; Moshi codebooks; user codebooks]``.

    Args:
        text: [T] text tokens.
        moshi_codes: [dep_q, T] Mimi codes of the left (Moshi) channel.
        user_codes: [n_q - dep_q, T] Mimi codes of the right (user) channel.

    Returns:
        [1 + n_q, T] int64.
    """
    T = text.shape[-1]
    if moshi_codes.shape[-1] != T or user_codes.shape[-1] != T:
        raise ValueError(f"length mismatch: text {T}, moshi {moshi_codes.shape[-1]}, user {user_codes.shape[-1]}")
    return torch.cat([text.view(1, T).long(), moshi_codes.long(), user_codes.long()], dim=0)
