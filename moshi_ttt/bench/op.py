"""Speed and memory of the TTT-MLP operator: plain PyTorch forms against the fused Triton kernels.

Run ``python -m moshi_ttt.bench.op [--out results.json]``. In one process it measures, side by
side and as ratios:

* the sequence operator, forward and forward+backward, time and peak memory: the plain PyTorch
  dual form (``ttt_mlp_dual``) against the fused kernels (``ttt_mlp_triton``) at T in {750, 3000}
  with Moshi 7B's TTT width (32 heads of 128, mini-batch 16, bf16 inputs, fp32 state);
* the streaming step, per layer, at B=1 and B=8: the per-token PyTorch form (``ttt_mlp_token``)
  against the in-place kernel (``ttt_step_triton_``), eagerly and inside a CUDA graph.

On a machine without CUDA it runs a tiny shape with the PyTorch paths only and says that the
kernels were not run and why (with ``--aot`` it also compiles them for sm_90 and reports their
registers, spills and shared memory). Timings use warm-up iterations, CUDA events and
synchronisation, and report the median. The design targets for the kernels (H100, T=3000, one
layer at 7B width): forward <= 3 ms, forward+backward <= 10 ms; they are printed next to the
results, never asserted. The machine's load is recorded with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moshi_ttt.ttt.ops import ttt_mlp_dual, ttt_mlp_token
from moshi_ttt.ttt.state import init_state

from ..runtime import load_average, load_warning, machine_state
from .common import device_name

TARGETS_MS = {"forward": 3.0, "forward+backward": 10.0}  # design targets: H100, T=3000


# ----------------------------------------------------------------------------- environment
def kernel_status(device: torch.device, shapes: tuple[int, ...]) -> tuple[bool, str]:
    """(whether the kernels can run here, why not)."""
    from moshi_ttt.ttt.kernels import kernel_unavailable_reason

    if device.type != "cuda":  # even under TRITON_INTERPRET: the interpreter is for tests
        return False, f"device {device.type}: the kernels run on CUDA"
    reason = kernel_unavailable_reason(device, torch.bfloat16, shapes, torch.float32)
    return reason is None, reason or "available"


# ----------------------------------------------------------------------------- problem
@dataclass
class Shape:
    B: int
    H: int
    T: int
    d: int
    K: int

    @property
    def F(self) -> int:
        return 4 * self.d


def make_inputs(s: Shape, device: torch.device, x_dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """Layer-like inputs: l2-normalised q/k (``qk_l2_norm``), lr = sigmoid(.)/d, fp32 parameters."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    xq = torch.nn.functional.normalize(rn(s.B, s.H, s.T, s.d), dim=-1)
    xk = torch.nn.functional.normalize(rn(s.B, s.H, s.T, s.d), dim=-1)
    return dict(
        xq=xq.to(x_dtype), xk=xk.to(x_dtype), xv=rn(s.B, s.H, s.T, s.d).to(x_dtype),
        lr=(torch.sigmoid(rn(s.B, s.H, s.T)) / s.d).to(x_dtype),
        ln_weight=torch.ones(s.H, s.d, device=device), ln_bias=torch.zeros(s.H, s.d, device=device),
        W1=rn(s.H, s.d, s.F, scale=0.02), b1=torch.zeros(s.H, 1, s.F, device=device),
        W2=rn(s.H, s.F, s.d, scale=0.02), b2=torch.zeros(s.H, 1, s.d, device=device),
        token_idx=1.0 / torch.arange(1, s.K + 1, device=device, dtype=torch.float32),
    )


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory above what was allocated before ``fn()`` (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ----------------------------------------------------------------------------- sequence operator
@dataclass(kw_only=True)
class Row:
    """One implementation's figures at one size (None: not measured) and why any is missing."""

    impl: str
    note: str = ""


@dataclass(kw_only=True)
class SeqRow(Row):
    T: int
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_peak_mib: float | None = None
    fwdbwd_peak_mib: float | None = None


def _seq_fns(op: Callable, inp: dict[str, Any], s: Shape, **kw):
    """(forward thunk, forward+backward thunk) for one operator implementation."""
    leaves = {n: inp[n].detach().clone().requires_grad_() for n in
              ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias", "W1", "b1", "W2", "b2")}

    def fwd():
        with torch.no_grad():
            st = init_state(inp["W1"], inp["b1"], inp["W2"], inp["b2"], s.B)
            return op(inp["xq"], inp["xk"], inp["xv"], inp["lr"], inp["ln_weight"], inp["ln_bias"],
                      st, s.K, inp["token_idx"], **kw)

    def fwdbwd():
        L = leaves
        st = init_state(L["W1"], L["b1"], L["W2"], L["b2"], s.B)
        out, new = op(L["xq"], L["xk"], L["xv"], L["lr"], L["ln_weight"], L["ln_bias"], st, s.K,
                      inp["token_idx"], **kw)
        loss = out.float().square().mean() + new.W1.square().mean()
        loss.backward()
        for t in L.values():
            t.grad = None

    return fwd, fwdbwd


def bench_sequence(s: Shape, device: torch.device, impls: dict[str, Callable], warmup: int,
                   iters: int, x_dtype: torch.dtype) -> list[SeqRow]:
    inp = make_inputs(s, device, x_dtype)
    rows = []
    for name, op in impls.items():
        fwd, fwdbwd = _seq_fns(op, inp, s)
        row = SeqRow(impl=name, T=s.T)
        try:
            row.fwd_ms = time_fn(fwd, device, warmup, iters)
            row.fwd_peak_mib = peak_mib(fwd, device)
            row.fwdbwd_ms = time_fn(fwdbwd, device, warmup, iters)
            row.fwdbwd_peak_mib = peak_mib(fwdbwd, device)
        except torch.cuda.OutOfMemoryError as e:  # report, do not crash the whole benchmark
            row.note = f"out of memory: {str(e).splitlines()[0]}"
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- streaming step
@dataclass(kw_only=True)
class StepRow(Row):
    B: int
    eager_us: float | None = None
    graph_us: float | None = None


def bench_streaming(s: Shape, device: torch.device, use_kernel: bool, warmup: int,
                    iters: int) -> list[StepRow]:
    """One token per call, one layer; fp32 activations and state (LMGen's streaming update)."""
    inp = make_inputs(Shape(s.B, s.H, 1, s.d, s.K), device, torch.float32)
    args = [inp[n] for n in ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias")]
    tok = inp["token_idx"]
    st0 = init_state(inp["W1"], inp["b1"], inp["W2"], inp["b2"], s.B)
    st0.pos.fill_(5)  # mid mini-batch: the running sums are used
    rows = []

    torch_state = [st0.clone()]

    def torch_step():
        out, new = ttt_mlp_token(*args, torch_state[0], s.K, tok)
        torch_state[0].copy_(new)  # LMGen keeps state tensors at fixed addresses
        return out

    thunks: dict[str, Callable[[], Any]] = {"torch-token": torch_step}
    if use_kernel:
        from moshi_ttt.ttt.kernels import ttt_step_triton_

        kstate = st0.clone()
        kout = torch.empty_like(args[0])

        def kernel_step():
            return ttt_step_triton_(*args, kstate, s.K, tok, out=kout)

        thunks["triton-step"] = kernel_step
    for name, fn in thunks.items():
        row = StepRow(impl=name, B=s.B)
        row.eager_us = 1e3 * time_fn(fn, device, warmup, iters)
        if device.type == "cuda":
            try:
                fn()  # warm (compile, allocator) outside capture
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                row.graph_us = 1e3 * time_fn(graph.replay, device, warmup, iters)
            except Exception as e:  # noqa: BLE001 -- report why a form cannot be captured
                row.note = f"CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0]}"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- driver
@dataclass
class Report:
    device: str
    device_type: str
    torch: str
    triton: str | None
    kernel_available: bool
    kernel_note: str
    dispatch: str
    shape: dict[str, int]
    sequence: list[dict] = field(default_factory=list)
    ratios: list[dict] = field(default_factory=list)
    streaming: list[dict] = field(default_factory=list)
    targets_ms: dict[str, float] = field(default_factory=lambda: dict(TARGETS_MS))
    aot: list[dict] | None = None
    machine: dict[str, Any] = field(default_factory=machine_state)   # load, CPUs, threads at the start
    load_warning: str | None = field(default_factory=lambda: load_warning(torch.get_num_threads()))


def run(device: torch.device | str | None = None, T_list: tuple[int, ...] | None = None,
        stream_batches: tuple[int, ...] = (1, 8), warmup: int | None = None, iters: int | None = None,
        aot: bool = False) -> Report:
    """Measure everything; on CPU a tiny shape and the PyTorch paths only."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    H, d, K = (32, 128, 16) if cuda else (2, 16, 4)
    T_list = T_list or ((750, 3000) if cuda else (32, 120))
    warmup = warmup if warmup is not None else (3 if cuda else 1)
    iters = iters if iters is not None else (10 if cuda else 3)
    x_dtype = torch.bfloat16 if cuda else torch.float32
    ok, why = kernel_status(device, (1, H, max(T_list), d, 4 * d, K))
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    rep = Report(device=device_name(device), device_type=device.type, torch=torch.__version__,
                 triton=triton_version, kernel_available=ok,
                 kernel_note="kernels run" if ok else f"kernels NOT run: {why}",
                 dispatch=("TTTConfig.kernels='auto' (or 'triton') runs the Triton kernels here" if ok else
                           "the PyTorch forms run here (TTTConfig.kernels='auto' falls back to them, "
                           "'triton' is an error)"),
                 shape={"H": H, "d": d, "K": K, "B": 1, "x_dtype": str(x_dtype), "state": "float32"})

    impls: dict[str, Callable] = {"torch-dual": ttt_mlp_dual}
    if ok:
        from moshi_ttt.ttt.kernels import ttt_mlp_triton

        impls["triton"] = ttt_mlp_triton
    for T in T_list:
        rows = bench_sequence(Shape(1, H, T, d, K), device, impls, warmup, iters, x_dtype)
        rep.sequence += [{**asdict(r), "load_1min": load_average()} for r in rows]
        if ok:
            base, kern = rows[0], rows[1]

            def ratio(a, b):
                return None if a is None or b is None or b == 0 else a / b

            rep.ratios.append({
                "T": T,
                "fwd_speedup": ratio(base.fwd_ms, kern.fwd_ms),
                "fwdbwd_speedup": ratio(base.fwdbwd_ms, kern.fwdbwd_ms),
                "fwd_mem_ratio": ratio(base.fwd_peak_mib, kern.fwd_peak_mib),
                "fwdbwd_mem_ratio": ratio(base.fwdbwd_peak_mib, kern.fwdbwd_peak_mib),
            })
    for B in stream_batches:
        rows = bench_streaming(Shape(B, H, 1, d, K), device, ok, warmup, max(iters, 20 if cuda else 3))
        rep.streaming += [{**asdict(r), "load_1min": load_average()} for r in rows]
    if aot:
        rep.aot = _aot_reports()
    return rep


def _aot_reports() -> list[dict] | None:
    """Compile the kernels for sm_90 (no GPU needed), or None if this Triton cannot."""
    try:
        from moshi_ttt.ttt.kernels.aot import compile_all

        return compile_all()
    except Exception as e:  # noqa: BLE001 -- a diagnostic must not break the benchmark
        return [{"error": f"{type(e).__name__}: {e}"}]


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, spec)
    return str(v)


def _table(title: str, rows: list[dict], cols: list[tuple[str, str, int, str]]) -> list[str]:
    """A titled text table of result rows: ``impl`` first, ``note`` last, and between them the
    columns ``(key, header, width, number format)``."""
    lines = [title, f"{'impl':<12}" + "".join(f"{h:>{w}}" for _, h, w, _ in cols) + "  note"]
    for r in rows:
        cells = "".join(f"{_fmt(r[k], spec):>{w}}" for k, _, w, spec in cols)
        lines.append(f"{r['impl']:<12}{cells}  {r['note']}")
    return lines


def format_report(rep: Report) -> str:
    load = rep.machine.get("load_1min")
    out = [f"device: {rep.device} ({rep.device_type}); torch {rep.torch}, triton {rep.triton}; machine load "
           f"{'unknown' if load is None else f'{load:.2f}'} on {rep.machine.get('cpus')} CPUs at start "
           "(load at each figure in the JSON)"]
    if rep.load_warning:
        out.append(rep.load_warning)
    out += [
           f"{rep.kernel_note}; {rep.dispatch}",
           f"shape: {rep.shape}", ""]
    out += _table("sequence operator (ms, MiB peak above inputs)", rep.sequence,
                  [("T", "T", 6, ""), ("fwd_ms", "fwd ms", 10, ".2f"), ("fwdbwd_ms", "fwd+bwd ms", 12, ".2f"),
                   ("fwd_peak_mib", "fwd MiB", 10, ".0f"), ("fwdbwd_peak_mib", "fwd+bwd MiB", 13, ".0f")])
    if rep.ratios:
        out += ["", "torch-dual / triton (speedup and memory ratio)"]
        for r in rep.ratios:
            out.append(f"T={r['T']:>5}: fwd x{_fmt(r['fwd_speedup'])}, fwd+bwd x{_fmt(r['fwdbwd_speedup'])}, "
                       f"memory fwd x{_fmt(r['fwd_mem_ratio'])}, fwd+bwd x{_fmt(r['fwdbwd_mem_ratio'])}")
    out.append(f"design targets (H100, T=3000): forward <= {rep.targets_ms['forward']} ms, "
               f"forward+backward <= {rep.targets_ms['forward+backward']} ms")
    out.append("")
    out += _table("streaming step, one layer (us per token)", rep.streaming,
                  [("B", "B", 4, ""), ("eager_us", "eager us", 10, ".1f"), ("graph_us", "graph us", 10, ".1f")])
    if rep.aot:
        from moshi_ttt.ttt.kernels.aot import format_reports

        out += ["", "kernels compiled ahead of time (not run):"]
        if "error" in rep.aot[0]:
            out.append(rep.aot[0]["error"])
        else:
            out.append(format_reports(rep.aot))
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 750 3000 on CUDA)")
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--aot", action="store_true",
                   help="also compile the kernels for sm_90 and report registers/spills/shared memory")


def main_args(a: argparse.Namespace) -> int:
    rep = run(a.device, tuple(a.T) if a.T else None, warmup=a.warmup, iters=a.iters, aot=a.aot)
    print(format_report(rep))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(asdict(rep), f, indent=2)
        print(f"\nwrote {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    main()
