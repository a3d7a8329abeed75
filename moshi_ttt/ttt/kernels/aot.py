"""Ahead-of-time compilation of the kernels for a GPU target, on a machine without a GPU.

Triton ships its own LLVM and ptxas, so the kernels can be compiled for e.g. sm_90 (H100) on a
CPU-only machine. This catches everything the CPU interpreter does not (compiled-mode typing and
scoping rules, shared-memory overflow) and reports the resources that decide performance:
registers per thread, spill bytes, shared memory, and which MMA instructions were emitted
(HGMMA = Hopper wgmma, HMMA = mma.sync). It is a diagnostic for benchmarks and tests; nothing
in the operator depends on it.

How: each launcher is called with CPU stand-in tensors of the real shapes (uninitialised) while
the kernel object is swapped for a recorder, so the recorded arguments are exactly those of a
real launch; they are then specialised like Triton's JIT does (16-byte aligned pointers, integers
divisible by 16, integers equal to 1 folded into constants) and compiled for the target.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..state import TTTState


class _Recorder:
    """Stands in for a @triton.jit kernel: ``rec[grid](*args, **kw)`` records instead of running."""

    def __init__(self, fn: Any):
        self.fn = fn
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append((args, kwargs))
        return run


@contextmanager
def _recording(module: Any, name: str):
    real = getattr(module, name)
    rec = _Recorder(real)
    setattr(module, name, rec)
    try:
        yield rec
    finally:
        setattr(module, name, real)


def _signature(fn: Any, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """Signature, constexprs, attrs and options for ``triton.compile``, specialised like the JIT."""
    names = list(fn.arg_names)
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k not in options})
    sig: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple, list] = {}
    for i, n in enumerate(names):
        v = values[n]
        if n in constexpr_names:
            sig[n], constexprs[n] = "constexpr", v
        elif isinstance(v, bool):
            sig[n] = "u1"
        elif isinstance(v, int):
            if v == 1:
                sig[n], constexprs[n] = "constexpr", 1
                continue
            sig[n] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        elif isinstance(v, torch.Tensor):
            sig[n] = "*" + triton.runtime.jit.canonicalize_dtype(v.dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            raise TypeError(f"{n}: unsupported argument {type(v)}")
    return sig, constexprs, attrs, options


def _tool(name: str) -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def compile_recorded(fn: Any, args: tuple, kwargs: dict, arch: int = 90) -> dict:
    """Compile one recorded launch for ``sm_<arch>``; returns a resource report (registers and
    stack bytes per thread, spill instructions, shared memory, HGMMA/HMMA instruction counts)."""
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("the kernels were decorated for the interpreter (TRITON_INTERPRET=1): "
                           "compile them in a process without it")
    jit_fn = fn
    sig, constexprs, attrs, options = _signature(jit_fn, args, kwargs)
    k = triton.compile(ASTSource(fn=jit_fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options=options)
    report: dict[str, Any] = {"kernel": jit_fn.__name__, "arch": f"sm_{arch}",
                              "shared_bytes": k.metadata.shared, **options}
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is not None:
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", res)
        if m:
            report["registers"], report["stack_bytes"] = int(m.group(1)), int(m.group(2))
        ops = Counter(x.split(".")[0] for x in re.findall(r"\b(HGMMA|HMMA|STL|LDL)\S*", sass))
        report.update({"hgmma": ops["HGMMA"], "hmma": ops["HMMA"], "spill_stores": ops["STL"],
                       "spill_loads": ops["LDL"]})
    return report


def _full_problem(B: int, H: int, T: int, d: int, K: int, x_dtype: torch.dtype):
    """Uninitialised CPU stand-ins with the real shapes and layouts (nothing is computed)."""
    F = 4 * d
    x = [torch.empty(B, T, H, d, dtype=x_dtype).transpose(1, 2) for _ in range(3)]  # layer layout
    lr = torch.empty(B, T, H, dtype=x_dtype).transpose(1, 2)
    ln = (torch.empty(H, d), torch.empty(H, d))
    tok = torch.empty(K)
    W = (torch.empty(B, H, d, F), torch.empty(B, H, 1, F), torch.empty(B, H, F, d), torch.empty(B, H, 1, d))
    S = tuple(torch.empty_like(w) for w in W)
    pos = torch.zeros(B, dtype=torch.long)
    return x, lr, ln, tok, W, S, pos


def compile_all(B: int = 1, H: int = 32, T: int = 3008, d: int = 128, K: int = 16,
                x_dtype: torch.dtype = torch.bfloat16, arch: int = 90,
                config: Any = None) -> list[dict]:
    """Record the forward, backward and streaming launches of one problem and compile them."""
    from . import backward, forward, sequence, streaming

    x, lr, ln, tok, W, S, pos = _full_problem(B, H, T, d, K, x_dtype)
    cfg = config or sequence.default_config(d, 4 * d, torch.device("cuda"), torch.float32)
    ck = sequence._ckpt_every(cfg, T, K)
    reports = []
    xq, xk, xv = sequence._prepare_x(*x)
    with _recording(forward, "_ttt_fwd_kernel") as rec:
        _, _, _, ckpts = forward.launch_forward(xq, xk, xv, lr, *ln, tok, pos, W, S, K, ckpt_every=ck,
                                                block_f=cfg.block_f_fwd, num_warps=cfg.num_warps_fwd,
                                                precision=cfg.precision)
    reports.append(compile_recorded(rec.fn, *rec.calls[0], arch=arch))
    ckpts = tuple(torch.empty(c.shape, dtype=c.dtype) for c in ckpts)
    with _recording(backward, "_ttt_bwd_kernel") as rec:
        backward.launch_backward(xq, xk, xv, lr, *ln, tok, pos, S, ckpts, K, ck,
                                 torch.empty(B, H, T, d, dtype=x_dtype), W, S,
                                 block_f=cfg.block_f_bwd, num_warps=cfg.num_warps_bwd,
                                 precision=cfg.precision)
    reports.append(compile_recorded(rec.fn, *rec.calls[0], arch=arch))
    st = TTTState(*W, *S, pos=pos)
    one = [t[:, :, :1] for t in x]
    with _recording(streaming, "_ttt_step_kernel") as rec:
        streaming.ttt_step_triton_(*one, lr[:, :, :1], *ln, st, K, tok, exec_mask=torch.ones(B, dtype=torch.bool))
    reports.append(compile_recorded(rec.fn, *rec.calls[0], arch=arch))
    return reports


def format_reports(reports: list[dict]) -> str:
    cols = ("kernel", "arch", "num_warps", "registers", "stack_bytes", "spill_stores", "shared_bytes",
            "hgmma", "hmma")
    lines = [" | ".join(cols)]
    for r in reports:
        lines.append(" | ".join(str(r.get(c, "-")) for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> list[dict]:
    import argparse

    p = argparse.ArgumentParser(description="Compile the TTT-MLP kernels for a GPU target (no GPU needed)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    reports = compile_all(B=args.batch, arch=args.arch)
    out(format_reports(reports))
    return reports


if __name__ == "__main__":
    main()
