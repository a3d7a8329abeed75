"""Diagnostics of the inner loop: how well the memory reconstructs each token as it arrives."""

from __future__ import annotations

import torch

from .ops import gelu_tanh, layer_norm, ttt_mlp
from .state import TTTState


def inner_loss_at_state(xk: torch.Tensor, xv: torch.Tensor, ln_weight: torch.Tensor,
                        ln_bias: torch.Tensor, state: TTTState) -> torch.Tensor:
    """Inner loss ``0.5 ||LN(f_W(xk)) - LN(xv - xk)||^2`` of every token under the state's
    current (mini-batch-start) weights. xk, xv [B, H, T, d] -> [B, H, T]."""
    ln_w, ln_b = ln_weight.unsqueeze(1), ln_bias.unsqueeze(1)
    W1, b1, W2, b2 = state.weights()
    z2 = gelu_tanh(xk @ W1 + b1) @ W2 + b2
    target = layer_norm(xv - xk, ln_w, ln_b)
    return 0.5 * (layer_norm(z2, ln_w, ln_b) - target).pow(2).sum(-1)


@torch.no_grad()
def prequential_inner_loss(xq, xk, xv, lr, ln_weight, ln_bias, state: TTTState, mini_batch_size: int,
                           token_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, TTTState]:
    """The reconstruction error of each token *before* the memory has learned from it: the
    inner loss under the weights at the start of the token's mini-batch (the weights its own
    gradient is taken at). A memory that learns in context shows this falling along a sequence
    with repeated associations. Inputs as ``ttt_mlp``; returns ([B, H, T], final state).
    Samples must share ``pos % K`` (true for fresh states)."""
    K = mini_batch_size
    T = xq.shape[2]
    offsets = (state.pos % K).unique()
    if offsets.numel() != 1:
        raise ValueError("prequential_inner_loss needs every sample at the same mini-batch offset")
    losses = []
    t, p = 0, int(offsets.item())
    while t < T:
        n = min(K - p, T - t)
        sl = slice(t, t + n)
        losses.append(inner_loss_at_state(xk[:, :, sl], xv[:, :, sl], ln_weight, ln_bias, state))
        _, state = ttt_mlp(xq[:, :, sl], xk[:, :, sl], xv[:, :, sl], lr[:, :, sl], ln_weight, ln_bias,
                           state, K, token_idx, impl="dual")
        t, p = t + n, (p + n) % K
    return torch.cat(losses, dim=-1), state
