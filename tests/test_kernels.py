"""Fused TTT-MLP kernels against the float64 oracle (flash-linear-attention's test style).

Every check compares outputs, the final state and every input gradient (xq, xk, xv, lr,
ln_weight, ln_bias, token_idx, the state's weights -- hence W1, b1, W2, b2 through init_state --
and its running sums) with ``ttt_mlp_reference``.

Without CUDA the kernels run in Triton's CPU interpreter in float64 (tiny shapes; the same kernel
code as on GPU). With CUDA, the same small tests run compiled in float32 ("ieee" dot precision),
and the ``gpu``-marked tests run the full Moshi 7B width (32 heads of 128, K=16, T=3008, bf16
inputs, fp32 state).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from moshi_ttt.ttt.ops import ttt_mlp_dual, ttt_mlp_token
from moshi_ttt.ttt.reference import ttt_mlp_reference
from moshi_ttt.ttt.state import TTTState, init_state, select_state

CUDA = torch.cuda.is_available()
INTERPRET = not CUDA
DEV = torch.device("cuda" if CUDA else "cpu")
DT = torch.float32 if CUDA else torch.float64
# rms(err) / rms(ref): float64 through the interpreter is exact to rounding; compiled float32
# ("ieee" dots) to ~1e-6 relative.
TOL = 1e-4 if CUDA else 1e-10
_KERNEL_MODULES = ("_common", "forward", "backward", "streaming", "sequence")


def _triton_imported_compiled() -> bool:
    """True if Triton was imported in this process without TRITON_INTERPRET: its own @jit helpers
    (e.g. the combine function of ``tl.sum``) are then compiled-mode objects and the interpreter
    cannot run any kernel here."""
    if "triton.language" not in sys.modules:
        return False
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(standard._sum_combine, InterpretedFunction)


# Without a GPU the kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1 before
# Triton is first imported. If another module imported it earlier in this process, the tests
# that run kernels are skipped here and run by ``test_interpreter_suite_in_subprocess`` instead.
IN_SUBPROCESS = INTERPRET and _triton_imported_compiled()
needs_kernels = pytest.mark.skipif(IN_SUBPROCESS, reason="Triton already imported in compiled mode: "
                                   "these run in test_interpreter_suite_in_subprocess")


def _load_kernel_modules() -> dict:
    """Import the kernel modules, in Triton's interpreter mode when there is no GPU.

    ``triton.jit`` picks interpreter or compiler when a kernel is decorated, so the modules are
    imported with TRITON_INTERPRET=1; the variable is then restored so that it does not leak
    into other test modules (the ``_interpret`` fixture sets it again around each test here).
    """
    names = [f"moshi_ttt.ttt.kernels.{m}" for m in _KERNEL_MODULES]
    if not INTERPRET or IN_SUBPROCESS:
        return {n.rsplit(".", 1)[1]: importlib.import_module(n) for n in names}
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return {n.rsplit(".", 1)[1]: importlib.import_module(n) for n in names}
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


# The interpreter converts 1-element arrays to scalars in a way NumPy deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

K_MODS = _load_kernel_modules()
KernelConfig = K_MODS["sequence"].KernelConfig
ttt_mlp_triton = K_MODS["sequence"].ttt_mlp_triton
ttt_step_triton_ = K_MODS["streaming"].ttt_step_triton_


@pytest.mark.skipif(not IN_SUBPROCESS, reason="this process can interpret the kernels itself")
def test_interpreter_suite_in_subprocess():
    """Run this file's kernel tests in a fresh process (TRITON_INTERPRET set before import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


# ----------------------------------------------------------------------------- helpers
def err_ratio(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.detach().double(), got.detach().double()
    return ((ref - got).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float = TOL) -> None:
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    r = err_ratio(ref, got)
    diff = (ref.double() - got.double()).abs().max().item()
    assert r <= tol, f"{name}: error ratio {r:.3e} > {tol:.1e} (max abs diff {diff:.3e})"


def make_problem(B: int, H: int, T: int, d: int, K: int, pos: list[int], *, seed: int = 0,
                 dtype: torch.dtype = DT, device: torch.device = DEV, x_dtype: torch.dtype | None = None):
    """Random inputs and a state at positions ``pos`` (random running sums mid-mini-batch).

    Returns (inputs dict, base weights (W1, b1, W2, b2) [H, ...], sums [B, H, ...], pos [B]).
    """
    g = torch.Generator().manual_seed(seed)
    F = 4 * d

    def r(*s, sc=1.0, dt=dtype):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(device=device, dtype=dt)

    xd = x_dtype or dtype
    inputs = dict(
        xq=r(B, H, T, d, dt=xd), xk=r(B, H, T, d, dt=xd), xv=r(B, H, T, d, dt=xd),
        lr=(torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5).to(device, xd),
        ln_weight=1.0 + r(H, d, sc=0.2), ln_bias=r(H, d, sc=0.2),
        token_idx=(1.0 / torch.arange(1, K + 1, dtype=torch.float64)
                   + 0.1 * torch.rand(K, generator=g, dtype=torch.float64)).to(device, dtype),
    )
    base = (r(H, d, F, sc=0.3), r(H, 1, F, sc=0.1), r(H, F, d, sc=0.3), r(H, 1, d, sc=0.1))
    posv = torch.tensor(pos, dtype=torch.long, device=device)
    mid = (posv % K != 0).to(dtype).view(B, 1, 1, 1)  # sums are zero at a mini-batch start
    sums = tuple(r(B, *w.shape, sc=0.1) * mid for w in base)
    return inputs, base, sums, posv


def run_with_grads(fn, inputs: dict, base, sums, pos, K: int, *, chunks: list[int] | None = None,
                   seed: int = 1, **kw):
    """Run ``fn`` (one call, or consecutive calls of ``chunks`` tokens) from ``init_state(base)``
    plus ``sums``, back-propagate a fixed random functional of (out, final state), and return
    (out, final state, {name: gradient})."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    wl = [w.detach().clone().requires_grad_() for w in base]
    sl = [s.detach().clone().requires_grad_() for s in sums]
    B = pos.shape[0]
    st = init_state(*wl, B)
    state = TTTState(*st.weights(), *sl, pos=pos.clone())
    T = inputs["xq"].shape[2]
    bounds = [0]
    for c in chunks or [T]:
        bounds.append(bounds[-1] + c)
    assert bounds[-1] == T
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        x = {n: (leaves[n][:, :, a:b] if n in ("xq", "xk", "xv", "lr") else leaves[n]) for n in leaves}
        o, state = fn(x["xq"], x["xk"], x["xv"], x["lr"], x["ln_weight"], x["ln_bias"], state, K,
                      x["token_idx"], **kw)
        outs.append(o)
    out = torch.cat(outs, dim=2)
    g = torch.Generator().manual_seed(seed)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)).sum()
    for n, t in state.items():
        if n != "pos":
            loss = loss + (t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64)
                           .to(t.device)).sum()
    names = list(leaves) + ["W1", "b1", "W2", "b2", "gW1", "gb1", "gW2", "gb2"]
    grads = torch.autograd.grad(loss, list(leaves.values()) + wl + sl)
    return out.detach(), state.detach(), dict(zip(names, grads))


def check_against(ref, got, tol: float = TOL) -> None:
    (ro, rs, rg), (ko, ks, kg) = ref, got
    assert_close("out", ro, ko, tol)
    for n, t in rs.items():
        if n == "pos":
            assert torch.equal(t, getattr(ks, n)), "pos"
        elif t.abs().max() > 0:
            assert_close(f"state.{n}", t, getattr(ks, n), tol)
        else:  # sums after a call that ends on a mini-batch boundary
            assert getattr(ks, n).abs().max() == 0, f"state.{n} should be zero"
    for n, g in rg.items():
        assert g.abs().max() > 0, f"reference gradient of {n} is zero: the test would be vacuous"
        assert_close(f"grad {n}", g, kg[n], tol)


def cfg(ckpt_every: int | None = None) -> KernelConfig:
    """Small tiles (2 hidden tiles at d=16) so that the tiling loops are exercised."""
    return KernelConfig(block_f_fwd=32, block_f_bwd=32, num_warps_fwd=4, num_warps_bwd=4,
                        precision="ieee", ckpt_every=ckpt_every)


# ----------------------------------------------------------------------------- sequence kernel
@needs_kernels
@pytest.mark.parametrize("K,T,pos,ckpt", [
    (4, 10, [0, 0], 1),     # fresh state, T not a multiple of K, a checkpoint every mini-batch
    (4, 11, [5, 10], 2),    # starts mid-mini-batch, a different offset per sample
    (8, 19, [3, 16], None),  # K=8, default checkpoint groups, one sample aligned
], ids=["fresh", "mid-offsets", "K8"])
def test_sequence_matches_reference(K, T, pos, ckpt):
    prob = make_problem(2, 2, T, 16, K, pos, seed=K + T)
    ref = run_with_grads(ttt_mlp_reference, *prob, K)
    got = run_with_grads(ttt_mlp_triton, *prob, K, config=cfg(ckpt))
    check_against(ref, got)


@needs_kernels
def test_short_calls_inside_one_mini_batch():
    """T=1 and T=2 calls that start and end inside a mini-batch (and one that closes it)."""
    for T, pos in ((1, [1, 3]), (2, [1, 2])):
        prob = make_problem(2, 2, T, 16, 4, pos, seed=T)
        check_against(run_with_grads(ttt_mlp_reference, *prob, 4),
                      run_with_grads(ttt_mlp_triton, *prob, 4, config=cfg()))


@needs_kernels
def test_chunk_invariance_with_gradients():
    """Two kernel calls (state carried, gradients through it) == one call: outputs, final
    state and every gradient, including those w.r.t. the initial state."""
    prob = make_problem(2, 2, 12, 16, 4, [2, 7], seed=3)
    one = run_with_grads(ttt_mlp_triton, *prob, 4, config=cfg(2))
    two = run_with_grads(ttt_mlp_triton, *prob, 4, chunks=[5, 7], config=cfg(2))
    check_against(one, two)


@needs_kernels
def test_causality_and_no_grad_path():
    """out[:t] does not depend on inputs after t; the no-grad launch (no checkpoints) agrees
    with the dual form."""
    inputs, base, sums, pos = make_problem(2, 2, 12, 16, 4, [1, 6], seed=4)
    state = TTTState(*init_state(*base, 2).weights(), *sums, pos=pos)
    with torch.no_grad():
        o1, _ = ttt_mlp_triton(inputs["xq"], inputs["xk"], inputs["xv"], inputs["lr"], inputs["ln_weight"],
                               inputs["ln_bias"], state, 4, inputs["token_idx"], config=cfg())
        od, _ = ttt_mlp_dual(inputs["xq"], inputs["xk"], inputs["xv"], inputs["lr"], inputs["ln_weight"],
                             inputs["ln_bias"], state, 4, inputs["token_idx"])
        assert_close("out vs dual", od, o1)
        t = 7
        pert = {n: v.clone() for n, v in inputs.items()}
        for n in ("xq", "xk", "xv"):
            pert[n][:, :, t:] += 1.0
        pert["lr"][:, :, t:] *= 0.5
        o2, _ = ttt_mlp_triton(pert["xq"], pert["xk"], pert["xv"], pert["lr"], pert["ln_weight"],
                               pert["ln_bias"], state, 4, pert["token_idx"], config=cfg())
    assert torch.equal(o1[:, :, :t], o2[:, :, :t])
    assert err_ratio(o1[:, :, t:], o2[:, :, t:]) > 1e-3  # and the later outputs do change


@needs_kernels
def test_comparison_is_sensitive():
    """The tolerances above can fail: a wrong mini-batch size or token_idx is far outside them."""
    inputs, base, sums, pos = make_problem(1, 2, 9, 16, 4, [0], seed=5)
    state = TTTState(*init_state(*base, 1).weights(), *sums, pos=pos)
    args = (inputs["xq"], inputs["xk"], inputs["xv"], inputs["lr"], inputs["ln_weight"], inputs["ln_bias"])
    with torch.no_grad():
        ref, _ = ttt_mlp_reference(*args, state, 4, inputs["token_idx"])
        wrong_k, _ = ttt_mlp_triton(*args, state, 2, inputs["token_idx"][:2], config=cfg())
        tok = inputs["token_idx"].clone()
        tok[1] += 0.2
        wrong_tok, _ = ttt_mlp_triton(*args, state, 4, tok, config=cfg())
    assert err_ratio(ref, wrong_k) > 100 * TOL
    assert err_ratio(ref, wrong_tok) > 10 * TOL


# ----------------------------------------------------------------------------- streaming kernel
@needs_kernels
def test_streaming_step_matches_reference_in_place():
    """Token by token across mini-batch boundaries with per-sample offsets; the state is updated
    in place (same storage) and the output buffer is reused."""
    B, H, d, K, T = 3, 2, 16, 4, 7
    inputs, base, sums, pos = make_problem(B, H, T, d, K, [0, 2, 7], seed=6)
    state0 = TTTState(*init_state(*base, B).weights(), *sums, pos=pos)
    args = [inputs[n] for n in ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias")]
    ref_out, ref_state = ttt_mlp_reference(*args, state0, K, inputs["token_idx"])
    st = state0.clone()
    ptrs = [t.data_ptr() for _, t in st.items()]
    buf = torch.empty(B, H, 1, d, device=DEV, dtype=DT)
    outs = []
    for t in range(T):
        o = ttt_step_triton_(*(x[:, :, t:t + 1] for x in args[:4]), args[4], args[5], st, K,
                             inputs["token_idx"], out=buf)
        assert o is buf
        outs.append(o.clone())
    assert [t.data_ptr() for _, t in st.items()] == ptrs
    assert_close("out", ref_out, torch.cat(outs, dim=2))
    for n, t in ref_state.items():
        if n == "pos":
            assert torch.equal(t, st.pos)
        else:
            assert_close(f"state.{n}", t, getattr(st, n))


@needs_kernels
def test_streaming_exec_mask():
    """Samples with exec_mask False get the same output but keep their state bit for bit."""
    B, H, d, K = 3, 2, 16, 4
    inputs, base, sums, pos = make_problem(B, H, 1, d, K, [3, 1, 2], seed=7)
    state0 = TTTState(*init_state(*base, B).weights(), *sums, pos=pos)
    args = [inputs[n] for n in ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias")]
    mask = torch.tensor([True, False, True], device=DEV)
    ref_out, ref_state = ttt_mlp_token(*args, state0, K, inputs["token_idx"])
    ref_state = select_state(mask, ref_state, state0)
    st = state0.clone()
    out = ttt_step_triton_(*args, st, K, inputs["token_idx"], exec_mask=mask)
    assert_close("out", ref_out, out)
    for n, t in ref_state.items():
        if n == "pos":
            assert torch.equal(t, st.pos)
        else:
            assert_close(f"state.{n}", t, getattr(st, n))
            assert torch.equal(getattr(st, n)[1], getattr(state0, n)[1]), f"{n} of a masked sample"


# ----------------------------------------------------------------------------- dispatch
def test_dispatch_rules(monkeypatch):
    from moshi_ttt.ttt import TTTConfig
    from moshi_ttt.ttt.dispatch import KernelsUnavailableError, choose
    from moshi_ttt.ttt.kernels import kernel_available, kernel_unavailable_reason

    shapes = (1, 32, 3008, 128, 512, 16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernel_available("cpu", torch.bfloat16, shapes)
    inputs, base, sums, pos = make_problem(1, 2, 3, 16, 4, [0], device=torch.device("cpu"))
    state = TTTState(*init_state(*base, 1).weights(), *sums, pos=pos)
    args = [inputs[n] for n in ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias")]
    step_args = [*(a[:, :, :1] for a in args[:4]), *args[4:]]
    with pytest.raises(KernelsUnavailableError, match="device cpu"):  # asked for: never a silent fallback
        choose("triton", *args, state, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_available("cpu", torch.bfloat16, shapes)  # the interpreter runs them on CPU
    assert choose("triton", *args, state, 4) == "triton"
    before = state.clone()
    assert choose("auto", *args, state, 4) == "torch"  # but "auto" never sends CPU tensors there
    assert choose("auto", *step_args, state, 4, step=True) == "torch"
    assert all(torch.equal(t, getattr(before, n)) for n, t in state.items())
    assert "head dim" in kernel_unavailable_reason("cpu", torch.bfloat16, (1, 2, 8, 24, 96, 4))
    assert "mini-batch" in kernel_unavailable_reason("cpu", torch.bfloat16, (1, 2, 8, 16, 64, 65))
    assert "state dtype" in kernel_unavailable_reason("cpu", torch.bfloat16, shapes, torch.bfloat16)
    assert choose("torch", *args, state, 4) == "torch"  # even where the kernels could run
    with pytest.raises(KernelsUnavailableError, match="one token"):
        choose("triton", *args, state, 4, step=True)
    with pytest.raises(ValueError, match="kernels='cuda'"):
        choose("cuda", *args, state, 4)
    assert TTTConfig().kernels == "torch"  # opt-in: the PyTorch forms unless configured


def test_config_kernels_named_in_error():
    from moshi_ttt.ttt import TTTConfig, TTTConfigError

    with pytest.raises(TTTConfigError, match=r"TTTConfig.kernels='cuda'"):
        TTTConfig(kernels="cuda")


def test_layer_asked_for_triton_says_why():
    """A layer configured with kernels='triton' where they cannot run fails with the reason."""
    from moshi_ttt.ttt import TTTMLP, TTTConfig
    from moshi_ttt.ttt.dispatch import KernelsUnavailableError

    layer = TTTMLP(24, 2, TTTConfig(mini_batch_size=4, kernels="triton"), device=DEV)
    x = torch.randn(1, 5, 24, device=DEV)
    with pytest.raises(KernelsUnavailableError, match="head dim 12"):
        layer(x)
    with torch.no_grad(), pytest.raises(KernelsUnavailableError, match="head dim 12"):
        layer(x[:, :1], layer.init_state(1), inplace=True)  # the streaming step too


@needs_kernels
def test_dispatch_runs_the_kernels(monkeypatch):
    """``kernels='triton'`` reaches the kernels (interpreted on CPU) for sequences and steps."""
    from moshi_ttt.ttt import dispatch
    from moshi_ttt.ttt.dispatch import ttt_mlp, ttt_step_

    calls = []

    def spy(name: str):
        real = getattr(dispatch, name)

        def run(*a, **kw):
            calls.append(name)
            return real(*a, **kw)
        return run

    for name in ("ttt_mlp_triton", "ttt_step_triton_"):
        monkeypatch.setattr(dispatch, name, spy(name))

    B, H, T, d, K = 2, 2, 6, 16, 4
    inputs, base, sums, pos = make_problem(B, H, T, d, K, [1, 3], seed=5)
    state0 = TTTState(*init_state(*base, B).weights(), *sums, pos=pos)
    args = [inputs[n] for n in ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias")]
    ref, ref_state = ttt_mlp_reference(*args, state0, K, inputs["token_idx"])
    out, new = ttt_mlp(*args, state0, K, inputs["token_idx"], kernels="triton")
    assert_close("out", ref, out)
    assert_close("state.W1", ref_state.W1, new.W1)
    step_args = [*(a[:, :, :1] for a in args[:4]), *args[4:]]
    ref1, ref1_state = ttt_mlp_reference(*step_args, state0, K, inputs["token_idx"])
    st = state0.clone()
    with torch.no_grad():
        out1 = ttt_step_(*step_args, st, K, inputs["token_idx"], kernels="triton")
    assert_close("step out", ref1, out1)
    assert_close("step state.gW1", ref1_state.gW1, st.gW1)
    assert calls == ["ttt_mlp_triton", "ttt_step_triton_"]


def test_siblings_do_not_import_each_other():
    """ops.py / dual.py (PyTorch forms), reference.py (oracle) and kernels/ do not import each
    other; only dispatch.py (above them) knows both."""
    import ast
    from pathlib import Path

    root = Path(importlib.import_module("moshi_ttt.ttt").__file__).parent

    def imports(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found.add("." * node.level + (node.module or ""))
        return found

    for name in ("ops.py", "dual.py", "reference.py"):
        assert not any("kernels" in m for m in imports(root / name)), name
    for path in (root / "kernels").glob("*.py"):
        bad = {m for m in imports(path) if m.lstrip(".").split(".")[0] in ("ops", "dual", "reference", "dispatch",
                                                                            "layer")}
        assert not bad, f"{path.name} imports {bad}"


def _nvidia_tools() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                       "ptxas"))


@pytest.mark.skipif(not _nvidia_tools(), reason="Triton without its NVIDIA backend tools")
def test_kernels_compile_for_h100():
    """Compile forward, backward and streaming kernels for sm_90 at the 7B shape without a GPU
    (Triton's own ptxas): compiled-mode rules the interpreter does not enforce (branch scoping,
    dtypes, shared memory) are checked on every machine. A separate process: this one holds the
    interpreted kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from moshi_ttt.ttt.kernels.aot import compile_all; "
            "print(json.dumps(compile_all()))")
    # No time limit: compile time is a benchmark's business (bench op --aot), not a test's.
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = json.loads(res.stdout.strip().splitlines()[-1])
    names = [r["kernel"] for r in reports]
    assert names == ["_ttt_fwd_kernel", "_ttt_bwd_kernel", "_ttt_step_kernel"]
    for r in reports:
        assert r["shared_bytes"] <= 227 * 1024, r  # H100: 227 KiB of shared memory per block
    assert reports[0].get("hgmma", 1) > 0, reports[0]  # the forward uses Hopper wgmma


def test_bench_runs_on_cpu(tmp_path):
    """The benchmark's CPU path: PyTorch forms only, says why the kernels did not run."""
    from moshi_ttt.bench import op

    rep = op.run("cpu", T_list=(8,), stream_batches=(1,), warmup=0, iters=1)
    assert not rep.kernel_available and "NOT run" in rep.kernel_note
    assert [r["impl"] for r in rep.sequence] == ["torch-dual"]
    assert rep.sequence[0]["fwd_ms"] > 0 and rep.streaming[0]["eager_us"] > 0
    text = op.format_report(rep)
    assert "torch-dual" in text and rep.device in text
    json.dumps(op.asdict(rep))


# ----------------------------------------------------------------------------- GPU, full width
H7B, D7B, K7B = 32, 128, 16


def _full_problem(B: int, T: int, pos: list[int], x_dtype=torch.bfloat16, seed: int = 0):
    """Moshi 7B TTT width; bf16 inputs (as the layer makes them), fp32 state and parameters."""
    inputs, base, sums, posv = make_problem(B, H7B, T, D7B, K7B, pos, seed=seed, dtype=torch.float32,
                                            device=DEV, x_dtype=x_dtype)
    # layer-like scales: qk l2-normalised, lr = base_lr * sigmoid(.) / d
    for n in ("xq", "xk"):
        inputs[n] = torch.nn.functional.normalize(inputs[n].float(), dim=-1).to(x_dtype)
    inputs["lr"] = (inputs["lr"].float() * 2.0 / D7B).to(x_dtype)
    base = (base[0] * 0.02 / 0.3, base[1] * 0.1, base[2] * 0.02 / 0.3, base[3] * 0.1)
    return inputs, base, tuple(s * 0.01 for s in sums), posv


def _as64(prob):
    inputs, base, sums, pos = prob
    return ({n: t.double() for n, t in inputs.items()}, tuple(w.double() for w in base),
            tuple(s.double() for s in sums), pos)


@pytest.mark.parametrize("precision,tol", [("tf32", 3e-2), ("tf32x3", 1e-4)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_full_width_forward(precision, tol):
    """T=3008, 32 heads of 128, K=16, bf16 inputs, fp32 state: outputs and final state against
    the float64 dual form on the same (bf16-valued) inputs."""
    Seq = K_MODS["sequence"]
    prob = _full_problem(1, 3008, [0])
    inputs, base, sums, pos = prob
    config = dataclasses.replace(Seq.default_config(D7B, 4 * D7B, DEV, torch.float32), precision=precision)
    st = TTTState(*init_state(*base, 1).weights(), *sums, pos=pos)
    args = [inputs[n] for n in ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias")]
    with torch.no_grad():
        out, new = ttt_mlp_triton(*args, st, K7B, inputs["token_idx"], config=config)
        i64, b64, s64, _ = _as64(prob)
        st64 = TTTState(*init_state(*b64, 1).weights(), *s64, pos=pos)
        ref, ref_state = ttt_mlp_dual(*(i64[n] for n in ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias")),
                                      st64, K7B, i64["token_idx"])
    assert out.dtype == torch.bfloat16 and new.W1.dtype == torch.float32
    assert_close("out", ref, out.float(), max(tol, 1e-2))  # bf16 output rounding: ~4e-3
    for n in ("W1", "b1", "W2", "b2"):
        assert_close(f"state.{n}", getattr(ref_state, n), getattr(new, n), tol)


# tf32 (the default) rounds every product to 10 mantissa bits: loose, but a wrong formula is O(1).
@pytest.mark.parametrize("precision,tol", [("tf32", 1e-1), ("tf32x3", 1e-3)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_full_width_gradients(precision, tol):
    """All gradients at full width (B=2, per-sample offsets, T=520) against float64 autograd
    through the dual form."""
    Seq = K_MODS["sequence"]
    prob = _full_problem(2, 520, [0, 21], x_dtype=torch.float32, seed=1)
    config = dataclasses.replace(Seq.default_config(D7B, 4 * D7B, DEV, torch.float32), precision=precision)
    ref = run_with_grads(ttt_mlp_dual, *_as64(prob), K7B)
    got = run_with_grads(ttt_mlp_triton, *prob, K7B, config=config)
    check_against(ref, got, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_streaming_cuda_graph():
    """The streaming step captured in a CUDA graph at full width, B=8, per-sample offsets:
    replays match the float64 per-token form, and eager steps allocate nothing."""
    B, T = 8, 40
    inputs, base, sums, pos = _full_problem(B, T, [0, 3, 5, 7, 9, 11, 14, 15], x_dtype=torch.float32)
    args = [inputs[n] for n in ("xq", "xk", "xv", "lr")]
    lnw, lnb, tok = inputs["ln_weight"], inputs["ln_bias"], inputs["token_idx"]
    st0 = TTTState(*init_state(*base, B).weights(), *sums, pos=pos)
    i64, b64, s64, _ = _as64((inputs, base, sums, pos))
    ref, ref_state = ttt_mlp_token(*(i64[n] for n in ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias")),
                                   TTTState(*init_state(*b64, B).weights(), *s64, pos=pos), K7B,
                                   i64["token_idx"])
    st = st0.clone()
    static_x = [a[:, :, :1].clone() for a in args]
    out = torch.empty(B, H7B, 1, D7B, device=DEV)
    # warm up (compiles) on a scratch state, then capture on the real one
    scratch = st0.clone()
    ttt_step_triton_(*static_x, lnw, lnb, scratch, K7B, tok, out=out)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    ttt_step_triton_(*static_x, lnw, lnb, scratch, K7B, tok, out=out)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ttt_step_triton_(*static_x, lnw, lnb, st, K7B, tok, out=out)
    st.copy_(st0)  # capture does not run the kernel; make sure we start from st0
    outs = []
    for t in range(T):
        for s, a in zip(static_x, args):
            s.copy_(a[:, :, t:t + 1])
        graph.replay()
        outs.append(out.clone())
    torch.cuda.synchronize()
    assert_close("out", ref, torch.cat(outs, dim=2), 1e-4)
    for n in ("W1", "b1", "W2", "b2", "gW1", "gb1", "gW2", "gb2"):
        assert_close(f"state.{n}", getattr(ref_state, n), getattr(st, n), 1e-4)
    assert torch.equal(st.pos, ref_state.pos)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_dispatch_runs_kernel():
    from moshi_ttt.ttt.dispatch import choose, ttt_mlp, ttt_step_

    inputs, base, sums, pos = _full_problem(1, 64, [0])
    st = TTTState(*init_state(*base, 1).weights(), *sums, pos=pos)
    args = [inputs[n] for n in ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias")]
    assert choose("auto", *args, st, K7B) == "triton"
    res = ttt_mlp(*args, st, K7B, inputs["token_idx"], kernels="auto")
    assert res[0].shape == inputs["xq"].shape
    step_args = [*(a[:, :, :1] for a in args[:4]), *args[4:]]
    with torch.no_grad():
        assert choose("auto", *step_args, st, K7B, step=True) == "triton"
        out = ttt_step_(*step_args, st, K7B, inputs["token_idx"], kernels="auto")
    assert out.shape == (1, H7B, 1, D7B) and int(st.pos[0]) == 1
