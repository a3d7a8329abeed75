"""Process-level facts and settings for every long command and benchmark: threads, subnormal flush, load, run facts.

This module sits at the bottom of the dependency graph (standard library, torch imported lazily),
so ``ttt``, ``model``, ``data``, ``train``, ``eval``, ``bench`` and the CLI can all use it.

Threads: on a small machine shared with other jobs, more torch threads than free cores makes every
operation wait for the slowest thread (measured: ``LMGen.step`` 5.5 ms idle, 198 ms with 2 threads at
load 6.5, 34 ms with 1 thread). :func:`choose_threads` therefore uses the cores that are free at start,
at least one, unless the user fixed the number (``MOSHI_TTT_THREADS`` or ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Above this load per core, timings measure the other jobs as much as ours.
BUSY_LOAD_PER_CPU = 0.5
THREADS_ENV = "MOSHI_TTT_THREADS"
_ANNOUNCED: int | None = None  # the thread count last printed (print once per process)


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, e.g. a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), or None where the OS has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from ``/proc/stat`` (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - fields[3] - fields[4], total


def busy_cpus(window: float = 0.3, cpus: int | None = None) -> float | None:
    """CPUs busy right now (measured over ``window`` seconds from ``/proc/stat``), or None where
    the OS does not say. Unlike the 1-minute load average it does not remember a job that has just
    ended (after ``pip install`` the load average reads about 1 on an idle machine)."""
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(window)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return None
    # The busy fraction of the machine, scaled to this process's CPUs (a container's share).
    return (b[0] - a[0]) / (b[1] - a[1]) * (cpus or cpu_count())


def choose_threads(requested: int | None = None, cpus: int | None = None, load: float | None = None
                   ) -> tuple[int, str]:
    """How many torch threads to use, and why (one phrase).

    Priority: ``requested`` (a ``--threads`` flag), then ``MOSHI_TTT_THREADS``, then ``OMP_NUM_THREADS``,
    then the cores that are free: ``cpus - load`` rounded, between 1 and ``cpus``, where ``load`` is
    the CPUs busy now (:func:`busy_cpus`), or the 1-minute load average where that is unknown.
    """
    cpus = cpus if cpus is not None else cpu_count()
    if requested is not None and requested > 0:
        return requested, "--threads"
    for env in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(env, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), env
    what = "load"
    if load is None:
        load, what = busy_cpus(cpus=cpus), "busy now"
    if load is None:
        load, what = load_average(), "load"
    if load is None:
        return cpus, "all CPUs (load unknown)"
    free = int(round(cpus - load))
    return max(1, min(cpus, free)), f"free CPUs, {what} {load:.1f}"


def setup_threads(requested: int | None = None, announce: bool = True, stream: Any = None) -> int:
    """Set torch's intra-op threads with :func:`choose_threads` and print one line saying so.

    Also flushes subnormal floats to zero on the CPU (``torch.set_flush_denormal``), as GPUs do:
    aten's tanh-gelu on CPU slows down up to 25x on inputs whose intermediates underflow (large or
    tiny magnitudes, measured 29 us -> 200-790 us on 16k floats), which the TTT memory's fast
    weights produce in training (the main job's step: 17% faster flushed).

    Returns the number of threads. The line names the variable that changes it, so a user who sees
    a slow run on a loaded machine knows what to try.
    """
    import torch

    global _ANNOUNCED
    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    flushed = torch.set_flush_denormal(True)
    if announce and _ANNOUNCED != n:
        _ANNOUNCED = n
        ftz = "; subnormal floats flushed to zero" if flushed else ""
        print(f"threads: {n} of {cpu_count()} CPUs ({why}; set {THREADS_ENV}=N to choose){ftz}",
              file=stream or sys.stderr)
    return n


def load_warning(threads: int | None = None) -> str | None:
    """A warning line when the machine is busy enough to distort timings, else None."""
    load, cpus = load_average(), cpu_count()
    if load is None or load <= BUSY_LOAD_PER_CPU * cpus:
        return None
    return (f"WARNING: machine load {load:.1f} on {cpus} CPUs: other jobs are running, timings below are "
            f"pessimistic and vary" + (f" ({threads} torch thread(s))" if threads else ""))


def machine_state() -> dict[str, Any]:
    """Load, CPUs and torch threads now: recorded beside every benchmark figure. ``busy_cpus_now``
    (CPUs busy over 0.3 s) makes an "idle" claim checkable where the 1-minute load average still
    remembers a job that just ended."""
    import torch

    return {"load_1min": load_average(), "busy_cpus_now": busy_cpus(), "cpus": cpu_count(),
            "torch_threads": torch.get_num_threads()}


def git_commit(path: str | Path | None = None) -> str | None:
    """The checked-out commit of the source tree (``-dirty`` when modified), or None outside git."""
    root = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_name() -> str:
    """A human name of the CPU (``/proc/cpuinfo`` model name on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_facts(wall_time_s: float | None = None) -> dict[str, Any]:
    """What a reader needs to reproduce or judge a run: versions, hardware, load, commit, wall time."""
    import torch

    try:
        from importlib.metadata import version

        moshi_version = version("moshi")
    except Exception:  # noqa: BLE001 - an uninstalled moshi is a fact to record, not an error
        moshi_version = None
    from . import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "wall_time_s": wall_time_s,
            "moshi_ttt": __version__, "git_commit": git_commit(), "moshi": moshi_version,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu_name(), "gpu": gpu, **machine_state()}


def is_terminal(stream: Any = None) -> bool:
    """True if ``stream`` (default stderr, where progress bars go) is an interactive terminal."""
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class PeriodicLog:
    """Progress without a terminal: one line every ``every_s`` seconds instead of a redrawn bar.

    Use beside ``tqdm(..., disable=not is_terminal())`` so a log file gets readable lines and a
    long phase never goes silent.
    """

    def __init__(self, what: str, total: int | None = None, every_s: float = 60.0, stream: Any = None):
        self.what, self.total, self.every_s = what, total, every_s
        self.stream = stream or sys.stderr
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.enabled = not is_terminal(self.stream)

    def update(self, n: int = 1, **info: Any) -> None:
        """Count ``n`` more units; print a line if ``every_s`` has passed since the last one."""
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            extra = "".join(f", {k} {v}" for k, v in info.items())
            print(f"{self.what}: {self.done}{of} after {now - self.start:.0f} s{extra}", file=self.stream,
                  flush=True)
