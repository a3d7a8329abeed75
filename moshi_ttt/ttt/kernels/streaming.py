"""Fused per-token TTT-MLP step for streaming (Triton), updating the state in place.

``ttt_step_triton_`` is the per-token form of ``moshi_ttt.ttt.ops.ttt_mlp_token`` for one frame:
the inner gradient at the mini-batch-start weights ``W0`` is added to the running sums ``G``, the
token is read out with ``W0 - token_idx[p] G`` (p = pos % K, per sample), and samples whose
mini-batch ends here move ``W0`` forward and zero ``G``. It is analytic (no autograd), writes
only into the state's own tensors and the output buffer (allocation-free when ``out`` is given),
never reads a value back to the host, and so can be captured in a CUDA graph (``LMGen``).

Kernel organisation: one program per (sample, head); two passes over hidden tiles of ``BF``
columns. Pass A reads W1, W2 to get ``z2k`` (the layer-norm gradient needs all of it); pass B
reads W1, W2, G1, G2 once more, updates the sums, reads the token out and writes the tile back.
All products are vector x matrix (one token), done as broadcast-multiply-reduce in registers:
the step is bound by memory traffic (~6 reads + 2 writes of d x 4d fp32 per head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..state import TTTState
from ._common import LN_EPS, _bh_offset, _gelu, _gelu_d1, _head_ln, _ln_affine, _ln_l2_grad, _ln_norm, _program, _slot


@triton.jit
def _ttt_step_kernel(
    xq_ptr, xk_ptr, xv_ptr, sx_b, sx_h, lr_ptr, sl_b, sl_h,
    lnw_ptr, lnb_ptr, tok_ptr, pos_ptr, exec_ptr,
    W1_ptr, b1_ptr, W2_ptr, b2_ptr, G1_ptr, g1_ptr, G2_ptr, g2_ptr,
    out_ptr, so_b, so_h,
    H, K: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
    EPS: tl.constexpr, HAS_EXEC: tl.constexpr,
):
    """One token for sample b = pid // H, head h = pid % H.

    x* [B, H, (1,) D] (strides sx_b, sx_h; last dim contiguous), lr [B, H, (1)], lnw/lnb [H, D],
    tok [K], pos [B] int64 (read only: the host adds 1 after the launch), exec [B] bool (samples
    with False are read out but keep their state). W*, G* [B, H, ...] contiguous, in place.
    out [B, H, (1,) D].
    """
    b, h, pid64 = _program(H)
    CT = W1_ptr.dtype.element_ty
    W1, b1, W2, b2 = _slot(W1_ptr, b1_ptr, W2_ptr, b2_ptr, pid64, D, F)
    G1, g1, G2, g2 = _slot(G1_ptr, g1_ptr, G2_ptr, g2_ptr, pid64, D, F)
    cd = tl.arange(0, D)
    cf = tl.arange(0, BF)
    xo = _bh_offset(b, h, sx_b, sx_h)
    xq = tl.load(xq_ptr + xo + cd).to(CT)
    xk = tl.load(xk_ptr + xo + cd).to(CT)
    xv = tl.load(xv_ptr + xo + cd).to(CT)
    lr = tl.load(lr_ptr + _bh_offset(b, h, sl_b, sl_h)).to(CT)
    lnw, lnb = _head_ln(lnw_ptr, lnb_ptr, h, D, CT)
    p = (tl.load(pos_ptr + b) % K).to(tl.int32)
    eta = tl.load(tok_ptr + p).to(CT)
    closes = p == K - 1
    run = p >= 0  # scalar True
    if HAS_EXEC:
        run = tl.load(exec_ptr + b) != 0
    keep_w = run & closes  # the mini-batch ends: W0 <- W_t and the sums restart at 0

    # Target and layer-2 input gradient at W0 (the helpers take feature-major [D, 1] tiles).
    tgt, _, _ = _ln_affine((xv - xk)[:, None], lnw, lnb, D, EPS)
    z2k = tl.load(b2 + cd)
    for f0 in range(0, F, BF):
        w1 = tl.load(W1 + cd[:, None] * F + f0 + cf[None, :])
        x2k = _gelu(tl.sum(xk[:, None] * w1, axis=0) + tl.load(b1 + f0 + cf))
        w2 = tl.load(W2 + (f0 + cf)[:, None] * D + cd[None, :])
        z2k += tl.sum(x2k[:, None] * w2, axis=0)
    gz2c, _, _, _ = _ln_l2_grad(z2k[:, None], tgt, lnw, lnb, D, EPS)
    gz2 = lr * tl.sum(gz2c, axis=1)                 # [D], lr folded in (sums are lr-weighted)

    # Readout with W_t = W0 - eta (G + this token's gradient), never materialised:
    # xq W1_t = xq W1 - eta (xq G1 + (xq . xk) gz1), and the same for layer 2.
    xqk = tl.sum(xq * xk, axis=0)
    z2q = tl.zeros([D], dtype=CT)
    c2 = tl.sum(tl.zeros([BF], dtype=CT), axis=0)  # sum over the hidden dim of x2q . x2k
    for f0 in range(0, F, BF):
        o1 = cd[:, None] * F + f0 + cf[None, :]
        o2 = (f0 + cf)[:, None] * D + cd[None, :]
        w1 = tl.load(W1 + o1)
        bb1 = tl.load(b1 + f0 + cf)
        x2k, gp = _gelu_d1(tl.sum(xk[:, None] * w1, axis=0) + bb1)
        w2 = tl.load(W2 + o2)
        gz1 = tl.sum(w2 * gz2[None, :], axis=1) * gp
        G1t = tl.load(G1 + o1)
        sb1 = tl.load(g1 + f0 + cf) + gz1
        z1q = tl.sum(xq[:, None] * (w1 - eta * G1t), axis=0) + bb1 - eta * (xqk * gz1 + sb1)
        x2q = _gelu(z1q)
        G2t = tl.load(G2 + o2)
        z2q += tl.sum(x2q[:, None] * (w2 - eta * G2t), axis=0)
        c2 += tl.sum(x2q * x2k, axis=0)
        tl.debug_barrier()  # in place: all warps have read this tile
        s1 = G1t + xk[:, None] * gz1[None, :]
        s2 = G2t + x2k[:, None] * gz2[None, :]
        tl.store(W1 + o1, w1 - eta * s1, mask=keep_w)
        tl.store(b1 + f0 + cf, bb1 - eta * sb1, mask=keep_w)
        tl.store(W2 + o2, w2 - eta * s2, mask=keep_w)
        tl.store(G1 + o1, tl.where(closes, 0.0, s1), mask=run)
        tl.store(g1 + f0 + cf, tl.where(closes, 0.0, sb1), mask=run)
        tl.store(G2 + o2, tl.where(closes, 0.0, s2), mask=run)
    bb2 = tl.load(b2 + cd)
    sb2 = tl.load(g2 + cd) + gz2
    b2t = bb2 - eta * sb2
    xh_o, _ = _ln_norm((z2q - eta * c2 * gz2 + b2t)[:, None], D, EPS)
    out = xq + tl.sum(xh_o, axis=1) * lnw + lnb
    tl.store(out_ptr + _bh_offset(b, h, so_b, so_h) + cd, out.to(out_ptr.dtype.element_ty))
    tl.debug_barrier()
    tl.store(b2 + cd, b2t, mask=keep_w)
    tl.store(g2 + cd, tl.where(closes, 0.0, sb2), mask=run)


def default_step_config(d: int, F: int) -> tuple[int, int]:
    """(block_f, num_warps): a [d, BF] fp32 tile over 8 warps is 16 registers a thread at d=128."""
    return min(F, 32), (8 if d >= 128 else 4)


def ttt_step_triton_(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, mini_batch_size: int,
    token_idx: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
    exec_mask: torch.Tensor | None = None, block_f: int | None = None, num_warps: int | None = None,
) -> torch.Tensor:
    """One streaming token through TTT-MLP, updating ``state`` in place; returns the output.

    Args:
        xq, xk, xv: [B, H, 1, d] (or [B, H, d]) with a contiguous last dim; lr [B, H, 1] or [B, H].
        ln_weight, ln_bias: [H, d] contiguous; token_idx [K] (pass it: the default is rebuilt,
            i.e. allocated, on every call).
        state: contiguous ``TTTState`` tensors (all of one float dtype, the compute dtype) that are
            updated in place, ``pos`` included (``pos += 1``, or ``+= exec_mask``).
        out: optional output buffer shaped like xq (allocation-free with it).
        exec_mask: [B] bool; samples with False get an output but keep their state exactly.
    Returns:
        ``out`` [like xq], dtype of ``out`` (default: of xq).
    No host synchronisation and no allocation when ``out`` and ``token_idx`` are given, so the
    call can be captured in a CUDA graph.
    """
    K = int(mini_batch_size)
    B, H = xq.shape[:2]
    d = xq.shape[-1]
    if xq.dim() == 4 and xq.shape[2] != 1:
        raise ValueError(f"ttt_step_triton_ takes one token, got T={xq.shape[2]}")
    F = state.W1.shape[-1]
    CT = state.W1.dtype
    for name, t in state.items():
        if name != "pos" and (t.dtype != CT or not t.is_contiguous()):
            raise ValueError(f"state.{name} must be contiguous {CT} (it is updated in place)")
    if xq.stride(-1) != 1 or xq.stride() != xk.stride() or xq.stride() != xv.stride():
        raise ValueError("xq, xk, xv must share strides with a contiguous last dim")
    if token_idx is None:
        token_idx = 1.0 / torch.arange(1, K + 1, device=xq.device, dtype=CT)
    if out is None:
        out = torch.empty_like(xq)
    bf, nw = default_step_config(d, F)
    bf = block_f or bf
    nw = num_warps or nw
    _ttt_step_kernel[(B * H,)](
        xq, xk, xv, xq.stride(0), xq.stride(1), lr, lr.stride(0), lr.stride(1),
        ln_weight, ln_bias, token_idx, state.pos, exec_mask if exec_mask is not None else state.pos,
        *state.weights(), *state.sums(),
        out, out.stride(0), out.stride(1),
        H, K=K, D=d, F=F, BF=bf, EPS=LN_EPS, HAS_EXEC=exec_mask is not None,
        num_warps=nw, num_stages=1,
    )
    if exec_mask is None:
        state.pos.add_(1)
    else:
        state.pos.add_(exec_mask)
    return out
