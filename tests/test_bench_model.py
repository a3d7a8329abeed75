"""Smoke test of the whole-model benchmark's plumbing (no timing is asserted)."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

from moshi_ttt.bench.model import ModelBenchConfig, format_table, run  # noqa: E402


def test_bench_model_reports_wall_and_cpu_time_ratios_and_load():
    res = run(ModelBenchConfig(preset="tiny", seq_len=16, train_iters=1, warmup=1, gen_batches=[2], gen_steps=2,
                                   interleave=False))  # the sequential path times CPU time per call
    ratios = res["ratios"]
    for key in ("train_fwd_bwd_time", "train_fwd_bwd_cpu_time", "lmgen_step_B2", "lmgen_step_B2_cpu"):
        assert ratios[key] > 0, key
    table = format_table(res)
    assert "CPU time" in table and "load average" in table
