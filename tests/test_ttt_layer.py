"""The TTT-MLP layer: state semantics (DESIGN.md section 4), gradients, in-context learning."""

import pytest
import torch

from moshi_ttt.ttt import TTTMLP, TTTConfig, TTTConfigError
from moshi_ttt.ttt.demo import DemoConfig, run_demo
from moshi_ttt.ttt.state import load_states, save_states, state_from_tensors

D = torch.float64

# Inner widths on a host of width 16 with 4 heads: the full-width default (4 x 4), a narrow memory
# (2 x 6 = 12 < 16) and a wide one (3 x 8 = 24 > 16, head count not dividing the host width).
WIDTHS = [{}, {"num_heads": 2, "head_dim": 6}, {"num_heads": 3, "head_dim": 8}]
WIDTH_IDS = ["host", "narrow12", "wide24"]


def make_layer(**cfg):
    cfg = {"mini_batch_size": 4, "init_std": 0.2, "base_lr": 4.0, **cfg}
    layer = TTTMLP(16, 4, TTTConfig(**cfg), dtype=D)
    with torch.no_grad():  # non-trivial values everywhere, so that every path is exercised
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def run_chunks(layer, x, sizes, state=None, **kw):
    outs, s = [], 0
    for n in sizes:
        o, state = layer(x[:, s:s + n], state, **kw)
        outs.append(o)
        s += n
    return torch.cat(outs, 1), state


def states_equal(a, b):
    return all(torch.equal(t, getattr(b, n)) for n, t in a.items())


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("short_conv", [0, 3])
def test_full_chunked_and_frame_by_frame_agree(persistent, rope, width, short_conv):
    layer = make_layer(rope=rope, short_conv=short_conv, **width)
    every = None if persistent else 6
    x = torch.randn(2, 20, 16, dtype=D)
    full, st_full = layer(x, reset_every=every)
    chunked, st_c = run_chunks(layer, x, (7, 5, 1, 7), reset_every=every)
    frames, st_f = run_chunks(layer, x, [1] * 20, reset_every=every)
    assert (chunked - full).abs().max() < 1e-10 and (frames - full).abs().max() < 1e-10
    for st in (st_c, st_f):
        assert all((t - getattr(st_full, n)).abs().max() < 1e-10 for n, t in st.items())


def test_non_persistent_resets_every_chunk():
    """reset_every=6 equals running each 6-frame segment from a fresh memory."""
    layer = make_layer()
    x = torch.randn(2, 18, 16, dtype=D)
    full, _ = layer(x, reset_every=6)
    manual = torch.cat([layer(x[:, s:s + 6])[0] for s in range(0, 18, 6)], 1)
    assert (full - manual).abs().max() < 1e-12
    persistent = make_layer()
    persistent.load_state_dict(layer.state_dict())
    assert (persistent(x)[0][:, 6:] - full[:, 6:]).abs().max() > 1e-6  # the memory did matter


@pytest.mark.parametrize("short_conv", [0, 2])
def test_batch_samples_are_independent(short_conv):
    layer = make_layer(short_conv=short_conv)
    x = torch.randn(3, 9, 16, dtype=D)
    out, st = layer(x)
    for b in range(3):
        o1, s1 = layer(x[b:b + 1])
        assert (out[b:b + 1] - o1).abs().max() < 1e-12
        assert all((t[b:b + 1] - getattr(s1, n)).abs().max() < 1e-12 for n, t in st.items())


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
@pytest.mark.parametrize("short_conv", [0, 3])
def test_reset_mask_resets_only_selected_samples(width, short_conv):
    layer = make_layer(short_conv=short_conv, **width)
    x = torch.randn(3, 10, 16, dtype=D)
    _, st = layer(x)
    st2 = layer.reset(st, torch.tensor([False, True, False]))
    fresh = layer.init_state(3)
    for n, t in st2.items():
        assert torch.equal(t[1], getattr(fresh, n)[1])
        assert torch.equal(t[0], getattr(st, n)[0]) and torch.equal(t[2], getattr(st, n)[2])
    # A reset sample continues exactly like a fresh stream.
    y = torch.randn(3, 5, 16, dtype=D)
    out, _ = layer(y, st2)
    out_fresh, _ = layer(y[1:2])
    assert (out[1:2] - out_fresh).abs().max() < 1e-12


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
@pytest.mark.parametrize("short_conv", [0, 3])
def test_exec_mask_keeps_state_bit_for_bit(width, short_conv):
    layer = make_layer(short_conv=short_conv, **width)
    x = torch.randn(2, 6, 16, dtype=D)
    _, st = layer(x)
    for n in (1, 3):  # per-token and dual paths
        _, st2 = layer(torch.randn(2, n, 16, dtype=D), st, exec_mask=torch.tensor([True, False]))
        for name, t in st2.items():
            assert torch.equal(t[1], getattr(st, name)[1])
        assert not torch.equal(st2.gb2[0], st.gb2[0])  # the executing sample did move
        assert st2.pos.tolist() == [6 + n, 6]


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_forward_never_writes_parameters(persistent, train):
    layer = make_layer()
    every = None if persistent else 4
    layer.train(train)
    snap = {k: v.clone() for k, v in layer.state_dict().items()}
    state = None
    for n in (5, 1, 7):
        _, state = layer(torch.randn(2, n, 16, dtype=D), state, reset_every=every)
    with torch.no_grad():
        layer(torch.randn(2, 3, 16, dtype=D), state, reset_every=every)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, snap[k]), k


def _third_chunk_grads(mode):
    torch.manual_seed(0)
    layer = make_layer(state_grad=mode)
    x = torch.randn(2, 18, 16, dtype=D)
    _, st = layer(x[:, :6])
    _, st = layer(x[:, 6:12], st)
    out, _ = layer(x[:, 12:], st)
    layer.zero_grad()
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad for n, p in layer.named_parameters()}


def test_state_grad_delta_reaches_initial_weights_from_every_chunk():
    out_delta, g_delta = _third_chunk_grads("delta")
    out_detach, g_detach = _third_chunk_grads("detach")
    assert torch.equal(out_delta, out_detach)  # the forward values are identical
    for name in ("W1", "b1", "W2", "b2"):
        assert g_delta[name] is not None and g_delta[name].abs().max() > 0, name
        assert g_detach[name] is None or g_detach[name].abs().max() == 0, name
    # The projections get gradients either way.
    assert g_detach["wq.weight"].abs().max() > 0


def test_state_grad_delta_is_identity_through_the_past():
    """Under 'delta' the carried state's value is exactly the state, and d/d W_base of anything
    computed from it equals d/d W_state (summed over the batch): an identity Jacobian."""
    from moshi_ttt.ttt.state import carry_state

    layer = make_layer(state_grad="delta")
    _, st = layer(torch.randn(2, 6, 16, dtype=D))
    carried = carry_state(st, layer.base_weights(), "delta")
    assert all(torch.equal(t, getattr(st, n)) for n, t in carried.items())
    r = torch.randn_like(st.W1)
    (g,) = torch.autograd.grad((carried.W1 * r).sum(), layer.W1)
    assert torch.equal(g, r.sum(0))
    assert carry_state(st, layer.base_weights(), "detach").W1.grad_fn is None


def test_layer_learns_in_context():
    result = run_demo(DemoConfig(rounds=6))
    rounds = result["per_round"]
    assert rounds[-1] < 0.35 * rounds[0]
    assert all(b < a for a, b in zip(rounds[:4], rounds[1:5]))  # falls round after round at first


def test_gradcheck_whole_layer():
    layer = TTTMLP(8, 2, TTTConfig(mini_batch_size=2, init_std=0.3, base_lr=2.0), dtype=D)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(2, 5, 8, dtype=D, requires_grad=True)

    def f(x, *ps):
        out, st = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return out, st.W1, st.gb2

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
def test_state_save_load_roundtrip(tmp_path, width):
    layer = make_layer(**width)
    x = torch.randn(2, 7, 16, dtype=D)
    _, st = layer(x)
    save_states(tmp_path / "m.safetensors", {"layer0": st}, {"note": "test"})
    grouped, meta = load_states(tmp_path / "m.safetensors")
    st2 = state_from_tensors(grouped["layer0"], like=layer.init_state(2))
    assert meta == {"note": "test"} and states_equal(st, st2)
    y = torch.randn(2, 5, 16, dtype=D)
    assert torch.equal(layer(y, st)[0], layer(y, st2)[0])
    with pytest.raises(ValueError, match="W1"):
        state_from_tensors(grouped["layer0"], like=layer.init_state(3))


@pytest.mark.parametrize("kw,match", [
    ({"mini_batch_size": 0}, "mini_batch_size"),
    ({"layers": "odd"}, "unknown layer spec"),
    ({"layers": "every:0"}, "unknown layer spec"),
    ({"base_lr": -1.0}, "base_lr"),
    ({"state_grad": "bogus"}, "state_grad"),
    ({"head_dim": 0}, "head_dim"),
])
def test_config_validation(kw, match):
    with pytest.raises(TTTConfigError, match=match):
        TTTConfig(**kw)


def test_layer_specs_resolve():
    assert TTTConfig(layers="middle").resolve_layers(32) == list(range(8, 24))
    assert TTTConfig(layers="all").resolve_layers(4) == [0, 1, 2, 3]
    assert TTTConfig(layers="none").resolve_layers(4) == []
    assert TTTConfig(layers="every:2").resolve_layers(6) == [1, 3, 5]
    assert TTTConfig(layers=[3, 1]).resolve_layers(4) == [1, 3]
    assert TTTConfig(enable=False).resolve_layers(4) == []
    with pytest.raises(TTTConfigError, match="out of range"):
        TTTConfig(layers=[4]).resolve_layers(4)
    with pytest.raises(TTTConfigError, match="unknown TTTConfig key"):
        TTTConfig.from_dict({"mini_batch": 3})


def test_configs_saved_with_the_old_reset_period_still_load():
    """``chunk_frames`` left TTTConfig (the reset period is an argument of the run): configs
    saved before still load, and the key is dropped."""
    cfg = TTTConfig.from_dict({"chunk_frames": 750, "persistent_states": False, "mini_batch_size": 8})
    assert not cfg.persistent_states and cfg.mini_batch_size == 8
    assert "chunk_frames" not in cfg.to_dict()


def test_inplace_streaming_step_respects_exec_mask_at_a_due_reset():
    """No-grad one-frame steps may update the caller's state in place; a sample that does not
    execute keeps its state exactly even when its non-persistent reset is due. (On CPU the in-place
    step runs with fused projection matrices: the same math in another summation order, so the
    executing sample agrees to rounding, with and without the short convolution.)"""
    for conv in (0, 2):
        layer = make_layer(short_conv=conv)
        x = torch.randn(2, 5, 16, dtype=D)
        with torch.no_grad():
            _, st = layer(x[:, :4], reset_every=4)     # pos == reset_every: a reset is due
            snap = st.clone()
            ref_out, ref_st = layer(x[:, 4:5], snap.clone(), exec_mask=torch.tensor([True, False]), reset_every=4)
            out, st2 = layer(x[:, 4:5], st, exec_mask=torch.tensor([True, False]), inplace=True, reset_every=4)
        assert (out - ref_out).abs().max() < 1e-12
        for n, t in st2.items():
            assert (t - getattr(ref_st, n)).abs().max() < 1e-12, n
            assert torch.equal(t[1], getattr(snap, n)[1]), n
        assert st2.pos.tolist() == [1, 4]


def test_inplace_step_sees_parameter_changes():
    """The in-place CPU step runs on fused copies of the projection weights; an in-place parameter
    change between frames (an optimizer step, ``load_state_dict``) must reach the next frame: its
    output equals the functional step's, which reads the parameters directly."""
    for conv in (0, 3):
        layer = make_layer(short_conv=conv)
        x = torch.randn(2, 6, 16, dtype=D)
        with torch.no_grad():
            st = layer.init_state(2)
            ref = st.clone()
            for t in range(6):
                if t in (2, 4):  # change every parameter the fused weights are built from
                    for p in layer.parameters():
                        p.mul_(1.1)
                out, st = layer(x[:, t:t + 1], st, inplace=True)
                ref_out, ref = layer(x[:, t:t + 1], ref)
                assert (out - ref_out).abs().max() < 1e-12, (conv, t)
        assert (st.W1 - ref.W1).abs().max() < 1e-12


def test_short_conv_is_a_causal_depthwise_convolution():
    """The convolution equals torch's conv1d (depthwise, left-padded) on the q/k/v inputs, and it
    binds neighbouring frames: the key of frame t depends on frame t-1 (and not on t+1)."""
    layer = make_layer(short_conv=3)
    x = torch.randn(2, 9, 16, dtype=D)
    got = layer._short_conv(x, None)
    xp = torch.nn.functional.pad(x.transpose(1, 2), (2, 0))
    for c in range(3):
        ref = torch.nn.functional.conv1d(xp, layer.conv_weight[c].unsqueeze(1), groups=16).transpose(1, 2)
        assert (got[c] - ref).abs().max() < 1e-12
    _, xk, _, _ = layer.project(x, torch.zeros(2, dtype=torch.long))
    x2 = x.clone()
    x2[:, 4] += 1.0
    _, xk2, _, _ = layer.project(x2, torch.zeros(2, dtype=torch.long))
    changed = (xk2 - xk).abs().amax(dim=(0, 1, 3))
    assert changed[:4].max() == 0 and changed[4] > 0 and changed[5] > 0 and changed[6] > 0 and changed[7] == 0


@pytest.mark.parametrize("width", WIDTHS[1:], ids=WIDTH_IDS[1:])
def test_inner_width_shapes_and_parameter_count(width):
    """Projections dim -> H d and back, post-norm over H d, lr gate dim -> H: counted by hand."""
    dim, H, d = 16, width["num_heads"], width["head_dim"]
    E, F, K = H * d, 4 * d, 4
    layer = make_layer(**width)
    assert layer.wq.weight.shape == layer.wk.weight.shape == layer.wv.weight.shape == (E, dim)
    assert layer.wo.weight.shape == (dim, E) and layer.post_norm.weight.shape == (E,)
    assert layer.lr_gate.weight.shape == (H, dim) and layer.W1.shape == (H, d, F)
    hand = (4 * dim * E + (dim * H + H) + K + 2 * H * d + H * d * F + H * F + H * F * d + H * d
            + 2 * E + dim)
    assert sum(p.numel() for p in layer.parameters()) == hand
    st = layer.init_state(2)
    assert st.W1.shape == (2, H, d, F) and st.b2.shape == (2, H, 1, d)


@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
def test_layer_matches_oracle_at_any_inner_width(width):
    """The whole layer against an independent float64 computation: projections written as
    matrix products, the token-by-token autograd oracle, post-norm and output projection."""
    from moshi_ttt.ttt.reference import ttt_mlp_reference

    layer = make_layer(**width)
    H, d = layer.num_heads, layer.head_dim
    x = torch.randn(2, 11, 16, dtype=D)
    out, st = layer(x)

    def heads(w):  # x [B, T, dim] @ w.T [dim, H d] -> [B, H, T, d]
        return (x @ w.T).view(2, 11, H, d).permute(0, 2, 1, 3)

    def l2(t):
        return t / t.pow(2).sum(-1, keepdim=True).sqrt()

    xq, xk, xv = l2(heads(layer.wq.weight)), l2(heads(layer.wk.weight)), heads(layer.wv.weight)
    lr = (4.0 * torch.sigmoid(x @ layer.lr_gate.weight.T + layer.lr_gate.bias) / d).permute(0, 2, 1)
    tok = (1.0 / torch.arange(1, 5, dtype=D) + layer.learnable_token_idx).clamp_min(0)
    o, st_ref = ttt_mlp_reference(xq, xk, xv, lr, layer.ttt_norm_weight, layer.ttt_norm_bias,
                                  layer.init_state(2), 4, tok)
    y = o.permute(0, 2, 1, 3).reshape(2, 11, H * d)
    y = torch.nn.functional.layer_norm(y, (H * d,), layer.post_norm.weight, layer.post_norm.bias, 1e-6)
    ref = torch.tanh(layer.gating_alpha) * (y @ layer.wo.weight.T)
    assert (out - ref).abs().max() < 1e-9
    assert all((t.double() - getattr(st_ref, n).double()).abs().max() < 1e-9 for n, t in st.items())


def test_head_dim_default_keeps_full_width():
    """head_dim None is today's layer: inner width = host width, same init for the same seed."""
    torch.manual_seed(3)
    a = TTTMLP(16, 4, TTTConfig(), dtype=D)
    torch.manual_seed(3)
    b = TTTMLP(16, 4, TTTConfig(num_heads=4, head_dim=4), dtype=D)
    assert a.inner_dim == 16 and a.head_dim == 4
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="head_dim"):
        TTTMLP(16, 4, TTTConfig(num_heads=3))


def test_exec_mask_written_in_place_after_forward_keeps_backward_valid():
    """moshi writes its exec_mask in place (a reset of another sample); a graph kept across
    chunks (state_grad: full) saved the mask of an earlier chunk and must still backpropagate."""
    layer = make_layer()
    mask = torch.tensor([True, False])
    out, st = layer(torch.randn(2, 5, 16, dtype=D), exec_mask=mask)
    mask[:] = torch.tensor([True, True])
    (out.pow(2).sum() + st.W1.sum()).backward()
    assert layer.W1.grad is not None and layer.W1.grad.abs().max() > 0


def test_exec_mask_rewritten_in_place_between_calls_with_full_state_grad():
    """moshi's ``set_exec_mask`` writes the mask in place; with ``state_grad: full`` the first
    call's graph is still alive when the second call's loss is backpropagated."""
    layer = make_layer(state_grad="full")
    x = torch.randn(2, 8, 16, dtype=D)
    mask = torch.ones(2, dtype=torch.bool)
    _, st = layer(x[:, :4], None, exec_mask=mask)
    mask[:] = torch.tensor([True, False])
    out, _ = layer(x[:, 4:], st, exec_mask=mask)
    out.sum().backward()
    assert layer.wk.weight.grad.abs().max() > 0
