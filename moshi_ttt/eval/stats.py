"""Statistics of the persistence experiment: per-file metrics, paired tests, the decision rule.

The unit of replication is the evaluation *file*: every arm is evaluated on the same files, so
comparisons are paired by ``file_id``. Per file we reduce the chunk results to two numbers:

- ``later_chunk_loss``: token-weighted mean loss over chunks with ``chunk_index >= 1``, the chunks
  where a memory carried across chunks can matter (chunk 0 starts from the learned initial
  weights in every mode);
- ``recall_loss``: token-weighted mean loss over the recall-target tokens of all chunks (None
  when the file has none), the tokens that provably need memory beyond the attention window on
  the synthetic long-memory corpus.

Decision rule (fixed before the experiment was run): keep persistence iff the persistent arm
Y is better than the baseline X with two-sided Wilcoxon signed-rank p < 0.05 *and* a relative
improvement of the mean larger than 10% (``(mean_y - mean_x) / mean_x < -0.10``; losses: lower is
better). Otherwise keep the simpler X: "no significant difference", "improvement below threshold"
(significant but <= 10%), or "persistence hurts" (significantly worse).

Everything here is numpy/scipy only (no torch), so it is fast and reusable outside the package.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats as sps

from moshi_ttt.eval.schema import EvalResult, FileResult

ALPHA = 0.05
MIN_REL_IMPROVEMENT = 0.10

Decision = Literal["keep", "no significant difference", "improvement below threshold", "hurts", "mixed"]

# ---- per-file metrics -------------------------------------------------------------------------


def later_chunk_loss(file: FileResult) -> float | None:
    """Token-weighted mean loss over chunks with ``chunk_index >= 1``; None for a one-chunk file
    (or one whose later chunks have no scored tokens)."""
    later = [c for c in file.chunks if c.chunk_index >= 1 and c.tokens > 0]
    if not later:
        return None
    tokens = np.array([c.tokens for c in later], dtype=np.float64)
    losses = np.array([c.loss for c in later], dtype=np.float64)
    return float((losses * tokens).sum() / tokens.sum())


def recall_target_loss(file: FileResult) -> float | None:
    """Token-weighted mean recall-target loss over all chunks; None if the file has no recall tokens."""
    with_recall = [c for c in file.chunks if c.recall_tokens > 0]
    if not with_recall:
        return None
    tokens = np.array([c.recall_tokens for c in with_recall], dtype=np.float64)
    losses = np.array([c.recall_loss for c in with_recall], dtype=np.float64)
    return float((losses * tokens).sum() / tokens.sum())


def rung_loss(rung: int) -> Callable[[FileResult], float | None]:
    """Per-file metric of a ladder corpus: token-weighted mean loss of the recall targets of one
    rung (``rung{r}_loss`` / ``rung{r}_tokens`` of the chunks); None if the file has none."""
    def fn(file: FileResult) -> float | None:
        num = den = 0.0
        for c in file.chunks:
            n = c.extra.get(f"rung{rung}_tokens", 0)
            if n:
                num += float(c.extra[f"rung{rung}_loss"]) * n
                den += n
        return num / den if den else None

    return fn


METRICS: dict[str, Callable[[FileResult], float | None]] = {
    "later_chunk_loss": later_chunk_loss,
    "recall_loss": recall_target_loss,
    **{f"rung{r}_loss": rung_loss(r) for r in (1, 2, 3)},
}
METRIC_TITLES = {
    "later_chunk_loss": "later-chunk loss (chunks >= 1)",
    "recall_loss": "recall-target loss",
    **{f"rung{r}_loss": f"rung {r} recall loss" for r in (1, 2, 3)},
}


def file_metric(result: EvalResult, metric: str) -> dict[str, float | None]:
    """``{file_id: value}`` of one per-file metric (a key of :data:`METRICS`) for one evaluation."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    fn = METRICS[metric]
    return {f.file_id: fn(f) for f in result.files}


def pool_seeds(results: Sequence[EvalResult], metric: str) -> dict[str, float | None]:
    """Per-file metric averaged over the seeds of one condition (files must match across seeds).

    Seeds are averaged *within* a file so that the paired test keeps files as its unit: seeds
    measure training variance, which :func:`spread_across_seeds` reports separately.
    """
    if not results:
        raise ValueError("pool_seeds: no results")
    per_seed = [file_metric(r, metric) for r in results]
    ids = set(per_seed[0])
    for r, values in zip(results[1:], per_seed[1:]):
        if set(values) != ids:
            missing = sorted(ids ^ set(values))
            raise ValueError(f"{r.label} seed {r.seed}: file set differs from seed {results[0].seed} "
                             f"(e.g. file {missing[0]!r}); seeds of one arm must be evaluated on the same files")
    out: dict[str, float | None] = {}
    for fid in per_seed[0]:
        vals = [v[fid] for v in per_seed]
        present = [v for v in vals if v is not None]
        if present and len(present) != len(vals):
            raise ValueError(f"{results[0].label}: file {fid!r} has a {metric} in some seeds and none in others")
        out[fid] = float(np.mean(present)) if present else None
    return out


# ---- summaries across files -------------------------------------------------------------------


@dataclass
class MeanCI:
    """Mean across files with a t-based 95% confidence interval (None bounds when n < 2)."""

    n: int
    mean: float | None
    low: float | None
    high: float | None


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> MeanCI:
    """Mean and Student-t confidence interval of the mean (files as independent units)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return MeanCI(0, None, None, None)
    m = float(v.mean())
    if n < 2:
        return MeanCI(n, m, None, None)
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return MeanCI(n, m, m - half, m + half)


@dataclass
class ChunkCurve:
    """A per-chunk quantity averaged across files: ``mean[i]`` (CI ``low[i]..high[i]``, ``n[i]``
    files) at chunk ``chunk_index[i]``."""

    chunk_index: list[int]
    mean: list[float]
    low: list[float | None]
    high: list[float | None]
    n: list[int]


def _per_file_chunk(results: Sequence[EvalResult], field_name: str) -> dict[tuple[str, int], float]:
    """Mean over seeds of a chunk field per (file, chunk); null values are skipped."""
    acc: dict[tuple[str, int], list[float]] = {}
    for r in results:
        for f in r.files:
            for c in f.chunks:
                v = getattr(c, field_name)
                if v is not None:
                    acc.setdefault((f.file_id, c.chunk_index), []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _curve(by_chunk: dict[int, list[float]]) -> ChunkCurve | None:
    """Mean and 95% CI across files per chunk index."""
    if not by_chunk:
        return None
    curve = ChunkCurve([], [], [], [], [])
    for k in sorted(by_chunk):
        s = mean_ci(by_chunk[k])
        curve.chunk_index.append(k)
        curve.mean.append(s.mean)  # type: ignore[arg-type]
        curve.low.append(s.low)
        curve.high.append(s.high)
        curve.n.append(s.n)
    return curve


def chunk_curve(results: Sequence[EvalResult], field_name: str = "loss") -> ChunkCurve | None:
    """Per-chunk-index mean across files of a chunk field ("loss", "state_drift", "recall_loss", ...).

    Seeds of one condition are first averaged per (file, chunk); chunks where the field is null
    are skipped. Returns None when no chunk has the field.
    """
    by_chunk: dict[int, list[float]] = {}
    for (_, k), v in _per_file_chunk(results, field_name).items():
        by_chunk.setdefault(k, []).append(v)
    return _curve(by_chunk)


def paired_chunk_curve(x_results: Sequence[EvalResult], y_results: Sequence[EvalResult],
                       field_name: str = "loss") -> ChunkCurve | None:
    """Per-chunk-index mean across files of the paired difference Y - X of a chunk field.

    Pairing by (file, chunk) removes the between-file spread that dominates the bands of
    :func:`chunk_curve`, so this curve shows where along a file Y differs from X. Seeds are averaged
    per (file, chunk) first; (file, chunk) pairs missing or null in either arm are skipped.
    """
    xs, ys = _per_file_chunk(x_results, field_name), _per_file_chunk(y_results, field_name)
    by_chunk: dict[int, list[float]] = {}
    for key in sorted(set(xs) & set(ys)):
        by_chunk.setdefault(key[1], []).append(ys[key] - xs[key])
    return _curve(by_chunk)


# ---- paired comparison ------------------------------------------------------------------------


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
        missing = [fid for fid in a if fid not in b]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"file {missing[0]!r}{more} is in {na} but not in {nb}: arms must be evaluated on the "
                             "same files")
    ids, excluded = [], []
    for fid in x:
        vx, vy = x[fid], y[fid]
        if vx is None and vy is None:
            excluded.append(fid)  # e.g. no recall targets in this file: nothing to compare
        elif vx is None or vy is None:
            has, lacks = (names[1], names[0]) if vx is None else (names[0], names[1])
            raise ValueError(f"file {fid!r} has a value in {has} but none in {lacks}: the same file should give "
                             "the same recall targets / chunks in every arm")
        else:
            ids.append(fid)
    xs = np.array([x[i] for i in ids], dtype=np.float64)
    ys = np.array([y[i] for i in ids], dtype=np.float64)
    return ids, xs, ys, excluded


def _bootstrap(xs: np.ndarray, ys: np.ndarray, n_boot: int, seed: int, notes: list[str]
               ) -> tuple[float | None, float | None, float | None, float | None, str]:
    """Paired bootstrap (resampling files) 95% CIs of (mean diff, relative change)."""
    n = xs.size
    if n < 2:
        notes.append(f"no bootstrap CI: needs at least 2 files, have {n}")
        return None, None, None, None, "none"
    d = ys - xs
    if np.ptp(d) == 0 and np.ptp(xs) == 0:
        # Every resample gives the same statistic: the interval is the point itself.
        diff = float(d[0])
        rel = diff / float(xs[0]) if xs[0] != 0 else None
        notes.append("bootstrap distribution is degenerate (all files identical): CI is the point estimate")
        return diff, diff, rel, rel, "degenerate"

    def statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        mx, my = x.mean(axis=axis), y.mean(axis=axis)
        return np.stack([my - mx, (my - mx) / mx])

    method = "BCa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate-jackknife warnings: handled by the fallback below
        res = sps.bootstrap((xs, ys), statistic, n_resamples=n_boot, paired=True, vectorized=True,
                            confidence_level=0.95, method="BCa", rng=np.random.default_rng(seed))
        low, high = res.confidence_interval.low, res.confidence_interval.high
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            # BCa needs a non-degenerate jackknife; the percentile interval always exists.
            method = "percentile"
            res = sps.bootstrap((xs, ys), statistic, n_resamples=n_boot, paired=True, vectorized=True,
                                confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed))
            low, high = res.confidence_interval.low, res.confidence_interval.high
            notes.append("BCa bootstrap undefined for these data; percentile interval used")
    vals = [float(v) if np.isfinite(v) else None for v in (low[0], high[0], low[1], high[1])]
    return vals[0], vals[1], vals[2], vals[3], method


def _wilcoxon(d: np.ndarray, alpha: float, notes: list[str]) -> tuple[float | None, float | None]:
    n = d.size
    nonzero = int(np.count_nonzero(d))
    if n == 0:
        return None, None
    if nonzero == 0:
        notes.append("all paired differences are zero: no difference to test (Wilcoxon p set to 1)")
        return 0.0, 1.0
    if nonzero < n:
        notes.append(f"{n - nonzero} zero difference(s) dropped by the Wilcoxon test (zero_method='wilcox')")
    if nonzero < 6:
        smallest = 2.0 / 2**nonzero
        notes.append(f"only {nonzero} non-zero paired difference(s): the two-sided Wilcoxon test cannot reach "
                     f"p < {alpha:g} (smallest possible p = {smallest:.3g}); more files are needed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.wilcoxon(d, alternative="two-sided")
    stat, p = float(res.statistic), float(res.pvalue)
    return (stat if math.isfinite(stat) else None), (p if math.isfinite(p) else None)


def _ttest(xs: np.ndarray, ys: np.ndarray, notes: list[str]) -> tuple[float | None, float | None]:
    d = ys - xs
    if d.size < 2:
        notes.append("no paired t-test: needs at least 2 files")
        return None, None
    if np.ptp(d) == 0:
        if d[0] == 0:
            notes.append("paired t-test undefined: all differences are zero (p set to 1)")
            return 0.0, 1.0
        notes.append("paired t-test: all differences are equal and non-zero (zero variance); t is infinite")
        return math.copysign(math.inf, d[0]), 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.ttest_rel(ys, xs)
    return float(res.statistic), float(res.pvalue)


def decide(rel_change: float | None, median_diff: float, p: float | None, x_name: str, y_name: str,
           subject: str = "persistence", alpha: float = ALPHA, min_rel: float = MIN_REL_IMPROVEMENT
           ) -> tuple[Decision, str]:
    """The decision rule on one comparison of losses (lower is better).

    Returns ``(decision, verdict)``; the verdict is a plain-language sentence that starts with
    "keep {subject}", "no significant difference", "improvement below threshold" or
    "{subject} hurts".
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
        n_boot: bootstrap resamples for the 95% CIs (files resampled with replacement, pairs kept).
        seed: bootstrap random seed (results are reproducible).
        metric, subject: recorded in the result; ``subject`` names what is kept or hurts in the
            verdict ("persistence", "TTT", ...).
        alpha, min_rel_improvement: the decision rule's thresholds (0.05 and 10% by the seeds).
    """
    x_name, y_name = names
    ids, xs, ys, excluded = _match(x, y, names)
    notes: list[str] = []
    if excluded:
        notes.append(f"{len(excluded)} file(s) without a value in either arm excluded")
    n = len(ids)
    if n == 0:
        raise ValueError(f"{y_name} vs {x_name}: no file has a value in both arms")
    d = ys - xs
    mean_x, mean_y = float(xs.mean()), float(ys.mean())
    mean_diff, median_diff = float(d.mean()), float(np.median(d))
    rel = (mean_y - mean_x) / mean_x if mean_x != 0 else None
    if rel is None:
        notes.append("relative change undefined: mean of X is 0")
    w_stat, w_p = _wilcoxon(d, alpha, notes)
    t_stat, t_p = _ttest(xs, ys, notes)
    dlo, dhi, rlo, rhi, method = _bootstrap(xs, ys, n_boot, seed, notes)
    decision, verdict = decide(rel, median_diff, w_p, x_name, y_name, subject, alpha, min_rel_improvement)
    if n < 6 and decision == "no significant difference":
        verdict += f" (with {n} file(s) no test can be significant: inconclusive, not evidence of no effect)"
    return Comparison(x_name=x_name, y_name=y_name, n=n, mean_x=mean_x, mean_y=mean_y, mean_diff=mean_diff,
                      median_diff=median_diff, rel_change=rel, rel_ci_low=rlo, rel_ci_high=rhi, diff_ci_low=dlo,
                      diff_ci_high=dhi, wilcoxon_stat=w_stat, wilcoxon_p=w_p, ttest_stat=t_stat, ttest_p=t_p,
                      decision=decision, verdict=verdict, metric=metric, subject=subject, alpha=alpha,
                      min_rel_improvement=min_rel_improvement, n_boot=n_boot, ci_method=method, file_ids=ids,
                      excluded=excluded, notes=notes)


# ---- seeds ------------------------------------------------------------------------------------


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
    vals = list(values.values()) if isinstance(values, Mapping) else list(values)
    v = np.asarray([x for x in vals if x is not None], dtype=np.float64)
    if v.size == 0:
        raise ValueError("spread_across_seeds: no values")
    std = float(v.std(ddof=1)) if v.size > 1 else None
    return SeedSpread(n=int(v.size), mean=float(v.mean()), std=std, min=float(v.min()), max=float(v.max()))
