"""Building a moshi ``LMModel`` with TTT memory (public: ``build_lm``, ``tiny_lm_kwargs``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel

from ..ttt.config import TTTConfig
from .hybrid import TTTBlock, TTTHybridLayer
from .presets import memory_lm_kwargs, moshi_7b_lm_kwargs, tiny_lm_kwargs

__all__ = ["build_lm", "tiny_lm_kwargs", "memory_lm_kwargs", "moshi_7b_lm_kwargs", "ttt_blocks",
           "ttt_parameter_names", "TTT_KEY_MARKER"]

# Every TTT parameter / state-dict key contains this path segment (".ttt." under a layer).
TTT_KEY_MARKER = ".ttt."


def build_lm(lm_kwargs: dict[str, Any], ttt_config: TTTConfig | None = None,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             chunkable: bool | None = None) -> LMModel:
    """A random-init moshi ``LMModel`` with TTT blocks in the layers named by ``ttt_config.layers``.

    With TTT disabled or in no layer (and ``chunkable`` not True), this is exactly stock moshi
    (``loaders.get_moshi_lm``). Otherwise every temporal-transformer layer is a ``TTTHybridLayer``
    (moshi's layer with a chunk-capable KV cache, needed for multi-frame streaming calls and for
    training over chunks) and the selected ones get a ``TTTBlock``. ``chunkable=True`` gives the
    chunk-capable layers even without TTT (a no-TTT baseline trained the same way). The config is
    kept on the model as ``model.ttt_config``.
    """
    ttt_config = ttt_config if ttt_config is not None else TTTConfig()
    kw = dict(lm_kwargs)
    if "layer_class" in kw:
        raise ValueError("build_lm: lm_kwargs must not set 'layer_class' (moshi-ttt injects its own)")
    layers = ttt_config.resolve_layers(int(kw["num_layers"]))
    if layers or chunkable:
        kw["layer_class"] = TTTHybridLayer
    model = loaders.get_moshi_lm(None, lm_kwargs=kw, device=device, dtype=dtype)
    for i in layers:
        model.transformer.layers[i].attach_ttt(ttt_config)
    model.ttt_config = ttt_config
    model.ttt_layers = layers
    return model


def ttt_blocks(model: LMModel) -> dict[int, TTTBlock]:
    """The TTT blocks of a model, by temporal-transformer layer index."""
    return {i: layer.ttt for i, layer in enumerate(model.transformer.layers)
            if isinstance(getattr(layer, "ttt", None), TTTBlock)}


def ttt_parameter_names(model: LMModel) -> Iterator[str]:
    for name, _ in model.named_parameters():
        if TTT_KEY_MARKER in name:
            yield name
