"""Model presets: the tiny CPU config, a short-reach one for memory experiments, and the 7B config,
as moshi ``LMModel`` kwargs."""

from __future__ import annotations

import copy
from typing import Any


def moshi_7b_lm_kwargs() -> dict[str, Any]:
    """Moshi 7B's config as shipped by moshi 0.2.13 (``loaders._lm_kwargs``), copied."""
    from moshi.models import loaders

    return copy.deepcopy(loaders._lm_kwargs)


def tiny_lm_kwargs(**overrides: Any) -> dict[str, Any]:
    """A tiny Moshi config that trains in seconds on a CPU and works in float64.

    Same architecture as Moshi 7B (RoPE, SiLU gating, depformer with weights per step, delays),
    shrunk: width 64, 4 layers of 4 heads, a 32-frame attention context, 2 generated audio
    codebooks + 2 user codebooks of 64 entries, a 64-token text vocabulary.
    ``norm`` is ``rms_norm`` rather than 7B's ``rms_norm_f32`` so that float64 stays float64
    (exactness tests); everything else behaves the same.
    """
    kw: dict[str, Any] = {
        "dim": 64,
        "text_card": 64,
        "existing_text_padding_id": 3,
        "n_q": 4,
        "dep_q": 2,
        "card": 64,
        "num_heads": 4,
        "num_layers": 4,
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "context": 32,
        "max_period": 10000,
        "gating": "silu",
        "norm": "rms_norm",
        "positional_embedding": "rope",
        "depformer_dim": 32,
        "depformer_dim_feedforward": 132,
        "depformer_num_heads": 2,
        "depformer_num_layers": 2,
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_context": 2,
        "depformer_max_period": 10000,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        # text, then dep_q Moshi codebooks, then the user's codebooks (as 7B's layout).
        "delays": [0, 0, 1, 0, 1],
    }
    kw.update(overrides)
    n_q = kw["n_q"]
    if len(kw["delays"]) != n_q + 1:
        raise ValueError(f"tiny_lm_kwargs: len(delays)={len(kw['delays'])} must equal n_q + 1 = {n_q + 1}")
    return kw


def memory_lm_kwargs(**overrides: Any) -> dict[str, Any]:
    """The tiny config with a short attention reach, for memory experiments on a CPU.

    ``tiny_lm_kwargs(num_layers=2, context=8)``: attention can carry information at most
    ``attention_reach = 2*(8 - 1) + 2 + 1 = 17`` frames forward (a code at frame ``f`` cannot change
    any prediction of frame ``t >= f + 17``; see ``moshi_ttt.model.reach``), so anything a model
    predicts correctly from further back must come from its memory. ``overrides`` as for
    ``tiny_lm_kwargs``.
    """
    kw: dict[str, Any] = {"num_layers": 2, "context": 8}
    kw.update(overrides)
    return tiny_lm_kwargs(**kw)
