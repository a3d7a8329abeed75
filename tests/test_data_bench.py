"""Encoding speed of the full-size Mimi (random weights) on 60 s of stereo audio.

Opt-in (it takes ~15-30 s on a 2-core CPU and is a timing): ``MOSHI_TTT_BENCH=1 pytest -m slow
tests/test_data_bench.py -s``. The same measurement: ``python -m moshi_ttt.data.bench``.
"""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest  # noqa: E402

from moshi_ttt.data.mimi import benchmark_encode  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MOSHI_TTT_BENCH") != "1", reason="timing benchmark: set MOSHI_TTT_BENCH=1")
def test_full_size_mimi_encodes_60s_stereo_faster_than_real_time():
    result = benchmark_encode(60.0, kind="random", num_codebooks=8, device="cpu")
    print(f"\nMimi encode, 60 s stereo on {result['cpu']} ({result['torch_threads']} threads): "
          f"{result['wall_sec']:.1f} s = {result['real_time_factor']:.1f}x real time")
    assert result["real_time_factor"] > 1.0
