"""Statistics of the experiment (numpy, scipy): per-file metrics pooled over seeds, paired tests, the decision rule.

Files are the unit of replication: every arm is evaluated on the same held-out files, so comparisons pair
them by ``file_id``. Decision rule, fixed before any run: keep the arm Y under test (persistence, TTT) over
the simpler X iff its mean loss is lower with a two-sided Wilcoxon signed-rank p < 0.05 *and* by more than
10% relative; otherwise keep X ("no significant difference", "improvement below threshold", "mixed": mean
and median disagree, or "hurts").
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats as sps

from .results import EvalResult

ALPHA = 0.05
MIN_REL_IMPROVEMENT = 0.10
Decision = Literal["keep", "no significant difference", "improvement below threshold", "hurts", "mixed"]


def pool_seeds(results: Sequence[EvalResult], metric: str) -> dict[str, float | None]:
    """``{file_id: metric}`` averaged over the seeds of one condition (which must share their files): the
    paired test keeps files as its unit; the spread across seeds is reported apart."""
    if not results:
        raise ValueError("pool_seeds: no results")
    per_seed = [r.file_metric(metric) for r in results]
    for r, values in zip(results[1:], per_seed[1:]):
        if set(values) != set(per_seed[0]):
            raise ValueError(f"{r.label} seed {r.seed}: file set differs from seed {results[0].seed} (e.g. file "
                             f"{sorted(set(per_seed[0]) ^ set(values))[0]!r}); seeds of one arm must be evaluated on "
                             "the same files")
    out: dict[str, float | None] = {}
    for fid in per_seed[0]:
        present = [v[fid] for v in per_seed if v[fid] is not None]
        if present and len(present) != len(per_seed):
            raise ValueError(f"{results[0].label}: file {fid!r} has a {metric} in some seeds and none in others")
        out[fid] = float(np.mean(present)) if present else None
    return out


@dataclass
class MeanCI:
    """Mean across files with a Student-t 95% confidence interval (None bounds when n < 2)."""

    n: int
    mean: float | None
    low: float | None = None
    high: float | None = None


def mean_ci(values: Iterable[float | None]) -> MeanCI:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size < 2:
        return MeanCI(int(v.size), float(v[0]) if v.size else None)
    m, half = float(v.mean()), float(sps.t.ppf(0.975, v.size - 1) * sps.sem(v))
    return MeanCI(int(v.size), m, m - half, m + half)  # (t.interval gives NaN for zero spread)


@dataclass
class ChunkCurve:
    """A per-chunk quantity across files: at chunk ``chunk_index[i]``, ``mean[i]`` over ``n[i]`` files, 95% CI."""

    chunk_index: list[int]
    mean: list[float]
    low: list[float | None]
    high: list[float | None]
    n: list[int]


def chunk_curve(results: Sequence[EvalResult], field_name: str = "loss",
                baseline: Sequence[EvalResult] | None = None) -> ChunkCurve | None:
    """Mean across files, per chunk index, of a chunk field ("loss", "state_drift"), seeds averaged per
    (file, chunk) first; None when no chunk has it. With ``baseline``: of the paired differences
    ``results - baseline`` per (file, chunk), where the between-file spread cancels."""

    def by_key(rs: Sequence[EvalResult]) -> dict[tuple[str, int], float]:
        acc: dict[tuple[str, int], list[float]] = defaultdict(list)
        for fid, c in ((f.file_id, c) for r in rs for f in r.files for c in f.chunks):
            if (v := getattr(c, field_name)) is not None:
                acc[(fid, c.chunk_index)].append(float(v))
        return {k: float(np.mean(v)) for k, v in acc.items()}

    ys = by_key(results)
    if baseline is not None:
        xs = by_key(baseline)
        ys = {k: ys[k] - xs[k] for k in sorted(ys.keys() & xs.keys())}
    by_chunk: dict[int, list[float]] = defaultdict(list)
    for (_, k), v in ys.items():
        by_chunk[k].append(v)
    cis = [mean_ci(by_chunk[k]) for k in sorted(by_chunk)]
    return ChunkCurve(sorted(by_chunk), *([getattr(c, a) for c in cis] for a in ("mean", "low", "high", "n"))) \
        if cis else None


@dataclass
class Comparison:
    """Paired comparison of arm Y against baseline X over files (differences Y - X); ``rel_change`` =
    (mean_y - mean_x) / mean_x, negative when Y has the lower loss. None where a number cannot be
    computed; ``notes`` says why. ``excluded``: files with a value in neither arm."""

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
    wilcoxon_p: float | None
    ttest_stat: float | None
    ttest_p: float | None
    decision: Decision
    verdict: str
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _bootstrap(xs: np.ndarray, ys: np.ndarray, n_boot: int, seed: int, notes: list[str]) -> list[float | None]:
    """Paired bootstrap (files resampled) 95% CIs: ``[diff low, diff high, rel low, rel high]``."""
    if xs.size < 2:
        notes.append(f"no bootstrap CI: needs at least 2 files, have {xs.size}")
        return [None] * 4

    def statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        mx, my = x.mean(axis=axis), y.mean(axis=axis)
        return np.stack([my - mx, (my - mx) / mx])

    for method in ("BCa", "percentile"):  # BCa needs a non-degenerate jackknife; percentile always exists
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ci = sps.bootstrap((xs, ys), statistic, n_resamples=n_boot, paired=True, vectorized=True,
                               method=method, rng=np.random.default_rng(seed)).confidence_interval
        if np.all(np.isfinite([ci.low, ci.high])) or method == "percentile":
            break
        notes.append("BCa bootstrap undefined for these data; percentile interval used")
    return [float(v) if np.isfinite(v) else None for v in (ci.low[0], ci.high[0], ci.low[1], ci.high[1])]


def _tests(d: np.ndarray, notes: list[str]) -> list[float | None]:
    """Two-sided Wilcoxon signed-rank and one-sample t-test of the paired differences: [p_w, t, p_t]."""
    if (nonzero := int(np.count_nonzero(d))) == 0:
        notes.append("all paired differences are zero: no difference to test (p-values set to 1)")
        return [1.0, 0.0, 1.0] if d.size > 1 else [1.0, None, None]
    if nonzero < d.size:
        notes.append(f"{d.size - nonzero} zero difference(s) dropped by the Wilcoxon test (zero_method='wilcox')")
    if nonzero < 6:
        notes.append(f"only {nonzero} non-zero paired difference(s): the two-sided Wilcoxon test cannot reach "
                     f"p < {ALPHA:g} (smallest possible p = {2.0 / 2**nonzero:.3g}); more files are needed")
    if d.size < 2:
        notes.append("no paired t-test: needs at least 2 files")
    with warnings.catch_warnings():  # all differences equal and non-zero: t is infinite, p 0
        warnings.simplefilter("ignore")
        t = sps.ttest_1samp(d, 0.0)
        return [None if math.isnan(v) else float(v) for v in (sps.wilcoxon(d).pvalue, t.statistic, t.pvalue)]


def decide(rel_change: float | None, median_diff: float, p: float | None, x_name: str, y_name: str,
           subject: str = "persistence") -> tuple[Decision, str]:
    """The decision rule on one comparison of losses: ``(decision, verdict)``, a sentence that starts with the
    decision ("keep {subject}", "no significant difference", "no consistent difference" for mixed, ...)."""
    keep_x, ptxt = f"by the decision rule keep the simpler {x_name}", "n/a" if p is None else f"{p:.3g}"
    if p is None or rel_change is None or p >= ALPHA:
        return "no significant difference", (f"no significant difference between {y_name} and {x_name} (Wilcoxon p "
                                             f"{ptxt} >= {ALPHA:g}); {keep_x}")
    if (rel_change < 0) != (median_diff < 0) or median_diff == 0:
        return "mixed", (f"no consistent difference: Wilcoxon p = {ptxt} but the mean ({rel_change:+.1%}) and the "
                         f"median paired difference ({median_diff:+.4g}) disagree in sign; {keep_x}")
    if rel_change < -MIN_REL_IMPROVEMENT:
        return "keep", (f"keep {subject}: {y_name} lowers the loss by {-rel_change:.1%} relative to {x_name} (Wilcoxon "
                        f"p = {ptxt} < {ALPHA:g}, more than the {MIN_REL_IMPROVEMENT:.0%} threshold)")
    if rel_change < 0:
        return "improvement below threshold", (f"improvement below threshold: {y_name} is better than {x_name} by "
                                               f"only {-rel_change:.1%} (Wilcoxon p = {ptxt}); {keep_x}")
    return "hurts", f"{subject} hurts: {y_name} raises the loss by {rel_change:.1%} (Wilcoxon p {ptxt}); keep {x_name}"


def paired_comparison(x: Mapping[str, float | None], y: Mapping[str, float | None],
                      names: tuple[str, str] = ("X", "Y"), n_boot: int = 10000, seed: int = 0, *,
                      subject: str = "persistence") -> Comparison:
    """Per-file losses ``{file_id: value}`` of arm Y (e.g. persistent) against baseline X, paired by id (a
    file in one arm only, or valued in one arm only, is an error naming it); files valued in neither arm
    (no recall target) are excluded. ``names``: of X and Y; ``n_boot``, ``seed``: bootstrap resamples and
    seed; ``subject``: what the verdict keeps or finds hurting ("persistence", "TTT")."""
    for a, b, (na, nb) in ((x, y, names), (y, x, names[::-1])):
        if missing := [fid for fid in a if fid not in b]:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"file {missing[0]!r}{more} is in {na} but not in {nb}: arms must be evaluated on the "
                             "same files")
    ids = [fid for fid in x if x[fid] is not None or y[fid] is not None]
    if (one := next((fid for fid in ids if x[fid] is None or y[fid] is None), None)) is not None:
        has, lacks = names[::-1] if x[one] is None else names
        raise ValueError(f"file {one!r} has a value in {has} but none in {lacks}: the same file should give the "
                         "same recall targets / chunks in every arm")
    if not ids:
        raise ValueError(f"{names[1]} vs {names[0]}: no file has a value in both arms")
    excluded = [fid for fid in x if fid not in ids]
    notes = [f"{len(excluded)} file(s) without a value in either arm excluded"] if excluded else []
    xs, ys = np.array([x[i] for i in ids], float), np.array([y[i] for i in ids], float)
    d = ys - xs
    mean_x, mean_y, median_diff = float(xs.mean()), float(ys.mean()), float(np.median(d))
    if (rel := (mean_y - mean_x) / mean_x if mean_x != 0 else None) is None:
        notes.append("relative change undefined: mean of X is 0")
    p_w, t, p_t = _tests(d, notes)
    dlo, dhi, rlo, rhi = _bootstrap(xs, ys, n_boot, seed, notes)
    decision, verdict = decide(rel, median_diff, p_w, *names, subject)
    if len(ids) < 6 and decision == "no significant difference":
        verdict += f" (with {len(ids)} file(s) no test can be significant: inconclusive, not evidence of no effect)"
    return Comparison(*names, len(ids), mean_x, mean_y, float(d.mean()), median_diff, rel, rlo, rhi, dlo, dhi,
                      p_w, t, p_t, decision, verdict, excluded, notes)


@dataclass
class SeedSpread:
    """Spread of one number across training seeds (``std``: sample std, None for one seed)."""

    n: int
    mean: float
    std: float | None
    min: float
    max: float


def spread_across_seeds(values: Sequence[float] | Mapping[object, float]) -> SeedSpread:
    v = np.asarray(list(values.values() if isinstance(values, Mapping) else values), dtype=np.float64)
    return SeedSpread(v.size, float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else None,
                      float(v.min()), float(v.max()))
