"""In-order chunk streams: every file walked chunk after chunk, one file at a time per lane.

A batch has ``B`` lanes. Each lane plays one file from its first chunk to its last, then takes the
next file of the epoch's (shuffled) order: the lane that frees up first takes the next file, so no
lane idles while files remain. A lane's ``reset`` flag is set at the first chunk of each file (the
model resets that lane's memory there and only there). The last chunk of a file is padded with
moshi's ``zero_token_id`` (-1, excluded from moshi's loss) and ``valid`` marks its real frames. When
no file is left for a lane at the end of an epoch it emits fully padded chunks with
``active=False`` and ``reset=True`` until the longest lane is done.

Distributed: rank ``r`` of ``N`` plays lanes ``r*B .. r*B + B - 1`` of the one schedule of ``N*B``
lanes, so ``N`` processes of ``B`` lanes see exactly the batches of one process of ``N*B`` lanes
(the same files in the same lanes at the same steps), each rank loading only its own lanes' files;
every rank runs the same number of steps per epoch (idle lanes are inactive), so collective ops
never wait on a rank that has stopped.

The whole schedule is a function of ``(seed, epoch, files, N*B, chunk_frames)``, so the position is
just ``(epoch, step)``, the same on every rank: ``state_dict()`` / ``load_state_dict()`` resume at
exactly the next chunk.

``mode="clips"`` is moshi-finetune's behaviour for comparison: the chunks of all files are shuffled
and drawn independently, and every chunk resets the memory.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

import numpy as np
import torch

from .dataset import EncodedFile, FileEntry

StreamMode = Literal["ordered", "clips"]


class ChunkSource(Protocol):
    """What a stream needs of a dataset (:class:`~moshi_ttt.data.dataset.EncodedDataset` has it)."""

    files: list[FileEntry]

    def load(self, file_id: str) -> EncodedFile: ...  # noqa: D102


@dataclass
class ChunkBatch:
    """One step of a :class:`ChunkStream` (``B`` lanes, ``C = chunk_frames``, ``K = 1 + n_q``).

    Attributes:
        codes: [B, K, C] int64 in moshi's layout; -1 (``zero_token_id``) where not ``valid``.
        valid: [B, C] bool, real frames (False in the padding of a file's last chunk and in
            inactive lanes).
        reset: [B] bool, reset this lane's memory before this chunk (first chunk of a file; always
            in inactive lanes and in ``clips`` mode).
        recall_mask: [B, C] bool, beyond-window recall targets (False where unknown or invalid).
        file_id: per lane, the file (None for inactive lanes).
        chunk_index: [B] int64, index of the chunk in its file (-1 for inactive lanes).
        is_first: [B] bool, first chunk of its file.
        is_last: [B] bool, last chunk of its file.
        active: [B] bool, the lane carries data.
        epoch: epoch of this batch.
        step: index of this batch in its epoch.
        recall_rung: [B, C] int64, rung of each frame's recall target in a ladder corpus (1 within
            attention's reach, 2 beyond it in the training span, 3 across spans; 0 where none,
            unknown or invalid). ChunkStream always fills it.
    """

    codes: torch.Tensor
    valid: torch.Tensor
    reset: torch.Tensor
    recall_mask: torch.Tensor
    file_id: list[str | None]
    chunk_index: torch.Tensor
    is_first: torch.Tensor
    is_last: torch.Tensor
    active: torch.Tensor
    epoch: int = 0
    step: int = 0
    recall_rung: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.codes.shape[0])

    @property
    def chunk_frames(self) -> int:
        return int(self.codes.shape[-1])

    def to(self, device: str | torch.device, non_blocking: bool = False) -> ChunkBatch:
        """A copy with every tensor on ``device``."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return ChunkBatch(**kw)


@dataclass
class _Slot:
    """A file played by a lane from step ``start`` for ``n`` chunks."""

    file: int
    start: int
    n: int


@dataclass
class _Schedule:
    epoch: int
    steps: int
    lanes: list[list[_Slot]]  # ordered mode: per lane, slots sorted by start
    lane_starts: list[list[int]]
    clips: list[tuple[int, int]] | None = None  # clips mode: every (file, chunk) of the epoch in order


class ChunkStream:
    """Batches of consecutive chunks of whole files, ``B`` lanes, resumable.

    Args:
        dataset: the files (``files`` with ``file_id``/``num_frames``, and ``load``).
        batch_size: number of lanes ``B``.
        chunk_frames: frames per chunk ``C``.
        seed: file order shuffle seed (order of epoch ``e`` is a function of ``(seed, e)``).
        rank, world_size: this process plays lanes ``rank*B .. rank*B + B - 1`` of a schedule of
            ``B * world_size`` lanes (distributed training).
        mode: ``"ordered"`` (files in order, state carried) or ``"clips"`` (independent chunks).
        shuffle: shuffle the file (clips: chunk) order each epoch; False keeps index order.
        epochs: stop after this many epochs (None: never stop).
        pad_id: value of codes outside ``valid`` (moshi's ``zero_token_id``).
    """

    def __init__(self, dataset: ChunkSource, batch_size: int, chunk_frames: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, mode: StreamMode = "ordered", shuffle: bool = True,
                 epochs: int | None = None, pad_id: int = -1):
        if batch_size < 1 or chunk_frames < 1:
            raise ValueError(f"batch_size and chunk_frames must be >= 1, got {batch_size}, {chunk_frames}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if mode not in ("ordered", "clips"):
            raise ValueError(f"mode must be 'ordered' or 'clips', got {mode!r}")
        if not dataset.files:
            raise ValueError("ChunkStream: the dataset has no files")
        self.dataset = dataset
        self.batch_size = batch_size
        self.chunk_frames = chunk_frames
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.mode: StreamMode = mode
        self.shuffle = shuffle
        self.epochs = epochs
        self.pad_id = pad_id
        self._files = list(dataset.files)
        self._nchunks = np.array([-(-f.num_frames // chunk_frames) for f in self._files], dtype=np.int64)
        if (self._nchunks < 1).any():
            bad = self._files[int(np.argmin(self._nchunks))]
            raise ValueError(f"file {bad.file_id!r} has {bad.num_frames} frames")
        self._rows: int | None = None
        self.epoch = 0
        self.step = 0
        self._sched: _Schedule | None = None
        self._lane_cache: dict[int, tuple[int, EncodedFile]] = {}

    # ----- schedule -----------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self._files)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _lanes(self, files: list[int]) -> tuple[list[list[_Slot]], int]:
        """Assign files to the lanes of all ranks: the lane that frees up first (lowest index on
        ties) takes the next. Returns this rank's lanes and the number of steps."""
        total = self.batch_size * self.world_size
        free_at = [0] * total
        lanes: list[list[_Slot]] = [[] for _ in range(total)]
        for f in files:
            b = min(range(total), key=lambda i: (free_at[i], i))
            n = int(self._nchunks[f])
            lanes[b].append(_Slot(f, free_at[b], n))
            free_at[b] += n
        return lanes[self.rank * self.batch_size:(self.rank + 1) * self.batch_size], max(free_at)

    def _schedule(self, epoch: int) -> _Schedule:
        if self._sched is not None and self._sched.epoch == epoch:
            return self._sched
        order = self._order(epoch)
        if self.mode == "ordered":
            lanes, steps = self._lanes([int(f) for f in order])
            sched = _Schedule(epoch, steps, lanes, [[s.start for s in lane] for lane in lanes])
        else:
            items = [(int(f), c) for f in order for c in range(int(self._nchunks[f]))]
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(items))
                items = [items[i] for i in perm]
            steps = -(-len(items) // (self.batch_size * self.world_size))
            sched = _Schedule(epoch, steps, [], [], clips=items)
        self._sched = sched
        return sched

    def steps_in_epoch(self, epoch: int | None = None) -> int:
        """Number of batches of ``epoch`` (default: the current one); the same on every rank."""
        return self._schedule(self.epoch if epoch is None else epoch).steps

    # ----- batches ------------------------------------------------------------------------------

    def _file(self, lane: int, f: int) -> EncodedFile:
        cached = self._lane_cache.get(lane)
        if cached is None or cached[0] != f:
            cached = (f, self.dataset.load(self._files[f].file_id))
            self._lane_cache[lane] = cached
        return cached[1]

    def _lane_item(self, sched: _Schedule, lane: int, step: int) -> tuple[int, int, int] | None:
        """``(file, chunk_index, num_chunks)`` played by ``lane`` at ``step``, or None if idle."""
        if sched.clips is not None:  # the global batch's lanes in order, this rank's slice of them
            i = (step * self.world_size + self.rank) * self.batch_size + lane
            if i >= len(sched.clips):
                return None
            f, c = sched.clips[i]
            return f, c, int(self._nchunks[f])
        starts = sched.lane_starts[lane]
        j = bisect.bisect_right(starts, step) - 1
        if j < 0:
            return None
        slot = sched.lanes[lane][j]
        if step >= slot.start + slot.n:
            return None
        return slot.file, step - slot.start, slot.n

    def _batch(self, sched: _Schedule, step: int) -> ChunkBatch:
        B, C = self.batch_size, self.chunk_frames
        codes: torch.Tensor | None = None
        valid = torch.zeros(B, C, dtype=torch.bool)
        recall = torch.zeros(B, C, dtype=torch.bool)
        rung = torch.zeros(B, C, dtype=torch.long)
        reset = torch.ones(B, dtype=torch.bool)
        chunk_index = torch.full((B,), -1, dtype=torch.long)
        is_first = torch.zeros(B, dtype=torch.bool)
        is_last = torch.zeros(B, dtype=torch.bool)
        active = torch.zeros(B, dtype=torch.bool)
        file_ids: list[str | None] = [None] * B
        lane_data = []
        for b in range(B):
            item = self._lane_item(sched, b, step)
            lane_data.append(item)
            if item is None:
                continue
            f, c, n = item
            ef = self._file(b, f)
            if codes is None:
                codes = torch.full((B, ef.codes.shape[0], C), self.pad_id, dtype=torch.long)
            lo = c * C
            hi = min(lo + C, ef.num_frames)
            codes[b, :, : hi - lo] = ef.codes[:, lo:hi]
            valid[b, : hi - lo] = True
            if ef.recall_mask is not None:
                recall[b, : hi - lo] = ef.recall_mask[lo:hi]
            if getattr(ef, "recall_rung", None) is not None:
                rung[b, : hi - lo] = ef.recall_rung[lo:hi]
            file_ids[b] = self._files[f].file_id
            chunk_index[b] = c
            is_first[b] = c == 0
            is_last[b] = c == n - 1
            active[b] = True
            reset[b] = True if self.mode == "clips" else c == 0
        if codes is None:  # every lane idle: shape from any file
            rows = self._num_rows()
            codes = torch.full((B, rows, C), self.pad_id, dtype=torch.long)
        self._rows = int(codes.shape[1])
        return ChunkBatch(codes, valid, reset, recall, file_ids, chunk_index, is_first, is_last, active,
                          epoch=sched.epoch, step=step, recall_rung=rung)

    def _num_rows(self) -> int:
        if self._rows is None:
            layout = getattr(self.dataset, "layout", None)
            if layout is not None:
                self._rows = int(layout.num_rows)
            else:
                self._rows = int(self.dataset.load(self._files[0].file_id).codes.shape[0])
        return self._rows

    def __iter__(self) -> Iterator[ChunkBatch]:
        """Batches from the current position on (across epochs until ``epochs``, if set)."""
        while self.epochs is None or self.epoch < self.epochs:
            sched = self._schedule(self.epoch)
            while self.step < sched.steps:
                step = self.step
                batch = self._batch(sched, step)
                # Advance before yielding: state_dict() taken after receiving a batch points at the next.
                self.step = step + 1
                yield batch
            self.epoch += 1
            self.step = 0
            self._lane_cache.clear()

    # ----- resume -------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        files = json.dumps([[f.file_id, f.num_frames] for f in self._files])
        # batch_size: the lanes of all ranks (the schedule's), so every rank's position is the same.
        return {"seed": self.seed, "batch_size": self.batch_size * self.world_size, "chunk_frames": self.chunk_frames,
                "mode": self.mode, "shuffle": self.shuffle,
                "files_sha256": hashlib.sha256(files.encode()).hexdigest(), "num_files": len(self._files)}

    def state_dict(self) -> dict[str, Any]:
        """Position (``epoch``, ``step`` of the next batch) plus what it is only valid for (the
        global schedule: valid on every rank)."""
        return {"epoch": self.epoch, "step": self.step, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position. Raises ValueError if the stream's setup differs."""
        mine = self._fingerprint()
        diff = [k for k in mine if k in state and state[k] != mine[k]]
        missing = [k for k in mine if k not in state]
        if diff or missing:
            what = ", ".join(f"{k}: saved {state[k]!r} vs now {mine[k]!r}" for k in diff)
            raise ValueError(f"cannot resume the chunk stream, its setup changed ({what or 'missing ' + str(missing)})")
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self._lane_cache.clear()
