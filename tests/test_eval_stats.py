"""Known-answer tests of moshi_ttt.eval.stats: every expected value is computed independently
(textbook formulas with numpy, published results, exhaustive enumeration), never by the function
under test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from moshi_ttt.eval.results import ChunkResult, FileResult
from moshi_ttt.eval.stats import (
    chunk_curve,
    decide,
    mean_ci,
    paired_comparison,
    spread_across_seeds,
)


def ids(values) -> dict[str, float]:
    return {f"f{i:03d}": float(v) for i, v in enumerate(values)}


# Student's sleep data (Cushny & Peebles 1905, R `sleep`): extra hours of sleep with drug 1 and 2
# on the same 10 patients. R: t.test(extra ~ group, paired = TRUE) -> t = -4.0621, df = 9,
# p-value = 0.002833 (here Y - X = drug 2 - drug 1, so t = +4.0621).
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_t_matches_textbook_formula_and_published_value():
    c = paired_comparison(ids(SLEEP_1), ids(SLEEP_2), ("drug1", "drug2"), n_boot=200)
    d = np.array(SLEEP_2) - np.array(SLEEP_1)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))  # t = mean(d) / (s_d / sqrt(n))
    assert c.ttest_stat == pytest.approx(t, rel=1e-12)
    assert c.ttest_stat == pytest.approx(4.0621, abs=5e-5)
    assert c.ttest_p == pytest.approx(0.002833, abs=5e-7)
    assert c.n == 10
    assert c.mean_x == pytest.approx(0.75) and c.mean_y == pytest.approx(2.33)
    assert c.mean_diff == pytest.approx(1.58)
    assert c.rel_change == pytest.approx((2.33 - 0.75) / 0.75)
    assert c.median_diff == pytest.approx(np.median(d))


def exact_wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided exact p by enumerating all 2^n sign assignments of the ranks (no ties, no zeros)."""
    ranks = sps.rankdata(np.abs(d))
    w_plus = ranks[d > 0].sum()
    n = d.size
    total = ranks.sum()
    w_obs = min(w_plus, total - w_plus)
    count = 0
    for signs in itertools.product((0, 1), repeat=n):
        wp = (ranks * np.array(signs)).sum()
        if min(wp, total - wp) <= w_obs + 1e-9:
            count += 1
    return count / 2**n


@pytest.mark.parametrize("diffs,expected", [
    # All n differences of one sign: only the 2 extreme assignments are as extreme -> 2 / 2^n.
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 2 / 64),
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], 2 / 256),
    # One negative difference with the smallest rank: W- = 1, subsets with sum <= 1: {} and {1}
    # -> one-sided 2/64, two-sided 4/64.
    ([-0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 4 / 64),
])
def test_wilcoxon_exact_known_values(diffs, expected):
    x = np.full(len(diffs), 3.0)
    c = paired_comparison(ids(x), ids(x + np.array(diffs)), n_boot=200)
    assert c.wilcoxon_p == pytest.approx(expected, rel=1e-12)


def test_wilcoxon_matches_exhaustive_enumeration():
    rng = np.random.default_rng(3)
    d = rng.normal(0.3, 1.0, 11)
    x = rng.normal(5.0, 1.0, 11)
    c = paired_comparison(ids(x), ids(x + d), n_boot=200)
    assert c.wilcoxon_p == pytest.approx(exact_wilcoxon_p(d), rel=1e-9)


def test_all_zero_differences_do_not_crash():
    x = ids([3.0, 2.5, 4.0, 3.3, 2.9, 3.1, 3.7])
    c = paired_comparison(x, dict(x), n_boot=200)
    assert c.wilcoxon_p == 1.0 and c.ttest_p == 1.0
    assert c.mean_diff == 0.0 and c.rel_change == 0.0
    assert c.rel_ci_low == 0.0 and c.rel_ci_high == 0.0
    assert c.decision == "no significant difference"
    assert c.verdict.startswith("no significant difference")
    assert any("zero" in n for n in c.notes)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_few_files_note_instead_of_crash(n):
    x = np.linspace(3.0, 4.0, n)
    c = paired_comparison(ids(x), ids(0.5 * x), n_boot=200)  # a 50% improvement on every file
    assert c.n == n
    # With n <= 5 the two-sided exact Wilcoxon p is at least 2 / 2^5 > 0.05: never "keep".
    assert c.decision == "no significant difference"
    assert any("cannot reach" in note for note in c.notes)
    assert "inconclusive" in c.verdict
    if n == 1:
        assert c.ttest_p is None and c.rel_ci_low is None


def test_bootstrap_ci_coverage_of_known_effect():
    """95% CIs of a paired design with known effect contain the truth at close to the nominal rate."""
    rng = np.random.default_rng(12345)
    n_files, reps, true_rel, mu = 40, 400, -0.2, 3.0
    hit_rel = hit_diff = 0
    for r in range(reps):
        base = rng.normal(mu, 0.6, n_files)  # per-file difficulty, shared by both arms (paired)
        x = base + rng.normal(0, 0.3, n_files)
        y = base * (1 + true_rel) + rng.normal(0, 0.3, n_files)
        c = paired_comparison(ids(x), ids(y), n_boot=1000, seed=r)
        # E[y] / E[x] - 1 = true_rel exactly; E[y - x] = mu * true_rel.
        hit_rel += c.rel_ci_low <= true_rel <= c.rel_ci_high
        hit_diff += c.diff_ci_low <= mu * true_rel <= c.diff_ci_high
    # Binomial(400, 0.95): sd 1.1%. Bootstrap intervals under-cover slightly at n = 40 (about 93%
    # in a 1000-replicate check), hence the asymmetric band; a 90% or a 99% interval fails it.
    assert 0.905 <= hit_rel / reps <= 0.98
    assert 0.905 <= hit_diff / reps <= 0.98


def test_bootstrap_ci_excludes_zero_for_large_effect_and_is_reproducible():
    rng = np.random.default_rng(7)
    base = rng.normal(3.0, 0.5, 20)
    x, y = base + rng.normal(0, 0.1, 20), 0.7 * base + rng.normal(0, 0.1, 20)
    c = paired_comparison(ids(x), ids(y), n_boot=2000, seed=1)
    assert c.rel_ci_low < c.rel_change < c.rel_ci_high < 0
    assert c.diff_ci_high < 0
    again = paired_comparison(ids(x), ids(y), n_boot=2000, seed=1)
    assert (again.rel_ci_low, again.rel_ci_high) == (c.rel_ci_low, c.rel_ci_high)


def _design(rel: float, noise: float, n: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.5, n)
    return ids(base), ids(base * (1 + rel) + rng.normal(0, noise, n))


def test_decision_rule_outcomes():
    keep = paired_comparison(*_design(-0.3, 0.05), ("A-reset", "B-persistent"), n_boot=500)
    assert keep.decision == "keep" and keep.verdict.startswith("keep persistence")
    assert keep.wilcoxon_p < 0.05 and keep.rel_change < -0.10

    small = paired_comparison(*_design(-0.05, 0.01), ("A-reset", "B-persistent"), n_boot=500)
    assert small.wilcoxon_p < 0.05 and -0.10 < small.rel_change < 0
    assert small.decision == "improvement below threshold"

    hurts = paired_comparison(*_design(0.2, 0.05), ("A-reset", "B-persistent"), n_boot=500)
    assert hurts.decision == "hurts" and hurts.verdict.startswith("persistence hurts")

    rng = np.random.default_rng(5)
    base = rng.normal(3.0, 0.5, 20)
    null = paired_comparison(ids(base + rng.normal(0, 0.1, 20)), ids(base + rng.normal(0, 0.1, 20)), n_boot=500)
    assert null.wilcoxon_p >= 0.05
    assert null.decision == "no significant difference" and null.verdict.startswith("no significant difference")

    tttt = paired_comparison(*_design(-0.3, 0.05), ("C", "B-persistent"), n_boot=500, subject="TTT")
    assert tttt.verdict.startswith("keep TTT")


def test_decide_thresholds_are_strict():
    # Exactly -10% is not "more than 10%"; p exactly 0.05 is not "< 0.05".
    assert decide(-0.10, -1.0, 0.001, "X", "Y")[0] == "improvement below threshold"
    assert decide(-0.1001, -1.0, 0.001, "X", "Y")[0] == "keep"
    assert decide(-0.5, -1.0, 0.05, "X", "Y")[0] == "no significant difference"
    # Wilcoxon significant but mean and median disagree in sign (outlier-driven mean): no verdict either way.
    assert decide(-0.3, +0.2, 0.001, "X", "Y")[0] == "mixed"


def test_files_are_matched_by_id_and_missing_file_is_named():
    x = {"a": 1.0, "b": 2.0, "c": 3.0}
    y = {"c": 3.3, "a": 1.1, "b": 2.2}  # other order: pairing must follow ids, not positions
    c = paired_comparison(x, y, n_boot=200)
    assert c.mean_diff == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    with pytest.raises(ValueError, match="'zz'.*B-persistent"):
        paired_comparison(x, {**y, "zz": 1.0}, ("A-reset", "B-persistent"))
    with pytest.raises(ValueError, match="'b'"):
        paired_comparison(x, {"a": 1.0, "c": 2.0}, ("A-reset", "B-persistent"))


def test_files_without_values_in_both_arms_are_excluded():
    x = {**ids([3.0, 2.0, 4.0, 3.5, 2.5, 3.2]), "empty": None}
    y = {**ids([2.0, 1.5, 3.0, 2.5, 2.0, 2.2]), "empty": None}
    c = paired_comparison(x, y, n_boot=200)
    assert c.n == 6 and c.excluded == ["empty"]
    with pytest.raises(ValueError, match="'empty'"):
        paired_comparison(x, {**y, "empty": 1.0})


def test_spread_across_seeds_known_values():
    s = spread_across_seeds([1.0, 2.0, 3.0, 4.0])
    assert s.n == 4 and s.mean == 2.5 and s.min == 1.0 and s.max == 4.0
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # sum of squares 5, ddof 1
    one = spread_across_seeds({0: -0.2})
    assert one.std is None and one.mean == -0.2


def test_mean_ci_known_value():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975, 4} * s / sqrt(n)
    assert ci.mean == 3.0
    assert ci.low == pytest.approx(3.0 - half, rel=1e-12) and ci.high == pytest.approx(3.0 + half, rel=1e-12)


def _file(fid: str, rows) -> FileResult:
    chunks = [ChunkResult(chunk_index=k, loss=l, tokens=t, recall_loss=rl, recall_tokens=rt)
              for k, (l, t, rl, rt) in enumerate(rows)]
    return FileResult(fid, 64 * len(rows), chunks)


def test_per_file_metrics_hand_computed():
    f = _file("f", [(9.0, 100, None, 0), (2.0, 10, 1.0, 2), (4.0, 30, 4.0, 6)])
    assert f.later_chunk_loss() == pytest.approx((2.0 * 10 + 4.0 * 30) / 40)  # chunk 0 excluded
    assert f.recall_loss() == pytest.approx((1.0 * 2 + 4.0 * 6) / 8)
    single = _file("s", [(3.0, 50, None, 0)])
    assert single.later_chunk_loss() is None and single.recall_loss() is None
    empty_later = _file("e", [(3.0, 50, None, 0), (None, 0, None, 0), (6.0, 25, None, 0)])
    assert empty_later.later_chunk_loss() == 6.0  # a chunk with no scored tokens enters no mean
    with_chunk0_recall = _file("r", [(3.0, 50, 5.0, 4), (3.0, 50, None, 0)])
    assert with_chunk0_recall.recall_loss() == 5.0  # recall counts in every chunk, chunk 0 included


def test_chunk_curves_hand_computed():
    from moshi_ttt.eval.results import EvalResult

    def result(files):
        return EvalResult("A", "reset", "reset", 0, "ckpt", "data", "long-memory", 64, 32, files)

    x = result([_file("a", [(3.0, 10, None, 0), (2.0, 10, None, 0)]), _file("b", [(5.0, 10, None, 0)])])
    y = result([_file("a", [(2.5, 10, None, 0), (1.0, 10, None, 0)]), _file("b", [(4.0, 10, None, 0)])])
    cx = chunk_curve([x])
    assert cx.chunk_index == [0, 1] and cx.n == [2, 1]
    assert cx.mean == [4.0, 2.0] and cx.low[1] is None
    d = chunk_curve([y], baseline=[x])
    assert d.mean == [pytest.approx(-0.75), pytest.approx(-1.0)]
