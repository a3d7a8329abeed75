"""Fused backward of the TTT-MLP operator (Triton): analytic reverse pass with recomputation.

Organisation
------------
* Grid: one program per (sample, head), like the forward. Mini-batches are processed in reverse.
* Memory: the forward kept only the fast weights at the start of every ``CK``-th mini-batch
  (checkpoints, ``[B, H, NC, ...]``). For each checkpoint group, last group first, the program
  recomputes the start weights of the group's mini-batches with the forward's own routine
  (``_mb_forward`` without outputs) into a per-program buffer of ``CK`` states, then runs the
  mini-batches backwards. Activation memory is O(T x width) for the inputs and their gradients,
  plus ``NC + CK`` states per (sample, head) (``CK ~ sqrt(#mini-batches)`` by default), plus a
  per-program scratch of six ``[F, BK]`` tiles. At 7B width (T=3000, B=1: 188 mini-batches,
  CK=14, NC=14) that is 28 x 16 MiB of states: ~0.45 GiB, against ~18 GiB for autograd through
  the PyTorch dual form.
* Gradients w.r.t. the fast weights flow backwards through the mini-batches in an fp32
  accumulator (the ``dW*`` buffers: on entry the gradients of the output state's weights, on exit
  those of the input state's weights, i.e. of ``init_state``'s output).

Per mini-batch (the forward, with rows i, j; ``P = lr * grad``; ``M`` the causal mask):
    Z1k = Xk W1 + b1;  X2k = gelu(Z1k);  Z2k = X2k W2 + b2;  Tg = LN(Xv - Xk)
    Gz2 = dLN-l2(Z2k, Tg);  P2 = lr Gz2;  Gz1 = (Gz2 W2^T) gelu'(Z1k);  P1 = lr Gz1
    A1 = M (Xq Xk^T + 1);  Z1q = Xq W1 + b1 - eta (Xq G1 + g1 + A1 P1);  X2q = gelu(Z1q)
    A2 = M (X2q X2k^T + 1); Z2q = X2q W2 + b2 - eta (X2q G2 + g2 + A2 P2);  out = Xq + LN(Z2q)
    S = G + (Xk^T P1, 1^T P1, X2k^T P2, 1^T P2);  end weights W - eta_last S if the mini-batch
    closes, else (W, S) are the call's output state.
the backward below is the chain rule of exactly these lines (written row-major here; the
kernel works on the transposed, feature-major tiles like the forward), pass by pass over hidden
tiles:
    pass A: recompute Z1k (kept in scratch), Z2k, Gz2;
    pass B: Gz1, Z1q (scratch), layer-2 readout, and every term that needs the gradient of the
            sums S (read from the weight-gradient accumulator before it is modified; the
            token_idx[K-1] gradient -<dW_end, S> is formed without materialising S);
    pass C: output path through layer 1 (dZ1q), gradients of P1, lr, eta, first part of dW;
    pass D: the inner-gradient path back to Z1k (gelu'' term), rest of dW.
Then the layer norms' and the target's backward (recomputed from Xv, Xk and Z2k).
All arithmetic is in the state dtype (fp32; fp64 in interpreter tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LN_EPS,
    _add_dot,
    _add_rowsum,
    _bh_offset,
    _gelu,
    _gelu_d1,
    _gelu_d2,
    _head_ln,
    _ln_affine,
    _ln_l2_grad,
    _ln_l2_grad_vjp,
    _ln_norm,
    _ln_norm_bwd,
    _load_tokens,
    _mb_constants,
    _mb_inner_grad,
    _mb_tokens,
    _program,
    _scratch_offsets,
    _slot,
    _tile_offsets,
)
from .forward import _copy_weights, _mb_forward, block_rows, num_mini_batches_max


@triton.jit
def _mb_backward(xq, xk, xv_ptr, t, valid, stride_t, lr, eta, eta_last, dout, causal, lnw, lnb,
                 W1, b1, W2, b2, G1, g1, G2, g2,
                 dW1, db1, dW2, db2, dS1, ds1, dS2, ds2, dG1, dg1, dG2, dg2,
                 scr, first, closes, opens,
                 BK: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                 EPS: tl.constexpr, PREC: tl.constexpr):
    """Backward of one mini-batch of one head; feature-major tiles ([features, tokens]).

    xq, xk, dout [D, BK]; xv is re-read from ``xv_ptr`` (tokens t, mask valid, token stride
    stride_t) where it is needed rather than held across the passes; lr, eta [BK];
    causal [BK, BK] (``[j, i] = i >= j``); W*/b* the mini-batch-start weights (row-major
    W1 [D, F], W2 [F, D]); G* the carried sums (read when ``first``). dW*/db* (in/out): gradient
    of the end weights on entry, of the start weights on exit. dS*/ds*: gradient of the call's
    output sums (used when ``opens``: the mini-batch does not close). dG*/dg* (out, when
    ``first``): gradient of the carried sums. scr: scratch of six [F, BK] slots.
    Returns (dxq, dxk, dxv [D, BK], dlr [BK], deta [BK] (without eta_last's term), deta_last,
    dlnw, dlnb [D]).
    Names follow the module docstring, transposed: a1[j, i] = M (xk_j . xq_i + 1); mb1[j, i] =
    M (p1_j . e1_i) with e = eta * dZ; every W1 tile is handled as W1^T [BF, D].
    """
    CT = xq.dtype
    cd = tl.arange(0, D)
    cf = tl.arange(0, BF)
    lrr = lr[None, :]
    etr = eta[None, :]
    SZ = F * BK
    Z1K = scr
    GZ1 = scr + SZ
    Z1Q = scr + 2 * SZ
    DP1 = scr + 3 * SZ
    DGZ1 = scr + 4 * SZ
    DX2K = scr + 5 * SZ

    # ---- target (recomputed at the end rather than held across the passes), pass A: Z1k (kept
    # in scratch), Z2k, Gz2 -- the forward's own first steps
    xv = _load_tokens(xv_ptr, t, valid, stride_t, D, CT)
    z2k, gz2, p2, a1 = _mb_inner_grad(xq, xk, xv, lr, causal, lnw, lnb, W1, b1, W2, b2, Z1K,
                                      BK, D, F, BF, EPS, PREC, True)
    tl.debug_barrier()

    # ---- pass B: Gz1, Z1q, layer-2 readout; everything that needs dS (read dW before it changes)
    z2q = tl.zeros([D, BK], dtype=CT)
    ext2 = tl.zeros([D, BK], dtype=CT)   # Z2q = W2^T X2q + b2 - eta * ext2
    a2 = tl.zeros([BK, BK], dtype=CT)
    dp2 = tl.zeros([D, BK], dtype=CT)
    dxk = tl.zeros([D, BK], dtype=CT)
    dlast = tl.sum(tl.zeros([BK], dtype=CT), axis=0)
    for f0 in range(0, F, BF):
        o1, o2 = _tile_offsets(f0, D, F, BF)             # W1^T tile, W2 tile [BF, D]
        so = _scratch_offsets(f0, BF, BK)                # scratch tile [BF, BK]
        w1t = tl.load(W1 + o1)
        w2 = tl.load(W2 + o2)
        x2k, gp = _gelu_d1(tl.load(Z1K + so))
        gz1 = tl.dot(w2, gz2, input_precision=PREC) * gp
        tl.store(GZ1 + so, gz1)
        p1 = lrr * gz1
        ext1 = tl.dot(p1, a1, input_precision=PREC)
        if first:
            ext1 += tl.dot(tl.load(G1 + o1), xq, input_precision=PREC) + tl.load(g1 + f0 + cf)[:, None]
        z1q = tl.dot(w1t, xq, input_precision=PREC) + tl.load(b1 + f0 + cf)[:, None] - etr * ext1
        tl.store(Z1Q + so, z1q)
        x2q = _gelu(z1q)
        z2q += tl.dot(tl.trans(w2), x2q, input_precision=PREC)
        a2 += tl.dot(tl.trans(x2k), x2q, input_precision=PREC)
        if first:
            ext2 += tl.dot(tl.trans(tl.load(G2 + o2)), x2q, input_precision=PREC)
        # Gradient dS of this mini-batch's sums S1 = G1 + Xk^T P1, s1 = g1 + 1^T P1,
        # S2 = G2 + X2k^T P2: through the end weights (closes: W_end = W - eta_last S) or directly
        # (opens: S is the call's output state). Masked-off loads read nothing.
        # d eta_last = -<dW_end, S>, without forming S: <dWe1, Xk^T P1> = sum(P1 * (dWe1 Xk)).
        dwe1 = tl.load(dW1 + o1, mask=closes, other=0.0)                       # [BF, D]
        y1 = tl.dot(dwe1, xk, input_precision=PREC)                             # [BF, BK]
        dbe1 = tl.load(db1 + f0 + cf, mask=closes, other=0.0)
        dsb1 = tl.load(ds1 + f0 + cf, mask=opens, other=0.0) - eta_last * dbe1
        dst1 = tl.load(dS1 + o1, mask=opens, other=0.0) - eta_last * dwe1      # [BF, D]
        dlast -= tl.sum(tl.sum(p1 * y1, axis=1) + dbe1 * (tl.sum(p1, axis=1)), axis=0)
        tl.store(DP1 + so, tl.dot(dst1, xk, input_precision=PREC) + dsb1[:, None])
        dxk += tl.dot(tl.trans(dst1), p1, input_precision=PREC)
        if first:  # dG = dS - X^T E (the second part is added in pass C)
            G1t = tl.load(G1 + o1)
            g1t = tl.load(g1 + f0 + cf)
            dlast -= tl.sum(tl.sum(dwe1 * G1t, axis=1) + dbe1 * g1t, axis=0)
            tl.store(dG1 + o1, dst1)
            tl.store(dg1 + f0 + cf, dsb1)
        dwe2 = tl.load(dW2 + o2, mask=closes, other=0.0)                       # [BF, D]
        y2 = tl.dot(dwe2, p2, input_precision=PREC)                             # [BF, BK]
        dlast -= tl.sum(tl.sum(x2k * y2, axis=1), axis=0)
        dst2 = tl.load(dS2 + o2, mask=opens, other=0.0) - eta_last * dwe2      # [BF, D]
        dp2 += tl.dot(tl.trans(dst2), x2k, input_precision=PREC)
        tl.store(DX2K + so, tl.dot(dst2, p2, input_precision=PREC))
        if first:
            G2t = tl.load(G2 + o2)
            dlast -= tl.sum(tl.sum(dwe2 * G2t, axis=1), axis=0)
            tl.store(dG2 + o2, dst2)
    a2 = tl.where(causal, a2 + 1.0, 0.0)
    ext2 += tl.dot(p2, a2, input_precision=PREC)
    sb2 = tl.sum(p2, axis=1)
    if first:
        ext2 += tl.load(g2 + cd)[:, None]
        sb2 += tl.load(g2 + cd)
    z2q += tl.load(b2 + cd)[:, None] - etr * ext2
    dbe2 = tl.load(db2 + cd, mask=closes, other=0.0)
    dsb2 = tl.load(ds2 + cd, mask=opens, other=0.0) - eta_last * dbe2
    dlast -= tl.sum(dbe2 * sb2, axis=0)  # dbe2 is 0 unless the mini-batch closes
    dp2 += dsb2[:, None]

    # ---- output layer norm
    xh_o, rstd_o = _ln_norm(z2q, D, EPS)
    dlnw = tl.sum(dout * xh_o, axis=1)
    dlnb = tl.sum(dout, axis=1)
    dz2q = _ln_norm_bwd(dout * lnw[:, None], xh_o, rstd_o, D)
    dxq = dout
    e2 = etr * dz2q
    deta = -tl.sum(dz2q * ext2, axis=0)
    dp2 -= tl.dot(e2, tl.trans(a2), input_precision=PREC)
    mb2 = tl.where(causal, tl.dot(tl.trans(p2), e2, input_precision=PREC), 0.0)   # [j, i]
    if first:
        tl.store(dg2 + cd, dsb2 - tl.sum(e2, axis=1))
    db2_loc = tl.sum(dz2q, axis=1)
    # P2 = lr Gz2: the part of dGz2 known now, and lr's gradient through P2
    dlr = tl.sum(dp2 * gz2, axis=0)
    dgz2 = lrr * dp2
    tl.debug_barrier()

    # ---- pass C: layer-1 readout path, dP1, dlr, dGz1; first part of the weight gradients
    mb1 = tl.zeros([BK, BK], dtype=CT)
    for f0 in range(0, F, BF):
        o1, o2 = _tile_offsets(f0, D, F, BF)
        so = _scratch_offsets(f0, BF, BK)
        w1t = tl.load(W1 + o1)
        w2 = tl.load(W2 + o2)
        x2k, gp = _gelu_d1(tl.load(Z1K + so))
        x2q, gpq = _gelu_d1(tl.load(Z1Q + so))
        gz1 = tl.load(GZ1 + so)
        p1 = lrr * gz1
        dx2q = tl.dot(w2, dz2q, input_precision=PREC) - tl.dot(x2k, mb2, input_precision=PREC)
        if first:
            dx2q -= tl.dot(tl.load(G2 + o2), e2, input_precision=PREC)
        dz1q = dx2q * gpq
        e1 = etr * dz1q
        dxq += tl.dot(tl.trans(w1t), dz1q, input_precision=PREC)
        ext1 = tl.dot(p1, a1, input_precision=PREC)
        if first:
            G1t = tl.load(G1 + o1)
            dxq -= tl.dot(tl.trans(G1t), e1, input_precision=PREC)
            ext1 += tl.dot(G1t, xq, input_precision=PREC) + tl.load(g1 + f0 + cf)[:, None]
        deta -= tl.sum(dz1q * ext1, axis=0)
        mb1 += tl.dot(tl.trans(p1), e1, input_precision=PREC)
        dp1 = tl.load(DP1 + so) - tl.dot(e1, tl.trans(a1), input_precision=PREC)
        dgz1 = lrr * dp1
        dlr += tl.sum(dp1 * gz1, axis=0)
        tl.store(DGZ1 + so, dgz1)
        dd = dgz1 * gp                                   # through Gz1 = (W2 Gz2) gelu'(Z1k)
        dgz2 += tl.dot(tl.trans(w2), dd, input_precision=PREC)
        # start-weight gradients (read-modify-write of each element by its own data: no race)
        # (the MMA accumulates onto the loaded tile: one [BF, D] tile live)
        _add_dot(dW1 + o1, dz1q, tl.trans(xq), PREC)
        _add_rowsum(db1 + f0 + cf, dz1q)
        acc2 = tl.dot(x2q, tl.trans(dz2q), tl.load(dW2 + o2), input_precision=PREC, out_dtype=CT)
        tl.store(dW2 + o2, tl.dot(dd, tl.trans(gz2), acc2, input_precision=PREC, out_dtype=CT))
        if first:
            _add_dot(dG1 + o1, -e1, tl.trans(xq), PREC)
            _add_rowsum(dg1 + f0 + cf, -e1)
            _add_dot(dG2 + o2, -x2q, tl.trans(e2), PREC)
    mb1 = tl.where(causal, mb1, 0.0)
    dxq -= tl.dot(xk, mb1, input_precision=PREC)
    dxk -= tl.dot(xq, tl.trans(mb1), input_precision=PREC)

    # ---- inner-loss gradient path: Gz2 = dLN-l2(Z2k, Tg); Tg = LN(Xv - Xk) (both recomputed)
    tgt, xh_t, rstd_t = _ln_affine(_load_tokens(xv_ptr, t, valid, stride_t, D, CT) - xk, lnw, lnb, D, EPS)
    gz2, xh_z, rstd_z, gg_z = _ln_l2_grad(z2k, tgt, lnw, lnb, D, EPS)
    dz2k, dtgt, dw_c, db_c = _ln_l2_grad_vjp(dgz2, gz2, xh_z, rstd_z, gg_z, tgt, lnw, lnb, D)
    dlnw += tl.sum(dw_c + dtgt * xh_t, axis=1)
    dlnb += tl.sum(db_c + dtgt, axis=1)
    dxv = _ln_norm_bwd(dtgt * lnw[:, None], xh_t, rstd_t, D)
    dxk -= dxv
    tl.store(db2 + cd, tl.load(db2 + cd) + db2_loc + tl.sum(dz2k, axis=1))
    tl.debug_barrier()

    # ---- pass D: back to Z1k (through X2k and through gelu'(Z1k) in Gz1), rest of dW
    for f0 in range(0, F, BF):
        o1, o2 = _tile_offsets(f0, D, F, BF)
        so = _scratch_offsets(f0, BF, BK)
        w1t = tl.load(W1 + o1)
        w2 = tl.load(W2 + o2)
        x2k, gp, gpp = _gelu_d2(tl.load(Z1K + so))
        x2q = _gelu(tl.load(Z1Q + so))
        hk = tl.dot(w2, gz2, input_precision=PREC)
        dx2k = (tl.dot(w2, dz2k, input_precision=PREC)
                - tl.dot(x2q, tl.trans(mb2), input_precision=PREC) + tl.load(DX2K + so))
        dz1k = dx2k * gp + tl.load(DGZ1 + so) * hk * gpp
        dxk += tl.dot(tl.trans(w1t), dz1k, input_precision=PREC)
        _add_dot(dW1 + o1, dz1k, tl.trans(xk), PREC)
        _add_rowsum(db1 + f0 + cf, dz1k)
        _add_dot(dW2 + o2, x2k, tl.trans(dz2k), PREC)
    return dxq, dxk, dxv, dlr, deta, dlast, dlnw, dlnb


@triton.jit
def _ttt_bwd_kernel(
    xq_ptr, xk_ptr, xv_ptr, sx_b, sx_h, sx_t,
    lr_ptr, sl_b, sl_h, sl_t,
    lnw_ptr, lnb_ptr, tok_ptr, pos_ptr,
    G1_ptr, g1_ptr, G2_ptr, g2_ptr,
    C1_ptr, c1_ptr, C2_ptr, c2_ptr,
    R1_ptr, r1_ptr, R2_ptr, r2_ptr,
    scr_ptr,
    do_ptr, sdo_b, sdo_h, sdo_t,
    dW1_ptr, db1_ptr, dW2_ptr, db2_ptr,
    dS1_ptr, ds1_ptr, dS2_ptr, ds2_ptr,
    dG1_ptr, dg1_ptr, dG2_ptr, dg2_ptr,
    dxq_ptr, dxk_ptr, dxv_ptr, sdx_b, sdx_h, sdx_t,
    dlr_ptr, sdl_b, sdl_h, sdl_t,
    dlnw_ptr, dlnb_ptr, dtok_ptr,
    T, H, NC, CK,
    K: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
    EPS: tl.constexpr, PREC: tl.constexpr,
):
    """Sequence backward; one program per (sample b, head h).

    Inputs as in ``_ttt_fwd_kernel`` plus: C* checkpoints [B, H, NC, ...]; R* per-program
    recomputation buffers [B, H, CK, ...]; scr [B, H, 6, BK, F]; do = d loss / d out [B, H, T, D].
    dW* (in/out, [B, H, ...], compute dtype): gradient of the output weights on entry, of the
    input weights on exit; dS* gradient of the output sums; dG* (out) gradient of the input sums.
    Outputs dxq/dxk/dxv [B, H, T, D], dlr [B, H, T], and per-(b, h) partial sums dlnw, dlnb
    [B, H, D] and dtok [B, H, BK] that the host reduces.
    """
    b, h, pid64 = _program(H)
    CT = dW1_ptr.dtype.element_ty
    xoff = _bh_offset(b, h, sx_b, sx_h)
    loff = _bh_offset(b, h, sl_b, sl_h)
    dooff = _bh_offset(b, h, sdo_b, sdo_h)
    dxoff = _bh_offset(b, h, sdx_b, sdx_h)
    dloff = _bh_offset(b, h, sdl_b, sdl_h)
    G1p, g1p, G2p, g2p = _slot(G1_ptr, g1_ptr, G2_ptr, g2_ptr, pid64, D, F)
    dW1p, db1p, dW2p, db2p = _slot(dW1_ptr, db1_ptr, dW2_ptr, db2_ptr, pid64, D, F)
    dS1p, ds1p, dS2p, ds2p = _slot(dS1_ptr, ds1_ptr, dS2_ptr, ds2_ptr, pid64, D, F)
    dG1p, dg1p, dG2p, dg2p = _slot(dG1_ptr, dg1_ptr, dG2_ptr, dg2_ptr, pid64, D, F)
    scr = scr_ptr + pid64 * 6 * BK * F

    rows = tl.arange(0, BK)
    cd = tl.arange(0, D)
    lnw, lnb = _head_ln(lnw_ptr, lnb_ptr, h, D, CT)
    causal, eta, eta_last = _mb_constants(tok_ptr, K, BK, CT)

    dtok = tl.zeros([BK], dtype=CT)
    dlnw = tl.zeros([D], dtype=CT)
    dlnb = tl.zeros([D], dtype=CT)

    p0 = (tl.load(pos_ptr + b) % K).to(tl.int32)
    M = (p0 + T + K - 1) // K
    NG = (M + CK - 1) // CK
    for gi in range(0, NG):
        g = NG - 1 - gi
        m0 = g * CK
        n = tl.minimum(M - m0, CK)
        # Recompute the start weights of the group's mini-batches from its checkpoint.
        r0 = pid64 * CK
        C1p, c1p, C2p, c2p = _slot(C1_ptr, c1_ptr, C2_ptr, c2_ptr, pid64 * NC + g, D, F)
        R1p, r1p, R2p, r2p = _slot(R1_ptr, r1_ptr, R2_ptr, r2_ptr, r0, D, F)
        _copy_weights(C1p, c1p, C2p, c2p, R1p, r1p, R2p, r2p, D, F, BF)
        tl.debug_barrier()
        for c in range(0, n - 1):
            m = m0 + c
            t, valid, xq, xk, lr = _mb_tokens(xq_ptr + xoff, xk_ptr + xoff, lr_ptr + loff, sx_t, sl_t, m, p0, T,
                                              K, D, BK, CT)
            xv = _load_tokens(xv_ptr + xoff, t, valid, sx_t, D, CT)
            Ra1, ra1, Ra2, ra2 = _slot(R1_ptr, r1_ptr, R2_ptr, r2_ptr, r0 + c, D, F)
            Rb1, rb1, Rb2, rb2 = _slot(R1_ptr, r1_ptr, R2_ptr, r2_ptr, r0 + c + 1, D, F)
            # Not the group's last mini-batch, hence not the call's last: it closes.
            _mb_forward(xq, xk, xv, lr, eta, eta_last, causal, lnw, lnb,
                        Ra1, ra1, Ra2, ra2, Rb1, rb1, Rb2, rb2, G1p, g1p, G2p, g2p, G1p, g1p, G2p, g2p,
                        m == 0, True, False, BK, D, F, BF, EPS, PREC, False)
            tl.debug_barrier()
        # Backward through the group, last mini-batch first.
        for ci in range(0, n):
            c = n - 1 - ci
            m = m0 + c
            t, valid, xq, xk, lr = _mb_tokens(xq_ptr + xoff, xk_ptr + xoff, lr_ptr + loff, sx_t, sl_t, m, p0, T,
                                              K, D, BK, CT)
            dout = _load_tokens(do_ptr + dooff, t, valid, sdo_t, D, CT)
            Ra1, ra1, Ra2, ra2 = _slot(R1_ptr, r1_ptr, R2_ptr, r2_ptr, r0 + c, D, F)
            closes = (m + 1) * K <= p0 + T
            opens = (m + 1) * K > p0 + T
            dxq, dxk, dxv, dlr, deta, dlast, dw, db = _mb_backward(
                xq, xk, xv_ptr + xoff, t, valid, sx_t, lr, eta, eta_last, dout, causal, lnw, lnb,
                Ra1, ra1, Ra2, ra2, G1p, g1p, G2p, g2p, dW1p, db1p, dW2p, db2p,
                dS1p, ds1p, dS2p, ds2p, dG1p, dg1p, dG2p, dg2p,
                scr, m == 0, closes, opens, BK, D, F, BF, EPS, PREC)
            dx_o = dxoff + cd[:, None] + t[None, :] * sdx_t
            tl.store(dxq_ptr + dx_o, dxq.to(dxq_ptr.dtype.element_ty), mask=valid[None, :])
            tl.store(dxk_ptr + dx_o, dxk.to(dxk_ptr.dtype.element_ty), mask=valid[None, :])
            tl.store(dxv_ptr + dx_o, dxv.to(dxv_ptr.dtype.element_ty), mask=valid[None, :])
            tl.store(dlr_ptr + dloff + t * sdl_t, dlr.to(dlr_ptr.dtype.element_ty), mask=valid)
            dtok += tl.where(valid, deta, 0.0) + tl.where(rows == K - 1, dlast, 0.0)
            dlnw += dw
            dlnb += db
            tl.debug_barrier()
    tl.store(dlnw_ptr + pid64 * D + cd, dlnw)
    tl.store(dlnb_ptr + pid64 * D + cd, dlnb)
    tl.store(dtok_ptr + pid64 * BK + rows, dtok)


# ----------------------------------------------------------------------------- host side
def launch_backward(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, token_idx: torch.Tensor, pos: torch.Tensor,
    G: tuple[torch.Tensor, ...], ckpts: tuple[torch.Tensor, ...], K: int, ckpt_every: int,
    dout: torch.Tensor, dW: tuple[torch.Tensor, ...], dS: tuple[torch.Tensor, ...], *,
    block_f: int, num_warps: int, precision: str,
) -> tuple[torch.Tensor, ...]:
    """Run the backward kernel.

    Args mirror ``launch_forward``; ``ckpts`` are its checkpoints, ``dout`` [B, H, T, d] the
    gradient of ``out``, ``dW``/``dS`` the gradients of the output state's weights and sums
    (compute dtype, [B, H, ...]; ``dW`` is cloned, not modified).
    Returns (dxq, dxk, dxv, dlr, dln_weight, dln_bias, dtoken_idx, dW1, db1, dW2, db2, dG1, dg1,
    dG2, dg2): input-shaped gradients; ln/token gradients in fp32-or-wider compute dtype.
    """
    B, H, T, D = xq.shape
    F = ckpts[0].shape[-1]
    CT = ckpts[0].dtype
    dev = xq.device
    NC = ckpts[0].shape[2]
    BK = block_rows(K)
    assert NC * ckpt_every >= num_mini_batches_max(T, K)
    R = tuple(torch.empty(B, H, ckpt_every, *c.shape[3:], device=dev, dtype=CT) for c in ckpts)
    scr = torch.empty(B, H, 6, BK, F, device=dev, dtype=CT)
    dWacc = tuple(g.to(CT).contiguous().clone() for g in dW)
    dSc = tuple(g.to(CT).contiguous() for g in dS)
    dG = tuple(torch.zeros_like(w) for w in dWacc)
    dout = dout.contiguous()
    dxq, dxk, dxv = (torch.empty(B, H, T, D, device=dev, dtype=x.dtype) for x in (xq, xk, xv))
    dlr = torch.empty(B, H, T, device=dev, dtype=lr.dtype)
    dlnw = torch.empty(B, H, D, device=dev, dtype=CT)
    dlnb = torch.empty(B, H, D, device=dev, dtype=CT)
    dtok = torch.empty(B, H, BK, device=dev, dtype=CT)
    _ttt_bwd_kernel[(B * H,)](
        xq, xk, xv, xq.stride(0), xq.stride(1), xq.stride(2),
        lr, lr.stride(0), lr.stride(1), lr.stride(2),
        ln_weight, ln_bias, token_idx, pos,
        *G, *ckpts, *R, scr,
        dout, dout.stride(0), dout.stride(1), dout.stride(2),
        *dWacc, *dSc, *dG,
        dxq, dxk, dxv, dxq.stride(0), dxq.stride(1), dxq.stride(2),
        dlr, dlr.stride(0), dlr.stride(1), dlr.stride(2),
        dlnw, dlnb, dtok,
        T, H, NC, ckpt_every,
        K=K, D=D, F=F, BK=BK, BF=block_f, EPS=LN_EPS, PREC=precision,
        num_warps=num_warps, num_stages=1,
    )
    return (dxq, dxk, dxv, dlr, dlnw.sum(0), dlnb.sum(0), dtok.sum((0, 1))[:K],
            *dWacc, *dG)
