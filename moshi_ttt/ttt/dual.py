"""The dual (matrix) form of the TTT-MLP operator with an analytic backward.

At the shapes of a CPU-sized model the dual form costs far more than its arithmetic: autograd
records ~40 tiny ops per inner mini-batch and replays ~80 in backward, each a few microseconds of
dispatch. Here

* everything that does not depend on the sequentially updated fast weights is computed once per
  call, batched over all mini-batches (the target ``LN(xv - xk)``, the causal mask, the inner
  learning-rate columns, the split into mini-batches);
* the weight-dependent chain of one mini-batch is a single ``torch.autograd.Function``
  (``_MiniBatch``) whose backward is the chain rule written out (the same math as the Triton
  backward in ``kernels/backward.py``), using the intermediates kept by its forward;
* heads and samples share one batch dimension ``N = B * H`` so every product is one ``bmm``.

The math of a mini-batch (rows are tokens; ``M`` the causal mask, ``s`` the gelu):
    Z1k = Xk W1 + b1;  X2k = s(Z1k);  Z2k = X2k W2 + b2
    Gz2 = d/dZ2k 0.5 ||LN(Z2k) - Tg||^2;  Gz1 = (Gz2 W2^T) s'(Z1k);  P = lr * Gz
    Z1q = Xq W1 + b1 - eta (Xq G1 + g1 + (M (Xq Xk^T + 1)) P1);  X2q = s(Z1q)
    Z2q = X2q W2 + b2 - eta (X2q G2 + g2 + (M (X2q X2k^T + 1)) P2)
    S = G + (Xk^T P1, 1^T P1, X2k^T P2, 1^T P2); a closing mini-batch moves W to W - eta_last S.
The output ``xq + LN(Z2q)`` is again batched over the call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .state import TTTState

LN_EPS = 1e-6
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715

_MASKS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


_ONES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _one(like: torch.Tensor) -> torch.Tensor:
    """A cached ``[1, 1, 1]`` one: ``baddbmm(one, a, b)`` is ``a @ b + 1`` in one op."""
    key = (like.device, like.dtype)
    t = _ONES.get(key)
    if t is None:
        t = _ONES[key] = torch.ones(1, 1, 1, device=like.device, dtype=like.dtype)
    return t


def causal_mask(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[n, n]`` lower-triangular ones (token i sees j <= i), cached per (n, device, dtype)."""
    key = (n, device, dtype)
    m = _MASKS.get(key)
    if m is None:
        m = _MASKS[key] = torch.ones(n, n, device=device, dtype=dtype).tril()
    return m


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_vjp(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g * gelu'(x)`` in one op (aten's tanh-gelu derivative uses the exact sqrt(2/pi))."""
    return torch.ops.aten.gelu_backward(g, x, approximate="tanh")


_CONSTS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}


def _consts(like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """0-dim constants of the gelu derivatives in ``like``'s dtype (no per-op conversion):
    1, c, c a, 3 c a, 6 c a with c = sqrt(2/pi), a = 0.044715."""
    key = (like.device, like.dtype)
    t = _CONSTS.get(key)
    if t is None:
        c, a = _SQRT_2_OVER_PI, _GELU_C
        t = _CONSTS[key] = tuple(torch.tensor(v, device=like.device, dtype=like.dtype)
                                 for v in (1.0, c, c * a, 3 * c * a, 6 * c * a))
    return t


def _gelu_d2(x: torch.Tensor) -> torch.Tensor:
    """Second derivative of the tanh-approximated gelu. With ``u = c (x + a x^3)``,
    ``t = tanh(u)``, ``u' = c (1 + 3 a x^2)``: ``(1 - t^2) (c + 6 c a x^2 - x t u'^2)``."""
    one, c, ca, c3a, c6a = _consts(x)
    x2 = x * x
    t = torch.tanh(torch.addcmul(c, x2, ca).mul_(x))
    du = torch.addcmul(c, x2, c3a)
    r = (x * t).mul_(du).mul_(du)
    return torch.addcmul(one, t, t, value=-1.0).mul_(torch.addcmul(c, x2, c6a).sub_(r))


def _rowmean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(-1, keepdim=True)


def _tok_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the token rows: [N, n, c] -> [N, 1, c]."""
    return x.sum(1, keepdim=True)


def _mb_forward(xq, xk, c0, lr, eta, el, lw, W1, b1, W2, b2, sums, closes: bool, keep: bool):
    """One mini-batch of n tokens; shapes with N = B * H:

    xq, xk [N, n, d]; c0 = ln_bias - target [N, n, d]; lr [N, n, 1]; eta [1, n, 1] (token_idx of
    these positions); el: token_idx of the mini-batch's last position (0-dim); lw [N, 1, d];
    W1 [N, d, F], b1 [N, 1, F], W2 [N, F, d], b2 [N, 1, d]; sums: (G1, g1, G2, g2) of the same
    shapes or None when they are zero (a mini-batch that starts at its first position).
    Returns z2q [N, n, d], the new (W1, b1, W2, b2), the new sums (None when the mini-batch
    closes: they restart at zero) and, with ``keep``, the intermediates the backward needs.
    """
    n = xq.shape[1]
    mask = causal_mask(n, xq.device, xq.dtype)
    z1k = torch.baddbmm(b1, xk, W1)                                      # [N, n, F]
    x2k = _gelu(z1k)
    z2k = torch.baddbmm(b2, x2k, W2)                                     # [N, n, d]
    shape = z2k.shape[-1:]
    xh, mu, rstd = torch.native_layer_norm(z2k, shape, None, None, LN_EPS)
    q = torch.addcmul(c0, xh, lw)                                        # LN(z2k) - target
    gh = q * lw                                                          # d loss / d xh
    # gz2 = rstd (gh - mean(gh) - xh mean(gh xh)): layer norm's own backward applied to gh.
    gz2 = torch.ops.aten.native_layer_norm_backward(gh, z2k, shape, mu, rstd, None, None,
                                                    [True, False, False])[0]
    h1 = torch.bmm(gz2, W2.transpose(1, 2))                              # [N, n, F]
    gz1 = _gelu_vjp(h1, z1k)
    p1, p2 = gz1 * lr, gz2 * lr

    one = _one(xq)
    a1 = torch.baddbmm(one, xq, xk.transpose(1, 2)).mul_(mask)          # [N, n, n]
    in1 = torch.bmm(a1, p1)
    if sums is not None:
        in1 = in1 + torch.baddbmm(sums[1], xq, sums[0])
    z1q = torch.addcmul(torch.baddbmm(b1, xq, W1), eta, in1, value=-1.0)
    x2q = _gelu(z1q)
    a2 = torch.baddbmm(one, x2q, x2k.transpose(1, 2)).mul_(mask)
    in2 = torch.bmm(a2, p2)
    if sums is not None:
        in2 = in2 + torch.baddbmm(sums[3], x2q, sums[2])
    z2q = torch.addcmul(torch.baddbmm(b2, x2q, W2), eta, in2, value=-1.0)

    S = (torch.bmm(xk.transpose(1, 2), p1), _tok_sum(p1), torch.bmm(x2k.transpose(1, 2), p2), _tok_sum(p2))
    if sums is not None:
        S = tuple(s + g for s, g in zip(S, sums))
    if closes:
        new_w = tuple(w - el * s for w, s in zip((W1, b1, W2, b2), S))
        new_sums = None
    else:
        new_w, new_sums = (W1, b1, W2, b2), S
    saved = None
    if keep:
        saved = (xq, xk, lr, eta, el, lw, W1, W2, *(sums if sums is not None else ()),
                 z1k, x2k, xh, rstd, q, gh, gz2, h1, gz1, p1, p2, a1, in1, z1q, x2q, a2, in2, mask)
    return z2q, new_w, new_sums, S, saved


def _acc_mm(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``acc + alpha * a @ b`` (batched) in one op, where ``acc`` None stands for zero; alpha is 1 or -1."""
    if acc is None:
        out = torch.bmm(a, b)
        return out.neg_() if alpha == -1.0 else out
    return torch.baddbmm(acc, a, b, alpha=alpha)


def _acc_tok(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``acc + (sum of x over the token rows)``, where ``acc`` None stands for zero."""
    return _tok_sum(x) if acc is None else acc + _tok_sum(x)


def _readout_vjp(dz, x, y, W, a, p, in_, eta, mask, G, dW, db, dP, dY, dG, dg):
    """Backward of one layer of the dual-form readout, for either layer:

        Z = X W + b - eta * in,   in = X G + g + A P,   A = M (X Y^T + 1)

    (layer 1: X = Xq, Y = Xk; layer 2: X = X2q, Y = X2k), with X [N, n, c], W [N, c, c'],
    P, dz [N, n, c'], A [N, n, n], eta [1, n, 1]; G the carried sums or None (zero).
    Adds onto the gradients dW, db, dP, dY, dG, dg (None: zero so far) and returns
    ``(dX, dW, db, d_eta, dP, dY, dG, dg)``, with ``d_eta`` [N, n, 1] without its minus sign.
    """
    e = eta * dz
    xT = x.transpose(1, 2)
    dW = _acc_mm(dW, xT, dz)
    db = _acc_tok(db, dz)
    d_eta = (dz * in_).sum(-1, keepdim=True)
    dA = torch.bmm(e, p.transpose(1, 2)).mul_(mask)                      # = -dL/dA
    dP = _acc_mm(dP, a.transpose(1, 2), e, -1.0)
    dX = torch.baddbmm(torch.bmm(dz, W.transpose(1, 2)), dA, y, alpha=-1.0)
    dY = _acc_mm(dY, dA.transpose(1, 2), x, -1.0)
    if G is not None:
        dX = torch.baddbmm(dX, e, G.transpose(1, 2), alpha=-1.0)
        dG = _acc_mm(dG, xT, e, -1.0)
        dg = -_tok_sum(e) if dg is None else dg - _tok_sum(e)
    return dX, dW, db, d_eta, dP, dY, dG, dg


class _MiniBatch(torch.autograd.Function):
    """Autograd node of one mini-batch: inputs as ``_mb_forward``; outputs z2q, the four new
    weights and (when the mini-batch does not close) the four new sums."""

    @staticmethod
    def forward(ctx, xq, xk, c0, lr, eta, el, lw, W1, b1, W2, b2, G1, g1, G2, g2, closes: bool):
        has_sums = G1 is not None
        sums = (G1, g1, G2, g2) if has_sums else None
        z2q, new_w, new_sums, S, saved = _mb_forward(xq, xk, c0, lr, eta, el, lw, W1, b1, W2, b2, sums,
                                                     closes, keep=True)
        ctx.closes, ctx.has_sums = closes, has_sums
        # With ``closes`` the backward needs S (eta_last's gradient), else nothing more.
        ctx.save_for_backward(*saved, *(S if closes else ()))
        ctx.set_materialize_grads(False)
        # Outputs must not alias inputs (an unchanged weight is returned as a view-free copy).
        if not closes:
            new_w = tuple(w.clone() for w in new_w)
            return (z2q, *new_w, *new_sums)
        return (z2q, *new_w)

    @staticmethod
    def backward(ctx, dz2q, *dstate):
        closes, has_sums = ctx.closes, ctx.has_sums
        t = list(ctx.saved_tensors)
        xq, xk, lr, eta, el, lw, W1, W2 = t[:8]
        t = t[8:]
        G1 = g1 = G2 = g2 = None
        if has_sums:
            G1, g1, G2, g2 = t[:4]
            t = t[4:]
        (z1k, x2k, xh, rstd, q, gh, gz2, h1, gz1, p1, p2, a1, in1, z1q, x2q, a2, in2, mask) = t[:18]
        S = t[18:]
        bmm, baddbmm = torch.bmm, torch.baddbmm
        xkT, x2kT = xk.transpose(1, 2), x2k.transpose(1, 2)
        W1T, W2T = W1.transpose(1, 2), W2.transpose(1, 2)

        # ---- state outputs: direct weight gradients and the sums' gradient dS
        dW1, db1, dW2, db2 = dstate[:4]
        d_el = None
        if closes:  # W_end = W - el * S
            terms = [(dw * s).sum() for dw, s in zip(dstate[:4], S) if dw is not None]
            if terms:
                d_el = -torch.stack(terms).sum()
            dS = tuple(None if dw is None else dw * -el for dw in dstate[:4])
        else:
            dS = dstate[4:]
        dS1, ds1, dS2, ds2 = dS
        dG1, dg1, dG2, dg2 = dS if has_sums else (None,) * 4
        # S1 = G1 + Xk^T P1, s1 = g1 + 1^T P1, S2 = G2 + X2k^T P2, s2 = g2 + 1^T P2
        dP1 = dXk = dP2 = dX2k = None
        if dS1 is not None:
            dP1 = _acc_mm(ds1, xk, dS1)
            dXk = bmm(p1, dS1.transpose(1, 2))
        elif ds1 is not None:
            dP1 = ds1.expand_as(p1)
        if dS2 is not None:
            dP2 = _acc_mm(ds2, x2k, dS2)
            dX2k = bmm(p2, dS2.transpose(1, 2))
        elif ds2 is not None:
            dP2 = ds2.expand_as(p2)

        d_eta = dXq = None
        if dz2q is not None:
            # ---- the readouts, layer 2 then layer 1 (see _readout_vjp): Z2q from X2q (keys X2k),
            # Z1q from Xq (keys Xk); eta's gradient is the sum of both, with the minus sign.
            dX2q, dW2, db2, d_eta, dP2, dX2k, dG2, dg2 = _readout_vjp(
                dz2q, x2q, x2k, W2, a2, p2, in2, eta, mask, G2, dW2, db2, dP2, dX2k, dG2, dg2)
            dz1q = _gelu_vjp(dX2q, z1q)
            dXq, dW1, db1, d_eta1, dP1, dXk, dG1, dg1 = _readout_vjp(
                dz1q, xq, xk, W1, a1, p1, in1, eta, mask, G1, dW1, db1, dP1, dXk, dG1, dg1)
            d_eta = d_eta.add_(d_eta1).neg_()

        dc0 = dlw = dlr = None
        if dP1 is not None or dP2 is not None:
            if dP1 is None:
                dP1 = torch.zeros_like(p1)
            if dP2 is None:
                dP2 = torch.zeros_like(p2)
            # ---- P = lr * Gz
            dlr = (dP1 * gz1).sum(-1, keepdim=True).add_((dP2 * gz2).sum(-1, keepdim=True))
            dgz1 = dP1 * lr
            # ---- Gz1 = H1 * gelu'(Z1k), H1 = Gz2 W2^T
            dh1 = _gelu_vjp(dgz1, z1k)
            dgz2 = baddbmm(dP2 * lr, dh1, W2)
            dW2 = _acc_mm(dW2, dh1.transpose(1, 2), gz2)
            dz1k = (dgz1 * h1).mul_(_gelu_d2(z1k))
            # ---- Gz2 = rstd * (Gh - mean(Gh) - xh mean(Gh xh)), Gh = lw * q, q = lw xh + c0
            v = dgz2 * rstd
            vx = _rowmean(v * xh)
            dgh = torch.addcmul(v - _rowmean(v), xh, vx, value=-1.0)
            dq = dgh * lw
            dxh = torch.addcmul(dq * lw, v, _rowmean(gh * xh), value=-1.0).addcmul_(gh, vx, value=-1.0)
            dc0 = dq
            dlw = _tok_sum(torch.addcmul(dgh * q, dq, xh))
            # layer norm of z2k (xh = (z2k - mu) rstd); the rstd factor of Gz2 adds -xh mean(V Gz2)
            m2 = _rowmean(dxh * xh).add_(_rowmean(dgz2 * gz2))
            dz2k = torch.addcmul(dxh - _rowmean(dxh), xh, m2, value=-1.0).mul_(rstd)
            # ---- Z2k = X2k W2 + b2, X2k = gelu(Z1k), Z1k = Xk W1 + b1
            dX2k = _acc_mm(dX2k, dz2k, W2T)
            dW2 = baddbmm(dW2, x2kT, dz2k)
            db2 = _acc_tok(db2, dz2k)
            dz1k = dz1k.add_(_gelu_vjp(dX2k, z1k))
            dXk = _acc_mm(dXk, dz1k, W1T)
            dW1 = _acc_mm(dW1, xkT, dz1k)
            db1 = _acc_tok(db1, dz1k)
        if d_eta is not None:
            d_eta = d_eta.sum(0, keepdim=True)
        return (dXq, dXk, dc0, dlr, d_eta, d_el, dlw, dW1, db1, dW2, db2, dG1, dg1, dG2, dg2, None)


def dual_same_offset(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
                     ln_w: torch.Tensor, ln_b: torch.Tensor, state: TTTState, K: int,
                     token_idx: torch.Tensor, offset: int) -> tuple[torch.Tensor, TTTState]:
    """Dual form over T tokens for samples whose in-mini-batch offset is ``offset``.

    xq, xk, xv [B, H, T, d]; lr [B, H, T]; ln_w, ln_b [H, 1, d]; token_idx [K]; all in the state
    dtype. Returns out [B, H, T, d] and the new state.
    """
    B, H, T, d = xq.shape
    N = B * H
    # Mini-batch sizes: the rest of the current one, full ones, a trailing partial one.
    sizes = [min(K - offset, T)]
    while sum(sizes) < T:
        sizes.append(min(K, T - sum(sizes)))

    # Weight-independent, batched over the whole call.
    target = _layer_norm(xv - xk, ln_w, ln_b)
    c0 = (ln_b - target).reshape(N, T, d)                                # ln_bias - target
    lw = ln_w.expand(B, H, 1, d).reshape(N, 1, d)
    xq3, xk3 = xq.reshape(N, T, d), xk.reshape(N, T, d)
    lr3 = lr.reshape(N, T, 1)
    if len(sizes) > 1:
        xqs, xks, c0s, lrs = (t.split(sizes, 1) for t in (xq3, xk3, c0, lr3))
    else:
        xqs, xks, c0s, lrs = (xq3,), (xk3,), (c0,), (lr3,)
    tok = token_idx.view(1, K, 1)
    el = token_idx[K - 1]

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(N, *t.shape[2:])

    W = tuple(flat(t) for t in state.weights())
    sums = tuple(flat(t) for t in state.sums())
    use_fn = torch.is_grad_enabled()
    z2qs = []
    p = offset
    for i, n in enumerate(sizes):
        eta = tok if (p == 0 and n == K) else tok[:, p:p + n]
        closes = p + n == K
        s_in = sums if i == 0 else None   # later mini-batches start with zero sums
        if use_fn:
            outs = _MiniBatch.apply(xqs[i], xks[i], c0s[i], lrs[i], eta, el, lw, *W,
                                    *(s_in if s_in is not None else (None,) * 4), closes)
            z2q, W = outs[0], tuple(outs[1:5])
            sums = tuple(outs[5:9]) if not closes else None
        else:
            z2q, W, sums, _, _ = _mb_forward(xqs[i], xks[i], c0s[i], lrs[i], eta, el, lw, *W, s_in,
                                             closes, keep=False)
        z2qs.append(z2q)
        p = (p + n) % K
    z2q = torch.cat(z2qs, 1) if len(z2qs) > 1 else z2qs[0]
    out = xq + _layer_norm(z2q.view(B, H, T, d), ln_w, ln_b)
    if sums is None:
        sums = tuple(torch.zeros_like(w) for w in W)

    def unflat(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, H, *t.shape[1:])

    return out, TTTState(*(unflat(t) for t in W), *(unflat(t) for t in sums), pos=state.pos + T)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LN over the last dim with per-head affine: x [B, H, T, d]; weight, bias [H, 1, d]."""
    return torch.addcmul(bias, F.layer_norm(x, x.shape[-1:], eps=LN_EPS), weight)
