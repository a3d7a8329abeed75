"""The training/evaluation path: one ``LMModel`` over consecutive chunks of B parallel streams.

Each lane of the batch walks one file chunk after chunk. The model runs inside moshi's own
streaming mode, so attention keys/values of the last ``context`` frames and the TTT memory are
carried from chunk to chunk (stop-gradient for keys/values, DESIGN.md section 4 for the memory),
and ``reset`` puts a lane back to the start of a file (moshi's ``reset_streaming(mask)``).

moshi's ``LMModel.forward`` delays the codebooks (``delays``) and prepends an initial token *per
call*, which would be wrong for every chunk but a file's first. We work in moshi's delayed domain
instead: position ``p`` of the delayed sequence holds frame ``p - 1 - delay_k`` of codebook ``k``
as input and predicts frame ``p - delay_k``. Chunk ``[s, e)`` of positions needs raw frames from
``s - 1 - max_delay``, so each lane keeps the last ``max_delay + 1`` frames of the previous chunk:
the delay tail, part of moshi's streaming state (``ChunkedState``, the model root's state in a
chunked session), so that it is reset, copied, snapshotted and saved with the rest.
Every token of a file is predicted exactly once over its chunks, and the token losses equal
those of moshi's full-sequence forward on the whole file (tested).

Gradients across chunks follow ``model.ttt_config.state_grad``: with "full", the carried TTT
memory and attention keys/values keep their graph from chunk to chunk until ``cut()`` (called by
the trainer at every training-span boundary), so the summed losses of a span have the gradient of
one full-sequence forward over it; with "delta"/"detach" every chunk is cut on its own.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.streaming import State
from moshi.modules.transformer import RingKVCache
from torch.utils.checkpoint import checkpoint

from ..ttt.state import TTTState, carry_state
from .attention import ChunkedRingKVCache
from .build import ttt_blocks
from .hybrid import set_memory_schedule
from .loss import TokenLosses, token_losses


def _copy_value(v: Any) -> Any:
    """A detached copy of one piece of streaming state; autograd leaves where the original needed
    gradient, so a recomputation saves the same tensors as the original forward."""
    if isinstance(v, torch.Tensor):
        c = v.detach().clone()
        return c.requires_grad_(True) if v.requires_grad and v.is_floating_point() else c
    if isinstance(v, TTTState):
        return v.map(lambda _, t: _copy_value(t))
    if isinstance(v, RingKVCache):
        c = copy.copy(v)
        for k, x in vars(v).items():
            setattr(c, k, _copy_value(x))
        return c
    return v  # ints, flags, module references


def copy_streaming_state(model: torch.nn.Module, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copies of every streaming ``State`` of ``model`` (or of ``state``, a previous copy), for
    ``set_streaming_state``: running on them never touches the originals."""
    out = {}
    for name, st in (state if state is not None else model.get_streaming_state()).items():
        c = copy.copy(st)
        for f in dataclasses.fields(st):
            setattr(c, f.name, _copy_value(getattr(st, f.name)))
        out[name] = c
    return out


@dataclass
class ChunkedState(State):
    """The model root's streaming state in a chunked session: moshi's root ``State`` (exec mask)
    and the delay tail of each lane.

    tail: [B, K, L] the last L = max_delay + 1 raw frames of each lane (moshi's initial token
        before a file's first frame).
    before: [B, L] True where a tail frame precedes the lane's file (no target there).
    initial: [1, K, 1] moshi's initial token, what a reset lane's tail goes back to (a constant of
        the model, not state: not saved).
    labels: [B, N, L] integer labels of the tail frames (``ChunkedLM.step(labels=...)``, e.g. the
        evaluation's recall targets; 0 before a file), None until a step brings labels.
    """

    tail: torch.Tensor
    before: torch.Tensor
    initial: torch.Tensor = field(repr=False)
    labels: torch.Tensor | None = None

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        mask = reset_mask.to(self.tail.device)
        self.tail = torch.where(mask.view(-1, 1, 1), self.initial.expand_as(self.tail), self.tail)
        self.before = self.before | mask.view(-1, 1)
        if self.labels is not None:
            self.labels = torch.where(mask.view(-1, 1, 1), torch.zeros_like(self.labels), self.labels)


@dataclass
class ChunkOutput:
    """Token losses of one chunk (delayed domain, ``C`` positions) and where their targets lie.

    losses: per-token CE and masks, text [B, C], audio [B, dep_q, C].
    target_frame: [1 + dep_q, C] frame index of each target relative to the chunk start
        (``j - delay_k``; negative = the last frames of the previous chunk).
    target_labels: [B, N, 1 + dep_q, C] the labels given to ``step`` of each token's target frame
        (0 before the file), or None.
    """

    losses: TokenLosses
    target_frame: torch.Tensor
    target_labels: torch.Tensor | None = None


class ChunkedLM:
    """Run ``model`` over consecutive chunks of ``batch_size`` lanes. Use as a context manager::

        with ChunkedLM(model, B) as runner:
            for batch in stream:
                out = runner.step(batch.codes, batch.reset)
    """

    def __init__(self, model: LMModel, batch_size: int, recompute: bool = False, reset_every: int | None = None):
        self.model = model
        self.batch_size = batch_size
        # The TTT memory's reset schedule for this session (None: kept for a whole file; P: reset
        # every P frames), owned by the caller: the trainer (``ttt.persistent_states`` and the
        # data's chunk length) or the evaluation (its memory mode).
        self.reset_every = reset_every
        self.recompute = recompute  # activation checkpointing per chunk (see ``_recomputed_losses``)
        self.delays = torch.tensor(model.delays, dtype=torch.long)
        self.tail_len = int(self.delays.max()) + 1
        self._stack = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> ChunkedLM:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        model, B = self.model, self.batch_size
        self._stack = model.streaming(B)
        # The session's root state carries the delay tail (installed through moshi's public
        # ``set_streaming_state``): moshi's own root state holds nothing else (its exec mask).
        device = model._streaming_state.device
        K, L = model.num_codebooks, self.tail_len
        initial = model._get_initial_token().view(1, K, 1).to(device)
        states = model.get_streaming_state()
        states[""] = ChunkedState(B, device, tail=initial.expand(B, K, L).clone(), initial=initial,
                                  before=torch.ones(B, L, dtype=torch.bool, device=device))
        model.set_streaming_state(states)
        cfg = getattr(model, "ttt_config", None)
        keep = cfg is not None and cfg.state_grad == "full"
        # Found once per streaming session (the cut at every training step must not walk the model).
        self._caches = [kv for m in model.modules()
                        if isinstance(kv := getattr(getattr(m, "_streaming_state", None), "kv_cache", None),
                                      ChunkedRingKVCache)]
        for cache in self._caches:
            cache.keep_graph = keep
        set_memory_schedule(ttt_blocks(model), self.reset_every)

    def cut(self) -> None:
        """Start a new training span: the carried state enters the next chunk without the graph of
        the previous ones (keys/values as constants; the TTT memory by the "delta" rule, so the
        learned initial weights still get every chunk's gradient). A no-op outside "full"."""
        for cache in self._caches:
            cache.cut()
        for block in ttt_blocks(self.model).values():
            st = block._streaming_state
            if st is not None and st.memory is not None:
                st.memory = carry_state(st.memory, block.layer.base_weights(), "delta")

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    # ------------------------------------------------------------------ delay tail
    @property
    def _root(self) -> ChunkedState:
        st = self.model._streaming_state
        if not isinstance(st, ChunkedState):
            raise RuntimeError("ChunkedLM: outside its context (use `with ChunkedLM(...)`)")
        return st

    @property
    def tail(self) -> torch.Tensor:
        """[B, K, L] the last raw frames of each lane (the streaming state's delay tail)."""
        return self._root.tail

    @property
    def before(self) -> torch.Tensor:
        """[B, L] True where a tail frame precedes the lane's file."""
        return self._root.before

    # ------------------------------------------------------------------ step
    def reset(self, mask: torch.Tensor) -> None:
        """Lanes in ``mask`` [B] start a new file: fresh memory, empty attention, no delay tail
        (moshi's ``reset_streaming``, which reaches every state, the tail's included)."""
        mask = mask.to(self._root.device)
        if bool(mask.any()):
            self.model.reset_streaming(mask)

    def _losses(self, seq_in: torch.Tensor, seq_tgt: torch.Tensor, tgt_ok: torch.Tensor) -> TokenLosses:
        """The model over one chunk in the delayed domain (advances the streaming state)."""
        model = self.model
        transformer_out, text_logits = model.forward_text(seq_in)
        logits = model.forward_depformer_training(seq_tgt, transformer_out)          # [B, dep_q, C, card]
        a0, dq = model.audio_offset, model.dep_q
        return token_losses(text_logits[:, 0], seq_tgt[:, 0], tgt_ok[:, 0],
                            logits, seq_tgt[:, a0:a0 + dq], tgt_ok[:, a0:a0 + dq])

    def _recomputed_losses(self, seq_in: torch.Tensor, seq_tgt: torch.Tensor, tgt_ok: torch.Tensor) -> TokenLosses:
        """``_losses`` under activation checkpointing: the chunk's activations are dropped after its
        forward and recomputed in backward from a copy of the streaming state it started from (its
        carried inputs), so a training span's memory does not grow with its chunks' activations.
        The recomputation runs on that copy and puts the live state back: moshi's streaming state
        (KV caches, offsets, TTT memory) is never advanced twice."""
        model = self.model
        start = copy_streaming_state(model)
        calls = [0]

        def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            calls[0] += 1
            if calls[0] == 1:  # the forward itself: advances the live state
                out = self._losses(x, seq_tgt, tgt_ok)
            else:               # backward's recomputation: on a copy of the chunk's starting state
                live = model.get_streaming_state()
                model.set_streaming_state(copy_streaming_state(model, start))
                try:
                    out = self._losses(x, seq_tgt, tgt_ok)
                finally:
                    model.set_streaming_state(live)
            return tuple(getattr(out, f.name) for f in dataclasses.fields(out))

        return TokenLosses(*checkpoint(run, seq_in, use_reentrant=False))

    def step(self, codes: torch.Tensor, reset: torch.Tensor | None = None,
             valid: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> ChunkOutput:
        """codes [B, K, C] raw frames (moshi's layout, -1 = padding); reset [B] bool before the chunk;
        valid [B, C] real frames (default: frames whose codes are not all -1). Like moshi's full
        forward, only positions that are real frames make predictions. labels [B, N, C] integer
        labels per frame, carried in the delay tail like the codes: the output's ``target_labels``
        gives each token the labels of its target frame."""
        if self._stack is None:
            raise RuntimeError("ChunkedLM.step outside its context (use `with ChunkedLM(...)`)")
        if reset is not None:
            self.reset(reset)
        model, root = self.model, self._root
        B, K, C = codes.shape
        L = self.tail_len
        ext = torch.cat([root.tail, codes], dim=2)                                      # [B, K, L + C]
        before = torch.cat([root.before, torch.zeros(B, C, dtype=torch.bool, device=codes.device)], 1)
        j = torch.arange(C, device=codes.device)
        d = self.delays.to(codes.device).view(K, 1)
        idx_in = (L + j - 1 - d).view(1, K, C).expand(B, K, C)
        idx_tgt = (L + j - d).view(1, K, C).expand(B, K, C)
        seq_in = ext.gather(2, idx_in)
        seq_tgt = ext.gather(2, idx_tgt)
        tgt_ok = ~before.unsqueeze(1).expand(B, K, L + C).gather(2, idx_tgt)            # [B, K, C]
        if valid is None:
            valid = (codes != -1).any(1)
        tgt_ok = tgt_ok & valid.to(codes.device).unsqueeze(1)

        if self.recompute and torch.is_grad_enabled():
            losses = self._recomputed_losses(seq_in, seq_tgt, tgt_ok)
        else:
            losses = self._losses(seq_in, seq_tgt, tgt_ok)
        dq = model.dep_q

        root.tail = ext[:, :, -L:].detach()
        root.before = before[:, -L:]
        target_frame = (j.view(1, C) - d)[: 1 + dq]
        target_labels = None
        if labels is not None:
            if root.labels is None:
                root.labels = labels.new_zeros(B, labels.shape[1], L)
            ext_l = torch.cat([root.labels, labels.to(root.labels)], 2)                    # [B, N, L + C]
            target_labels = ext_l[:, :, L + target_frame.to(ext_l.device)]                  # [B, N, 1 + dq, C]
            root.labels = ext_l[:, :, -L:]
        return ChunkOutput(losses, target_frame, target_labels)
