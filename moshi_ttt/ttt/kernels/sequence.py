"""``ttt_mlp_triton``: the TTT-MLP operator over a sequence with fused Triton kernels.

Same contract as ``moshi_ttt.ttt.ops.ttt_mlp`` (DESIGN.md section 3): returns ``(out,
new_state)``, never modifies its inputs, and is differentiable w.r.t. every input (``xq, xk, xv,
lr, ln_weight, ln_bias, token_idx``) and every tensor of the input state (the weights, hence the
base parameters through ``init_state``, and the running sums). The backward is the fused Triton
kernel of ``backward.py`` (analytic, recomputing mini-batch-start states from checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..state import TTTState
from .backward import launch_backward
from .forward import default_block_f, launch_forward, num_mini_batches_max

PRECISIONS = ("tf32", "tf32x3", "ieee")


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters (defaults: ``default_config``).

    precision: tl.dot input precision for float32 compute: "tf32" (fast, ~1e-3 relative per
        product, like cuBLAS with allow_tf32), "tf32x3" (~fp32 accuracy, 3x the tensor-core
        work) or "ieee" (exact fp32, no tensor cores). float64 (interpreter tests) is always exact.
    ckpt_every: mini-batches per checkpoint group of the backward (None: ~sqrt(#mini-batches)).
    """

    block_f_fwd: int
    block_f_bwd: int
    num_warps_fwd: int
    num_warps_bwd: int
    precision: str
    ckpt_every: int | None = None


def default_config(d: int, F: int, device: torch.device, compute_dtype: torch.dtype,
                   precision: str = "tf32") -> KernelConfig:
    """Untuned defaults (chosen for register pressure at d=128 on H100, not measured).

    ``precision`` applies to float32 compute on CUDA; float64 and the interpreter are exact."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
    if compute_dtype == torch.float64 or device.type != "cuda":
        precision = "ieee"
    bf = default_block_f(d, F)
    return KernelConfig(block_f_fwd=bf, block_f_bwd=min(bf, 32), num_warps_fwd=8 if d >= 128 else 4,
                        num_warps_bwd=8 if d >= 64 else 4, precision=precision)


def _ckpt_every(cfg: KernelConfig, T: int, K: int) -> int:
    if cfg.ckpt_every is not None:
        return max(1, int(cfg.ckpt_every))
    return max(1, math.ceil(math.sqrt(num_mini_batches_max(T, K))))


class _TTTMLPFunction(torch.autograd.Function):
    """Autograd node around the fused forward/backward kernels.

    Inputs: xq, xk, xv [B, H, T, d]; lr [B, H, T]; ln_weight, ln_bias [H, d]; token_idx [K];
    pos [B] (int64, no gradient); W1, b1, W2, b2, gW1, gb1, gW2, gb2 (the input state).
    Outputs: out [B, H, T, d] and the output state's W1, b1, W2, b2, gW1, gb1, gW2, gb2.
    Saved for backward: the inputs (no copies) and the checkpoints (NC states per (b, h)).
    """

    @staticmethod
    def forward(ctx, xq, xk, xv, lr, ln_weight, ln_bias, token_idx, pos,
                W1, b1, W2, b2, gW1, gb1, gW2, gb2, K: int, cfg: KernelConfig):
        T = xq.shape[2]
        ck_every = _ckpt_every(cfg, T, K)
        out, newW, newS, ckpts = launch_forward(
            xq, xk, xv, lr, ln_weight, ln_bias, token_idx, pos, (W1, b1, W2, b2),
            (gW1, gb1, gW2, gb2), K, ckpt_every=ck_every, block_f=cfg.block_f_fwd,
            num_warps=cfg.num_warps_fwd, precision=cfg.precision)
        ctx.save_for_backward(xq, xk, xv, lr, ln_weight, ln_bias, token_idx, pos,
                              gW1, gb1, gW2, gb2, *ckpts)
        ctx.K, ctx.cfg, ctx.ck_every = K, cfg, ck_every
        return (out, *newW, *newS)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dW1, db1, dW2, db2, dgW1, dgb1, dgW2, dgb2):
        xq, xk, xv, lr, ln_weight, ln_bias, token_idx, pos, gW1, gb1, gW2, gb2, *ckpts = ctx.saved_tensors
        cfg = ctx.cfg
        (dxq, dxk, dxv, dlr, dlnw, dlnb, dtok, dW1i, db1i, dW2i, db2i,
         dG1, dg1, dG2, dg2) = launch_backward(
            xq, xk, xv, lr, ln_weight, ln_bias, token_idx, pos, (gW1, gb1, gW2, gb2),
            tuple(ckpts), ctx.K, ctx.ck_every, dout, (dW1, db1, dW2, db2), (dgW1, dgb1, dgW2, dgb2),
            block_f=cfg.block_f_bwd, num_warps=cfg.num_warps_bwd, precision=cfg.precision)
        return (dxq, dxk, dxv, dlr, dlnw.to(ln_weight.dtype), dlnb.to(ln_bias.dtype),
                dtok.to(token_idx.dtype), None, dW1i, db1i, dW2i, db2i, dG1, dg1, dG2, dg2, None, None)


def _prepare_x(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor):
    """The kernels take one stride set for q, k, v with a contiguous last dim; copy only if not."""
    if xq.stride(-1) == 1 and xq.stride() == xk.stride() == xv.stride():
        return xq, xk, xv
    return xq.contiguous(), xk.contiguous(), xv.contiguous()


def ttt_mlp_triton(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, mini_batch_size: int,
    token_idx: torch.Tensor | None = None, *, config: KernelConfig | None = None,
) -> tuple[torch.Tensor, TTTState]:
    """TTT-MLP over ``T >= 1`` tokens with the fused kernels; contract of ``ttt_mlp``.

    Args:
        xq, xk, xv: [B, H, T, d] (any float dtype; bf16 in training).
        lr: [B, H, T]; ln_weight, ln_bias: [H, d]; token_idx: [K] (default ``1/(i+1)``).
        state: ``TTTState`` (W1 [B, H, d, F], b1 [B, H, 1, F], W2 [B, H, F, d], b2 [B, H, 1, d],
            running sums of the same shapes, pos [B] int64); its dtype is the compute dtype
            (fp32; fp64 in interpreter tests). Samples may have different ``pos % K``.
        mini_batch_size: K.
        config: launch parameters; default ``default_config``.
    Returns:
        out [B, H, T, d] (dtype of xq) and the new state (new tensors; the input is untouched).
    """
    K = int(mini_batch_size)
    B, H, T, d = xq.shape
    CT = state.W1.dtype
    if token_idx is None:
        token_idx = 1.0 / torch.arange(1, K + 1, device=xq.device, dtype=CT)
    cfg = config or default_config(d, state.W1.shape[-1], xq.device, CT)
    xq, xk, xv = _prepare_x(xq, xk, xv)
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    token_idx = token_idx.contiguous()
    pos = state.pos.contiguous()
    W = tuple(t.contiguous() for t in state.weights())
    S = tuple(t.to(CT).contiguous() for t in state.sums())
    tensors = (xq, xk, xv, lr, ln_weight, ln_bias, token_idx, *W, *S)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out, *new = _TTTMLPFunction.apply(xq, xk, xv, lr, ln_weight, ln_bias, token_idx, pos,
                                          *W, *S, K, cfg)
    else:
        out, newW, newS, _ = launch_forward(
            xq, xk, xv, lr, ln_weight, ln_bias, token_idx, pos, W, S, K, ckpt_every=None,
            block_f=cfg.block_f_fwd, num_warps=cfg.num_warps_fwd, precision=cfg.precision)
        new = [*newW, *newS]
    return out, TTTState(*new, pos=state.pos + T)
