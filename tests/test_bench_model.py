"""Smoke test of the whole-model benchmark's plumbing (no timing is asserted)."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

from moshi_ttt.bench.model import ModelBenchConfig, format_table, run  # noqa: E402


def test_bench_model_reports_wall_and_cpu_time_ratios_and_load():
    res = run(ModelBenchConfig(preset="tiny", seq_len=16, train_iters=1, warmup=1, gen_batches=[2], gen_steps=2,
                                   interleave=False))  # the sequential path times CPU time per call
    ratios = res["ratios"]
    for key in ("train_fwd_bwd_time", "train_fwd_bwd_cpu_time", "lmgen_step_B2", "lmgen_step_B2_cpu",
                "trainer_path_fwd_bwd_time", "trainer_path_fwd_bwd_cpu_time"):
        assert ratios[key] > 0, key
    table = format_table(res)
    assert "CPU time" in table and "load average" in table and "trainer's path (16-f chunks)" in table
    if os.path.exists("/proc/stat"):  # the CPUs busy at start, beside the load average
        assert res["machine"]["busy_cpus_now"] is not None and "busy now" in table


def test_bench_model_times_the_trainers_path_in_alternation():
    """The interleaved (CPU default) path times both training paths; the trainer's path runs the
    chunks through ChunkedLM (a session per model, closed before LMGen opens its own)."""
    res = run(ModelBenchConfig(preset="tiny", seq_len=16, chunk_frames=8, train_iters=1, warmup=1,
                               gen_batches=[1], gen_steps=2))
    assert res["interleaved"] and res["config"]["chunk_frames"] == 8
    assert res["ratios"]["trainer_path_fwd_bwd_time"] > 0 and res["ratios"]["lmgen_step_B1"] > 0
    assert "trainer's path (8-f chunks)" in format_table(res)
