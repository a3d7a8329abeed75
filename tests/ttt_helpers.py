"""Random inputs for operator tests (float64 by default)."""

import torch

from moshi_ttt.ttt.ops import init_state


def random_op_inputs(B=2, H=2, T=11, d=4, dtype=torch.float64, lr_scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return scale * torch.randn(*s, generator=g, dtype=dtype)

    xq, xk, xv = r(B, H, T, d), r(B, H, T, d), r(B, H, T, d)
    lr = lr_scale * torch.rand(B, H, T, generator=g, dtype=dtype)
    lw, lb = 1 + r(H, d, scale=0.1), r(H, d, scale=0.1)
    W1, b1 = r(H, d, 4 * d, scale=0.3), r(H, 1, 4 * d, scale=0.1)
    W2, b2 = r(H, 4 * d, d, scale=0.3), r(H, 1, d, scale=0.1)
    return dict(xq=xq, xk=xk, xv=xv, lr=lr, ln_weight=lw, ln_bias=lb), (W1, b1, W2, b2)


def state_close(a, b, atol):
    return all(torch.allclose(x, getattr(b, n), atol=atol, rtol=0) for n, x in a.items())


def max_state_diff(a, b):
    return max((x.double() - getattr(b, n).double()).abs().max().item() for n, x in a.items())


__all__ = ["random_op_inputs", "state_close", "max_state_diff", "init_state"]
