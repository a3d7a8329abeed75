"""Evaluation: per-chunk losses of a checkpoint, the persistence experiment (arms, statistics, plots, report)."""
