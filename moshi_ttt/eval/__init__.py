"""Evaluation: per-chunk losses of held-out files (moshi-ttt eval), the experiment, statistics, plots, report."""
