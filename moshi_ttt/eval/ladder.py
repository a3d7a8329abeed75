"""The positive control: can this run detect a memory that helps? (the key -> value ladder)

A null result on the long-memory corpus or on real data means something only beside a task that
a working memory must solve, evaluated in the same run. The ladder corpus (``moshi_ttt.data.ladder``)
labels every recall target with a rung:

1. within attention's reach: attention alone must solve it (every arm, the no-TTT arm included);
2. beyond the reach, the write in the same training span: only a memory trained through its
   writes can help;
3. beyond the reach, the write in an earlier span: only a memory kept across spans can help.

Per rung we compare, paired by held-out file, arm B with its memory kept over the whole file
against the same weights with the memory reset every chunk, and against arm A (trained and
evaluated with the memory reset every chunk). The verdict rule, fixed before any run:

* rung 1 is *solved* by a condition when its mean loss is below half the chance level;
* rung 2 or 3 *detects memory* when B-kept lowers the loss by at least 50% against both B-reset
  and A, each with a two-sided Wilcoxon signed-rank p < 0.01 over the files;
* on the control corpus (fresh values at every occurrence: nothing to remember) keeping the memory
  must not change rungs 2-3 by 2% or more, nor significantly (p >= 0.01): no false detection.

Everything here is numpy/scipy through ``stats`` (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import plots
from .results import EvalResult
from .stats import Comparison, MeanCI, mean_ci, paired_comparison, pool_seeds

RUNG_NAMES = {1: "within attention's reach", 2: "beyond the reach, same training span",
              3: "beyond the reach, across spans"}
SOLVED_FRACTION = 0.5      # rung 1 solved: mean loss below this fraction of chance
DETECT_REL = -0.5          # memory detected: at least a 50% lower loss...
DETECT_P = 0.01            # ...with Wilcoxon p below this, against each baseline
CONTROL_MAX_REL = 0.02     # control: |relative change| below 2% and not significant


@dataclass
class RungResult:
    """One rung of one ladder corpus."""

    rung: int
    name: str
    chance: float
    means: dict[str, MeanCI]                      # condition label -> mean over files
    kept_vs_reset: Comparison | None = None       # B-persistent (y) vs B-reset (x)
    kept_vs_a: Comparison | None = None           # B-persistent (y) vs A-reset (x)
    solved: dict[str, bool] = field(default_factory=dict)
    detected: bool | None = None                  # rungs 2-3; None when it cannot be judged
    verdict: str = ""


@dataclass
class LadderResult:
    corpus: str
    control: bool
    chance: float
    rungs: list[RungResult]
    verdict: str
    passed: bool          # positive control: memory detected; control: no false detection


def analyse_ladder(evals: Sequence[EvalResult], corpus: str, chance: float, control: bool,
                   n_boot: int = 2000) -> LadderResult:
    """Apply the verdict rule of this module to the evaluations of one ladder corpus.

    Args:
        evals: every evaluation of the corpus (arms A/B in both memory modes, C), any seeds.
        corpus: its name in the report.
        chance: the per-token loss of a predictor that knows nothing of the value (nats).
        control: True for the control corpus (nothing to remember).
    """
    conds: dict[str, list[EvalResult]] = {}
    for e in evals:
        conds.setdefault(e.label, []).append(e)
    rungs: list[RungResult] = []
    for r in (1, 2, 3):
        per = {lab: pool_seeds(res, f"rung{r}_loss") for lab, res in conds.items()}  # files: the unit
        per = {lab: v for lab, v in per.items() if any(x is not None for x in v.values())}
        if not per:
            continue
        means = {lab: mean_ci(v.values()) for lab, v in sorted(per.items())}
        rr = RungResult(r, RUNG_NAMES[r], chance, means)
        if r == 1 and control:  # fresh values: nothing to copy, even within reach
            rr.verdict = "nothing to copy here (fresh values): chance is the right answer"
            rungs.append(rr)
            continue
        if r == 1:
            rr.solved = {lab: m.mean is not None and m.mean < SOLVED_FRACTION * chance for lab, m in means.items()}
            missing = [lab for lab, ok in rr.solved.items() if not ok]
            rr.verdict = ("solved by every condition (attention alone suffices, as it must)" if not missing
                          else f"NOT solved by {', '.join(missing)}: the pipeline did not learn even what "
                               "attention can see; train longer before reading anything else")
            rungs.append(rr)
            continue
        if "B-persistent" in per and "B-reset" in per:
            rr.kept_vs_reset = paired_comparison(per["B-reset"], per["B-persistent"], ("B-reset", "B-persistent"),
                                                 n_boot=n_boot, metric=f"rung{r}_loss", subject="memory")
        if "B-persistent" in per and "A-reset" in per:
            rr.kept_vs_a = paired_comparison(per["A-reset"], per["B-persistent"], ("A-reset", "B-persistent"),
                                             n_boot=n_boot, metric=f"rung{r}_loss", subject="memory")
        comps = [c for c in (rr.kept_vs_reset, rr.kept_vs_a) if c is not None]
        if not comps:
            rr.verdict = "cannot be judged: arm B was not evaluated with its memory kept and reset"
        elif control:
            c = rr.kept_vs_reset or comps[0]
            ok = c.rel_change is not None and abs(c.rel_change) < CONTROL_MAX_REL and \
                (c.wilcoxon_p is None or c.wilcoxon_p >= DETECT_P)
            rr.detected = not ok
            rr.verdict = ("no false detection (keeping the memory changes nothing here, as it must)" if ok else
                          f"keeping the memory changes the loss by {100 * (c.rel_change or 0):+.1f}% "
                          f"(p = {c.wilcoxon_p}) where there is nothing to remember: the measurement is biased")
        else:
            hits = [c.rel_change is not None and c.rel_change <= DETECT_REL and c.wilcoxon_p is not None
                    and c.wilcoxon_p < DETECT_P for c in comps]
            rr.detected = all(hits) and len(comps) == 2
            rels = ", ".join(f"{100 * (c.rel_change or 0):+.1f}% vs {c.x_name} (p = {_p(c.wilcoxon_p)})"
                             for c in comps)
            rr.verdict = (f"memory detected: B with its memory kept {rels}" if rr.detected else
                          f"memory not detected (needs <= {100 * DETECT_REL:.0f}% vs both B-reset and A-reset "
                          f"at p < {DETECT_P}): B with its memory kept {rels}")
        rungs.append(rr)
    beyond = [rr for rr in rungs if rr.rung >= 2 and rr.detected is not None]
    rung1 = next((rr for rr in rungs if rr.rung == 1), None)
    if control:
        passed = bool(beyond) and not any(rr.detected for rr in beyond)
        verdict = ("control passed: no change where there is nothing to remember" if passed else
                   "control FAILED: keeping the memory changes the loss where there is nothing to remember"
                   if beyond else "control not evaluated (no beyond-reach targets or no arm B)")
    else:
        passed = any(rr.detected for rr in beyond)
        if passed:
            which = ", ".join(str(rr.rung) for rr in beyond if rr.detected)
            verdict = f"memory detected (rung {which}): this run can see a memory that helps"
        elif rung1 is not None and not all(rung1.solved.values()):
            verdict = ("apparatus not working: even the within-reach rung is unsolved, so this run cannot "
                       "tell whether memory helps")
        else:
            verdict = ("memory not detected on the positive control: this run could not detect a memory "
                       "that helps, so a null result elsewhere in it is no evidence of absence")
    return LadderResult(corpus, control, chance, rungs, verdict, passed)


def _p(p: float | None) -> str:
    return "n/a" if p is None else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def _rel_cell(c: Comparison | None) -> str:
    if c is None:
        return "–"
    return f"{100 * (c.rel_change or 0):+.1f}% (p {_p(c.wilcoxon_p)})"


def ladder_markdown(res: LadderResult, plot: str | None = None) -> list[str]:
    """The report section of one ladder corpus."""
    kind = "control (fresh values: nothing to remember)" if res.control else "positive control"
    lines = [f"### {res.corpus}: key -> value ladder, {kind}", "", f"**{res.verdict}.**", "",
             f"Per-token recall loss in nats (chance {res.chance:.3f}: a predictor that knows nothing of "
             "the value); mean over held-out files [95% CI]. Lower is better.", ""]
    labels = sorted({lab for rr in res.rungs for lab in rr.means})
    lines.append("| rung | " + " | ".join(labels) + " | B kept vs B reset | B kept vs A | verdict |")
    lines.append("| --- | " + " | ".join("---" for _ in labels) + " | --- | --- | --- |")
    for rr in res.rungs:
        cells = []
        for lab in labels:
            m = rr.means.get(lab)
            if m is None or m.mean is None:
                cells.append("–")
            else:
                cells.append(f"{m.mean:.3f}" + (f" [{m.low:.3f}, {m.high:.3f}]" if m.low is not None else ""))
        lines.append(f"| {rr.rung}: {rr.name} | " + " | ".join(cells) +
                     f" | {_rel_cell(rr.kept_vs_reset)} | {_rel_cell(rr.kept_vs_a)} | {rr.verdict} |")
    n = max((c.n for rr in res.rungs for c in (rr.kept_vs_reset, rr.kept_vs_a) if c is not None), default=0)
    lines += ["", f"Paired by held-out file ({n} files); rule: {100 * -DETECT_REL:.0f}% lower at Wilcoxon "
              f"p < {DETECT_P} against both baselines (control: |change| < {100 * CONTROL_MAX_REL:.0f}%, "
              "not significant). Rung 1 counts as solved below half of chance."]
    if plot:
        lines += ["", f"![{res.corpus} ladder]({plot})"]
    return lines + [""]


def plot_ladder(res: LadderResult, path: str | Path) -> Path:
    """Grouped bars: per rung, the mean recall loss of every condition, with the chance line."""
    labels = sorted({lab for rr in res.rungs for lab in rr.means})
    return plots.plot_grouped_bars([f"rung {rr.rung}\n{rr.name}" for rr in res.rungs],
                                   {lab: [rr.means.get(lab) for rr in res.rungs] for lab in labels}, path,
                                   f"{res.corpus}: {res.verdict[:70]}", "recall loss (nats per token)", res.chance)


def ladder_json(res: LadderResult) -> dict[str, Any]:
    return asdict(res)
