"""``moshi-ttt bench generate``: speed and memory use of streaming generation over a long input.

Streams ``--minutes`` of synthetic user audio (made frame by frame, never held whole) through the
same loop as ``moshi-ttt generate`` (Mimi encode, ``LMGen.step``, Mimi decode, wav and text written
to disk as produced) with the tiny random preset on CPU, and reports:

* resident memory (RSS) after the first minute of input, at the middle and at the end, and the
  growth from minute 1 to the end (flat memory means a long conversation costs no more than a
  short one);
* the real-time factor (seconds of audio per second of compute; above 1x is faster than real
  time) and where the time goes: Mimi encode, LM step, Mimi decode, writing;
* the machine's load and the torch threads, with a warning when other jobs distort the timing.

    moshi-ttt bench generate --minutes 30          # the full measurement (a few minutes of CPU)
    moshi-ttt bench generate --minutes 2 --json gen.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

FRAME_RATE = 12.5


def rss_mb() -> float:
    """Resident set size of this process now, MB (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_frames(n_frames: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Speech-like user audio made one 80 ms frame at a time: a voiced tone whose pitch and loudness
    wander, with pauses, plus a little noise. Nothing of the whole input is ever in memory."""
    rng = np.random.default_rng(seed)
    frame = 1920
    t = np.arange(frame, dtype=np.float32) / 24000.0
    phase, pitch, amp = 0.0, 140.0, 0.1
    for i in range(n_frames):
        pitch = float(np.clip(pitch + rng.normal(0, 4), 90, 260))
        talking = (i // 25) % 3 != 2          # 2 s of talk, 1 s of pause
        amp = 0.9 * amp + 0.1 * (0.2 if talking else 0.0)
        x = amp * np.sin(2 * np.pi * pitch * t + phase) + 0.005 * rng.standard_normal(frame)
        phase = float((phase + 2 * np.pi * pitch * frame / 24000.0) % (2 * np.pi))
        yield x.astype(np.float32)


def run(minutes: float = 30.0, threads: int | None = None, seed: int = 0, out_dir: str | Path | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Run the measurement; returns the figures (also printed)."""
    from ..model.build import build_lm, tiny_lm_kwargs
    from ..model.generate import StreamingOutput, generate
    from ..model.mimi import random_mimi
    from ..runtime import load_average, load_warning, machine_state, run_facts, setup_threads
    from ..ttt.config import TTTConfig

    n_threads = setup_threads(threads)
    warn = load_warning(n_threads)
    if warn:
        print(warn, file=sys.stderr)
    state_start = machine_state()
    torch.manual_seed(seed)
    model = build_lm(tiny_lm_kwargs(), TTTConfig(layers="all"), dtype=torch.float32).eval()
    mimi = random_mimi(tiny=True, num_codebooks=model.dep_q, card=model.card)
    n_frames = max(1, int(round(minutes * 60 * FRAME_RATE)))
    per_minute = int(60 * FRAME_RATE)
    mid = n_frames // 2
    samples: dict[str, tuple[float, float]] = {}     # name -> (audio minute, RSS MB)
    curve: list[tuple[float, float]] = []
    rss_before = rss_mb()

    def on_frame(i: int, res: Any) -> None:
        done = i + 1
        if done % per_minute == 0 or done in (mid, n_frames):
            m, r = done / FRAME_RATE / 60, rss_mb()
            curve.append((round(m, 3), round(r, 2)))
            if done == min(per_minute, n_frames):
                samples["start"] = (m, r)
            if done == mid:
                samples["middle"] = (m, r)
            if done == n_frames:
                samples["end"] = (m, r)
            if progress and done % per_minute == 0:
                print(f"  minute {m:.0f}/{minutes:g}: RSS {r:.1f} MB, {res.rtf:.2f}x real time", file=sys.stderr,
                      flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(out_dir or tmp) / "bench_generate"
        with StreamingOutput(prefix, None, padding_ids=(0, model.existing_text_padding_id)) as sink:
            res = generate(model, mimi, synthetic_frames(n_frames, seed), sink, progress=False,
                           total_frames=n_frames, on_frame=on_frame)
        wav_mb = sink.wav_path.stat().st_size / 2**20
    samples.setdefault("start", samples.get("end", (0.0, rss_before)))
    samples.setdefault("middle", samples["start"])
    t = res.times
    stages = {"mimi_encode": t.encode, "lm_step": t.step, "mimi_decode": t.decode, "write": t.write}
    total = sum(stages.values()) or 1.0
    mimi_share = (t.encode + t.decode) / total
    dominant = ("Mimi (encode + decode) dominates" if mimi_share > 0.5
                else "the LM step dominates; Mimi (encode + decode) is the smaller part")
    growth = samples["end"][1] - samples["start"][1]
    out = {
        "what": "moshi-ttt bench generate", "preset": "tiny (random weights), TTT in all layers, float32, CPU",
        "audio_minutes": n_frames / FRAME_RATE / 60, "frames": n_frames, "wall_s": res.wall,
        "real_time_factor": res.rtf, "compute_s_per_audio_s": res.wall / res.seconds,
        "stages_s": stages, "stages_ms_per_frame": {k: 1e3 * v / n_frames for k, v in stages.items()},
        "mimi_share": mimi_share, "dominant": dominant,
        "rss_mb": {k: {"minute": round(v[0], 3), "rss_mb": round(v[1], 2)} for k, v in samples.items()},
        "rss_before_model_mb": rss_before, "rss_growth_mb_from_minute_1": growth, "rss_curve": curve,
        "output_wav_mb": wav_mb, "machine_start": state_start,
        "load_1min_end": load_average(), "load_warning": warn, "facts": run_facts(res.wall),
    }
    _print(out)
    return out


def _print(r: dict[str, Any]) -> None:
    s = r["rss_mb"]
    st = r["stages_ms_per_frame"]
    ms = r["machine_start"]
    print(f"bench generate: {r['audio_minutes']:.1f} min of synthetic user audio, {r['preset']}")
    print(f"  machine: {r['facts']['cpu']}, {ms['torch_threads']} torch thread(s) of {ms['cpus']} CPUs, "
          f"load {ms['load_1min']:.2f} at start, {r['load_1min_end']:.2f} at end")
    print(f"  speed: {r['real_time_factor']:.2f}x real time ({r['compute_s_per_audio_s']:.3f} s of compute per "
          f"second of audio; above 1x is faster than real time), {r['wall_s']:.1f} s in all")
    print(f"  per 80 ms frame: Mimi encode {st['mimi_encode']:.2f} ms, LM step {st['lm_step']:.2f} ms, "
          f"Mimi decode {st['mimi_decode']:.2f} ms, writing {st['write']:.2f} ms: {r['dominant']} "
          f"(Mimi {100 * r['mimi_share']:.0f}%)")
    print(f"  resident memory: start (minute {s['start']['minute']:.1f}) {s['start']['rss_mb']:.1f} MB, "
          f"middle (minute {s['middle']['minute']:.1f}) {s['middle']['rss_mb']:.1f} MB, "
          f"end (minute {s['end']['minute']:.1f}) {s['end']['rss_mb']:.1f} MB: "
          f"growth {r['rss_growth_mb_from_minute_1']:+.1f} MB from minute 1 (output wav on disk: "
          f"{r['output_wav_mb']:.1f} MB)")
    if r["load_warning"]:
        print(f"  {r['load_warning']}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=30.0, help="minutes of synthetic input to stream (default 30)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the free CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tiny model and of the input")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no per-minute progress lines")


def main_args(args: argparse.Namespace) -> int:
    if not (args.minutes > 0 and math.isfinite(args.minutes)):
        print(f"error: --minutes must be positive, got {args.minutes}", file=sys.stderr)
        return 2
    res = run(args.minutes, args.threads, args.seed, progress=not args.quiet)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"figures written to {args.json}")
    return 0
