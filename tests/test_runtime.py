"""Threads, load, run facts and progress lines (moshi_ttt/runtime.py); no test limits wall-clock time."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from moshi_ttt import runtime


def test_threads_use_the_free_cpus_and_respect_the_user(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.choose_threads(cpus=2, load=0.1)[0] == 2
    assert runtime.choose_threads(cpus=2, load=1.2)[0] == 1        # one core busy elsewhere: one thread
    assert runtime.choose_threads(cpus=2, load=6.5)[0] == 1        # never zero
    assert runtime.choose_threads(cpus=16, load=3.0)[0] == 13
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.choose_threads(cpus=2, load=0.0) == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv(runtime.THREADS_ENV, "5")
    assert runtime.choose_threads(cpus=2, load=0.0) == (5, runtime.THREADS_ENV)
    assert runtime.choose_threads(4, cpus=2, load=0.0) == (4, "--threads")


def test_busy_cpus_sees_a_busy_core_now(monkeypatch):
    """The thread choice measures the CPUs busy now, not the 1-minute load average."""
    import threading

    idle = runtime.busy_cpus(window=0.2, cpus=2)
    if idle is None:  # not Linux: the load average is the fallback
        return
    assert 0.0 <= idle <= 2.0
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    t = threading.Thread(target=spin)
    t.start()
    try:
        busy = runtime.busy_cpus(window=0.3, cpus=runtime.cpu_count())
    finally:
        stop.set()
        t.join()
    assert busy is not None and busy >= 0.6, busy   # the spinning thread keeps one CPU busy
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "busy_cpus", lambda cpus=None: 1.8)
    assert runtime.choose_threads(cpus=2) == (1, "free CPUs, busy now 1.8")
    monkeypatch.setattr(runtime, "busy_cpus", lambda cpus=None: None)
    monkeypatch.setattr(runtime, "load_average", lambda: 0.2)
    assert runtime.choose_threads(cpus=2) == (2, "free CPUs, load 0.2")


def test_setup_threads_prints_the_choice_once(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "_ANNOUNCED", None)
    monkeypatch.setenv(runtime.THREADS_ENV, "1")
    buf = io.StringIO()
    try:
        assert runtime.setup_threads(stream=buf) == 1 and torch.get_num_threads() == 1
        runtime.setup_threads(stream=buf)
    finally:
        torch.set_num_threads(before)
    assert buf.getvalue().count("threads: 1 of") == 1 and runtime.THREADS_ENV in buf.getvalue()


def test_setup_threads_flushes_subnormal_floats(monkeypatch):
    """After setup a subnormal float32 counts as zero (the CPU's flush-to-zero mode, as on GPUs):
    aten's tanh-gelu would otherwise run up to 25x slower on the fast weights' values."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "_ANNOUNCED", None)
    monkeypatch.setenv(runtime.THREADS_ENV, "1")
    try:
        torch.set_flush_denormal(False)  # (an earlier setup in this process may have flushed)
        tiny = torch.tensor([1e-40], dtype=torch.float32)  # below float32's smallest normal, 1.18e-38
        assert (tiny * 2.0).item() > 0
        buf = io.StringIO()
        runtime.setup_threads(stream=buf)
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU has no flush-to-zero mode")
        assert (tiny * 2.0).item() == 0.0
        assert "subnormal floats flushed to zero" in buf.getvalue()
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(False)


def test_load_warning_only_when_busy(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime, "load_average", lambda: 0.4)
    assert runtime.load_warning() is None
    monkeypatch.setattr(runtime, "load_average", lambda: 6.5)
    assert "load 6.5 on 2 CPUs" in runtime.load_warning(1)


def test_run_facts_name_versions_hardware_load_and_commit():
    facts = runtime.run_facts(wall_time_s=12.0)
    for key in ("wall_time_s", "torch", "moshi", "python", "cpu", "load_1min", "cpus", "torch_threads", "git_commit"):
        assert key in facts
    assert facts["wall_time_s"] == 12.0 and facts["torch"]


def test_periodic_log_prints_lines_without_a_terminal():
    buf = io.StringIO()                     # not a terminal
    log = runtime.PeriodicLog("train", total=10, every_s=0.0, stream=buf)
    log.update(3, loss="1.23")
    assert re.match(r"train: 3/10 after \d+ s, loss 1\.23", buf.getvalue())


def test_no_test_has_a_wall_clock_limit():
    """A timed assertion fails on a busy machine; hangs are caught by pytest-timeout (conftest.py)."""
    here = Path(__file__).parent
    offenders = [f"{p.name}:{i}" for p in sorted(here.glob("test_*.py")) if p.name != Path(__file__).name
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"timeout\s*=\s*\d|deadline|time\.time\(\)\s*[-<>]", line)]
    assert not offenders, offenders
