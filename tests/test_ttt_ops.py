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


# ----------------------------------------------------------------------------- analytic backward
def _grads_from_carried_state(fn, K, offsets, T, seed=5):
    """Gradients of outputs and every output-state field with respect to every input, including
    a carried state that sits inside its mini-batch (non-zero running sums, per-sample offsets)
    and has a graph of its own (its weights and sums are leaves here)."""
    inputs, base = random_op_inputs(B=len(offsets), T=T, d=3, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    st0 = init_state(*base, batch_size=len(offsets))
    leaves = {}
    fields = {}
    for name, t in st0.items():
        if name == "pos":
            fields[name] = torch.tensor(offsets)
            continue
        v = (t + 0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype)).requires_grad_(True)
        leaves["state." + name] = fields[name] = v
    state = TTTState(**fields)
    for k, v in inputs.items():
        leaves[k] = v.requires_grad_(True)
    tok = (1.0 / torch.arange(1, K + 1, dtype=torch.float64) + 0.1).requires_grad_(True)
    leaves["token_idx"] = tok
    out, new = fn(**inputs, state=state, mini_batch_size=K, token_idx=tok)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    loss = (out * w).sum()
    for i, (name, t) in enumerate(new.items()):
        if name != "pos":
            loss = loss + (t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() * (1 + i)
    return list(leaves), torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)


@pytest.mark.parametrize("K,offsets,T", [(4, [1, 1], 7), (4, [0, 3, 2], 6), (3, [2, 0], 2), (1, [0, 0], 3),
                                         (4, [0, 0], 8)])
def test_dual_gradients_from_a_carried_state_match_reference(K, offsets, T):
    names, g_ref = _grads_from_carried_state(ttt_mlp_reference, K, offsets, T)
    for impl in ("dual", "dual_autograd"):
        _, g = _grads_from_carried_state(lambda impl=impl, **kw: ttt_mlp(**kw, impl=impl), K, offsets, T)
        for name, a, b in zip(names, g, g_ref):
            assert b is not None and b.abs().max() > 0, name
            assert a is not None and (a - b).abs().max() < 1e-9, (impl, name, (a - b).abs().max())


def test_dual_gradients_are_chunk_invariant():
    """One call over T tokens and the same tokens split into calls (boundaries inside mini-batches)
    give the same gradients for every input: the analytic backward chains through the state."""
    K = 4
    inputs, base = random_op_inputs(B=2, T=13, d=4, seed=7)
    leaves = {**inputs, **dict(zip(("W1", "b1", "W2", "b2"), base))}
    for v in leaves.values():
        v.requires_grad_(True)
    w = torch.randn(2, 2, 13, 4, dtype=torch.float64)

    def grads(sizes):
        st = init_state(leaves["W1"], leaves["b1"], leaves["W2"], leaves["b2"], 2)
        outs, s = [], 0
        for n in sizes:
            piece = {k: v[:, :, s:s + n] if k in ("xq", "xk", "xv", "lr") else v for k, v in inputs.items()}
            o, st = ttt_mlp(**piece, state=st, mini_batch_size=K, impl="dual")
            outs.append(o)
            s += n
        loss = (torch.cat(outs, 2) * w).sum() + st.W2.pow(2).sum() + st.gW1.sum()
        return torch.autograd.grad(loss, list(leaves.values()))

    for a, b in zip(grads([13]), grads([2, 5, 1, 5])):
        assert (a - b).abs().max() < 1e-10


def test_dual_no_grad_equals_grad_forward():
    """Under no_grad the dual form skips the autograd nodes; the values are the same."""
    inputs, base = random_op_inputs(B=2, T=10)
    st = init_state(*base, batch_size=2)
    out, new = ttt_mlp(**inputs, state=st, mini_batch_size=4, impl="dual")
    with torch.no_grad():
        out2, new2 = ttt_mlp(**inputs, state=st, mini_batch_size=4, impl="dual")
    assert torch.equal(out, out2) and max_state_diff(new, new2) == 0


@pytest.mark.parametrize("has_sums,closes", [(False, True), (True, True), (True, False), (False, False)])
def test_dual_mini_batch_node_gradcheck(has_sums, closes):
    """torch.autograd.gradcheck of one mini-batch node against finite differences."""
    from moshi_ttt.ttt.dual import _MiniBatch

    g = torch.Generator().manual_seed(11)
    N, n, d, F = 3, 3, 2, 8

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g, dtype=torch.float64)).requires_grad_(True)

    args = [r(N, n, d), r(N, n, d), r(N, n, d), torch.rand(N, n, 1, generator=g, dtype=torch.float64)
            .requires_grad_(True), r(1, n, 1, scale=0.5), r((), scale=0.5), r(N, 1, d),
            r(N, d, F, scale=0.5), r(N, 1, F, scale=0.2), r(N, F, d, scale=0.5), r(N, 1, d, scale=0.2)]
    sums = [r(N, d, F, scale=0.1), r(N, 1, F, scale=0.1), r(N, F, d, scale=0.1), r(N, 1, d, scale=0.1)]

    def f(*a):
        s = a[11:] if has_sums else (None,) * 4
        return _MiniBatch.apply(*a[:11], *s, closes)

    assert torch.autograd.gradcheck(f, (*args, *(sums if has_sums else ())), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- in-place streaming step
@pytest.mark.parametrize("start,p_skip", [([0, 2, 3], 0.3), ([1, 1, 1], 0.0)])
def test_inplace_step_equals_token_form_bit_for_bit(start, p_skip):
    """``ttt_mlp_step_`` over a sequence (per-sample offsets, some samples not executing; or every
    sample at the same position, which the CPU step reads on the host) gives the token form's
    outputs and states exactly, in the same tensors (stable addresses)."""
    from moshi_ttt.ttt.ops import ttt_mlp_step_
    from moshi_ttt.ttt.state import select_state

    K, T = 4, 9
    inputs, base = random_op_inputs(B=3, T=T, seed=9)
    tok = 1.0 / torch.arange(1, K + 1, dtype=torch.float64) + 0.05
    st = init_state(*base, batch_size=3)
    st.pos.copy_(torch.tensor(start))
    ref = st.clone()
    ptrs = [t.data_ptr() for _, t in st.items()]
    g = torch.Generator().manual_seed(2)
    for t in range(T):
        one = {k: v[:, :, t:t + 1] if k in ("xq", "xk", "xv", "lr") else v for k, v in inputs.items()}
        ex = torch.rand(3, generator=g) >= p_skip
        o_ref, new = ttt_mlp(**one, state=ref, mini_batch_size=K, token_idx=tok, impl="token")
        ref = select_state(ex, new, ref)
        o = ttt_mlp_step_(**one, state=st, mini_batch_size=K, token_idx=tok, exec_mask=ex)
        assert torch.equal(o, o_ref)
        assert all(torch.equal(a, getattr(ref, n)) for n, a in st.items())
    assert [t.data_ptr() for _, t in st.items()] == ptrs
    out_ref, st_ref = ttt_mlp_reference(**{k: v[:, :, :1] if k in ("xq", "xk", "xv", "lr") else v
                                           for k, v in inputs.items()},
                                        state=init_state(*base, batch_size=3), mini_batch_size=K, token_idx=tok)
    st1 = init_state(*base, batch_size=3)
    o1 = ttt_mlp_step_(**{k: v[:, :, :1] if k in ("xq", "xk", "xv", "lr") else v for k, v in inputs.items()},
                       state=st1, mini_batch_size=K, token_idx=tok)
    assert (o1 - out_ref).abs().max() < 1e-9 and max_state_diff(st1, st_ref) < 1e-9


def test_reset_state_inplace_resets_only_selected_samples():
    from moshi_ttt.ttt.state import reset_state_

    inputs, base = random_op_inputs(B=3, T=6)
    _, st = ttt_mlp(**inputs, state=init_state(*base, batch_size=3), mini_batch_size=4)
    snap, fresh = st.clone(), init_state(*base, batch_size=3)
    reset_state_(st, base, torch.tensor([False, True, False]))
    for n, t in st.items():
        assert torch.equal(t[1], getattr(fresh, n)[1]), n
        assert torch.equal(t[0], getattr(snap, n)[0]) and torch.equal(t[2], getattr(snap, n)[2]), n
