"""The TTT-MLP operator against its float64 oracle (DESIGN.md section 3)."""

import pytest
import torch
from ttt_helpers import init_state, max_state_diff, random_op_inputs

from moshi_ttt.ttt.ops import ttt_mlp
from moshi_ttt.ttt.reference import ttt_mlp_reference
from moshi_ttt.ttt.state import TTTState

IMPLS = ["dual", "token"]


def _run(fn, inputs, state, K, token_idx=None, **kw):
    return fn(**inputs, state=state, mini_batch_size=K, token_idx=token_idx, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,K", [(11, 4), (8, 4), (5, 8), (7, 1)])
def test_matches_float64_reference(impl, T, K):
    inputs, base = random_op_inputs(T=T)
    state = init_state(*base, batch_size=2)
    tok = 1.0 / torch.arange(1, K + 1, dtype=torch.float64) + 0.05 * torch.rand(K, dtype=torch.float64)
    out_ref, st_ref = _run(ttt_mlp_reference, inputs, state, K, tok)
    out, st = _run(ttt_mlp, inputs, state, K, tok, impl=impl)
    assert (out - out_ref).abs().max() < 1e-9
    assert max_state_diff(st, st_ref) < 1e-9
    assert torch.equal(st.pos, torch.full((2,), T))


@pytest.mark.parametrize("impl", IMPLS + ["auto"])
def test_chunk_invariance(impl):
    K = 4
    inputs, base = random_op_inputs(T=11)
    state0 = init_state(*base, batch_size=2)
    out_full, st_full = _run(ttt_mlp, inputs, state0, K, impl="dual")
    outs, st, s = [], state0, 0
    for n in (1, 3, 2, 5):  # boundaries inside mini-batches, a size-1 call, a call spanning two
        piece = {k: v[:, :, s:s + n] if k in ("xq", "xk", "xv", "lr") else v for k, v in inputs.items()}
        o, st = _run(ttt_mlp, piece, st, K, impl=impl)
        outs.append(o)
        s += n
    assert (torch.cat(outs, 2) - out_full).abs().max() < 1e-12
    assert max_state_diff(st, st_full) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_causality(impl):
    K, T, t = 4, 11, 5
    inputs, base = random_op_inputs(T=T)
    state = init_state(*base, batch_size=2)
    out, _ = _run(ttt_mlp, inputs, state, K, impl=impl)
    changed = {k: v.clone() for k, v in inputs.items()}
    for k in ("xq", "xk", "xv", "lr"):
        changed[k][:, :, t + 1:] = torch.randn_like(changed[k][:, :, t + 1:]).abs()
    out2, _ = _run(ttt_mlp, changed, state, K, impl=impl)
    assert torch.equal(out[:, :, :t + 1], out2[:, :, :t + 1])
    assert not torch.allclose(out[:, :, t + 1:], out2[:, :, t + 1:])


@pytest.mark.parametrize("impl", IMPLS)
def test_target_is_ln_of_difference(impl):
    """With W1 = W2 = 0 the inner model outputs b2. Set b2 = xv - xk for a token repeated over a
    full mini-batch: under the target LN(xv - xk) the inner loss is already 0, so the gradient is
    0 and the state must not move. Under the old target LN(xv) - xk it would move."""
    H, d, K = 2, 4, 4
    g = torch.Generator().manual_seed(1)
    xk = torch.randn(1, H, 1, d, generator=g, dtype=torch.float64).expand(1, H, K, d)
    xv = torch.randn(1, H, 1, d, generator=g, dtype=torch.float64).expand(1, H, K, d)
    W1, b1 = torch.zeros(H, d, 4 * d, dtype=torch.float64), torch.zeros(H, 1, 4 * d, dtype=torch.float64)
    W2 = torch.zeros(H, 4 * d, d, dtype=torch.float64)
    b2 = (xv - xk)[0, :, :1].clone()                                   # [H, 1, d]
    lw, lb = torch.ones(H, d, dtype=torch.float64), torch.zeros(H, d, dtype=torch.float64)
    state = init_state(W1, b1, W2, b2, 1)
    lr = torch.ones(1, H, K, dtype=torch.float64)
    _, st = ttt_mlp(xk, xk, xv, lr, lw, lb, state, K, impl=impl)
    assert max_state_diff(st, TTTState(**{**dict(state.items()), "pos": st.pos})) < 1e-12
    # Sanity: the same check with the old target's optimum (b2 = LN(xv) - xk) does move the state.
    mu, sd = xv.mean(-1, keepdim=True), xv.var(-1, unbiased=False, keepdim=True).add(1e-6).sqrt()
    state_old = init_state(W1, b1, W2, ((xv - mu) / sd - xk)[0, :, :1].clone(), 1)
    _, st_old = ttt_mlp(xk, xk, xv, lr, lw, lb, state_old, K, impl=impl)
    assert (st_old.b2 - state_old.b2).abs().max() > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_per_sample_state_equals_single_sample_runs(impl):
    K = 4
    inputs, base = random_op_inputs(B=3, T=9)
    out, st = _run(ttt_mlp, inputs, init_state(*base, batch_size=3), K, impl=impl)
    for b in range(3):
        one = {k: v[b:b + 1] if k in ("xq", "xk", "xv", "lr") else v for k, v in inputs.items()}
        o1, s1 = _run(ttt_mlp, one, init_state(*base, batch_size=1), K, impl=impl)
        assert (out[b:b + 1] - o1).abs().max() < 1e-12
        assert max_state_diff(st.index(torch.tensor([b])), s1) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_samples_at_different_mini_batch_offsets(impl):
    """After per-sample resets, samples sit at different offsets in their mini-batches."""
    K = 4
    pre, base = random_op_inputs(B=3, T=6, seed=3)
    st = init_state(*base, batch_size=3)
    _, st = ttt_mlp(**pre, state=st, mini_batch_size=K)
    fresh = init_state(*base, batch_size=3)
    st = TTTState(**{n: torch.where(torch.tensor([True, False, False]).view(-1, *[1] * (t.dim() - 1)),
                                    getattr(fresh, n), t) for n, t in st.items()})
    st.pos[2] = 5  # a third offset (5 % 4 = 1), its weights are whatever they are
    inputs, _ = random_op_inputs(B=3, T=7, seed=4)
    out_ref, st_ref = _run(ttt_mlp_reference, inputs, st, K)
    out, st_new = _run(ttt_mlp, inputs, st, K, impl=impl)
    assert (out - out_ref).abs().max() < 1e-9
    assert max_state_diff(st_new, st_ref) < 1e-9


def test_gradients_match_reference():
    """Outer gradients of the dual form reach every input and equal the oracle's."""
    K = 4
    inputs, base = random_op_inputs(B=2, T=7, d=3)
    leaves = {**inputs, **dict(zip(("W1", "b1", "W2", "b2"), base))}
    for v in leaves.values():
        v.requires_grad_(True)
    tok = (1.0 / torch.arange(1, K + 1, dtype=torch.float64)).requires_grad_(True)
    w = torch.randn(2, 2, 7, 3, dtype=torch.float64)

    def grads(fn):
        st = init_state(leaves["W1"], leaves["b1"], leaves["W2"], leaves["b2"], 2)
        out, new = fn(**inputs, state=st, mini_batch_size=K, token_idx=tok)
        loss = (out * w).sum() + new.W1.sum() + new.gb2.pow(2).sum()
        return torch.autograd.grad(loss, [*leaves.values(), tok])

    g_ref = grads(ttt_mlp_reference)
    for impl in IMPLS:
        g = grads(lambda impl=impl, **kw: ttt_mlp(**kw, impl=impl))
        for name, a, b in zip([*leaves, "token_idx"], g, g_ref):
            assert a.abs().max() > 0, name
            assert (a - b).abs().max() < 1e-9, (impl, name)


def test_does_not_write_inputs_or_base_weights():
    inputs, base = random_op_inputs()
    snap = [t.clone() for t in (*inputs.values(), *base)]
    st = init_state(*base, batch_size=2)
    st_snap = st.clone()
    for impl in IMPLS:
        ttt_mlp(**inputs, state=st, mini_batch_size=4, impl=impl)
    assert all(torch.equal(a, b) for a, b in zip(snap, (*inputs.values(), *base)))
    assert max_state_diff(st, st_snap) == 0
    st.W1.add_(1.0)  # writing the state never writes the base weights
    assert torch.equal(base[0], snap[len(inputs)])


def test_mixed_precision_state():
    """bf16-like inputs with a float32 state: output dtype follows xq, state stays float32."""
    inputs, base = random_op_inputs(dtype=torch.float32)
    st = init_state(*base, batch_size=2)
    low = {k: v.to(torch.bfloat16) if k in ("xq", "xk", "xv") else v for k, v in inputs.items()}
    out, new = ttt_mlp(**low, state=st, mini_batch_size=4)
    assert out.dtype == torch.bfloat16 and new.W1.dtype == torch.float32


def test_shape_errors_are_clear():
    inputs, base = random_op_inputs()
    st = init_state(*base, batch_size=2)
    with pytest.raises(ValueError, match="lr must be"):
        ttt_mlp(**{**inputs, "lr": inputs["lr"][:, :, :3]}, state=st, mini_batch_size=4)
    with pytest.raises(ValueError, match="token_idx"):
        ttt_mlp(**inputs, state=st, mini_batch_size=4, token_idx=torch.ones(3, dtype=torch.float64))
