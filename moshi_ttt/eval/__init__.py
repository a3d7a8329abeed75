"""Evaluation: per-chunk losses of held-out files (typed results), the experiment, statistics, report."""
