"""The TTT-MLP operator: the functional core (DESIGN.md section 3).

Public contract::

    init_state(W1, b1, W2, b2, batch_size) -> TTTState
    ttt_mlp(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx=None)
        -> (out, new_state)

Per head, with ``LN`` a layer norm over the head dim (biased variance, eps inside the sqrt)
followed by ``w * . + b`` and ``f_W(x) = gelu_tanh(x W1 + b1) W2 + b2``:

* target ``y_j = LN(xv_j - xk_j)``; inner loss ``l_j(W) = 0.5 || LN(f_W(xk_j)) - y_j ||^2``;
* tokens are grouped in mini-batches of ``K = mini_batch_size`` by their position since the last
  reset (``state.pos``), never by how the sequence was split into calls;
* in a mini-batch starting at ``W0``, token ``i`` uses
  ``W_i = W0 - token_idx[i] * sum_{j <= i} lr_j grad l_j(W0)`` and outputs
  ``out_i = xq_i + LN(f_{W_i}(xq_i))``; at the end of a full mini-batch the state becomes ``W_{K-1}``.

Implementations here (PyTorch), which agree:
* the dual (matrix) form for sequences (training, prefill): one autograd node per inner
  mini-batch with an analytic backward (``dual.py``; ``impl="dual_autograd"`` is the same form
  differentiated op by op, kept as a cross-check);
* the per-token form, for streaming (one frame at a time, per-sample mini-batch offsets), and its
  no-grad in-place twin ``ttt_mlp_step_`` (the state is updated where it lies, no host sync: the
  torch counterpart of the fused streaming kernel; bit-identical to the per-token form).
Outer gradients reach every input and the state. The oracle they are tested against is
``moshi_ttt.ttt.reference`` (float64, autograd inner loop). The fused Triton kernels
(``moshi_ttt.ttt.kernels``) are a sibling that this module does not import; ``dispatch.py`` chooses.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from .dual import dual_same_offset
from .state import TTTState, init_state

__all__ = ["init_state", "ttt_mlp", "ttt_mlp_dual", "ttt_mlp_dual_autograd", "ttt_mlp_token", "ttt_mlp_step_",
           "default_token_idx",
           "LN_EPS"]

LN_EPS = 1e-6
# Exact constant: the rounded 0.79788456 of the reference repos drifts float64 checks by 1e-9.
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


# ----------------------------------------------------------------------------- primitives
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the tanh-approximated gelu, analytic."""
    inner = _SQRT_2_OVER_PI * (x + _GELU_C * x.pow(3))
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * x * x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = LN_EPS) -> torch.Tensor:
    """Layer norm over the last dim. x [..., H, n, d]; weight, bias [H, 1, d] (broadcast)."""
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return weight * ((x - mu) / torch.sqrt(var + eps)) + bias


def ln_l2_grad(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = LN_EPS) -> torch.Tensor:
    """Gradient of ``0.5 || LN(z) - target ||^2`` with respect to ``z`` (analytic)."""
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).pow(2).mean(-1, keepdim=True)
    std = torch.sqrt(var + eps)
    xhat = (z - mu) / std
    g = (weight * xhat + bias - target) * weight  # d loss / d xhat
    return (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) / std


_TOKEN_IDX: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def default_token_idx(mini_batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``1 / (i + 1)`` for i in [0, K): token i of a mini-batch averages the gradients so far.

    A constant, cached per (K, device, dtype): treat the result as read-only."""
    key = (mini_batch_size, torch.device(device or "cpu"), dtype)
    t = _TOKEN_IDX.get(key)
    if t is None:
        t = _TOKEN_IDX[key] = 1.0 / torch.arange(1, mini_batch_size + 1, device=device, dtype=dtype)
    return t


def _check_shapes(xq, xk, xv, lr, ln_weight, ln_bias, state: TTTState, K: int, token_idx) -> None:
    if xq.dim() != 4 or xq.shape != xk.shape or xq.shape != xv.shape:
        raise ValueError(f"xq, xk, xv must be [B, H, T, d] of one shape, got "
                         f"{tuple(xq.shape)}, {tuple(xk.shape)}, {tuple(xv.shape)}")
    B, H, T, d = xq.shape
    if T < 1:
        raise ValueError("ttt_mlp needs T >= 1")
    if tuple(lr.shape) != (B, H, T):
        raise ValueError(f"lr must be [B, H, T] = {(B, H, T)}, got {tuple(lr.shape)}")
    if tuple(ln_weight.shape) != (H, d) or tuple(ln_bias.shape) != (H, d):
        raise ValueError(f"ln_weight/ln_bias must be [H, d] = {(H, d)}, got "
                         f"{tuple(ln_weight.shape)}, {tuple(ln_bias.shape)}")
    if state.W1.shape[:3] != (B, H, d):
        raise ValueError(f"state.W1 must be [B, H, d, F] with (B, H, d) = {(B, H, d)}, "
                         f"got {tuple(state.W1.shape)}")
    if K < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {K}")
    if token_idx is not None and tuple(token_idx.shape) != (K,):
        raise ValueError(f"token_idx must be [mini_batch_size] = [{K}], got {tuple(token_idx.shape)}")


def _in_state_dtype(xq: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, K: int,
                    token_idx: torch.Tensor | None) -> tuple[torch.dtype, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compute dtype (the state's, e.g. fp32 under a bf16 model) and, in it, token_idx [K]
    (default ``1/(i+1)``) and the inner layer-norm affine as [H, 1, d] (broadcast over tokens)."""
    dt = state.W1.dtype
    if token_idx is None:
        token_idx = default_token_idx(K, device=xq.device, dtype=dt)
    return dt, token_idx.to(dt), ln_weight.unsqueeze(1).to(dt), ln_bias.unsqueeze(1).to(dt)


# ----------------------------------------------------------------------------- dual form
def _dual_segment(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
    ln_w: torch.Tensor, ln_b: torch.Tensor, state: TTTState, eta: torch.Tensor, eta_last: torch.Tensor,
    closes: bool,
) -> tuple[torch.Tensor, TTTState]:
    """n tokens that all lie in one inner mini-batch, for samples sharing the same offset in it.

    xq, xk, xv [B, H, n, d]; lr [B, H, n]; ln_w, ln_b [H, 1, d]; eta [n] (token_idx of these
    positions); eta_last: token_idx of the mini-batch's last position; closes: the segment ends the
    mini-batch (the state then moves to W_{K-1} and the sums restart at zero).
    """
    W1, b1, W2, b2 = state.weights()
    gW1, gb1, gW2, gb2 = state.sums()

    # Inner gradients of every token's loss at the mini-batch-start weights W0.
    z1k = xk @ W1 + b1                                   # [B, H, n, F]
    x2k = gelu_tanh(z1k)
    z2k = x2k @ W2 + b2                                  # [B, H, n, d]
    target = layer_norm(xv - xk, ln_w, ln_b)             # LN(xv - xk), docs/DESIGN.md section 3
    gz2 = ln_l2_grad(z2k, target, ln_w, ln_b)            # [B, H, n, d]
    gz1 = (gz2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(z1k)  # [B, H, n, F]

    n = xq.shape[2]
    lr_col = lr.unsqueeze(-2)                             # [B, H, 1, n]: weight of source token j
    eta_row = eta.view(n, 1)                              # [n, 1]: scale of target token i
    causal = torch.ones(n, n, dtype=torch.bool, device=xq.device).tril()

    # Layer 1 at W_i, for every i at once (causal: token i sees j <= i).
    a1 = torch.where(causal, (xq @ xk.transpose(-1, -2) + 1.0) * lr_col, 0.0)
    z1q = xq @ W1 + b1 - eta_row * (xq @ gW1 + gb1 + a1 @ gz1)
    x2q = gelu_tanh(z1q)
    a2 = torch.where(causal, (x2q @ x2k.transpose(-1, -2) + 1.0) * lr_col, 0.0)
    z2q = x2q @ W2 + b2 - eta_row * (x2q @ gW2 + gb2 + a2 @ gz2)
    out = xq + layer_norm(z2q, ln_w, ln_b)

    # Running sums of lr_j * grad l_j over the mini-batch so far.
    lr_e = lr.unsqueeze(-1)
    gz1_lr, gz2_lr = gz1 * lr_e, gz2 * lr_e
    gW1 = gW1 + xk.transpose(-1, -2) @ gz1_lr
    gb1 = gb1 + gz1_lr.sum(-2, keepdim=True)
    gW2 = gW2 + x2k.transpose(-1, -2) @ gz2_lr
    gb2 = gb2 + gz2_lr.sum(-2, keepdim=True)

    pos = state.pos + n
    if closes:
        W1, b1 = W1 - eta_last * gW1, b1 - eta_last * gb1
        W2, b2 = W2 - eta_last * gW2, b2 - eta_last * gb2
        gW1, gb1, gW2, gb2 = (torch.zeros_like(t) for t in (gW1, gb1, gW2, gb2))
    return out, TTTState(W1, b1, W2, b2, gW1, gb1, gW2, gb2, pos)


def _dual_same_offset(xq, xk, xv, lr, ln_w, ln_b, state: TTTState, K: int, token_idx: torch.Tensor,
                      offset: int) -> tuple[torch.Tensor, TTTState]:
    """Dual form over T tokens for samples whose in-mini-batch offset is ``offset``."""
    T = xq.shape[2]
    outs = []
    t, p = 0, offset
    while t < T:
        n = min(K - p, T - t)
        sl = slice(t, t + n)
        out, state = _dual_segment(
            xq[:, :, sl], xk[:, :, sl], xv[:, :, sl], lr[:, :, sl], ln_w, ln_b, state,
            token_idx[p:p + n], token_idx[K - 1], closes=(p + n == K),
        )
        outs.append(out)
        t += n
        p = (p + n) % K
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0], state


def _by_offset(fn, xq, xk, xv, lr, state: TTTState, K: int, **kw) -> tuple[torch.Tensor, TTTState]:
    """Run ``fn`` per group of samples that share ``pos % K`` (samples reset at different times
    have different mini-batch boundaries). One group (the usual case) costs no indexing."""
    offsets = (state.pos % K).tolist()
    groups: dict[int, list[int]] = {}
    for b, o in enumerate(offsets):
        groups.setdefault(o, []).append(b)
    if len(groups) == 1:
        return fn(xq, xk, xv, lr, state=state, offset=offsets[0], **kw)
    out = torch.empty_like(xq)
    pieces: list[tuple[torch.Tensor, TTTState]] = []
    for o, members in groups.items():
        idx = torch.tensor(members, device=xq.device)
        o_out, o_state = fn(xq[idx], xk[idx], xv[idx], lr[idx], state=state.index(idx), offset=o, **kw)
        out = out.index_copy(0, idx, o_out)
        pieces.append((idx, o_state))
    new = state
    for idx, o_state in pieces:
        new = TTTState(**{name: t.index_copy(0, idx, getattr(o_state, name)) for name, t in new.items()})
    return out, new


def _dual_impl(xq, xk, xv, lr, ln_weight, ln_bias, state: TTTState, mini_batch_size: int,
               token_idx: torch.Tensor | None, same_offset) -> tuple[torch.Tensor, TTTState]:
    K = mini_batch_size
    _check_shapes(xq, xk, xv, lr, ln_weight, ln_bias, state, K, token_idx)
    dt, token_idx, ln_w, ln_b = _in_state_dtype(xq, ln_weight, ln_bias, state, K, token_idx)
    out, new = _by_offset(
        lambda q, k, v, r, state, offset: same_offset(q, k, v, r, ln_w, ln_b, state, K, token_idx, offset),
        xq.to(dt), xk.to(dt), xv.to(dt), lr.to(dt), state, K,
    )
    return out.to(xq.dtype), new


def ttt_mlp_dual(xq, xk, xv, lr, ln_weight, ln_bias, state: TTTState, mini_batch_size: int,
                 token_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, TTTState]:
    """Dual (matrix) form with one autograd node per inner mini-batch and an analytic backward
    (``dual.py``); same contract as ``ttt_mlp``."""
    return _dual_impl(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx,
                      dual_same_offset)


def ttt_mlp_dual_autograd(xq, xk, xv, lr, ln_weight, ln_bias, state: TTTState, mini_batch_size: int,
                          token_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, TTTState]:
    """The dual form written op by op and differentiated by autograd (slow at small shapes: kept
    as an independent cross-check of ``ttt_mlp_dual``'s analytic backward); same contract."""
    return _dual_impl(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx,
                      _dual_same_offset)


# ----------------------------------------------------------------------------- per-token form
def ttt_mlp_token(xq, xk, xv, lr, ln_weight, ln_bias, state: TTTState, mini_batch_size: int,
                  token_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, TTTState]:
    """Per-token form (streaming); same contract as ``ttt_mlp``.

    One token per sample at a time: the gradient at the mini-batch-start weights W0 is added to
    the running sums, the token is read out with ``W0 - token_idx[p] * sums``, and samples whose
    mini-batch ends here move W0 forward. Each sample has its own offset ``p = pos % K``.
    """
    K = mini_batch_size
    _check_shapes(xq, xk, xv, lr, ln_weight, ln_bias, state, K, token_idx)
    dt, token_idx, ln_w, ln_b = _in_state_dtype(xq, ln_weight, ln_bias, state, K, token_idx)
    B, H, T, d = xq.shape
    outs = []
    for t in range(T):
        out, state = _token_step(xq[:, :, t:t + 1].to(dt), xk[:, :, t:t + 1].to(dt),
                                 xv[:, :, t:t + 1].to(dt), lr[:, :, t:t + 1].to(dt),
                                 ln_w, ln_b, state, K, token_idx)
        outs.append(out)
    out = torch.cat(outs, dim=2) if T > 1 else outs[0]
    return out.to(xq.dtype), state


def _token_grads(xk, xv, lr, lw2, W1, b1, W2, b2):
    """Inner gradient of one token per row at the mini-batch-start weights, lr folded in.

    xk, xv [N, 1, d]; lr [N, 1, 1]; lw2 = ln_weight^2 [N, 1, d]; W* [N, ...] (N = B * H).
    Returns x2k [N, 1, F] and lr * dl/dz1 [N, 1, F], lr * dl/dz2 [N, 1, d].
    ``LN(z) - LN(xv - xk)`` with a shared affine is ``w * (xhat - xhat_target)``: the bias cancels.
    """
    z1k = torch.baddbmm(b1, xk, W1)
    x2k = gelu_tanh(z1k)
    z2k = torch.baddbmm(b2, x2k, W2)
    shape = z2k.shape[-1:]
    xh, mu, rstd = torch.native_layer_norm(z2k, shape, None, None, LN_EPS)
    gh = (xh - F.layer_norm(xv - xk, shape, eps=LN_EPS)) * lw2
    # d/dz of 0.5 ||LN(z) - target||^2 is layer norm's own backward applied to gh.
    gz2 = torch.ops.aten.native_layer_norm_backward(gh, z2k, shape, mu, rstd, None, None,
                                                    [True, False, False])[0] * lr
    gz1 = torch.ops.aten.gelu_backward(torch.bmm(gz2, W2.transpose(1, 2)), z1k, approximate="tanh")
    return x2k, gz1, gz2


def ln_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``layer_norm`` through aten's fused op: x [..., n, d]; weight, bias [H, 1, d]."""
    return torch.addcmul(bias, F.layer_norm(x, x.shape[-1:], eps=LN_EPS), weight)


def _token_readout(xq, eta, W1, b1, W2, b2, S1, s1, S2, s2):
    """Pre-norm output of one token per row with ``W_t = W0 - eta * S``, S the running sums with
    the token's own gradient already added. xq [N, 1, d]; eta [N or 1, 1, 1]; W*, S* [N, ...]
    (N = B * H). Returns z2q [N, 1, d]. (Forming W_t costs four weight-sized ops, fewer than
    the dual form's expansion ``x W0 - eta (x G + (x . x_k + 1) * own gradient)`` at one token.)"""
    x2q = gelu_tanh(torch.baddbmm(torch.addcmul(b1, eta, s1, value=-1.0), xq,
                                  torch.addcmul(W1, eta, S1, value=-1.0)))
    return torch.baddbmm(torch.addcmul(b2, eta, s2, value=-1.0), x2q, torch.addcmul(W2, eta, S2, value=-1.0))


def _flat_state(state: TTTState, N: int, cache: bool = False) -> tuple[list, list]:
    """The state's weights and sums as ``[N, ...]`` views (N = B * H). With ``cache`` the views
    are kept on the state object and reused while it holds the same tensors (streaming updates
    them in place, so the views stay valid)."""
    tensors = (state.W1, state.b1, state.W2, state.b2, state.gW1, state.gb1, state.gW2, state.gb2)
    key = tuple(map(id, tensors))
    hit = getattr(state, "_flat_views", None) if cache else None
    if hit is not None and hit[0] == key:
        views = hit[1]
    else:
        views = [t.reshape(N, *t.shape[2:]) for t in tensors]
        # Only views (never copies) may be reused: the step writes through them.
        if cache and all(v.data_ptr() == t.data_ptr() for v, t in zip(views, tensors)):
            state._flat_views = (key, views, tensors)  # the tensors too: ids stay unique while alive
    return views[:4], views[4:]


def _flat_step_inputs(xq, xk, xv, lr, ln_w, state: TTTState, K: int, token_idx: torch.Tensor,
                      cache: bool = False):
    """[B, H, 1, .] inputs and the state as [N, ...] views; eta, closing flags per sample.

    ``closes`` is [B, 1, 1, 1] bool, or a Python bool when every sample is at the same position
    and that was read for free (CPU, ``cache``: the in-place step): one slice instead of index ops."""
    B, H, _, d = xq.shape
    N = B * H
    lw2 = ln_w * ln_w                                              # [H, 1, d]
    same = None
    if cache and xq.device.type == "cpu":  # reading the positions costs nothing on CPU
        p_host = state.pos.tolist()
        if all(p == p_host[0] for p in p_host):
            same = p_host[0] % K
    if same is not None:
        eta, closes = token_idx[same:same + 1].view(1, 1, 1), same == K - 1
    else:
        p = state.pos % K                                          # [B]
        closes = (p == K - 1).view(B, 1, 1, 1)
        eta = token_idx[p]                                         # [B]
        eta = eta.view(1, 1, 1) if B == 1 else eta.view(B, 1).expand(B, H).reshape(N, 1, 1)
    if B > 1:  # [N, 1, .], sample-major
        if same is not None:
            eta = eta.expand(N, 1, 1)
        lw2 = lw2.repeat(B, 1, 1)
    W, G = _flat_state(state, N, cache)
    return (xq.reshape(N, 1, d), xk.reshape(N, 1, d), xv.reshape(N, 1, d), lr.reshape(N, 1, 1), lw2, eta,
            closes, W, G)


def _token_step(xq, xk, xv, lr, ln_w, ln_b, state: TTTState, K: int, token_idx: torch.Tensor):
    """One token, functional (autograd): xq, xk, xv [B, H, 1, d], lr [B, H, 1]; ln_w, ln_b [H, 1, d]."""
    B, H, _, d = xq.shape
    xq3, xk3, xv3, lr3, lw2, eta, closes, W, G = _flat_step_inputs(xq, xk, xv, lr, ln_w, state, K, token_idx)
    x2k, gz1, gz2 = _token_grads(xk3, xv3, lr3, lw2, *W)
    sums = (torch.baddbmm(G[0], xk3.transpose(1, 2), gz1), G[1] + gz1,
            torch.baddbmm(G[2], x2k.transpose(1, 2), gz2), G[3] + gz2)
    z2q = _token_readout(xq3, eta, *W, *sums)
    out = xq + ln_affine(z2q.view(B, H, 1, d), ln_w, ln_b)
    sums = [s.view(B, H, *s.shape[1:]) for s in sums]
    # A closing sample moves W0 to W_{K-1} and restarts its sums (same ops as the in-place step).
    negc = -(closes.to(xq.dtype) * token_idx[K - 1])
    keep = (~closes).to(xq.dtype)
    weights = [torch.addcmul(w, s, negc) for w, s in zip(state.weights(), sums)]
    return out, TTTState(*weights, *(s * keep for s in sums), state.pos + 1)


def ttt_mlp_step_(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
                  ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, mini_batch_size: int,
                  token_idx: torch.Tensor | None = None, exec_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One streaming token per sample, no autograd, the state updated in place.

    xq, xk, xv [B, H, 1, d]; lr [B, H, 1]; ln_weight, ln_bias [H, d]. Samples whose
    ``exec_mask`` [B] is False keep their state exactly (their output is computed all the same).
    Same values as ``ttt_mlp_token`` (bit for bit), with no host sync and no new state tensors:
    the torch counterpart of the fused streaming kernel, for CPU and for GPUs without it.
    Returns out [B, H, 1, d] (dtype of xq).
    """
    if torch.is_grad_enabled():  # (a decorator would cost its context switch on every frame)
        with torch.no_grad():
            return ttt_mlp_step_(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx,
                                 exec_mask)
    K = mini_batch_size
    dt, token_idx, ln_w, ln_b = _in_state_dtype(xq, ln_weight, ln_bias, state, K, token_idx)
    B, H, _, d = xq.shape
    xq_, xk_, xv_, lr_ = (t if t.dtype == dt else t.to(dt) for t in (xq, xk, xv, lr))
    xq3, xk3, xv3, lr3, lw2, eta, closes, W, G = _flat_step_inputs(xq_, xk_, xv_, lr_, ln_w, state, K, token_idx,
                                                                   cache=True)
    x2k, gz1, gz2 = _token_grads(xk3, xv3, lr3, lw2, *W)
    step = 1
    on_cpu = xq.device.type == "cpu"
    if on_cpu and exec_mask is not None and bool(exec_mask.all()):
        exec_mask = None  # CPU: reading the mask is free, and all-true is the usual case
    xkT, x2kT = xk3.transpose(1, 2), x2k.transpose(1, 2)
    if exec_mask is None:  # the sums take the token's gradient in place; the readout uses them
        G[0].baddbmm_(xkT, gz1)
        G[1].add_(gz1)
        G[2].baddbmm_(x2kT, gz2)
        G[3].add_(gz2)
        z2q = _token_readout(xq3, eta, *W, *G)
    else:  # a sample that does not execute is read out all the same, but adds nothing and does not close
        S = (torch.baddbmm(G[0], xkT, gz1), G[1] + gz1, torch.baddbmm(G[2], x2kT, gz2), G[3] + gz2)
        z2q = _token_readout(xq3, eta, *W, *S)
        ex = exec_mask.to(device=xq.device)
        e = ex.view(B, 1, 1, 1).expand(B, H, 1, 1).reshape(B * H, 1, 1)
        for g, s_new in zip(G, S):
            g.copy_(torch.where(e, s_new, g))
        closes = ex.view(B, 1, 1, 1) & closes
        step = ex.long()
    out = xq_ + ln_affine(z2q.view(B, H, 1, d), ln_w, ln_b)
    # On CPU reading a flag costs nothing (no device to wait for): skip the K - 1 of K steps
    # where no sample closes. Elsewhere the update always runs (no host sync, CUDA graphs).
    if closes is True:  # every sample closes (a Python bool: positions read on CPU)
        eta_last = token_idx[K - 1]
        for w, s in zip(state.weights(), state.sums()):
            w.addcmul_(s, eta_last, value=-1.0)
            s.zero_()
    elif closes is not False and (not on_cpu or bool(closes.any())):
        negc = -(closes.to(dt) * token_idx[K - 1])
        keep = (~closes).to(dt)
        for w, s in zip(state.weights(), state.sums()):
            w.addcmul_(s, negc)
            s.mul_(keep)
    state.pos.add_(step)
    return out if out.dtype == xq.dtype else out.to(xq.dtype)


# ----------------------------------------------------------------------------- the operator
def ttt_mlp(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
            ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, mini_batch_size: int,
            token_idx: torch.Tensor | None = None, *,
            impl: Literal["auto", "dual", "dual_autograd", "token"] = "auto",
            ) -> tuple[torch.Tensor, TTTState]:
    """Run the TTT-MLP operator over ``T >= 1`` tokens, continuing from ``state`` (PyTorch forms).

    Args:
        xq, xk, xv: [B, H, T, d] inner queries, keys, values.
        lr: [B, H, T] per-token inner learning rate (already scaled, >= 0).
        ln_weight, ln_bias: [H, d] inner layer-norm affine parameters.
        state: the per-sample state (``init_state`` or a previous call's ``new_state``).
        mini_batch_size: K, tokens per inner step.
        token_idx: [K] step-size multipliers per mini-batch position; default ``1/(i+1)``.
        impl: "dual" (matrix form, analytic backward), "dual_autograd" (the same, differentiated
            by autograd), "token" (per-token), or "auto": token for T == 1, dual otherwise.
            The Triton kernels are a sibling of this module, chosen above both by
            ``moshi_ttt.ttt.dispatch`` (``ttt_mlp(..., kernels=...)``).
    Returns:
        out [B, H, T, d] (dtype of xq) and the new state; the input state is not modified.
    """
    if impl == "auto":
        impl = "token" if xq.shape[2] == 1 else "dual"
    if impl == "dual":
        return ttt_mlp_dual(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx)
    if impl == "dual_autograd":
        return ttt_mlp_dual_autograd(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx)
    if impl == "token":
        return ttt_mlp_token(xq, xk, xv, lr, ln_weight, ln_bias, state, mini_batch_size, token_idx)
    raise ValueError(f"unknown impl {impl!r}; use 'auto', 'dual', 'dual_autograd' or 'token' "
                     "(the Triton kernels: moshi_ttt.ttt.dispatch.ttt_mlp)")
