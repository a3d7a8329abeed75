"""The oracle: a token-by-token TTT-MLP written with autograd for the inner gradient.

Slow and obviously right; every faster implementation (dual form, per-token form, kernels) is
tested against it in float64. It shares no code with ``ops.py`` except the state container:
the layer norm, gelu and inner gradient are written out again here on purpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .state import TTTState

EPS = 1e-6


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * w + b


def _f(x: torch.Tensor, W1, b1, W2, b2) -> torch.Tensor:
    """Inner MLP for one sample, all heads: x [H, d] -> [H, d]."""
    h = F.gelu(torch.einsum("hd,hdf->hf", x, W1) + b1[:, 0], approximate="tanh")
    return torch.einsum("hf,hfd->hd", h, W2) + b2[:, 0]


def ttt_mlp_reference(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, state: TTTState, mini_batch_size: int,
    token_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TTTState]:
    """Same contract as ``moshi_ttt.ttt.ops.ttt_mlp``; loops over samples and tokens."""
    B, H, T, d = xq.shape
    K = mini_batch_size
    if token_idx is None:
        token_idx = 1.0 / torch.arange(1, K + 1, dtype=xq.dtype, device=xq.device)
    outs = torch.zeros_like(xq)
    new_fields: dict[str, list[torch.Tensor]] = {name: [] for name, _ in state.items()}
    with torch.enable_grad():
        for b in range(B):
            W0 = [state.W1[b], state.b1[b], state.W2[b], state.b2[b]]
            S = [state.gW1[b], state.gb1[b], state.gW2[b], state.gb2[b]]
            pos = int(state.pos[b])
            out_b = []
            for t in range(T):
                p = pos % K
                W0g = [w if w.requires_grad else w.detach().requires_grad_() for w in W0]
                # Per-head loss summed over heads: each head's weights only see their own head.
                target = _ln(xv[b, :, t] - xk[b, :, t], ln_weight, ln_bias)
                pred = _ln(_f(xk[b, :, t], *W0g), ln_weight, ln_bias)
                loss = 0.5 * ((pred - target) ** 2).sum()
                grads = torch.autograd.grad(loss, W0g, create_graph=True)
                lr_t = lr[b, :, t]
                S = [s + lr_t.view(H, *([1] * (g.dim() - 1))) * g for s, g in zip(S, grads)]
                Wt = [w - token_idx[p] * s for w, s in zip(W0g, S)]
                out_b.append(xq[b, :, t] + _ln(_f(xq[b, :, t], *Wt), ln_weight, ln_bias))
                if p == K - 1:
                    W0 = Wt
                    S = [torch.zeros_like(s) for s in S]
                else:
                    W0 = W0g
                pos += 1
            outs_b = torch.stack(out_b, dim=1)  # [H, T, d]
            outs = outs.index_put((torch.tensor([b]),), outs_b.unsqueeze(0))
            for name, t in zip(("W1", "b1", "W2", "b2", "gW1", "gb1", "gW2", "gb2"), W0 + S):
                new_fields[name].append(t)
            new_fields["pos"].append(torch.tensor(pos, device=xq.device))
    new = TTTState(**{name: torch.stack(v) for name, v in new_fields.items()})
    return outs, new
