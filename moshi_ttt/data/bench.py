"""Mimi encoding speed: ``python -m moshi_ttt.data.bench [--seconds 60] [--device cpu]``.

Prints one JSON line from :func:`moshi_ttt.data.mimi.benchmark_encode` (full-size Mimi with random
weights, which cost the same as real ones; stereo; the default windowing of ``prepare``).
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    from .mimi import MimiSpec, benchmark_encode

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="audio length (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs, the best is kept (default: %(default)s)")
    p.add_argument("--window-sec", type=float, default=30.0, help="encoding window (default: %(default)s)")
    p.add_argument("--overlap-sec", type=float, default=10.0, help="window overlap (default: %(default)s)")
    args = p.parse_args(argv)
    spec = MimiSpec(kind="random", num_codebooks=8, window_sec=args.window_sec, overlap_sec=args.overlap_sec)
    result = benchmark_encode(args.seconds, device=args.device, repeats=args.repeats, spec=spec)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
