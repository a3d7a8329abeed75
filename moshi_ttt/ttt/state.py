"""Per-sample fast-weight state of a TTT-MLP layer, and the operations on it.

The state is a plain container of tensors with a leading batch dimension: every sample of a
batch has its own memory. Nothing here writes a parameter: every function returns new tensors
(or, for streaming, copies into the state's own buffers).

Shapes (B batch, H heads, d head dim, F = 4 d hidden):
    W1 [B, H, d, F]   b1 [B, H, 1, F]   W2 [B, H, F, d]   b2 [B, H, 1, d]
        the fast weights at the start of the current inner mini-batch;
    gW1, gb1, gW2, gb2 (same shapes)
        the running sums ``sum_j lr_j * grad l_j(W)`` over the tokens of the current mini-batch
        seen so far (zero at a mini-batch start);
    pos [B] (int64)
        tokens seen since the last reset; mini-batch boundaries are multiples of the mini-batch size;
    conv [B, k - 1, dim] or None
        the layer's last ``k - 1`` inputs for its short causal convolution (``TTTConfig.short_conv``
        = k > 1); None when the layer has none. The operator never reads it; resets zero it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_path

WEIGHT_NAMES = ("W1", "b1", "W2", "b2")
SUM_NAMES = ("gW1", "gb1", "gW2", "gb2")
OPERATOR_NAMES = (*WEIGHT_NAMES, *SUM_NAMES, "pos")
STATE_FORMAT_VERSION = 1


@dataclass
class TTTState:
    W1: torch.Tensor
    b1: torch.Tensor
    W2: torch.Tensor
    b2: torch.Tensor
    gW1: torch.Tensor
    gb1: torch.Tensor
    gW2: torch.Tensor
    gb2: torch.Tensor
    pos: torch.Tensor
    conv: torch.Tensor | None = None

    # ----------------------------------------------------------------- container helpers
    @property
    def batch_size(self) -> int:
        return self.W1.shape[0]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the state (``conv`` only when present)."""
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None:
                yield f.name, t

    def core(self) -> TTTState:
        """The operator's part (no ``conv``), sharing the tensors (in-place updates reach ``self``)."""
        return self if self.conv is None else TTTState(*(getattr(self, n) for n in OPERATOR_NAMES))

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> TTTState:
        return TTTState(**{name: fn(name, t) for name, t in self.items()})

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.W1, self.b1, self.W2, self.b2

    def sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gW1, self.gb1, self.gW2, self.gb2

    def detach(self) -> TTTState:
        return self.map(lambda _, t: t.detach())

    def clone(self) -> TTTState:
        return self.map(lambda _, t: t.clone())

    def copy_(self, other: TTTState) -> None:
        """In-place copy (streaming: keeps tensor addresses stable for CUDA graphs)."""
        for name, t in self.items():
            t.copy_(getattr(other, name))

    def index(self, idx: torch.Tensor) -> TTTState:
        """The sub-batch ``idx`` (a LongTensor of sample indices)."""
        return self.map(lambda _, t: t.index_select(0, idx))


def init_state(
    W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor, batch_size: int
) -> TTTState:
    """Broadcast the learned initial fast weights to a batch.

    The result does not alias the base tensors (writing into the state never writes them) and
    keeps the autograd path: gradients of anything computed from the state reach W1..b2.
    """
    def rep(t: torch.Tensor) -> torch.Tensor:
        # expand + contiguous materialises a copy, with grad_fn back to the base parameter.
        return t.unsqueeze(0).expand(batch_size, *t.shape).contiguous()

    weights = [rep(t) for t in (W1, b1, W2, b2)]
    sums = [torch.zeros_like(w) for w in weights]
    pos = torch.zeros(batch_size, dtype=torch.long, device=W1.device)
    return TTTState(*weights, *sums, pos=pos)


def fresh_state(base: tuple[torch.Tensor, ...], like: TTTState) -> TTTState:
    """A fresh memory shaped like ``like`` (batch size, dtype, convolution tail) from the learned
    initial weights ``base`` = (W1, b1, W2, b2) [H, ...]. Under autograd it keeps its graph to
    ``base`` (a reset inside a training span reaches the initial weights like a fresh stream)."""
    st = init_state(*(w.to(like.W1.dtype) for w in base), like.batch_size)
    if like.conv is not None:
        st.conv = torch.zeros_like(like.conv)
    return st


def _bmask(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    m = mask.to(device=t.device, dtype=torch.bool)
    if torch.is_grad_enabled():
        # torch.where saves its condition for backward, and moshi updates its exec_mask in place
        # (State.reset, set_exec_mask): a graph kept across chunks (state_grad: full) must not
        # see a later chunk's write.
        m = m.clone()
    return m.view(-1, *([1] * (t.dim() - 1)))


def select_state(mask: torch.Tensor, new: TTTState, old: TTTState) -> TTTState:
    """Per sample: ``new`` where ``mask`` is True, ``old`` elsewhere (exact, no arithmetic)."""
    return TTTState(**{
        name: torch.where(_bmask(mask, t), t, getattr(old, name)) for name, t in new.items()
    })


def reset_state(state: TTTState, fresh: TTTState, mask: torch.Tensor | None) -> TTTState:
    """Put the samples selected by ``mask`` back to ``fresh`` (the learned initial weights)."""
    if mask is None:
        return fresh
    return select_state(mask, fresh, state)


@torch.no_grad()
def reset_state_(state: TTTState, base: tuple[torch.Tensor, ...], mask: torch.Tensor) -> None:
    """In place: the samples selected by ``mask`` [B] go back to ``base`` (the learned initial
    W1, b1, W2, b2, broadcast over the batch), with zero sums and position; no host sync, no new
    state tensors (streaming, CUDA graphs)."""
    for name, t in state.items():
        m = _bmask(mask, t)
        if name in WEIGHT_NAMES:
            t.copy_(torch.where(m, base[WEIGHT_NAMES.index(name)].to(t.dtype), t))
        else:
            t.masked_fill_(m, 0)


def carry_state(state: TTTState, base: tuple[torch.Tensor, ...], mode: str) -> TTTState:
    """The carried state as it enters a new chunk's graph (DESIGN.md section 4).

    ``base`` are the learned initial weights (W1, b1, W2, b2), broadcastable to the state.
    ``mode == "delta"``: value of ``state`` exactly, gradient ``d/d base = identity``, i.e.
    ``W_base + stopgrad(W_state - W_base)``, written as ``stopgrad(W_state) + (W_base -
    stopgrad(W_base))`` so that the value is bit-identical to the detached one (``x + 0.0 == x``).
    ``mode == "detach"``: plain stop-gradient.
    ``mode == "full"``: the state unchanged, graph included (within a training span; whoever
    owns the span cuts it at its boundary with ``"delta"``).
    With "delta" and "detach" the running gradient sums and the position are detached.
    """
    if mode == "full":
        return state
    if mode == "detach":
        return state.detach()
    if mode != "delta":
        raise ValueError(f"state_grad must be 'full', 'delta' or 'detach', got {mode!r}")
    bases = dict(zip(WEIGHT_NAMES, base))

    def f(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in bases:
            b = bases[name]
            return t.detach() + (b - b.detach()).to(t.dtype)
        return t.detach()

    return state.map(f)


# ------------------------------------------------------------------------- persistence
def state_to_tensors(state: TTTState, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + name: t.detach().contiguous().cpu() for name, t in state.items()}


def state_from_tensors(
    tensors: dict[str, torch.Tensor], prefix: str = "", *, like: TTTState | None = None,
    source: str = "state",
) -> TTTState:
    """Inverse of ``state_to_tensors``. With ``like``, shapes are checked and tensors are moved
    to its device/dtype; a mismatch raises a ValueError naming the tensor."""
    out: dict[str, torch.Tensor] = {}
    for f in fields(TTTState):
        key = prefix + f.name
        if f.name == "conv" and (like is None or like.conv is None) and key not in tensors:
            continue  # optional: layers without a short convolution
        if key not in tensors:
            raise ValueError(f"{source}: missing tensor {key!r}")
        t = tensors[key]
        if like is not None:
            ref = getattr(like, f.name)
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(
                    f"{source}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
                )
            t = t.to(device=ref.device, dtype=ref.dtype)
        out[f.name] = t
    return TTTState(**out)


def save_states(path: str | Path, states: dict[str, TTTState], meta: dict[str, Any]) -> None:
    """Write named states (e.g. one per layer) and JSON metadata to one safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, st in states.items():
        tensors.update(state_to_tensors(st, prefix=f"{name}/"))
    header = {"format": "moshi-ttt-state", "version": str(STATE_FORMAT_VERSION),
              "names": json.dumps(sorted(states)), "meta": json.dumps(meta, sort_keys=True)}
    with atomic_path(path) as tmp:  # a crash never leaves a half-written memory file
        save_file(tensors, str(tmp), metadata=header)


def load_states(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a file written by ``save_states``: ({name: {tensor name: tensor}}, meta)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"memory state file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors memory file ({e})") from e
    if header.get("format") != "moshi-ttt-state":
        raise ValueError(f"{path}: not a moshi-ttt memory file (format={header.get('format')!r})")
    names = json.loads(header["names"])
    grouped: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for key, t in tensors.items():
        name, _, tname = key.rpartition("/")
        grouped[name][tname] = t
    return grouped, json.loads(header["meta"])
