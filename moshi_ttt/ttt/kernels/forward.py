"""Fused dual-form forward of the TTT-MLP operator over a sequence (Triton).

Organisation
------------
* Grid: one program per (sample, head), ``B * H`` programs. A program owns that head's fast
  weights for the whole call and walks its inner mini-batches in order, so no cross-program
  synchronisation is ever needed.
* What stays on chip: everything that is O(K x d) -- the mini-batch's q/k/v, the layer-2
  pre-activations, the inner gradients of layer 2, the output, the K x K attention-like matrices
  -- lives in registers/shared memory for the whole mini-batch. The fast weights ``W1 [d, F]``
  and ``W2 [F, d]`` (F = 4d; 256 KiB each in fp32 at d=128) do not fit on one SM, so they live in
  a per-(sample, head) fp32 buffer in global memory -- the output state, updated in place; at
  Moshi 7B width that is 16 MiB per sample, resident in the H100's 50 MiB L2 -- and are streamed
  through the SM in tiles of ``BF`` hidden units (the tiling of the 4d dim).
* Per mini-batch, two passes over the hidden tiles:
  - pass A: ``z2k = W2^T gelu(W1^T xk + b1) + b2`` (the layer-norm gradient needs all of z2k);
  - pass B: per tile, the layer-1 gradient, the dual-form layer-1 readout ``z1q``, its gelu,
    the layer-2 partial products, then the tile's weight update as one MMA accumulating onto
    the old tile. Then the layer-2 readout, the output layer norm and the ``b2`` update.
* Orientation: tiles are feature-major (``[features, tokens]``): the 16 tokens of a mini-batch
  are the N dimension of every product and weight tiles are the M dimension, so Hopper's wgmma
  applies and loop-invariant token operands are read from shared memory (see ``_common``).
* Partial mini-batches and per-sample offsets: a program reads its sample's ``pos``; tokens are
  placed on the aligned grid ``pos % K + t``, mini-batch ``m`` covers positions ``i`` with token
  index ``t = m K - pos % K + i``. Positions outside ``[0, T)`` (the earlier part of a mini-batch
  begun by a previous call, or the part a later call will bring) are masked: learning rate 0,
  nothing stored. The first mini-batch adds the carried running sums ``G`` of the state (``W_i =
  W0 - eta_i (G + ...)``); a mini-batch that does not close (only the call's last one) writes its
  sums to the new state instead of updating the weights. So every sample of a batch may have its
  own offset in one launch; no host synchronisation is needed.
* Tokens per tile are padded to ``BK = max(16, next_pow2(K))`` (tl.dot needs >= 16).

The same ``_mb_forward`` routine is reused by the backward kernel to recompute mini-batch-start
states from checkpoints (``WITH_OUT=False``), so forward and recomputation agree bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LN_EPS,
    _bh_offset,
    _gelu,
    _gelu_d1,
    _head_ln,
    _ln_norm,
    _load_tokens,
    _mb_constants,
    _mb_inner_grad,
    _mb_tokens,
    _program,
    _slot,
    _store_end,
    _tile_offsets,
)


@triton.jit
def _copy_weights(sW1, sb1, sW2, sb2, dW1, db1, dW2, db2,
                  D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr):
    """Copy one head's fast weights (W1 [D, F], b1 [F], W2 [F, D], b2 [D]) from s* to d*."""
    cf = tl.arange(0, BF)
    for f0 in range(0, F, BF):
        o1, o2 = _tile_offsets(f0, D, F, BF)
        tl.store(dW1 + o1, tl.load(sW1 + o1))
        tl.store(dW2 + o2, tl.load(sW2 + o2))
        tl.store(db1 + f0 + cf, tl.load(sb1 + f0 + cf))
    cd = tl.arange(0, D)
    tl.store(db2 + cd, tl.load(sb2 + cd))


@triton.jit
def _mb_forward(xq, xk, xv, lr, eta, eta_last, causal, lnw, lnb,
                rW1, rb1, rW2, rb2, wW1, wb1, wW2, wb2,
                G1, g1, G2, g2, S1, s1, S2, s2,
                first, closes, opens,
                BK: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                EPS: tl.constexpr, PREC: tl.constexpr, WITH_OUT: tl.constexpr):
    """One inner mini-batch of one head, dual form, feature-major (tiles are [features, tokens]).

    xq, xk, xv [D, BK]; lr [BK] (0 on masked tokens); eta [BK] (token_idx of each position);
    eta_last (token_idx[K-1]); causal [BK, BK] with ``causal[j, i] = i >= j`` (token i sees
    j <= i); lnw, lnb [D]. r* point at the mini-batch-start weights (W1 [D, F], b1 [F],
    W2 [F, D], b2 [D], row-major), w* at where the end weights go (may alias r*: the forward
    updates in place). G* are the carried running sums (added when ``first``); S* is where the
    sums go when the mini-batch does not close (``opens``: the end of the call).
    Returns ``out = xq + LN(z2q)`` [D, BK] when WITH_OUT (else zeros): the recomputation in the
    backward only needs the state update.
    Names: ``a1[j, i] = (xk_j . xq_i + 1)`` masked causally (the transposed attention-like
    matrix), ``p* = lr * grad`` (lr-weighted inner gradients).
    """
    CT = xq.dtype
    cd = tl.arange(0, D)
    cf = tl.arange(0, BF)
    lrr = lr[None, :]
    etr = eta[None, :]
    sc = tl.where(closes, -eta_last, 1.0)  # closes: W - eta_last S; opens: S itself

    # Target, pass A (z2k over the whole hidden dim), the layer-2 gradient p2 [D, BK] and a1.
    _, gz2, p2, a1 = _mb_inner_grad(xq, xk, xv, lr, causal, lnw, lnb, rW1, rb1, rW2, rb2, rW1,
                                    BK, D, F, BF, EPS, PREC, False)

    # Pass B: per hidden tile, layer-1 gradient, readout and weight update of that tile.
    # (Runtime `if first:` blocks only modify names bound before them: compiled Triton does not
    # export names first bound inside a runtime branch.)
    z2q = tl.zeros([D, BK], dtype=CT)
    a2 = tl.zeros([BK, BK], dtype=CT)
    for f0 in range(0, F, BF):
        o1, o2 = _tile_offsets(f0, D, F, BF)                            # W1^T and W2 tiles [BF, D]
        w1t = tl.load(rW1 + o1)
        bb1 = tl.load(rb1 + f0 + cf)
        w2 = tl.load(rW2 + o2)
        x2k, gp = _gelu_d1(tl.dot(w1t, xk, input_precision=PREC) + bb1[:, None])
        p1 = lrr * (tl.dot(w2, gz2, input_precision=PREC) * gp)         # lr * gz1  [BF, BK]
        if WITH_OUT:
            ext1 = tl.dot(p1, a1, input_precision=PREC)
            if first:
                ext1 += tl.dot(tl.load(G1 + o1), xq, input_precision=PREC) + tl.load(g1 + f0 + cf)[:, None]
            x2q = _gelu(tl.dot(w1t, xq, input_precision=PREC) + bb1[:, None] - etr * ext1)
            z2q += tl.dot(tl.trans(w2), x2q, input_precision=PREC)
            a2 += tl.dot(tl.trans(x2k), x2q, input_precision=PREC)       # a2[j, i] = x2k_j . x2q_i
            if first:
                z2q -= etr * tl.dot(tl.trans(tl.load(G2 + o2)), x2q, input_precision=PREC)
        # Tile update. In place (w* may alias r*): every warp must have read the tile first.
        # The update is one MMA whose accumulator starts at the old tile, so only one [BF, D]
        # tile is live: closes -> W - eta_last (G + Xk^T P1); opens -> S = G + Xk^T P1.
        tl.debug_barrier()
        acc1 = tl.load(rW1 + o1, mask=closes, other=0.0)
        accb = tl.load(rb1 + f0 + cf, mask=closes, other=0.0)
        if first:
            acc1 += sc * tl.load(G1 + o1)
            accb += sc * tl.load(g1 + f0 + cf)
        new1 = tl.dot(sc * p1, tl.trans(xk), acc1, input_precision=PREC, out_dtype=CT)   # [BF, D] (W1^T tile)
        newb = accb + sc * tl.sum(p1, axis=1)
        _store_end(wW1 + o1, S1 + o1, new1, closes, opens)
        _store_end(wb1 + f0 + cf, s1 + f0 + cf, newb, closes, opens)
        acc2 = tl.load(rW2 + o2, mask=closes, other=0.0)
        if first:
            acc2 += sc * tl.load(G2 + o2)
        new2 = tl.dot(x2k, tl.trans(sc * p2), acc2, input_precision=PREC, out_dtype=CT)  # [BF, D]
        _store_end(wW2 + o2, S2 + o2, new2, closes, opens)

    accb2 = tl.load(rb2 + cd, mask=closes, other=0.0)
    if first:
        accb2 += sc * tl.load(g2 + cd)
    newb2 = accb2 + sc * tl.sum(p2, axis=1)
    out = tl.zeros([D, BK], dtype=CT)
    if WITH_OUT:
        ext2 = tl.dot(p2, tl.where(causal, a2 + 1.0, 0.0), input_precision=PREC)
        if first:
            ext2 += tl.load(g2 + cd)[:, None]
        z2q += tl.load(rb2 + cd)[:, None] - etr * ext2
        xh_o, _ = _ln_norm(z2q, D, EPS)
        out = xq + xh_o * lnw[:, None] + lnb[:, None]
    tl.debug_barrier()
    _store_end(wb2 + cd, s2 + cd, newb2, closes, opens)
    return out


@triton.jit
def _ttt_fwd_kernel(
    xq_ptr, xk_ptr, xv_ptr, sx_b, sx_h, sx_t,
    lr_ptr, sl_b, sl_h, sl_t,
    lnw_ptr, lnb_ptr, tok_ptr, pos_ptr,
    W1_ptr, b1_ptr, W2_ptr, b2_ptr,
    G1_ptr, g1_ptr, G2_ptr, g2_ptr,
    S1_ptr, s1_ptr, S2_ptr, s2_ptr,
    out_ptr, so_b, so_h, so_t,
    C1_ptr, c1_ptr, C2_ptr, c2_ptr,
    T, H, NC, CK,
    K: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr,
    EPS: tl.constexpr, PREC: tl.constexpr, CKPT: tl.constexpr,
):
    """Sequence forward; one program per (sample b, head h).

    x* [B, H, T, D] (strides sx_*, last dim contiguous), lr [B, H, T], lnw/lnb [H, D], tok [K],
    pos [B] int64. W*/b* [B, H, ...] hold the input state's weights on entry and the output
    state's on exit (in place). G* input running sums; S* output running sums (pre-zeroed: written
    only when the call ends inside a mini-batch). out [B, H, T, D]. With CKPT, the weights at the
    start of mini-batches 0, CK, 2 CK, ... go to checkpoint slots C* [B, H, NC, ...].
    """
    b, h, pid64 = _program(H)
    CT = W1_ptr.dtype.element_ty
    W1p, b1p, W2p, b2p = _slot(W1_ptr, b1_ptr, W2_ptr, b2_ptr, pid64, D, F)
    G1p, g1p, G2p, g2p = _slot(G1_ptr, g1_ptr, G2_ptr, g2_ptr, pid64, D, F)
    S1p, s1p, S2p, s2p = _slot(S1_ptr, s1_ptr, S2_ptr, s2_ptr, pid64, D, F)
    xoff = _bh_offset(b, h, sx_b, sx_h)
    loff = _bh_offset(b, h, sl_b, sl_h)
    ooff = _bh_offset(b, h, so_b, so_h)
    cd = tl.arange(0, D)
    lnw, lnb = _head_ln(lnw_ptr, lnb_ptr, h, D, CT)
    causal, eta, eta_last = _mb_constants(tok_ptr, K, BK, CT)

    p0 = (tl.load(pos_ptr + b) % K).to(tl.int32)
    M = (p0 + T + K - 1) // K
    for m in range(0, M):
        if CKPT:
            if m % CK == 0:
                C1p, c1p, C2p, c2p = _slot(C1_ptr, c1_ptr, C2_ptr, c2_ptr, pid64 * NC + m // CK, D, F)
                _copy_weights(W1p, b1p, W2p, b2p, C1p, c1p, C2p, c2p, D, F, BF)
        t, valid, xq, xk, lr = _mb_tokens(xq_ptr + xoff, xk_ptr + xoff, lr_ptr + loff, sx_t, sl_t, m, p0, T,
                                          K, D, BK, CT)
        xv = _load_tokens(xv_ptr + xoff, t, valid, sx_t, D, CT)
        first = m == 0
        closes = (m + 1) * K <= p0 + T
        opens = (m + 1) * K > p0 + T
        out = _mb_forward(xq, xk, xv, lr, eta, eta_last, causal, lnw, lnb,
                          W1p, b1p, W2p, b2p, W1p, b1p, W2p, b2p, G1p, g1p, G2p, g2p, S1p, s1p, S2p, s2p,
                          first, closes, opens, BK, D, F, BF, EPS, PREC, True)
        tl.store(out_ptr + ooff + cd[:, None] + t[None, :] * so_t,
                 out.to(out_ptr.dtype.element_ty), mask=valid[None, :])
        # The next mini-batch reads the weights this one wrote (other warps' stores).
        tl.debug_barrier()


# ----------------------------------------------------------------------------- host side
def block_rows(K: int) -> int:
    """Rows per mini-batch tile: tl.dot needs >= 16, and Triton block sizes are powers of 2."""
    return max(16, triton.next_power_of_2(K))


def default_block_f(D: int, F: int) -> int:
    """Hidden-dim tile: 64 columns at d >= 64 keeps a W1 tile (d x BF fp32) at 32 KiB."""
    return min(F, 64 if D >= 64 else 32)


def num_mini_batches_max(T: int, K: int) -> int:
    """Upper bound over any start offset of the mini-batches a call of T tokens touches."""
    return (K - 1 + T + K - 1) // K


def launch_forward(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, token_idx: torch.Tensor, pos: torch.Tensor,
    W: tuple[torch.Tensor, ...], G: tuple[torch.Tensor, ...], K: int, *,
    ckpt_every: int | None, block_f: int, num_warps: int, precision: str,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Run the forward kernel.

    Args:
        xq, xk, xv: [B, H, T, d] with equal strides and a contiguous last dim; lr [B, H, T].
        ln_weight, ln_bias: [H, d] contiguous; token_idx [K]; pos [B] int64.
        W: (W1, b1, W2, b2) input weights [B, H, ...] (compute dtype, e.g. fp32); G: input sums.
        ckpt_every: None for no checkpoints, else mini-batches per checkpoint group.
    Returns:
        out [B, H, T, d] (dtype of xq), new weights, new sums, checkpoints (C1, c1, C2, c2) each
        [B, H, NC, ...] (empty tuple without checkpoints).
    """
    B, H, T, D = xq.shape
    F = W[0].shape[-1]
    newW = tuple(w.contiguous().clone() for w in W)
    newS = tuple(torch.zeros_like(w) for w in newW)
    Gc = tuple(g.contiguous() for g in G)
    out = torch.empty(B, H, T, D, device=xq.device, dtype=xq.dtype)
    if ckpt_every is not None:
        NC = -(-num_mini_batches_max(T, K) // ckpt_every)
        ck = tuple(torch.empty(B, H, NC, *w.shape[2:], device=w.device, dtype=w.dtype) for w in newW)
        CK = ckpt_every
    else:
        NC, CK = 1, 1
        ck = newW  # never written (CKPT=False); any valid pointer will do
    _ttt_fwd_kernel[(B * H,)](
        xq, xk, xv, xq.stride(0), xq.stride(1), xq.stride(2),
        lr, lr.stride(0), lr.stride(1), lr.stride(2),
        ln_weight, ln_bias, token_idx, pos,
        *newW, *Gc, *newS,
        out, out.stride(0), out.stride(1), out.stride(2),
        *ck,
        T, H, NC, CK,
        K=K, D=D, F=F, BK=block_rows(K), BF=block_f, EPS=LN_EPS, PREC=precision,
        CKPT=ckpt_every is not None,
        num_warps=num_warps, num_stages=1,
    )
    return out, newW, newS, (ck if ckpt_every is not None else ())
