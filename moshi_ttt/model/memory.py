"""A conversation's memory on disk.

Two granularities, one file format (safetensors + JSON metadata):

* ``save_memory`` / ``load_memory``: the TTT fast-weight state of every TTT block of a streaming
  model: what the model has learned about this conversation. Restoring it into a new stream
  starts a new conversation *with* that memory (``moshi-ttt generate --memory-in``).
* ``save_stream`` / ``load_stream``: the complete streaming state of a module (an ``LMModel`` or an
  ``LMGen``): TTT memory, attention KV caches, offsets, exec masks, LMGen's token cache. Restoring
  it in another process continues the stream exactly where it stopped.

Loading checks the model: layers, shapes and the TTT config must match, or a ``ValueError`` says
which tensor or setting differs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache
from safetensors import safe_open
from safetensors.torch import save_file

from ..ttt.state import TTTState, load_states, save_states, state_from_tensors
from .build import ttt_blocks
from .hybrid import TTTBlock, TTTBlockState


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


def save_memory(model, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the TTT memory of a streaming ``model`` (one state per TTT layer) to ``path``."""
    states = {f"layer{i}": st.memory for i, st in _streaming_blocks(model).items()}
    save_states(path, states, {**_model_meta(model), **(extra or {})})


def load_memory(model, path: str | Path) -> dict[str, Any]:
    """Restore TTT memory saved by ``save_memory`` into a streaming ``model`` (same batch size)."""
    grouped, meta = load_states(path)
    mine = _model_meta(model)
    if meta.get("ttt_layers") != mine["ttt_layers"]:
        raise ValueError(f"{path}: memory of TTT layers {meta.get('ttt_layers')}, model has {mine['ttt_layers']}")
    for key in ("mini_batch_size", "num_heads", "head_dim", "qk_l2_norm", "rope"):
        if (meta.get("ttt") or {}).get(key) != (mine["ttt"] or {}).get(key):
            raise ValueError(f"{path}: TTT setting {key}={meta['ttt'].get(key)!r} differs from the "
                             f"model's {mine['ttt'].get(key)!r}")
    for i, st in _streaming_blocks(model).items():
        new = state_from_tensors(grouped[f"layer{i}"], like=st.memory, source=f"{path} layer{i}")
        TTTBlock.store_memory(st, new)
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
    # exec_mask is set in __post_init__, not a dataclass field; callbacks/graphs are not state.
    names = [f.name for f in dataclasses.fields(state) if f.name not in ("batch_size", "device", "block")]
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
    meta = {"format": "moshi-ttt-stream", "scalars": json.dumps(scalars), **_safe_meta(module)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def _safe_meta(module) -> dict[str, str]:
    model = getattr(module, "lm_model", module)
    return {"model": json.dumps(_model_meta(model)) if hasattr(model, "transformer") else "{}"}


def load_stream(module: StreamingModule, path: str | Path) -> None:
    """Restore a state written by ``save_stream`` into ``module`` (streaming, same batch size)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "moshi-ttt-stream":
        raise ValueError(f"{path}: not a moshi-ttt stream file")
    scalars = json.loads(meta["scalars"])

    def put(dst: torch.Tensor, key: str) -> None:
        src = tensors.get(key)
        if src is None:
            raise ValueError(f"{path}: missing tensor {key!r}")
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"{path}: {key!r} has shape {tuple(src.shape)}, the stream {tuple(dst.shape)}")
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
