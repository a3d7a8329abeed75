"""Replay fault probes against the ``moshi-ttt`` command line and print a table.

Each probe is what a new user (or a scheduler, or a full disk) does to a command: bad values and
files, corruption of what we wrote, ``kill -9`` inside a checkpoint write, SIGTERM / SIGINT, a
disk that fills up. Every command runs in a subprocess, as a user would run it. A probe records:

- traceback: a Python traceback reached the user (stdout or stderr of any of its commands);
- silent loss: data was lost or altered without an error (wrong exit code 0, a checkpoint or a
  metrics line gone, a summary overwritten, a partial dataset that looks complete, ...);
- identical: for the probes that interrupt and resume a run, whether the resumed run is bit for
  bit the uninterrupted reference (every step's loss, the final weights and carried state).

    python scripts/fault_probes.py [--workdir DIR] [--keep] [--only SUBSTRING]

Exit code 0 when every probe passes (no traceback, no silent loss, every resumed run identical).
Disk-full probes mount a small tmpfs (root with mount permission); where that is not permitted
they are reported as skipped (tests/test_faults_train.py simulates ENOSPC inside the process).
Runs on a CPU in a few minutes (tiny preset, 6 training steps per run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
       "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
STEPS = 6

# Slows the checkpoint manifest (the last act before the rename) so that a kill lands inside the
# write, then runs the normal command line.
SLOW_CKPT = r"""
import sys, time
import moshi_ttt.train.checkpoint as c
orig = c._sha256
def slow(p):
    time.sleep(float(sys.argv[1]))
    return orig(p)
c._sha256 = slow
from moshi_ttt.cli import main
sys.exit(main(sys.argv[2:]))
"""


@dataclass
class Run:
    cmd: list[str]
    rc: int
    out: str
    err: str

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.out + self.err

    def last_line(self) -> str:
        lines = [ln for ln in (self.err + self.out).splitlines() if ln.strip()]
        return lines[-1][:110] if lines else ""


@dataclass
class Outcome:
    ok: bool
    loss: bool = False
    identical: bool | None = None
    detail: str = ""
    runs: list[Run] = field(default_factory=list)


@dataclass
class Probe:
    name: str
    kind: str
    fn: Callable[[Ctx], Outcome]


PROBES: list[Probe] = []


def probe(name: str, kind: str):
    def deco(fn):
        PROBES.append(Probe(name, kind, fn))
        return fn
    return deco


class Ctx:
    """Shared fixtures: a synthetic corpus, a reference run, toy recordings and a tokenizer."""

    def __init__(self, work: Path):
        self.work = work
        self.runs: list[Run] = []

    # ---------------------------------------------------------------- commands
    def cli(self, *args: str, timeout: float = 900, python: list[str] | None = None) -> Run:
        cmd = [PY, *(python or ["-m", "moshi_ttt.cli"]), *map(str, args)]
        p = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        run = Run(cmd, p.returncode, p.stdout, p.stderr)
        self.runs.append(run)
        return run

    def popen(self, *args: str, python: list[str] | None = None) -> subprocess.Popen:
        cmd = [PY, *(python or ["-m", "moshi_ttt.cli"]), *map(str, args)]
        return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(self, proc: subprocess.Popen) -> Run:
        out, err = proc.communicate(timeout=900)
        run = Run(list(proc.args), proc.returncode, out, err)  # type: ignore[arg-type]
        self.runs.append(run)
        return run

    def train_args(self, run_dir: Path, *extra: str) -> list[str]:
        sets = [f"run_dir={run_dir}", f"data.train={self.work / 'train'}", "data.eval=null", f"steps={STEPS}",
                "ckpt_every=1", "keep_last=3", "log_every=1", "data.chunk_frames=32", "data.lanes=2",
                "ttt.layers=[1,2]", "optim.warmup_steps=1", *extra]
        return ["train", str(REPO / "configs" / "tiny_cpu.yaml"), "--quiet", *sum((["--set", s] for s in sets), [])]

    def train(self, run_dir: Path, *extra: str, flags: tuple[str, ...] = ()) -> Run:
        return self.cli(*self.train_args(run_dir, *extra), *flags)

    # ---------------------------------------------------------------- fixtures
    def setup(self) -> None:
        r = self.cli("synth", "--out", self.work / "train", "--num-files", "16", "--quiet")
        assert r.rc == 0, r.err
        from moshi_ttt.data.synthetic import SynthConfig, write_corpus

        # A consistent dataset of another layout (3 + 3 codebooks instead of 2 + 2).
        write_corpus(SynthConfig(seed=0, num_files=2, frames_min=64, frames_max=64, n_q=6, dep_q=3),
                     self.work / "wide", progress=False)
        self.ref = self.work / "ref"
        r = self.train(self.ref)
        assert r.rc == 0, r.err + r.out
        self.ref_losses = losses(self.ref)
        assert sorted(self.ref_losses) == list(range(1, STEPS + 1))
        from moshi_ttt.data.fixtures import make_toy_recordings, train_toy_tokenizer

        self.tok = train_toy_tokenizer(self.work / "tok" / "toy")
        self.manifest = make_toy_recordings(self.work / "rec", num_files=3)
        r = self.prepare(self.work / "prep_ref")
        assert r.rc == 0, r.err
        self.ref_codes = dataset_codes(self.work / "prep_ref")

    def prepare(self, out: Path, *extra: str, manifest: Path | None = None) -> Run:
        return self.cli("prepare", manifest or self.manifest, "--out", out, "--tokenizer", self.tok,
                        "--random-mimi", "tiny", "--quiet", "--workers", "1", *extra)

    def copy_ref(self, name: str) -> Path:
        dst = self.work / name
        shutil.copytree(self.ref, dst)
        return dst

    def identical(self, run_dir: Path) -> tuple[bool, str]:
        """Every step logged once with the reference's loss; final weights and state equal."""
        got = losses(run_dir)
        if sorted(got) != sorted(self.ref_losses):
            return False, f"steps logged {sorted(got)}"
        diff = [s for s in got if got[s] != self.ref_losses[s]]
        if diff:
            return False, f"losses differ at steps {diff}"
        last = f"checkpoints/step_{STEPS:07d}"
        for f in ("trainable.safetensors", "stream.safetensors", "adapter/ttt.safetensors"):
            a, b = self.ref / last / f, run_dir / last / f
            if not b.is_file() or safetensors_content(a) != safetensors_content(b):
                return False, f"{last}/{f} differs"
        return True, "bit-identical"


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice is reported as a loss of 1e9."""
    out: dict[int, float] = {}
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return out
    for ln in p.read_text().splitlines():
        try:
            d = json.loads(ln)
        except ValueError:
            continue
        if "loss" in d:
            out[d["step"]] = 1e9 if d["step"] in out else d["loss"]
    return out


def safetensors_content(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """Metadata and every tensor's dtype, shape and bytes (the header's key order is not stable)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {}
        for k in f.keys():
            t = f.get_tensor(k).contiguous()
            tensors[k] = (str(t.dtype), tuple(t.shape), t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return meta, tensors


def checkpoints(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in folder.glob("step_*") if p.is_dir() and p.name[5:].isdigit()) \
        if folder.is_dir() else []


def dataset_codes(out: Path) -> dict[str, object]:
    idx = out / "index.jsonl"
    if not idx.is_file():
        return {}
    res = {}
    for ln in idx.read_text().splitlines():
        d = json.loads(ln)
        res[d["file_id"]] = safetensors_content(out / d["path"])
    return res


def flip(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def expect(run: Run, rc: int, *needles: str) -> tuple[bool, str]:
    text = run.err + run.out
    missing = [n for n in needles if n not in text]
    ok = run.rc == rc and not missing
    return ok, f"rc={run.rc} (want {rc})" + (f", missing {missing}" if missing else "") + f": {run.last_line()}"


def tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at ``path`` (root only); False where not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


# ====================================================================== config and arguments
def _config_probe(name: str, extra: tuple[str, ...], rc: int, needle: str, yaml_text: str | None = None):
    @probe(name, "bad config")
    def _(c: Ctx) -> Outcome:
        run_dir = c.work / f"cfg_{abs(hash(name)) % 10**8}"
        args = c.train_args(run_dir, *extra)
        if yaml_text is not None:
            cfg = c.work / f"{run_dir.name}.yaml"
            cfg.write_text(yaml_text)
            args[1] = str(cfg)
        r = c.cli(*args)
        ok, d = expect(r, rc, needle)
        return Outcome(ok, loss=r.rc == 0, detail=d)


_config_probe("train optim.grad_clip=-1", ("optim.grad_clip=-1",), 2, "optim.grad_clip")
_config_probe("train data.chunk_frames=0", ("data.chunk_frames=0",), 2, "data.chunk_frames")
_config_probe("train optim.lr=fast", ("optim.lr=fast",), 2, "optim.lr")
_config_probe("train unknown key optim.lrr", ("optim.lrr=1",), 2, "optim.lrr")
_config_probe("train --set data.X over a null data: section", (), 2, "'data' is None",
              yaml_text="data:\nsteps: 3\n")
_config_probe("train invalid YAML", (), 2, "not valid YAML", yaml_text="a: [1, 2\n")
_config_probe("train ttt.layers wrong type", ("ttt.layers={a: 1}",), 2, "ttt")
_config_probe("train device=tpu9", ("device=tpu9",), 7, "tpu9")
_config_probe("train missing data folder", ("data.train=/nonexistent/data",), 2, "no dataset at /nonexistent/data")


@probe("train config file missing", "bad config")
def _(c: Ctx) -> Outcome:
    r = c.cli("train", c.work / "nope.yaml")
    ok, d = expect(r, 2, "nope.yaml")
    return Outcome(ok, detail=d)


@probe("train device=cuda without CUDA", "bad config")
def _(c: Ctx) -> Outcome:
    import torch

    if torch.cuda.is_available():
        return Outcome(True, detail="skipped: CUDA present")
    r = c.train(c.work / "cuda_run", "device=cuda")
    ok, d = expect(r, 7, "CUDA is not available")
    return Outcome(ok, loss=r.rc == 0, detail=d)


@probe("train run_dir under a file (unwritable)", "bad path")
def _(c: Ctx) -> Outcome:
    blocker = c.work / "blocker_file"
    blocker.write_text("x")
    r = c.train(blocker / "run")
    ok, d = expect(r, 6, "blocker_file")
    return Outcome(ok, detail=d)


# ====================================================================== checkpoints and resume
@probe("resume: all checkpoints corrupt", "corruption")
def _(c: Ctx) -> Outcome:
    run = c.copy_ref("allbad")
    for s in checkpoints(run):
        flip(run / "checkpoints" / f"step_{s:07d}" / "trainable.safetensors")
    before = checkpoints(run)
    r = c.train(run, flags=("--resume",))
    ok, d = expect(r, 4, "--restart")
    lost = checkpoints(run) != before or len(losses(run)) != STEPS
    return Outcome(ok and not lost, loss=lost or r.rc == 0, detail=d)


@probe("resume --restart after all corrupt", "corruption")
def _(c: Ctx) -> Outcome:
    run = c.copy_ref("allbad_restart")
    for s in checkpoints(run):
        flip(run / "checkpoints" / f"step_{s:07d}" / "stream.safetensors")
    r = c.train(run, flags=("--resume", "--restart"))
    ok, d = expect(r, 0, "moved")
    kept = sorted(p.name for p in (run / "restarted_1" / "checkpoints").iterdir()) if \
        (run / "restarted_1" / "checkpoints").is_dir() else []
    same, why = c.identical(run)
    lost = len(kept) != 3
    return Outcome(ok and same and not lost, loss=lost, identical=same, detail=f"{d}; {why}")


@probe("resume: newest checkpoint corrupt", "corruption")
def _(c: Ctx) -> Outcome:
    run = c.copy_ref("newestbad")
    flip(run / "checkpoints" / f"step_{STEPS:07d}" / "trainer.pt", 100)
    r = c.train(run, flags=("--resume",))
    ok, d = expect(r, 0, "corrupted")
    same, why = c.identical(run)
    aside = (run / "checkpoints" / f"step_{STEPS:07d}.corrupt").is_dir()
    return Outcome(ok and same and aside, loss=not aside, identical=same, detail=f"{d}; {why}")


@probe("resume: manifest missing in newest", "corruption")
def _(c: Ctx) -> Outcome:
    run = c.copy_ref("nomanifest")
    (run / "checkpoints" / f"step_{STEPS:07d}" / "manifest.json").unlink()
    r = c.train(run, flags=("--resume",))
    ok, d = expect(r, 0)
    same, why = c.identical(run)
    return Outcome(ok and same, identical=same, detail=f"{d}; {why}")


@probe("resume: stale .tmp from a crashed write", "crash")
def _(c: Ctx) -> Outcome:
    run = c.copy_ref("staletmp")
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:07d}")
    tmp = run / "checkpoints" / f"step_{STEPS:07d}.tmp"
    tmp.mkdir()
    (tmp / "trainable.safetensors").write_bytes(b"half")
    r = c.train(run, flags=("--resume",))
    ok, d = expect(r, 0)
    same, why = c.identical(run)
    return Outcome(ok and same and not tmp.exists(), identical=same, detail=f"{d}; {why}")


@probe("resume: partial last line in metrics.jsonl", "crash")
def _(c: Ctx) -> Outcome:
    run = c.copy_ref("partialmetrics")
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:07d}")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:17])
    r = c.train(run, flags=("--resume",))
    ok, d = expect(r, 0)
    same, why = c.identical(run)
    return Outcome(ok and same, identical=same, detail=f"{d}; {why}")


@probe("resume of a finished run", "misuse")
def _(c: Ctx) -> Outcome:
    run = c.copy_ref("finished")
    before = (run / "summary.json").read_bytes()
    r = c.train(run, flags=("--resume",))
    ok, d = expect(r, 0, "already finished")
    lost = (run / "summary.json").read_bytes() != before
    return Outcome(ok and not lost, loss=lost, detail=d)


@probe("resume --set optim.lr=0.5 (applied, recorded)", "misuse")
def _(c: Ctx) -> Outcome:
    run = c.copy_ref("lr_override")
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:07d}")
    r = c.train(run, "optim.lr=0.5", flags=("--resume",))
    ok, d = expect(r, 0, "applied optim.lr")
    import torch

    ck = run / "checkpoints" / f"step_{STEPS:07d}"
    st = torch.load(ck / "trainer.pt", weights_only=False)
    used = st["scheduler"]["base_lrs"][0]
    recorded = json.loads((ck / "config.json").read_text())["optim"]["lr"]
    silent = used != recorded
    return Outcome(ok and not silent, loss=silent, detail=f"{d}; recorded {recorded}, used {used}")


@probe("resume --set optim.beta1=0.5 (refused)", "misuse")
def _(c: Ctx) -> Outcome:
    run = c.copy_ref("beta_override")
    before = checkpoints(run)
    r = c.train(run, "optim.beta1=0.5", flags=("--resume",))
    ok, d = expect(r, 2, "optim.beta1")
    return Outcome(ok and checkpoints(run) == before, loss=r.rc == 0, detail=d)


@probe("new run into a folder with checkpoints", "misuse")
def _(c: Ctx) -> Outcome:
    run = c.copy_ref("overwrite")
    before = checkpoints(run)
    r = c.train(run)
    ok, d = expect(r, 4, "--resume")
    lost = checkpoints(run) != before or len(losses(run)) != STEPS
    return Outcome(ok and not lost, loss=lost, detail=d)


def _kill_probe(name: str, at_step: int, seed: int):
    @probe(name, "kill -9")
    def _(c: Ctx) -> Outcome:
        run = c.work / f"kill_{at_step}_{seed}"
        rnd = random.Random(seed)
        proc = c.popen(python=["-c", SLOW_CKPT, f"{0.05 + 0.1 * rnd.random():.3f}", *c.train_args(run)])
        tmp = run / "checkpoints" / f"step_{at_step:07d}.tmp"
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if tmp.is_dir() and any(tmp.iterdir()):
                time.sleep(rnd.random() * 0.2)
                break
            time.sleep(0.005)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        r = c.train(run, flags=("--resume",))
        ok, d = expect(r, 0, "resumed from" if at_step > 1 else "")
        same, why = c.identical(run)
        return Outcome(ok and same and killed, identical=same, detail=f"killed={killed}; {d}; {why}")


_kill_probe("kill -9 inside checkpoint write (step 2)", 2, 1)
_kill_probe("kill -9 inside checkpoint write (step 4)", 4, 2)
_kill_probe("kill -9 inside checkpoint write (step 5)", 5, 3)
_kill_probe("kill -9 inside the first checkpoint write", 1, 4)


def _signal_probe(name: str, sig: int, rc: int):
    @probe(name, "signal")
    def _(c: Ctx) -> Outcome:
        run = c.work / f"sig_{sig}"
        proc = c.popen(*c.train_args(run, "ckpt_every=100"))
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline and len(losses(run)) < 2:
            time.sleep(0.02)
        proc.send_signal(sig)
        r = c.finish(proc)
        ok, d = expect(r, rc, "writing a checkpoint")
        logged = max(losses(run)) if losses(run) else 0
        lost = not checkpoints(run) or checkpoints(run)[-1] != logged
        r2 = c.train(run, flags=("--resume",))
        ok2, d2 = expect(r2, 0)
        same, why = c.identical(run)
        last = checkpoints(run)[-1] if checkpoints(run) else None
        return Outcome(ok and ok2 and same and not lost, loss=lost, identical=same,
                       detail=f"{d}; ckpt {last} vs logged {logged}; {why}")


_signal_probe("SIGTERM mid-run, then resume", signal.SIGTERM, 143)
_signal_probe("SIGINT mid-run, then resume", signal.SIGINT, 130)


@probe("disk full: run_dir on a 2 MiB tmpfs", "disk full")
def _(c: Ctx) -> Outcome:
    mnt = c.work / "tmpfs_small"
    if not tmpfs(mnt, "2m"):
        return Outcome(True, detail="skipped: tmpfs mount not permitted (see tests for the ENOSPC simulation)")
    try:
        r = c.train(mnt / "run")
        ok, d = expect(r, 6, "free space")
        stale = list((mnt / "run" / "checkpoints").glob("*.tmp")) if (mnt / "run" / "checkpoints").is_dir() else []
        return Outcome(ok and not stale, loss=r.rc == 0, detail=d)
    finally:
        umount(mnt)


@probe("disk fills during the run; resume elsewhere", "disk full")
def _(c: Ctx) -> Outcome:
    mnt = c.work / "tmpfs_mid"
    if not tmpfs(mnt, "11m"):
        return Outcome(True, detail="skipped: tmpfs mount not permitted")
    try:
        r = c.train(mnt / "run")
        ok, d = expect(r, 6, "free space")
        done = checkpoints(mnt / "run")
        stale = list((mnt / "run" / "checkpoints").glob("*.tmp"))
        moved = c.work / "disk_mid_moved"
        shutil.copytree(mnt / "run", moved)
    finally:
        umount(mnt)
    from moshi_ttt.train.checkpoint import verify_checkpoint

    intact = all(verify_checkpoint(moved / "checkpoints" / f"step_{s:07d}") for s in done)
    r2 = c.train(moved, flags=("--resume",))
    ok2, d2 = expect(r2, 0)
    same, why = c.identical(moved)
    return Outcome(ok and ok2 and same and intact and not stale and bool(done), loss=not intact,
                   identical=same, detail=f"{d}; kept {done}; {why}")


@probe("non-finite step: carried state restored, nothing NaN saved", "non-finite")
def _(c: Ctx) -> Outcome:
    code = f"""
import sys, torch
from moshi_ttt.train.config import load_train_config
from moshi_ttt.train.loop import Trainer
from moshi_ttt.model.memory import snapshot_stream, stream_finite
from safetensors.torch import load_file
cfg = load_train_config(None, ["run_dir={c.work / 'nonfinite'}", "data.train={c.work / 'train'}", "data.eval=null",
      "data.chunk_frames=32", "data.lanes=2", "ttt.layers=[1,2]", "progress=false"])
tr = Trainer(cfg)
it = iter(tr.stream)
tr.train_step(next(it))
def flat():
    out = {{"tail": tr.runner.tail.clone()}}
    for n, f in snapshot_stream(tr.model).items():
        for k, v in f.items():
            if isinstance(v, torch.Tensor): out[n + k] = v
            elif isinstance(v, tuple): out[n + k] = v[0]
            elif hasattr(v, "items"): out.update({{n + k + a: t for a, t in v.items()}})
    return out
before = flat()
w = tr.model.text_emb.weight
keep = w.detach().clone()
with torch.no_grad(): w.fill_(float("nan"))
m = tr.train_step(next(it))
after = flat()
same = m["skipped"] and all(torch.equal(before[k], after[k]) for k in before) and stream_finite(tr.model)
with torch.no_grad(): w.copy_(keep)
tr.train_step(next(it))
ck = tr.save_checkpoint()
fin = all(bool(torch.isfinite(t).all()) for t in load_file(str(ck / "stream.safetensors")).values()
          if t.is_floating_point())
print("RESTORED" if same else "NOT RESTORED", "FINITE" if fin else "NONFINITE")
"""
    r = c.cli(python=["-c", code])
    ok, d = expect(r, 0, "RESTORED FINITE")
    return Outcome(ok and "NOT" not in r.out, loss=not ok, detail=d)


@probe("train on a dataset with no usable file", "bad input")
def _(c: Ctx) -> Outcome:
    data = c.work / "emptyset"
    shutil.copytree(c.work / "train", data)
    (data / "index.jsonl").write_text("")
    r = c.train(c.work / "empty_run", f"data.train={data}")
    ok, d = expect(r, 1, "no usable file")
    return Outcome(ok, loss=r.rc == 0, detail=d)


@probe("train: a codes file corrupted on disk mid-corpus", "corruption")
def _(c: Ctx) -> Outcome:
    data = c.work / "badcodes"
    shutil.copytree(c.work / "train", data)
    victim = sorted((data / "codes").glob("*.safetensors"))[3]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01                               # one bit of a code: still in range
    victim.write_bytes(bytes(raw))
    r = c.train(c.work / "badcodes_run", f"data.train={data}", "steps=40")
    ok, d = expect(r, 1, victim.name)
    from moshi_ttt.train.checkpoint import verify_checkpoint

    intact = all(verify_checkpoint(c.work / "badcodes_run" / "checkpoints" / f"step_{s:07d}")
                 for s in checkpoints(c.work / "badcodes_run"))
    return Outcome(ok and intact, loss=r.rc == 0 or not intact, detail=d)


@probe("train --set without '='", "bad config")
def _(c: Ctx) -> Outcome:
    r = c.cli("train", "--set", "steps")
    ok, d = expect(r, 2, "key=value")
    return Outcome(ok, detail=d)


@probe("train: run_dir/checkpoints is a file", "bad path")
def _(c: Ctx) -> Outcome:
    run = c.work / "ckfile"
    run.mkdir()
    (run / "checkpoints").write_text("x")
    r = c.train(run)
    ok, d = expect(r, 6, "checkpoints")
    return Outcome(ok, loss=r.rc == 0, detail=d)


@probe("train: data.eval folder missing", "bad input")
def _(c: Ctx) -> Outcome:
    r = c.train(c.work / "noeval", "data.eval=/nonexistent/eval")
    ok, d = expect(r, 2, "no dataset at /nonexistent/eval")
    return Outcome(ok, detail=d)


# ====================================================================== eval
@probe("eval --chunk-frames 0", "bad argument")
def _(c: Ctx) -> Outcome:
    r = c.cli("eval", c.ref, "--data", c.work / "train", "--chunk-frames", "0", "--out", c.work / "ev0")
    ok, d = expect(r, 2, "--chunk-frames")
    return Outcome(ok, loss=r.rc == 0, detail=d)


@probe("eval on data of another layout", "bad input")
def _(c: Ctx) -> Outcome:
    r = c.cli("eval", c.ref, "--data", c.work / "wide", "--out", c.work / "ev1", "--quiet")
    ok, d = expect(r, 1, "another layout")
    return Outcome(ok, detail=d)


@probe("eval of a folder without checkpoints", "bad input")
def _(c: Ctx) -> Outcome:
    r = c.cli("eval", c.work / "train", "--data", c.work / "train", "--out", c.work / "ev2")
    ok, d = expect(r, 4, "no checkpoint")
    return Outcome(ok, detail=d)


@probe("eval --device foo", "bad argument")
def _(c: Ctx) -> Outcome:
    r = c.cli("eval", c.ref, "--data", c.work / "train", "--device", "foo", "--out", c.work / "ev3")
    ok, d = expect(r, 7, "foo")
    return Outcome(ok, detail=d)


@probe("eval of a checkpoint with NaN weights", "corruption")
def _(c: Ctx) -> Outcome:
    run = c.copy_ref("nanweights")
    ck = run / "checkpoints" / f"step_{STEPS:07d}"
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    t = load_file(str(ck / "trainable.safetensors"))
    k = sorted(t)[0]
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")
    save_file(t, str(ck / "trainable.safetensors"))
    mf = json.loads((ck / "manifest.json").read_text())       # as a diverged run would have saved it
    mf["files"]["trainable.safetensors"] = hashlib.sha256((ck / "trainable.safetensors").read_bytes()).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(mf))
    r = c.cli("eval", ck, "--data", c.work / "train", "--out", c.work / "ev4", "--quiet")
    ok, d = expect(r, 4, "NaN")
    del torch
    return Outcome(ok, loss=r.rc == 0, detail=d)


# ====================================================================== prepare
@probe("prepare --num-codebooks 0", "bad argument")
def _(c: Ctx) -> Outcome:
    r = c.prepare(c.work / "p0", "--num-codebooks", "0")
    ok, d = expect(r, 2, "--num-codebooks")
    return Outcome(ok, loss=r.rc == 0, detail=d)


@probe("prepare --window-sec 0", "bad argument")
def _(c: Ctx) -> Outcome:
    r = c.prepare(c.work / "p0w", "--window-sec", "0")
    ok, d = expect(r, 2, "--window-sec")
    return Outcome(ok, loss=r.rc == 0, detail=d)


@probe("prepare with a tokenizer that is not a model", "bad input")
def _(c: Ctx) -> Outcome:
    bad = c.work / "bad.model"
    bad.write_bytes(b"\x00garbage" * 10)
    r = c.cli("prepare", c.manifest, "--out", c.work / "p1", "--tokenizer", bad, "--random-mimi", "tiny", "--quiet")
    ok, d = expect(r, 2, "bad.model")
    return Outcome(ok, detail=d)


@probe("prepare with a missing manifest", "bad input")
def _(c: Ctx) -> Outcome:
    r = c.prepare(c.work / "p2", manifest=c.work / "nope.jsonl")
    ok, d = expect(r, 1, "nope.jsonl")
    return Outcome(ok, detail=d)


@probe("prepare --cache under a file (unwritable)", "bad path")
def _(c: Ctx) -> Outcome:
    blocker = c.work / "cache_blocker"
    blocker.write_text("x")
    out = c.work / "p3"
    r = c.prepare(out, "--cache", blocker / "cache")
    ok, d = expect(r, 0, "not writable")
    lost = dataset_codes(out) != c.ref_codes
    return Outcome(ok and not lost, loss=lost, detail=d)


@probe("prepare --out under a file (unwritable)", "bad path")
def _(c: Ctx) -> Outcome:
    blocker = c.work / "out_blocker"
    blocker.write_text("x")
    r = c.prepare(blocker / "out")
    ok, d = expect(r, 6, "out_blocker")
    return Outcome(ok, detail=d)


@probe("prepare: bit-flipped cache entry (codes in range)", "corruption")
def _(c: Ctx) -> Outcome:
    out = c.work / "p4"
    shutil.copytree(c.work / "prep_ref", out)
    entry = sorted((out / "mimi_cache").rglob("*.safetensors"))[0]
    data = bytearray(entry.read_bytes())
    v = int.from_bytes(data[-2:], "little", signed=True)
    data[-2:] = ((v + 1) % 64).to_bytes(2, "little", signed=True)
    entry.write_bytes(bytes(data))
    r = c.prepare(out)
    ok, d = expect(r, 0)
    report = (out / "prepare_report.json").read_text()
    ok = ok and entry.name in report and "checksum" in report      # noted, naming the cache entry
    lost = dataset_codes(out) != c.ref_codes
    return Outcome(ok and not lost, loss=lost, detail=d)


@probe("prepare: truncated cache entry", "corruption")
def _(c: Ctx) -> Outcome:
    out = c.work / "p5"
    shutil.copytree(c.work / "prep_ref", out)
    entry = sorted((out / "mimi_cache").rglob("*.safetensors"))[1]
    entry.write_bytes(entry.read_bytes()[:40])
    r = c.prepare(out)
    ok, d = expect(r, 0)
    ok = ok and entry.name in (out / "prepare_report.json").read_text()
    lost = dataset_codes(out) != c.ref_codes
    return Outcome(ok and not lost, loss=lost, detail=d)


@probe("prepare --strict with a bad alignment", "bad input")
def _(c: Ctx) -> Outcome:
    from moshi_ttt.data.fixtures import make_toy_recordings

    man = make_toy_recordings(c.work / "rec_strict", num_files=3)
    (c.work / "rec_strict" / "audio" / "rec_02.json").write_text("{oops")
    out = c.work / "p6"
    r = c.prepare(out, "--strict", manifest=man)
    ok, d = expect(r, 1, "inputs kept", "rec_02")
    looks_complete = (out / "index.jsonl").is_file()
    return Outcome(ok and not looks_complete, loss=looks_complete, detail=d)


@probe("prepare: negative times, unknown chars, empty alignment, silence, 40x over-range", "bad input")
def _(c: Ctx) -> Outcome:
    from moshi_ttt.data.fixtures import make_toy_recordings, toy_stereo, write_wav

    root = c.work / "rec_warn"
    man = make_toy_recordings(root, num_files=5)
    ali = lambda i: root / "audio" / f"rec_{i:02d}.json"  # noqa: E731
    a = json.loads(ali(0).read_text())
    a["alignments"][0][1] = [-0.5, -0.2]
    ali(0).write_text(json.dumps(a))
    a = json.loads(ali(1).read_text())
    a["alignments"].insert(0, ["Zürich§", [0.4, 0.8], "SPEAKER_MAIN"])
    ali(1).write_text(json.dumps(a))
    ali(2).write_text(json.dumps({"alignments": []}))
    wav = toy_stereo(2.6, 24000, seed=5)
    wav[1] = 0.0
    write_wav(root / "audio" / "rec_03.wav", wav, 24000)
    write_wav(root / "audio" / "rec_04.wav", toy_stereo(3.0, 24000, seed=6) * 40.0, 24000)
    r = c.prepare(c.work / "p7", manifest=man)
    ok, d = expect(r, 0, "negative times", "does not know", "no words", "silent", "over range")
    return Outcome(ok, loss=not ok, detail=d)


@probe("prepare: disk full on a 16 KiB tmpfs output", "disk full")
def _(c: Ctx) -> Outcome:
    mnt = c.work / "tmpfs_prep"
    if not tmpfs(mnt, "16k"):
        return Outcome(True, detail="skipped: tmpfs mount not permitted")
    try:
        from moshi_ttt.data.fixtures import make_toy_recordings

        man = make_toy_recordings(c.work / "rec_big", num_files=3, seconds=(20.0,))
        r = c.prepare(mnt / "out", "--cache", c.work / "cache_big", manifest=man)
        ok, d = expect(r, 6)
        looks_complete = (mnt / "out" / "index.jsonl").is_file()
        return Outcome(ok and not looks_complete, loss=looks_complete or r.rc == 0, detail=d)
    finally:
        umount(mnt)


@probe("prepare with garbage --mimi-weights", "bad input")
def _(c: Ctx) -> Outcome:
    bad = c.work / "mimi.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}" * 3)
    r = c.cli("prepare", c.manifest, "--out", c.work / "p8", "--tokenizer", c.tok, "--mimi-weights", bad, "--quiet")
    ok, d = expect(r, 5, "mimi.safetensors")
    return Outcome(ok, detail=d)


def _interrupt_prepare(name: str, sig: int, rc: int | None):
    @probe(name, "signal" if sig != signal.SIGKILL else "kill -9")
    def _(c: Ctx) -> Outcome:
        from moshi_ttt.data.fixtures import make_toy_recordings

        man = make_toy_recordings(c.work / f"rec_int_{sig}", num_files=4, seconds=(20.0,))
        out = c.work / f"p_int_{sig}"
        proc = c.popen("prepare", man, "--out", out, "--tokenizer", c.tok, "--random-mimi", "tiny", "--quiet",
                       "--workers", "1")
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if (out / "codes").is_dir() and any((out / "codes").glob("*.safetensors")):
                break
            time.sleep(0.01)
        interrupted = proc.poll() is None
        proc.send_signal(sig)
        r = c.finish(proc)
        looks_complete = (out / "index.jsonl").is_file() and interrupted
        ok = interrupted and (rc is None or r.rc == rc)
        r2 = c.cli("prepare", man, "--out", out, "--tokenizer", c.tok, "--random-mimi", "tiny", "--quiet")
        ok2, d2 = expect(r2, 0)
        done = len(dataset_codes(out)) == 4
        return Outcome(ok and ok2 and done and not looks_complete, loss=looks_complete or not done,
                       detail=f"interrupted={interrupted} rc={r.rc}; rerun {d2}")


_interrupt_prepare("kill -9 during prepare, then rerun", signal.SIGKILL, None)
_interrupt_prepare("SIGINT during prepare, then rerun", signal.SIGINT, 130)


# ====================================================================== memory, adapters, weights
def _library_probe(name: str, body: str, rc: int, needle: str):
    @probe(name, "integrity")
    def _(c: Ctx) -> Outcome:
        code = "import sys, torch\nfrom moshi_ttt.cli import run_guarded\n" + body.replace("WORK", str(c.work)) + \
               "\nsys.exit(run_guarded(job, False))\n"
        r = c.cli(python=["-c", code])
        ok, d = expect(r, rc, needle)
        return Outcome(ok, loss=r.rc == 0, detail=d)


_MODEL = """
from moshi_ttt import TTTConfig, build_lm, tiny_lm_kwargs
torch.manual_seed(0)
model = build_lm(tiny_lm_kwargs(), TTTConfig(layers=[1, 2], mini_batch_size=4))
"""
_library_probe("memory file with NaN", _MODEL + """
from moshi_ttt.model.memory import load_memory, save_memory
from moshi_ttt.model.build import ttt_blocks
from moshi_ttt.ttt.state import save_states, load_states
with model.streaming(1):
    save_memory(model, "WORK/mem.safetensors")
    g, meta = load_states("WORK/mem.safetensors")
    st = {f"layer{i}": b._streaming_state.memory.map(lambda n, t: t.clone()) for i, b in ttt_blocks(model).items()}
    st["layer1"].W1.view(-1)[0] = float("nan")
    meta.pop("sha256")
    save_states("WORK/mem_nan.safetensors", st, meta)
def job():
    with model.streaming(1):
        load_memory(model, "WORK/mem_nan.safetensors")
""", 5, "NaN")
_library_probe("memory file with a flipped bit", _MODEL + """
from moshi_ttt.model.memory import load_memory, save_memory
with model.streaming(1):
    save_memory(model, "WORK/mem2.safetensors")
p = "WORK/mem2.safetensors"
b = bytearray(open(p, "rb").read()); b[-5] ^= 1; open(p, "wb").write(bytes(b))
def job():
    with model.streaming(1):
        load_memory(model, p)
""", 5, "corrupted")
_library_probe("adapter with a flipped bit", _MODEL + """
from moshi_ttt.model.weights import save_ttt_checkpoint, load_ttt_checkpoint
save_ttt_checkpoint(model, "WORK/adapter")
p = "WORK/adapter/ttt.safetensors"
b = bytearray(open(p, "rb").read()); b[-5] ^= 1; open(p, "wb").write(bytes(b))
def job():
    load_ttt_checkpoint(model, "WORK/adapter")
""", 5, "corrupted")
_library_probe("adapter with malformed ttt_config.json", _MODEL + """
from moshi_ttt.model.weights import save_ttt_checkpoint, load_ttt_checkpoint
save_ttt_checkpoint(model, "WORK/adapter2")
open("WORK/adapter2/ttt_config.json", "w").write('{"format": "moshi-ttt-adapter",')
def job():
    load_ttt_checkpoint(model, "WORK/adapter2")
""", 5, "not valid JSON")
_library_probe("stock weights with an inf", """
import json
from moshi.models import loaders
from safetensors.torch import save_file
from moshi_ttt import TTTConfig, tiny_lm_kwargs
from moshi_ttt.model.weights import load_lm
kw = tiny_lm_kwargs()
sd = {k: v.contiguous().clone() for k, v in loaders.get_moshi_lm(None, lm_kwargs=kw).state_dict().items()}
sd["text_linear.weight"][0, 0] = float("inf")
save_file(sd, "WORK/model.safetensors")
open("WORK/config.json", "w").write(json.dumps(kw))
def job():
    load_lm("WORK/model.safetensors", "WORK/config.json", TTTConfig(layers="all"), dtype=torch.float32)
""", 5, "text_linear.weight")


# ====================================================================== main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--only", default=None, help="run the probes whose name contains this")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fault_probes_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    ctx = Ctx(work)
    t0 = time.time()
    print(f"setting up in {work} (corpus, reference run, toy recordings) ...", flush=True)
    ctx.setup()
    rows = []
    probes = [p for p in PROBES if args.only is None or args.only in p.name]
    for i, p in enumerate(probes, 1):
        start = len(ctx.runs)
        try:
            out = p.fn(ctx)
        except Exception as e:  # a probe's own failure is a failed probe, not a crash of the table
            out = Outcome(False, detail=f"probe error: {type(e).__name__}: {e}")
        out.runs = ctx.runs[start:]
        tb = any(r.traceback for r in out.runs)
        rows.append((p, out, tb))
        status = "ok" if out.ok and not tb and not out.loss else "FAIL"
        print(f"[{i:2d}/{len(probes)}] {status:4s} {p.name}: {out.detail[:150]}", flush=True)
    print()
    w = max(len(p.name) for p, _, _ in rows)
    # rc: exit code of the probe's last command; tb: a traceback reached the user; loss: silent loss;
    # ident: the resumed run equals the uninterrupted one bit for bit.
    print(f"{'#':>2}  {'probe':{w}s}  {'kind':12s}  {'rc':>4s}  {'tb':2s}  {'loss':4s}  {'ident':5s}  result")
    for i, (p, out, tb) in enumerate(rows, 1):
        rc = out.runs[-1].rc if out.runs else "-"
        ident = "-" if out.identical is None else ("yes" if out.identical else "NO")
        res = "ok" if out.ok and not tb and not out.loss else "FAIL"
        print(f"{i:2d}  {p.name:{w}s}  {p.kind:12s}  {rc!s:>4s}  {'Y' if tb else '.':2s}  "
              f"{'Y' if out.loss else '.':4s}  {ident:5s}  {res}")
    n_tb = sum(tb for _, _, tb in rows)
    n_loss = sum(out.loss for _, out, _ in rows)
    resumed = [out.identical for _, out, _ in rows if out.identical is not None]
    failed = sum(not (out.ok and not tb and not out.loss) for _, out, tb in rows)
    print()
    print(f"probes {len(rows)}, commands run {len(ctx.runs)}, failed {failed}; tracebacks {n_tb}, silent losses "
          f"{n_loss}, resumed runs bit-identical {sum(resumed)}/{len(resumed)}  ({time.time() - t0:.0f} s)")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if failed == 0 and n_tb == 0 and n_loss == 0 and all(resumed) else 1


if __name__ == "__main__":
    sys.exit(main())
