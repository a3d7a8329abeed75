"""A positive-control ladder: key -> value bindings (MQAR-like) laid out for moshi's delays.

A memory experiment that reports "no effect" means something only beside a task a working memory
must solve. This corpus is that task, in three rungs of difficulty, labelled per target frame.

**Layout of one occurrence** of binding ``(key, value)`` at frame ``t`` (``D`` = the largest
acoustic delay, ``P = 2 + D`` frames per occurrence):

- the key code in the first user stream (row ``1 + dep_q``, whose delay must be 0) on frames
  ``t .. t + 1 + D``;
- the value on frame ``t + 1`` in every Moshi-stream row (row 0 text: an id in
  ``[first_text_id, text_card)``; rows ``1..dep_q``: audio codes in ``[0, card)``), each row drawn
  independently and uniformly per binding.

In moshi's delayed domain position ``p`` holds raw frame ``p - 1 - d_j`` of row ``j`` as input and
predicts frame ``p - d_k`` of row ``k``. For a row of delay ``d`` the value (frame ``t + 1``) is
predicted at position ``t + 1 + d``, whose input holds key frame ``t + d`` (the **read**: the key
is visible before the value must be predicted), and the value enters as input at position
``t + 2 + d`` together with key frame ``t + 1 + d`` (the **write**: key and value in the same
input frame). The previous occurrence at frame ``s`` thus enters the model at delayed positions
``s + 1 .. s + 2 + D``; a read at ``t`` predicts its targets at positions ``t + 1 .. t + 1 + D``.

**Rungs** (``R`` = :func:`moshi_ttt.model.reach.stacked_reach`, ``W`` = context, ``C`` = chunk
frames, ``S = span_chunks * C`` the training span; files start at a chunk boundary), for a read at
``t`` whose key last occurred at ``s``, gap ``g = t - s`` (:func:`read_rung`):

1. ``g <= W - 1 - D``: every input position of the previous occurrence lies within one attention
   window (``W`` positions) of every target position, so a single attention layer can copy the
   value: attention alone must solve it (a sanity check of the whole pipeline).
2. ``g >= R + D`` -- the latest frame of the previous occurrence (key frame ``s + 1 + D``) is
   ``>= R`` frames before the target frame ``t + 1``, so no frame of it (nor of any earlier
   occurrence) can change the target's prediction through attention -- and its positions lie in
   the same span as the target positions but in an earlier chunk.
3. ``g >= R + D`` and every position of the previous occurrence lies in an earlier span than every
   target position: only a memory kept across spans can help.

0. Any other read (between rung 1 and the reach, or beyond the reach but in the same chunk): not
   a measured target (``recall_mask`` False).

Without memory a beyond-reach target is at chance: everything attention can see (background, other
keys' bindings, the current key, the other rows of the current value) is independent of it. With
``control=True`` every occurrence draws a fresh value: same layout and labels, nothing to remember.

**Schedule** (per file, deterministic from ``(seed, index)``): ``num_bindings`` distinct keys
drawn from ``[0, num_keys)`` (user codes reserved for keys; the background never uses them), each
with a random value. Occurrences sit on a grid of ``P`` frames, greedily: a rung-3 read whenever a
key can give one (the scarce rung: at most one per key and span), else the first write of a key not
yet shown, else a rung-1 or rung-2 read if that rung is behind its share of the file's quota
(``num_bindings`` per span after the first, times ``rung1_share`` for rung 1), else the slot stays
background. A key not yet seen in the current span is kept for its rung-3 read. Labels are then
computed from the actual positions.

Rung 1 gets a larger share by default (6: about 88 rung-1, 17 rung-2 and 15 rung-3 reads in a file
of 384 frames, every slot used) because its reads are what teach attention to copy: with equal shares a 2-layer
model trained for 500 steps had not learned the within-reach copy (rung 1 at 4.0 nats, chance 4.1);
with share 6 it has (1.9). Higher shares starve rungs 2 and 3 (a refreshed key is no longer
beyond the reach).

**Background**: ``"zero"`` (zero entropy: text padding, one constant code per audio row and per
user row, the key row's constant not a key) or ``"voice"`` (file-specific code subsets and random
text words, as in :mod:`moshi_ttt.data.synthetic`, without end-of-padding markers: the text stream
is synthetic, and a marker before each value would only add unpredictable tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from ..model.reach import stacked_reach
from .dataset import EncodedDatasetWriter
from .synthetic import SynthLayout

Background = Literal["zero", "voice"]

#: What each measured rung tests (for reports).
RUNG_NAMES = {1: "within attention's reach", 2: "beyond the reach, same training span",
              3: "beyond the reach, across spans"}


@dataclass
class LadderConfig(SynthLayout):
    """Settings of the key -> value ladder; defaults fit ``memory_lm_kwargs()`` (2 layers, context 8,
    reach 17) with chunks of 32 frames and training spans of 4 chunks.

    Attributes:
        seed: everything is a function of ``(seed, file index)``.
        num_files: files in the corpus.
        num_frames: frames per file (default ``num_spans`` training spans).
        num_spans: file length in spans when ``num_frames`` is None (>= 2 for rung 3 to exist).
        num_layers, context, delays: the model's attention stack (they give the reach).
        chunk_frames, span_chunks: the training chunk ``C`` and span ``N`` (``S = N * C`` frames).
        num_bindings: keys per file (each with its own random value).
        num_keys: user codes ``[0, num_keys)`` reserved for keys (each file draws its keys there).
        background: ``"zero"`` or ``"voice"``.
        voice_size, word_rate: the ``voice`` background's code subsets and text word rate.
        control: every occurrence draws a fresh value (no dependence to remember).
        rung1_max_gap: largest gap labelled rung 1 (default and maximum ``context - 1 - D``).
        rung1_share: rung 1's quota relative to rungs 2 and 3 (reads within the reach are what
            teaches attention to copy: more of them, fewer background slots).
        n_q, dep_q, card, text_card, text_padding_id, end_of_text_padding_id, first_text_id,
            frame_rate: the code layout (values use text ids ``>= first_text_id``).
    """

    seed: int = 0
    num_files: int = 64
    num_frames: int | None = None
    num_spans: int = 3
    num_layers: int = 2
    context: int = 8
    delays: tuple[int, ...] = (0, 0, 1, 0, 1)
    chunk_frames: int = 32
    span_chunks: int = 4
    num_bindings: int = 8
    num_keys: int = 16
    background: Background = "zero"
    voice_size: int = 8
    word_rate: float = 0.15
    control: bool = False
    rung1_max_gap: int | None = None
    rung1_share: float = 6.0

    def __post_init__(self) -> None:
        self.delays = tuple(int(d) for d in self.delays)
        D = self.max_delay if self.delays else 0
        if self.rung1_max_gap is None:
            self.rung1_max_gap = self.context - 1 - D
        if self.num_frames is None:
            self.num_frames = self.num_spans * self.span_frames
        self.require([
            (self.num_files >= 1, "num_files must be >= 1"),
            (self.n_q > self.dep_q >= 1, "need n_q > dep_q >= 1 (the first user stream carries the keys)"),
            (len(self.delays) == self.n_q + 1, f"len(delays)={len(self.delays)} must be n_q + 1 = {self.n_q + 1}"),
            (min(self.delays) == 0 and self.delays[0] == 0, "need delays >= 0 with the text delay 0"),
            (self.delays[1 + self.dep_q] == 0 if len(self.delays) > self.dep_q + 1 else False,
             "the first user stream (the key row) must have delay 0"),
            (self.chunk_frames >= 1 and self.span_chunks >= 1, "chunk_frames and span_chunks must be >= 1"),
            (1 <= self.num_bindings <= self.num_keys, "need 1 <= num_bindings <= num_keys"),
            (self.num_keys < self.card, "num_keys must be < card (the background needs a non-key user code)"),
            (self.background in ("zero", "voice"), f"background must be 'zero' or 'voice', got {self.background!r}"),
            (self.background == "zero" or self.voice_size <= self.card - self.num_keys,
             "voice_size must be <= card - num_keys"),
            (self.background == "zero" or self.voice_size <= self.text_card - self.first_text_id,
             "voice_size too large for the text vocabulary"),
            (0 <= self.text_padding_id < self.first_text_id < self.text_card
             and 0 <= self.end_of_text_padding_id < self.first_text_id,
             "special text ids must be below first_text_id < text_card"),
            (self.period <= self.rung1_max_gap <= self.context - 1 - D,
             f"rung1_max_gap={self.rung1_max_gap} must be in [{self.period}, context - 1 - max_delay = "
             f"{self.context - 1 - D}] (one occurrence every {self.period} frames; the whole previous "
             "occurrence must sit in one attention window)"),
            (self.num_frames >= 2 * self.period, "num_frames too short for a write and a read"),
            (0.0 <= self.word_rate <= 1.0, "word_rate must be in [0, 1]"),
            (self.rung1_share > 0, "rung1_share must be > 0"),
        ])

    @staticmethod
    def delay_kwargs(lm_kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"delays": tuple(lm_kwargs["delays"])}

    @classmethod
    def from_meta(cls, synthetic: dict[str, Any]) -> LadderConfig:
        """The config back from ``dataset.json["synthetic"]`` of a ladder corpus (extra keys ignored)."""
        if synthetic.get("task") != "kv":
            raise ValueError(f"not a kv ladder corpus (task={synthetic.get('task')!r})")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in synthetic.items() if k in names})

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def period(self) -> int:
        """Frames per occurrence: the key spans ``2 + max_delay`` frames."""
        return 2 + self.max_delay

    @property
    def key_row(self) -> int:
        return 1 + self.dep_q

    @property
    def span_frames(self) -> int:
        return self.chunk_frames * self.span_chunks

    @property
    def reach(self) -> int:
        """Attention's reach ``R``: a code at frame ``f`` cannot change predictions of ``t >= f + R``."""
        return stacked_reach(self.num_layers, self.context, self.delays)

    @property
    def beyond_gap(self) -> int:
        """Smallest gap whose previous occurrence is wholly beyond the reach: ``R + max_delay``."""
        return self.reach + self.max_delay

    def chance_nats(self) -> list[float]:
        """Per Moshi-stream row (text, then dep_q audio rows): ln of the value alphabet."""
        return [math.log(self.text_card - self.first_text_id)] + [math.log(self.card)] * self.dep_q

    def read_rung(self, prev: int, t: int) -> int:
        """:func:`read_rung` with this config's reach, window, delays, chunk and span."""
        return read_rung(prev, t, reach=self.reach, max_delay=self.max_delay, chunk_frames=self.chunk_frames,
                         span_chunks=self.span_chunks, rung1_max_gap=int(self.rung1_max_gap))


def read_rung(prev: int, t: int, *, reach: int, max_delay: int, chunk_frames: int, span_chunks: int,
              rung1_max_gap: int) -> int:
    """Rung (0-3) of a read at frame ``t`` of a key whose previous occurrence is at frame ``prev``.

    The previous occurrence enters the model at delayed positions ``prev + 1 .. prev + 2 + D``;
    the read's targets (frame ``t + 1``) are predicted at positions ``t + 1 .. t + 1 + D``.
    Chunk of position ``p``: ``p // C``; span: ``p // (C * span_chunks)``.
    """
    g = t - prev
    if g < 1:
        raise ValueError(f"read at {t} does not follow the previous occurrence at {prev}")
    if g <= rung1_max_gap:
        return 1
    if g < reach + max_delay:
        return 0
    C, S = chunk_frames, chunk_frames * span_chunks
    in_lo, in_hi = prev + 1, prev + 2 + max_delay
    tgt_lo, tgt_hi = t + 1, t + 1 + max_delay
    if in_hi // S < tgt_lo // S:
        return 3
    if in_lo // S == tgt_hi // S and in_hi // C < tgt_lo // C:
        return 2
    return 0


@dataclass
class LadderFile:
    """One generated file.

    Attributes:
        codes: [1 + n_q, T] int64.
        recall_mask: [T] bool, ``recall_rung > 0``.
        recall_rung: [T] int64, rung of the read whose value sits at that frame (0 elsewhere).
        occurrences: ``(frame t, binding index)`` of every occurrence, in order.
        keys: [num_bindings] int64, the key code of each binding.
        values: [num_occurrences, 1 + dep_q] int64, the value each occurrence holds (rows 0..dep_q).
    """

    codes: torch.Tensor
    recall_mask: torch.Tensor
    recall_rung: torch.Tensor
    occurrences: list[tuple[int, int]]
    keys: torch.Tensor = field(repr=False)
    values: torch.Tensor = field(repr=False)

    def rung_counts(self) -> dict[int, int]:
        """Number of reads (target frames) per rung 0..3."""
        r = self.recall_rung
        n_reads = len(self.occurrences) - len({b for _, b in self.occurrences})
        counts = {k: int((r == k).sum()) for k in (1, 2, 3)}
        counts[0] = n_reads - sum(counts.values())
        return dict(sorted(counts.items()))


def draw_value(cfg: LadderConfig, rng: np.random.Generator) -> np.ndarray:
    """A value ``[1 + dep_q]``: text id uniform in ``[first_text_id, text_card)``, audio in ``[0, card)``."""
    text = rng.integers(cfg.first_text_id, cfg.text_card, size=1)
    return np.concatenate([text, rng.integers(0, cfg.card, size=cfg.dep_q)])


def schedule(cfg: LadderConfig, rng: np.random.Generator) -> list[tuple[int, int]]:
    """The occurrences ``(frame, binding index)`` of one file, in frame order (see the module doc)."""
    P, D, T = cfg.period, cfg.max_delay, int(cfg.num_frames)
    S = cfg.span_frames
    n_slots = (T - 2 - D) // P + 1
    quota = cfg.num_bindings * max(1, -(-T // S) - 1)  # rung 3 capacity: one per key and later span
    last: dict[int, int] = {}
    unshown = [int(b) for b in rng.permutation(cfg.num_bindings)]
    counts = {1: 0, 2: 0, 3: 0}
    out: list[tuple[int, int]] = []
    for i in range(n_slots):
        t = i * P
        options: dict[int, list[int]] = {1: [], 2: [], 3: []}
        for b, s in last.items():
            r = cfg.read_rung(s, t)
            fresh = (s + 2 + D) // S < (t + 1) // S  # not seen in this span yet: keep it for rung 3
            if r and (r == 3 or not fresh):
                options[r].append(b)
        cap = {r: quota * share * (i + 1) / n_slots + 1 for r, share in ((1, cfg.rung1_share), (2, 1.0))}
        pick: int | None = None
        if options[3]:
            r = 3
        elif unshown:  # every binding is written before rung-1 reads may fill the slots
            r = 0
        else:
            open_rungs = [r for r in (1, 2) if options[r] and counts[r] < cap[r]]
            r = min(open_rungs, key=lambda r: (counts[r], rng.random())) if open_rungs else 0
        if r:
            pick = int(rng.choice(options[r]))
            counts[r] += 1
        elif unshown:
            pick = unshown.pop()
        if pick is not None:
            out.append((t, pick))
            last[pick] = t
    return out


def generate_ladder_file(cfg: LadderConfig, index: int, values: np.ndarray | None = None) -> LadderFile:
    """Generate file ``index`` of the ladder.

    ``values`` ([num_bindings, 1 + dep_q]) replaces the drawn binding values and leaves everything
    else unchanged (background, keys and schedule come from separate random streams).
    """
    dq, D, T = cfg.dep_q, cfg.max_delay, int(cfg.num_frames)
    rng = np.random.default_rng([cfg.seed, index, 0])        # background, keys, schedule
    rng_val = np.random.default_rng([cfg.seed, index, 1])    # the bindings' values
    rng_ctrl = np.random.default_rng([cfg.seed, index, 2])   # the control's fresh values
    keys = rng.choice(cfg.num_keys, cfg.num_bindings, replace=False).astype(np.int64)
    codes = np.empty((1 + cfg.n_q, T), dtype=np.int64)
    non_key = np.arange(cfg.num_keys, cfg.card)
    if cfg.background == "zero":
        codes[0] = cfg.text_padding_id
        codes[1:1 + dq] = rng.integers(0, cfg.card, size=(dq, 1))
        codes[1 + dq:] = rng.choice(non_key, size=(cfg.n_q - dq, 1))
    else:
        word_ids = rng.choice(np.arange(cfg.first_text_id, cfg.text_card), cfg.voice_size, replace=False)
        text = np.full(T, cfg.text_padding_id, dtype=np.int64)
        words = rng.random(T) < cfg.word_rate
        text[words] = rng.choice(word_ids, int(words.sum()))
        codes[0] = text
        for k in range(dq):
            codes[1 + k] = rng.choice(rng.choice(cfg.card, cfg.voice_size, replace=False), T)
        for u in range(cfg.n_q - dq):
            codes[1 + dq + u] = rng.choice(rng.choice(non_key, cfg.voice_size, replace=False), T)

    occ = schedule(cfg, rng)
    drawn = np.stack([draw_value(cfg, rng_val) for _ in range(cfg.num_bindings)])
    bound = drawn if values is None else np.asarray(values, dtype=np.int64)
    if bound.shape != (cfg.num_bindings, 1 + dq):
        raise ValueError(f"values shape {bound.shape} != {(cfg.num_bindings, 1 + dq)}")
    rung = np.zeros(T, dtype=np.int64)
    last: dict[int, int] = {}
    held = []
    for t, b in occ:
        v = draw_value(cfg, rng_ctrl) if cfg.control else bound[b]
        held.append(v)
        codes[cfg.key_row, t:t + 2 + D] = keys[b]
        codes[:1 + dq, t + 1] = v
        if b in last:
            rung[t + 1] = cfg.read_rung(last[b], t)
        last[b] = t
    held_arr = np.stack(held) if held else np.zeros((0, 1 + dq), dtype=np.int64)
    rung_t = torch.from_numpy(rung)
    return LadderFile(torch.from_numpy(codes), rung_t > 0, rung_t, occ, torch.from_numpy(keys),
                      torch.from_numpy(held_arr))


def ladder_file_id(cfg: LadderConfig, index: int) -> str:
    return f"kv{'-control' if cfg.control else ''}-{cfg.seed}-{index:05d}"


def ladder_meta(cfg: LadderConfig) -> dict[str, Any]:
    """The ``synthetic`` section of ``dataset.json`` (counts are added by :func:`write_ladder`)."""
    return {**asdict(cfg), "task": "kv", "kind": "kv-control" if cfg.control else "kv",
            "reach": cfg.reach, "beyond_reach_min_gap": cfg.beyond_gap, "span_frames": cfg.span_frames,
            "key_row": cfg.key_row, "period": cfg.period,
            "chance_nats": {"per_row": cfg.chance_nats(), "text": cfg.chance_nats()[0],
                            "audio": math.log(cfg.card)}}


def write_ladder(cfg: LadderConfig, out: str | Path, progress: bool = True) -> Path:
    """Write the ladder as an encoded dataset at ``out`` (with ``recall_rung``); returns ``out``.

    ``dataset.json["synthetic"]`` holds the config, ``task`` ("kv"), ``reach``, ``chunk_frames``,
    ``span_chunks``, ``control``, ``chance_nats`` and ``rung_counts`` (reads per rung over the
    corpus, as target frames; each frame holds ``1 + dep_q`` target tokens).
    """
    out = Path(out)
    extra = {"synthetic": ladder_meta(cfg)}
    produced_by = {"tool": "moshi-ttt synth --task kv", "generator": "moshi_ttt.data.ladder"}
    totals = {0: 0, 1: 0, 2: 0, 3: 0}
    with EncodedDatasetWriter(out, cfg.layout, produced_by, extra_meta=extra) as writer:
        for i in tqdm(range(cfg.num_files), desc="synth kv", unit="file", disable=not progress):
            f = generate_ladder_file(cfg, i)
            counts = f.rung_counts()
            for k, v in counts.items():
                totals[k] += v
            writer.add(ladder_file_id(cfg, i), f.codes, f.recall_mask, recall_rung=f.recall_rung,
                       source={"synthetic": True, "task": "kv", "index": i, "control": cfg.control,
                               "rung_counts": {str(k): v for k, v in counts.items()},
                               "keys": f.keys.tolist(), "occurrences": [list(o) for o in f.occurrences]})
        meta = writer.extra_meta["synthetic"]
        meta["rung_counts"] = {str(k): v for k, v in totals.items()}
        meta["recall_target_frames"] = totals[1] + totals[2] + totals[3]
    return out
