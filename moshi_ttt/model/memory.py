"""A conversation's memory on disk.

Two granularities, one file format (safetensors + JSON metadata):

* ``save_memory`` / ``load_memory``: the TTT fast-weight state of every TTT block of a streaming
  model: what the model has learned about this conversation. Restoring it into a new stream
  starts a new conversation *with* that memory (``moshi-ttt generate --memory-in``).
* ``save_stream`` / ``load_stream``: the complete streaming state of a module (an ``LMModel`` or an
  ``LMGen``): TTT memory, attention KV caches, offsets, exec masks, LMGen's token cache. Restoring
  it in another process continues the stream exactly where it stopped.

Loading checks the model: layers, shapes and the TTT config must match, or a ``ValueError`` says
which tensor or setting differs. Integrity: both files carry a SHA-256 of their tensors, checked on
load, and every floating tensor must be finite (saving refuses a non-finite memory, loading refuses
one with :class:`~moshi_ttt.errors.IntegrityError` naming the file and the tensor).

``snapshot_stream`` / ``restore_stream`` keep an in-memory copy of the same state: the trainer
takes one before each step and restores it when the step is skipped as non-finite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import IntegrityError
from ..fileio import atomic_path
from ..ttt.state import TTTState, load_states, save_states, state_from_tensors
from .build import ttt_blocks
from .hybrid import TTTBlockState


def _model_meta(model) -> dict[str, Any]:
    cfg = getattr(model, "ttt_config", None)
    return {"ttt": cfg.to_dict() if cfg is not None else None,
            "ttt_layers": sorted(ttt_blocks(model))}


def _streaming_blocks(model) -> dict[int, TTTBlockState]:
    out = {}
    for i, block in ttt_blocks(model).items():
        if block._streaming_state is None:
            raise RuntimeError("the model is not streaming: call this inside `with model.streaming(B):`")
        out[i] = block._streaming_state
    return out


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise :class:`IntegrityError` naming ``source`` and the first tensor holding NaN or inf."""
    for k, t in tensors.items():
        if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise IntegrityError(f"{source}: tensor {k!r} holds {n} NaN or infinite value(s); refusing to use it")


def _memory_tensors(states: dict[str, TTTState]) -> dict[str, torch.Tensor]:
    return {f"{name}/{n}": t for name, st in states.items() for n, t in st.items()}


def save_memory(model, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the TTT memory of a streaming ``model`` (one state per TTT layer) to ``path``.

    A non-finite memory is refused (:class:`IntegrityError`): it would poison every later load."""
    states = {f"layer{i}": st.memory for i, st in _streaming_blocks(model).items()}
    flat = _memory_tensors(states)
    check_finite(flat, f"memory to save to {path}")
    save_states(path, states, {**_model_meta(model), **(extra or {}), "sha256": tensors_digest(flat)})


def load_memory(model, path: str | Path) -> dict[str, Any]:
    """Restore TTT memory saved by ``save_memory`` into a streaming ``model`` (same batch size).

    Checks the SHA-256 (when the file has one) and that every tensor is finite."""
    try:
        grouped, meta = load_states(path)
    except ValueError as e:  # unreadable or not a memory file
        raise IntegrityError(str(e)) from e
    flat = {f"{name}/{n}": t for name, d in grouped.items() for n, t in d.items()}
    digest = meta.get("sha256")
    if digest is not None and tensors_digest(flat) != digest:
        raise IntegrityError(f"{path}: memory file is corrupted (sha256 of its tensors does not match)")
    check_finite(flat, path)
    mine = _model_meta(model)
    if meta.get("ttt_layers") != mine["ttt_layers"]:
        raise IntegrityError(f"{path}: memory of TTT layers {meta.get('ttt_layers')}, model has {mine['ttt_layers']}")
    # Settings written before a key existed take that key's default (older files stay loadable).
    defaults = {"head_dim": None, "short_conv": 0}
    for key in ("mini_batch_size", "num_heads", "head_dim", "short_conv", "qk_l2_norm", "rope"):
        theirs = (meta.get("ttt") or {}).get(key, defaults.get(key))
        ours = (mine["ttt"] or {}).get(key, defaults.get(key))
        if theirs != ours:
            raise IntegrityError(f"{path}: TTT setting {key}={theirs!r} differs from the model's {ours!r}")
    for i, st in _streaming_blocks(model).items():
        try:
            new = state_from_tensors(grouped[f"layer{i}"], like=st.memory, source=f"{path} layer{i}")
        except (KeyError, ValueError) as e:  # a tensor missing or of another shape
            raise IntegrityError(f"{path}: memory of layer {i} does not fit the model ({e})") from e
        st.store(new)
    return meta


# ----------------------------------------------------------------------------- full stream state
def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().cpu()
    elif isinstance(obj, TTTState):
        for n, t in obj.items():
            tensors[f"{prefix}.{n}"] = t.detach().contiguous().cpu()
    elif isinstance(obj, RingKVCache):
        tensors[f"{prefix}.cache"] = obj.cache.detach().contiguous().cpu()
        tensors[f"{prefix}.end_offset"] = obj.end_offset.detach().cpu()
        scalars[f"{prefix}.capacity"] = obj.capacity
    elif isinstance(obj, (int, float, bool)) or obj is None:
        scalars[prefix] = obj


def _state_fields(state) -> list[str]:
    # exec_mask is set in __post_init__, not a dataclass field; callbacks/graphs are not state, nor
    # the parameters a TTT block's state holds by reference for its resets (``initial``).
    names = [f.name for f in dataclasses.fields(state) if f.name not in ("batch_size", "device", "initial")]
    return ["exec_mask", *names]


def _all_states(module: StreamingModule) -> dict[str, Any]:
    """Streaming states of ``module`` and, for an ``LMGen``, of its (detached) ``lm_model``."""
    states = dict(module.get_streaming_state())
    inner = getattr(module, "lm_model", None)
    if isinstance(inner, StreamingModule):
        states.update({f"lm_model/{k}": v for k, v in inner.get_streaming_state().items()})
    return states


def save_stream(module: StreamingModule, path: str | Path) -> None:
    """Write the complete streaming state of ``module`` and its streaming children."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for name, state in _all_states(module).items():
        if state is None:
            raise RuntimeError(f"{name or 'module'} is not streaming")
        for f in _state_fields(state):
            _flatten(getattr(state, f, None), f"{name}:{f}", tensors, scalars)
    check_finite(tensors, f"stream state to save to {path}")
    meta = {"format": "moshi-ttt-stream", "scalars": json.dumps(scalars), **_safe_meta(module),
            "sha256": tensors_digest(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _safe_meta(module) -> dict[str, str]:
    model = getattr(module, "lm_model", module)
    return {"model": json.dumps(_model_meta(model)) if hasattr(model, "transformer") else "{}"}


def load_stream(module: StreamingModule, path: str | Path, fill: dict[str, torch.Tensor] | None = None) -> None:
    """Restore a state written by ``save_stream`` into ``module`` (streaming, same batch size).
    ``fill``: tensors (by key) for a file written before they were part of the state."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise IntegrityError(f"{path}: not a readable stream file ({type(e).__name__}: {e})") from e
    if meta.get("format") != "moshi-ttt-stream":
        raise IntegrityError(f"{path}: not a moshi-ttt stream file")
    if "sha256" in meta and tensors_digest(tensors) != meta["sha256"]:
        raise IntegrityError(f"{path}: stream file is corrupted (sha256 of its tensors does not match)")
    check_finite(tensors, path)
    tensors = {**(fill or {}), **tensors}
    scalars = json.loads(meta["scalars"])

    def put(dst: torch.Tensor, key: str) -> None:
        src = tensors.get(key)
        if src is None:
            raise IntegrityError(f"{path}: missing tensor {key!r}")
        if tuple(src.shape) != tuple(dst.shape):
            raise IntegrityError(f"{path}: {key!r} has shape {tuple(src.shape)}, the stream {tuple(dst.shape)}")
        dst.copy_(src.to(dst.dtype))

    with torch.no_grad():
        for name, state in _all_states(module).items():
            for f in _state_fields(state):
                key, obj = f"{name}:{f}", getattr(state, f, None)
                if isinstance(obj, torch.Tensor):
                    put(obj, key)
                elif isinstance(obj, TTTState):
                    for n, t in obj.items():
                        put(t, f"{key}.{n}")
                elif isinstance(obj, RingKVCache):
                    cap = scalars[f"{key}.capacity"]
                    if cap != obj.capacity:  # a chunk-capable cache that had grown
                        obj.cache = torch.zeros(*obj.cache.shape[:3], cap, obj.cache.shape[4],
                                                device=obj.cache.device, dtype=obj.cache.dtype)
                        obj.capacity = cap
                    put(obj.cache, f"{key}.cache")
                    put(obj.end_offset, f"{key}.end_offset")
                elif key in scalars:
                    setattr(state, f, scalars[key])


# ----------------------------------------------------------------------------- in-memory snapshot
def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def snapshot_stream(module: StreamingModule) -> dict[str, dict[str, Any]]:
    """A detached copy of every streaming state field of ``module`` (TTT memory, KV caches,
    offsets, masks), to put back with :func:`restore_stream`. Costs one copy of the state."""
    snap: dict[str, dict[str, Any]] = {}
    for name, state in _all_states(module).items():
        if state is None:
            continue
        fields: dict[str, Any] = {}
        for f in _state_fields(state):
            obj = getattr(state, f, None)
            if isinstance(obj, torch.Tensor):
                fields[f] = _clone(obj)
            elif isinstance(obj, TTTState):
                fields[f] = obj.map(lambda _, t: _clone(t))
            elif isinstance(obj, RingKVCache):
                fields[f] = (_clone(obj.cache), _clone(obj.end_offset), obj.capacity)
            elif isinstance(obj, (int, float, bool)) or obj is None:
                fields[f] = obj
        snap[name] = fields
    return snap


def restore_stream(module: StreamingModule, snap: dict[str, dict[str, Any]]) -> None:
    """Put back a :func:`snapshot_stream` (same streaming session); the snapshot stays usable."""
    states = _all_states(module)
    with torch.no_grad():
        for name, fields in snap.items():
            state = states[name]
            for f, val in fields.items():
                obj = getattr(state, f, None)
                if isinstance(val, torch.Tensor):
                    setattr(state, f, _clone(val))
                elif isinstance(val, TTTState):
                    if isinstance(state, TTTBlockState):
                        state.memory = val.map(lambda _, t: _clone(t))
                    else:
                        setattr(state, f, val.map(lambda _, t: _clone(t)))
                elif isinstance(val, tuple) and isinstance(obj, RingKVCache):
                    obj.cache, obj.end_offset, obj.capacity = _clone(val[0]), _clone(val[1]), val[2]
                    if getattr(obj, "live", None) is not None:
                        obj.live = None  # the span's graph-carrying copy: the values are back in cache
                else:
                    setattr(state, f, val)


def _stream_tensors(module: StreamingModule) -> Iterator[torch.Tensor]:
    """Every tensor of the streaming state: plain fields, TTT memories, KV caches."""
    for state in _all_states(module).values():
        if state is None:
            continue
        for f in _state_fields(state):
            obj = getattr(state, f, None)
            if isinstance(obj, torch.Tensor):
                yield obj
            elif isinstance(obj, TTTState):
                yield from (t for _, t in obj.items())
            elif isinstance(obj, RingKVCache):
                yield obj.cache


def stream_finite(module: StreamingModule) -> bool:
    """True when every floating tensor of the streaming state is finite."""
    return all(bool(torch.isfinite(t).all()) for t in _stream_tensors(module) if t.dtype.is_floating_point)


def stream_nbytes(module: StreamingModule) -> int:
    """Bytes of the streaming state's tensors (what ``save_stream`` writes, about)."""
    return sum(t.numel() * t.element_size() for t in _stream_tensors(module))
