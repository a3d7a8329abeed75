"""A synthetic long-memory corpus: tokens whose prediction provably needs memory beyond attention.

Each file is a ``[1 + n_q, T]`` code tensor in moshi's layout (row 0 text, rows 1..dep_q the
Moshi streams the model predicts, rows dep_q+1..n_q the user streams it only reads), written in
the same encoded-dataset format as real recordings, with a ``recall_mask`` [T].

Per file, deterministic from ``(seed, file index)``:

- **Voice** (background): every Moshi and user codebook draws its tokens from a file-specific
  subset of ``voice_size`` codes; the text stream has padding, "words" from a file-specific subset
  of ``voice_size`` text ids, and moshi's end-of-padding id before each word. A model learns the
  voice of a file from its recent frames (within the window): realistic, file-level structure.
- **Motif and recalls**: one motif ``M`` of ``motif_len`` frames, every Moshi-stream token (text
  and dep_q audio codebooks) drawn uniformly (text ids ``first_text_id..text_card-1``, audio
  ``0..card-1``) and independently of everything else. It is *shown* once near the start, then
  *recalled* (the same ``M``) again and again, consecutive occurrences separated by a gap of
  ``gap_min..gap_max`` frames, with ``gap_min >= reach`` (attention's reach over the stacked
  layers, below).
- **Cue**: the user stream (codebook ``dep_q + 1``) carries slot marker ``j`` (codes ``0..L-1``,
  never used by the background) one frame before motif frame ``j``, at every occurrence. The
  markers say *when* a motif frame comes and *which* one, never *what* it is: a key for a
  key -> value memory (what TTT's fast weights store).
- **Labels**: ``recall_mask[t]`` is True on the frames of every occurrence after the first: the
  recall targets (the Moshi-stream tokens of those frames).
- **Control** (``control=True``): identical background, cues and labels, but every occurrence
  draws a fresh motif: the same statistics, no long-range dependence.

Why attention alone cannot solve the recall targets (the calculation the tests check): every one of
moshi's ``num_layers`` layers is a sliding window of ``W = context`` positions over the previous
layer's outputs, so a code at frame ``f`` can change a prediction of frame ``t`` only if
``t - f < R = num_layers*(W - 1) + 2 + d`` (``d`` = largest acoustic delay, 1 for Moshi;
:mod:`moshi_ttt.model.reach`). One layer alone would see only frames ``>= t - W - d``; the stack
sees much further (``R = 127`` for the tiny preset, not ``W + d + 1 = 34``). The last frame of the
previous occurrence of ``M`` is ``gap + 1 >= gap_min + 1 > R`` frames before the first target of
the current one, so no earlier occurrence is in view (``gap >= R - 1`` would do; we keep one frame
of margin). What is in view -- background, cues, and the current occurrence's earlier frames ``M[:j]``
(independent of ``M[j]``, every entry being drawn independently) -- is independent of the target
``M[row, j]``. Hence ``H(M[row, j] | window) = H(M[row, j]) = ln(card)`` nats for audio
(``ln(text_card - first_text_id)`` for text): chance, for any predictor whatever its size. A memory
that kept the first occurrence predicts it exactly (entropy 0). In the control the target is
independent of the whole past: chance for every model, memory or not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from ..model.reach import stacked_reach
from .dataset import CodesLayout, EncodedDatasetWriter


_Corpus = TypeVar("_Corpus", bound="SynthLayout")


@dataclass
class SynthLayout:
    """The code layout shared by the synthetic corpora (defaults: ``tiny_lm_kwargs()``'s)."""

    n_q: int = 4
    dep_q: int = 2
    card: int = 64
    text_card: int = 64
    text_padding_id: int = 3
    end_of_text_padding_id: int = 0
    first_text_id: int = 4
    frame_rate: float = 12.5

    @staticmethod
    def layout_kwargs(lm_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The layout fields and the attention stack of a moshi ``LMModel`` config."""
        return {"n_q": lm_kwargs["n_q"], "dep_q": lm_kwargs["dep_q"], "card": lm_kwargs["card"],
                "text_card": lm_kwargs["text_card"], "context": lm_kwargs["context"],
                "num_layers": lm_kwargs["num_layers"],
                "text_padding_id": lm_kwargs.get("existing_text_padding_id", 3)}

    @staticmethod
    def delay_kwargs(lm_kwargs: dict[str, Any]) -> dict[str, Any]:
        """What a corpus takes from the model's delays (it sets the reach); each corpus says how."""
        raise NotImplementedError

    @classmethod
    def from_lm_kwargs(cls: type[_Corpus], lm_kwargs: dict[str, Any], **overrides: Any) -> _Corpus:
        """The corpus for a moshi ``LMModel`` config (e.g. ``tiny_lm_kwargs()``): its layout, attention
        stack and delays, then ``overrides``."""
        return cls(**{**cls.layout_kwargs(lm_kwargs), **cls.delay_kwargs(lm_kwargs), **overrides})

    def require(self, checks: list[tuple[bool, str]]) -> None:
        """Raise ``ValueError`` naming the corpus and the first rule in ``checks`` that fails."""
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{type(self).__name__}: {msg}")

    @property
    def layout(self) -> CodesLayout:
        return CodesLayout(n_q=self.n_q, dep_q=self.dep_q, card=self.card, text_card=self.text_card,
                           text_padding_id=self.text_padding_id,
                           end_of_text_padding_id=self.end_of_text_padding_id, frame_rate=self.frame_rate)


@dataclass
class SynthConfig(SynthLayout):
    """Settings of the synthetic corpus; the defaults fit ``tiny_lm_kwargs()`` (4 layers, context 32,
    reach 127).

    Attributes:
        seed: everything is a function of ``(seed, file index)``.
        num_files: files in the corpus.
        frames_min, frames_max: file lengths are uniform in this range (default: room for at least
            two recalls, ``context // 2 + 2*(motif_len + gap_max) + motif_len``, up to one more gap).
        context: the attention context (frames) of each layer.
        num_layers: attention layers stacked; with ``context`` and ``max_delay`` they give the
            reach (``reach`` property) that every gap must reach.
        n_q, dep_q, card, text_card, text_padding_id, end_of_text_padding_id: the model's layout.
        first_text_id: lowest "word" text id (ids below are special: end-of-padding, BOS, EOS, pad).
        motif_len: frames per motif ``L``.
        gap_min, gap_max: frames between the end of one occurrence and the start of the next
            (default ``reach + 8`` and ``reach + 24``; ``gap_min >= reach`` is enforced).
        voice_size: codes per stream in a file's background "voice".
        word_rate: probability that a background frame starts a text word.
        max_delay: largest acoustic delay of the model (moshi: 1), part of the reach.
        control: recalls draw fresh motifs (no long-range dependence).
        frame_rate: stored as metadata (12.5 Hz like Mimi).
    """

    seed: int = 0
    num_files: int = 64
    frames_min: int | None = None
    frames_max: int | None = None
    context: int = 32
    num_layers: int = 4
    motif_len: int = 4
    gap_min: int | None = None
    gap_max: int | None = None
    voice_size: int = 8
    word_rate: float = 0.15
    max_delay: int = 1
    control: bool = False

    def __post_init__(self) -> None:
        if self.gap_min is None:
            self.gap_min = self.reach + 8
        if self.gap_max is None:
            self.gap_max = max(self.gap_min, self.reach + 24)
        L = self.motif_len
        if self.frames_min is None:
            self.frames_min = self.context // 2 + 2 * (L + self.gap_max) + L
            if self.frames_max is not None:
                self.frames_min = min(self.frames_min, self.frames_max)
        if self.frames_max is None:
            self.frames_max = max(self.frames_min, self.frames_min + L + self.gap_min)
        self.require([
            (self.num_files >= 1, "num_files must be >= 1"),
            (L >= 1, "motif_len must be >= 1"),
            (self.n_q > self.dep_q >= 1, "need n_q > dep_q >= 1 (the user stream carries the cues)"),
            (L + self.voice_size <= self.card, "motif_len + voice_size must be <= card (cue codes are reserved)"),
            (self.voice_size <= self.text_card - self.first_text_id, "voice_size too large for the text vocabulary"),
            (0 <= self.text_padding_id < self.first_text_id and 0 <= self.end_of_text_padding_id < self.first_text_id,
             "special text ids must be below first_text_id"),
            (self.gap_min >= self.reach,
             f"gap_min={self.gap_min} must be >= attention's reach {self.reach} = num_layers*(context-1) + 2 + "
             "max_delay, or the stacked attention layers could see the previous occurrence"),
            (self.gap_max >= self.gap_min, "gap_max must be >= gap_min"),
            (1 <= self.frames_min <= self.frames_max, "need 1 <= frames_min <= frames_max"),
            (0.0 <= self.word_rate <= 1.0, "word_rate must be in [0, 1]"),
        ])

    @staticmethod
    def delay_kwargs(lm_kwargs: dict[str, Any]) -> dict[str, Any]:
        delays = lm_kwargs.get("delays") or [0]
        return {"max_delay": max(delays) - min(delays)}

    @property
    def reach(self) -> int:
        """Attention's reach: a code at frame ``f`` cannot change a prediction of frame ``t >= f + reach``."""
        return stacked_reach(self.num_layers, self.context, [0, self.max_delay])

    def chance_nats(self) -> dict[str, float]:
        """Entropy of a recall target without memory: uniform over its alphabet."""
        return {"text": math.log(self.text_card - self.first_text_id), "audio": math.log(self.card)}


@dataclass
class SynthFile:
    """One generated file.

    Attributes:
        codes: [1 + n_q, T] int64.
        recall_mask: [T] bool, frames of the recall targets (occurrences after the first).
        starts: first frame of every occurrence of the motif (the first is the show).
        motifs: [num_occurrences, 1 + dep_q, L] int64, what each occurrence holds (all equal to the
            shown motif unless ``control``).
    """

    codes: torch.Tensor
    recall_mask: torch.Tensor
    starts: list[int]
    motifs: torch.Tensor = field(repr=False)


def draw_motif(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """A motif ``[1 + dep_q, L]``: text ids uniform in ``[first_text_id, text_card)``, audio in ``[0, card)``."""
    L = cfg.motif_len
    text = rng.integers(cfg.first_text_id, cfg.text_card, size=(1, L))
    audio = rng.integers(0, cfg.card, size=(cfg.dep_q, L))
    return np.concatenate([text, audio], axis=0)


def generate_file(cfg: SynthConfig, index: int, motif: np.ndarray | None = None) -> SynthFile:
    """Generate file ``index`` of the corpus.

    ``motif`` ([1 + dep_q, L]) replaces the drawn motif and leaves everything else unchanged (the
    background, cues and positions come from separate random streams); tests use it to show that
    the frames in view of a recall target do not depend on the motif.
    """
    L, dq = cfg.motif_len, cfg.dep_q
    # Separate streams: background/structure, the motif, the control's fresh motifs.
    rng = np.random.default_rng([cfg.seed, index, 0])
    rng_motif = np.random.default_rng([cfg.seed, index, 1])
    rng_ctrl = np.random.default_rng([cfg.seed, index, 2])
    T = int(rng.integers(cfg.frames_min, cfg.frames_max + 1))
    codes = np.empty((1 + cfg.n_q, T), dtype=np.int64)

    # Background voice.
    word_ids = rng.choice(np.arange(cfg.first_text_id, cfg.text_card), cfg.voice_size, replace=False)
    for k in range(dq):
        codes[1 + k] = rng.choice(rng.choice(cfg.card, cfg.voice_size, replace=False), T)
    for u in range(cfg.n_q - dq):
        # Codes 0..L-1 of the user streams are reserved for the cues.
        codes[1 + dq + u] = rng.choice(rng.choice(np.arange(L, cfg.card), cfg.voice_size, replace=False), T)
    text = np.full(T, cfg.text_padding_id, dtype=np.int64)
    words = rng.random(T) < cfg.word_rate
    text[words] = rng.choice(word_ids, int(words.sum()))

    # Occurrences: the show near the start (>= 1 so its first cue fits), then recalls.
    starts = []
    r = int(rng.integers(1, 1 + max(1, cfg.context // 2)))
    while r + L <= T:
        starts.append(r)
        r += L + int(rng.integers(cfg.gap_min, cfg.gap_max + 1))
    shown = draw_motif(cfg, rng_motif) if motif is None else np.asarray(motif, dtype=np.int64)
    if shown.shape != (1 + dq, L):
        raise ValueError(f"motif shape {shown.shape} != {(1 + dq, L)}")
    recall = np.zeros(T, dtype=bool)
    motifs = []
    for o, s in enumerate(starts):
        m = shown if (o == 0 or not cfg.control) else draw_motif(cfg, rng_ctrl)
        motifs.append(m)
        text[s:s + L] = m[0]
        codes[1:1 + dq, s:s + L] = m[1:]
        codes[1 + dq, s - 1:s - 1 + L] = np.arange(L)  # cue for motif frame j, one frame ahead
        recall[s:s + L] = o > 0
    # Moshi's text convention: end-of-padding right before a token that follows padding.
    is_tok = (text != cfg.text_padding_id) & (text != cfg.end_of_text_padding_id)
    eop = np.zeros(T, dtype=bool)
    eop[:-1] = is_tok[1:] & (text[:-1] == cfg.text_padding_id)
    text[eop] = cfg.end_of_text_padding_id
    codes[0] = text
    motifs_arr = np.stack(motifs) if motifs else np.zeros((0, 1 + dq, L), dtype=np.int64)
    return SynthFile(torch.from_numpy(codes), torch.from_numpy(recall), starts, torch.from_numpy(motifs_arr))


def file_id(cfg: SynthConfig, index: int) -> str:
    return f"{'control' if cfg.control else 'memory'}-{cfg.seed}-{index:05d}"


def write_corpus(cfg: SynthConfig, out: str | Path, progress: bool = True) -> Path:
    """Write the corpus as an encoded dataset at ``out``; returns ``out``."""
    out = Path(out)
    kind = "control" if cfg.control else "memory"
    extra = {"synthetic": {**asdict(cfg), "task": "motif", "reach": cfg.reach, "chance_nats": cfg.chance_nats(),
                           "kind": kind}}
    produced_by = {"tool": "moshi-ttt synth", "generator": "moshi_ttt.data.synthetic"}
    n_targets = 0
    with EncodedDatasetWriter(out, cfg.layout, produced_by, extra_meta=extra) as writer:
        for i in tqdm(range(cfg.num_files), desc="synth", unit="file", disable=not progress):
            f = generate_file(cfg, i)
            n_targets += int(f.recall_mask.sum())
            writer.add(file_id(cfg, i), f.codes, f.recall_mask,
                       source={"synthetic": True, "index": i, "control": cfg.control, "starts": f.starts})
        writer.extra_meta["synthetic"]["recall_target_frames"] = n_targets
    return out
