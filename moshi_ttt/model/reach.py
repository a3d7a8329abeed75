"""Attention's receptive field ("reach") of a moshi ``LMModel`` config, in frames.

Moshi's temporal transformer is a stack of ``L`` sliding-window attention layers (training mask
``0 <= p_q - p_k < W``, ``W = context``), so the output at delayed position ``p`` depends on the
inputs at positions ``p - L*(W - 1) .. p`` and on nothing earlier (feed-forwards, norms and RoPE
act per position). In moshi's delayed domain position ``p`` holds raw frame ``p - 1 - d_j`` of
codebook ``j`` as input and predicts raw frame ``p - d_k`` of codebook ``k``. A raw input code at
frame ``f`` of codebook ``j`` therefore reaches the predictions of frame ``t`` of codebook ``k``
only if::

    t - f <= L*(W - 1) + 1 + d_j - d_k

The depformer adds nothing: at position ``p`` it sees the temporal output at ``p`` and the
(teacher-forced) tokens of the same position, i.e. frames ``p - d_j`` with ``t - f = d_j - d_k``.
Maximised over codebook pairs (input the most delayed, target the least), a raw code at frame
``f`` can change a prediction of frame ``t`` only if ``t - f < R`` with::

    R = L*(W - 1) + 2 + (max(delays) - min(delays))

That ``R`` is what :func:`attention_reach` returns (tested by perturbation in float64: exactly no
effect at ``t - f >= R``, an effect at ``R - 1``). Examples: the tiny preset (4 layers, W = 32,
delays 0/1) 127; ``memory_lm_kwargs()`` (2 layers, W = 8) 17; Moshi 7B (32 layers, W = 3000)
95,971 frames, about 2 h 8 min at 12.5 Hz.

TTT layers have no such bound (that is their point): the reach is attention's alone, i.e. of the
model with TTT disabled or with its memory reset. No moshi import here, so ``data`` can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def stacked_reach(num_layers: int, context: int, delays: Sequence[int]) -> int:
    """``R = num_layers*(context - 1) + 2 + max(delays) - min(delays)`` (see the module docstring)."""
    if num_layers < 1 or context < 1:
        raise ValueError(f"need num_layers >= 1 and context >= 1, got {num_layers}, {context}")
    if not delays:
        raise ValueError("delays must not be empty")
    return int(num_layers) * (int(context) - 1) + 2 + int(max(delays)) - int(min(delays))


def pair_reach(num_layers: int, context: int, delay_in: int, delay_out: int) -> int:
    """Largest ``t - f`` at which input codebook (delay ``delay_in``) frame ``f`` can still change a
    prediction of frame ``t`` of target codebook (delay ``delay_out``): ``L*(W-1) + 1 + d_in - d_out``."""
    return int(num_layers) * (int(context) - 1) + 1 + int(delay_in) - int(delay_out)


def attention_reach(lm_kwargs: dict[str, Any]) -> int:
    """Reach ``R`` (frames) of a moshi ``LMModel`` config: a raw input code at frame ``f`` can
    change the model's predictions of the targets at frame ``t`` only if ``t - f < R``.

    Uses ``num_layers``, ``context`` and ``delays`` of the temporal transformer (the depformer only
    sees the current position). Raises ValueError for an unbounded context (``None``).
    """
    context = lm_kwargs.get("context")
    if context is None:
        raise ValueError("context is None: attention is unbounded, there is no finite reach")
    delays = lm_kwargs.get("delays") or [0]
    return stacked_reach(int(lm_kwargs["num_layers"]), int(context), delays)
