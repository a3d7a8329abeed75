"""Statistics of the persistence experiment: paired tests over files and the decision rule.

The unit of replication is the evaluation *file*: every arm is evaluated on the same files, so
comparisons are paired by ``file_id``, on a per-file metric of :class:`FileResult`
(``later_chunk_loss``: chunks >= 1, where a memory carried across chunks can matter;
``recall_loss``: the tokens that provably need memory beyond the attention window).

Decision rule (fixed before the experiment was run): keep persistence iff the persistent arm
Y is better than the baseline X with two-sided Wilcoxon signed-rank p < 0.05 *and* a relative
improvement of the mean larger than 10% (``(mean_y - mean_x) / mean_x < -0.10``; losses: lower is
better). Otherwise keep the simpler X: "no significant difference", "improvement below threshold"
(significant but <= 10%), "mixed" (mean and median disagree) or "hurts" (significantly worse).

numpy/scipy for the numbers.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats as sps

from .results import EvalResult

ALPHA = 0.05
MIN_REL_IMPROVEMENT = 0.10
Decision = Literal["keep", "no significant difference", "improvement below threshold", "hurts", "mixed"]
METRIC_TITLES = {"later_chunk_loss": "later-chunk loss (chunks >= 1)", "recall_loss": "recall-target loss",
                 **{f"rung{r}_loss": f"rung {r} recall loss" for r in (1, 2, 3)}}


def pool_seeds(results: Sequence[EvalResult], metric: str) -> dict[str, float | None]:
    """Per-file metric averaged over the seeds of one condition (files must match across seeds).

    Seeds are averaged *within* a file so that the paired test keeps files as its unit: seeds
    measure training variance, which :func:`spread_across_seeds` reports separately.
    """
    if not results:
        raise ValueError("pool_seeds: no results")
    per_seed = [r.file_metric(metric) for r in results]
    for r, values in zip(results[1:], per_seed[1:]):
        if set(values) != set(per_seed[0]):
            missing = sorted(set(per_seed[0]) ^ set(values))
            raise ValueError(f"{r.label} seed {r.seed}: file set differs from seed {results[0].seed} "
                             f"(e.g. file {missing[0]!r}); seeds of one arm must be evaluated on the same files")
    out: dict[str, float | None] = {}
    for fid in per_seed[0]:
        present = [v[fid] for v in per_seed if v[fid] is not None]
        if present and len(present) != len(per_seed):
            raise ValueError(f"{results[0].label}: file {fid!r} has a {metric} in some seeds and none in others")
        out[fid] = float(np.mean(present)) if present else None
    return out


@dataclass
class MeanCI:
    """Mean across files with a t-based 95% confidence interval (None bounds when n < 2)."""

    n: int
    mean: float | None
    low: float | None
    high: float | None


def mean_ci(values: Iterable[float | None], confidence: float = 0.95) -> MeanCI:
    """Mean and Student-t confidence interval of the mean (files as independent units)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size < 2:
        return MeanCI(int(v.size), float(v[0]) if v.size else None, None, None)
    m, half = float(v.mean()), float(sps.t.ppf(0.5 + confidence / 2, v.size - 1) * sps.sem(v))
    return MeanCI(int(v.size), m, m - half, m + half)  # (t.interval gives NaN for zero spread)


@dataclass
class ChunkCurve:
    """A per-chunk quantity across files: ``mean[i]`` (95% CI ``low[i]..high[i]``, ``n[i]`` files)
    at chunk ``chunk_index[i]``."""

    chunk_index: list[int]
    mean: list[float]
    low: list[float | None]
    high: list[float | None]
    n: list[int]


def _by_file_chunk(results: Sequence[EvalResult], field_name: str) -> dict[tuple[str, int], float]:
    """Mean over seeds of a chunk field per (file, chunk); null values are skipped."""
    acc: dict[tuple[str, int], list[float]] = defaultdict(list)
    for f in (f for r in results for f in r.files):
        for c in f.chunks:
            if (v := getattr(c, field_name)) is not None:
                acc[(f.file_id, c.chunk_index)].append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def chunk_curve(results: Sequence[EvalResult], field_name: str = "loss",
                baseline: Sequence[EvalResult] | None = None) -> ChunkCurve | None:
    """Per-chunk-index mean across files of a chunk field ("loss", "state_drift", ...); None when no
    chunk has it. Seeds are averaged per (file, chunk) first.

    baseline: the curve of the paired differences ``results - baseline`` per (file, chunk) instead
    (pairs missing in either are skipped): the between-file spread that dominates the bands of
    the plain curve cancels, so it shows where along a file the two differ.
    """
    ys = _by_file_chunk(results, field_name)
    if baseline is not None:
        xs = _by_file_chunk(baseline, field_name)
        ys = {k: ys[k] - xs[k] for k in sorted(ys.keys() & xs.keys())}
    by_chunk: dict[int, list[float]] = defaultdict(list)
    for (_, k), v in ys.items():
        by_chunk[k].append(v)
    cis = [mean_ci(by_chunk[k]) for k in sorted(by_chunk)]
    return ChunkCurve(sorted(by_chunk), [c.mean for c in cis], [c.low for c in cis], [c.high for c in cis],
                      [c.n for c in cis]) if cis else None  # type: ignore[misc]


@dataclass
class Comparison:
    """Paired comparison of arm Y against baseline X over files (differences are Y - X).

    ``rel_change`` = (mean_y - mean_x) / mean_x; negative means Y has the lower (better) loss.
    p-values and CIs are None when they cannot be computed; ``notes`` then says why.
    """

    x_name: str
    y_name: str
    n: int
    mean_x: float
    mean_y: float
    mean_diff: float
    median_diff: float
    rel_change: float | None
    rel_ci_low: float | None
    rel_ci_high: float | None
    diff_ci_low: float | None
    diff_ci_high: float | None
    wilcoxon_stat: float | None
    wilcoxon_p: float | None
    ttest_stat: float | None
    ttest_p: float | None
    decision: Decision
    verdict: str
    metric: str = ""
    subject: str = "persistence"
    alpha: float = ALPHA
    min_rel_improvement: float = MIN_REL_IMPROVEMENT
    n_boot: int = 0
    ci_method: str = ""
    file_ids: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _match(x: Mapping[str, float | None], y: Mapping[str, float | None], names: tuple[str, str]
           ) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Pair values by file id; a file missing from either side is an error naming it."""
    for a, b, (na, nb) in ((x, y, names), (y, x, names[::-1])):
        if missing := [fid for fid in a if fid not in b]:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"file {missing[0]!r}{more} is in {na} but not in {nb}: arms must be evaluated on the "
                             "same files")
    ids = [fid for fid in x if x[fid] is not None or y[fid] is not None]
    for fid in ids:
        if x[fid] is None or y[fid] is None:
            has, lacks = names[::-1] if x[fid] is None else names
            raise ValueError(f"file {fid!r} has a value in {has} but none in {lacks}: the same file should give "
                             "the same recall targets / chunks in every arm")
    excluded = [fid for fid in x if fid not in ids]  # e.g. no recall targets in this file: nothing to compare
    return ids, np.array([x[i] for i in ids], float), np.array([y[i] for i in ids], float), excluded


def _bootstrap(xs: np.ndarray, ys: np.ndarray, n_boot: int, seed: int, notes: list[str]
               ) -> tuple[list[float | None], str]:
    """Paired bootstrap (resampling files) 95% CIs: ``[diff low, diff high, rel low, rel high]``, method."""
    if xs.size < 2:
        notes.append(f"no bootstrap CI: needs at least 2 files, have {xs.size}")
        return [None] * 4, "none"
    d = ys - xs
    if np.ptp(d) == 0 and np.ptp(xs) == 0:  # every resample gives the same statistic: the point itself
        rel = float(d[0] / xs[0]) if xs[0] != 0 else None
        notes.append("bootstrap distribution is degenerate (all files identical): CI is the point estimate")
        return [float(d[0]), float(d[0]), rel, rel], "degenerate"

    def statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        mx, my = x.mean(axis=axis), y.mean(axis=axis)
        return np.stack([my - mx, (my - mx) / mx])

    for method in ("BCa", "percentile"):  # BCa needs a non-degenerate jackknife; percentile always exists
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ci = sps.bootstrap((xs, ys), statistic, n_resamples=n_boot, paired=True, vectorized=True,
                               method=method, rng=np.random.default_rng(seed)).confidence_interval
        if (np.all(np.isfinite(ci.low)) and np.all(np.isfinite(ci.high))) or method == "percentile":
            break
        notes.append("BCa bootstrap undefined for these data; percentile interval used")
    vals = (ci.low[0], ci.high[0], ci.low[1], ci.high[1])
    return [float(v) if np.isfinite(v) else None for v in vals], method


def _tests(xs: np.ndarray, ys: np.ndarray, alpha: float, notes: list[str]) -> tuple[float | None, ...]:
    """Two-sided Wilcoxon signed-rank and paired t-test on ``ys - xs``: (w, p_w, t, p_t)."""
    d = ys - xs
    nonzero = int(np.count_nonzero(d))
    if nonzero == 0:
        notes.append("all paired differences are zero: no difference to test (Wilcoxon p set to 1)")
        w = (0.0, 1.0)
    else:
        if nonzero < d.size:
            notes.append(f"{d.size - nonzero} zero difference(s) dropped by the Wilcoxon test (zero_method='wilcox')")
        if nonzero < 6:
            notes.append(f"only {nonzero} non-zero paired difference(s): the two-sided Wilcoxon test cannot reach "
                         f"p < {alpha:g} (smallest possible p = {2.0 / 2**nonzero:.3g}); more files are needed")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sps.wilcoxon(d, alternative="two-sided")
        w = tuple(float(v) if math.isfinite(v) else None for v in (res.statistic, res.pvalue))
    if d.size < 2:
        notes.append("no paired t-test: needs at least 2 files")
        return (*w, None, None)
    if np.ptp(d) == 0:
        if d[0] == 0:
            notes.append("paired t-test undefined: all differences are zero (p set to 1)")
            return (*w, 0.0, 1.0)
        notes.append("paired t-test: all differences are equal and non-zero (zero variance); t is infinite")
        return (*w, math.copysign(math.inf, d[0]), 0.0)
    t = sps.ttest_rel(ys, xs)
    return (*w, float(t.statistic), float(t.pvalue))


def decide(rel_change: float | None, median_diff: float, p: float | None, x_name: str, y_name: str,
           subject: str = "persistence", alpha: float = ALPHA, min_rel: float = MIN_REL_IMPROVEMENT
           ) -> tuple[Decision, str]:
    """The decision rule on one comparison of losses (lower is better): ``(decision, verdict)``.

    The verdict is a plain-language sentence that starts with "keep {subject}", "no significant
    difference", "no consistent difference", "improvement below threshold" or "{subject} hurts".
    """
    if p is None or rel_change is None or p >= alpha:
        ptxt = "not computable" if p is None else f"{p:.3g} >= {alpha:g}"
        return "no significant difference", (
            f"no significant difference between {y_name} and {x_name} (Wilcoxon p {ptxt}); "
            f"by the decision rule keep the simpler {x_name}")
    pct = f"{abs(rel_change):.1%}"
    if (rel_change < 0) != (median_diff < 0) or median_diff == 0:
        return "mixed", (
            f"no consistent difference: Wilcoxon p = {p:.3g} but the mean ({rel_change:+.1%}) and the median "
            f"paired difference ({median_diff:+.4g}) disagree in sign (a few files dominate the mean); "
            f"by the decision rule keep the simpler {x_name}")
    if rel_change < -min_rel:
        return "keep", (f"keep {subject}: {y_name} lowers the loss by {pct} relative to {x_name} "
                        f"(Wilcoxon p = {p:.3g} < {alpha:g}, more than the {min_rel:.0%} threshold)")
    if rel_change < 0:
        return "improvement below threshold", (
            f"improvement below threshold: {y_name} is significantly better than {x_name} (Wilcoxon p = {p:.3g}) "
            f"but only by {pct} (<= {min_rel:.0%}); by the decision rule keep the simpler {x_name}")
    return "hurts", (f"{subject} hurts: {y_name} raises the loss by {pct} relative to {x_name} "
                     f"(Wilcoxon p = {p:.3g} < {alpha:g}); keep {x_name}")


def paired_comparison(x: Mapping[str, float | None], y: Mapping[str, float | None],
                      names: tuple[str, str] = ("X", "Y"), n_boot: int = 10000, seed: int = 0, *,
                      metric: str = "", subject: str = "persistence", alpha: float = ALPHA,
                      min_rel_improvement: float = MIN_REL_IMPROVEMENT) -> Comparison:
    """Compare per-file losses of arm Y (``y``, e.g. persistent) against baseline X (``x``).

    Args:
        x, y: ``{file_id: value}``; files are paired by id (a file in one but not the other is an
            error naming it). Files where both values are None (e.g. no recall targets) are
            excluded and listed in ``excluded``.
        names: display names of X and Y.
        n_boot, seed: bootstrap resamples (files with replacement, pairs kept) and random seed.
        metric, subject: recorded in the result; ``subject`` names what is kept or hurts in the
            verdict ("persistence", "TTT", ...).
        alpha, min_rel_improvement: the decision rule's thresholds (0.05 and 10% by the seeds).
    """
    ids, xs, ys, excluded = _match(x, y, names)
    notes = [f"{len(excluded)} file(s) without a value in either arm excluded"] if excluded else []
    if not ids:
        raise ValueError(f"{names[1]} vs {names[0]}: no file has a value in both arms")
    d = ys - xs
    mean_x, mean_y, median_diff = float(xs.mean()), float(ys.mean()), float(np.median(d))
    rel = (mean_y - mean_x) / mean_x if mean_x != 0 else None
    if rel is None:
        notes.append("relative change undefined: mean of X is 0")
    w_stat, w_p, t_stat, t_p = _tests(xs, ys, alpha, notes)
    (dlo, dhi, rlo, rhi), method = _bootstrap(xs, ys, n_boot, seed, notes)
    decision, verdict = decide(rel, median_diff, w_p, *names, subject, alpha, min_rel_improvement)
    if len(ids) < 6 and decision == "no significant difference":
        verdict += f" (with {len(ids)} file(s) no test can be significant: inconclusive, not evidence of no effect)"
    return Comparison(*names, len(ids), mean_x, mean_y, float(d.mean()), median_diff, rel, rlo, rhi, dlo, dhi,
                      w_stat, w_p, t_stat, t_p, decision, verdict, metric, subject, alpha, min_rel_improvement,
                      n_boot, method, ids, excluded, notes)


@dataclass
class SeedSpread:
    """Spread of one number across training seeds (``std`` is the sample std, None for one seed)."""

    n: int
    mean: float
    std: float | None
    min: float
    max: float


def spread_across_seeds(values: Sequence[float] | Mapping[Any, float]) -> SeedSpread:
    """Mean, sample standard deviation (ddof=1), min and max of a value measured once per seed."""
    v = np.asarray([x for x in (values.values() if isinstance(values, Mapping) else values) if x is not None],
                   dtype=np.float64)
    if v.size == 0:
        raise ValueError("spread_across_seeds: no values")
    return SeedSpread(int(v.size), float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else None,
                      float(v.min()), float(v.max()))
