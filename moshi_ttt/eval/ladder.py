"""The positive control: can this run detect a memory that helps? (the key -> value ladder)

A null result elsewhere means something only beside a task that a working memory must solve, in the
same run. The ladder corpus (``moshi_ttt.data.ladder``) labels each recall target with a rung:
1. within attention's reach (every arm must solve it); 2. beyond the reach, the write in the same
training span; 3. beyond the reach, the write in an earlier span (only a memory kept across spans helps).
Per rung, paired by held-out file, B with its memory kept is compared with the same weights reset every
chunk and with A-reset. The verdict rule, fixed before any run: rung 1 is *solved* by a condition whose
mean loss is below half the chance level; rung 2 or 3 *detects memory* when B-kept is at least 50% lower
than both B-reset and A-reset, each at Wilcoxon p < 0.01; on the control corpus (fresh values: nothing
to remember) keeping the memory must change rungs 2-3 by less than 2% and not significantly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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


def _pct(c: Comparison) -> str:
    p = c.wilcoxon_p
    return f"{100 * (c.rel_change or 0):+.1f}% (p {'n/a' if p is None else f'{p:.1e}' if p < 1e-3 else f'{p:.3f}'})"


def _rung(r: int, per: dict[str, dict[str, float | None]], chance: float, control: bool, n_boot: int) -> RungResult:
    rr = RungResult(r, RUNG_NAMES[r], chance, {lab: mean_ci(v.values()) for lab, v in sorted(per.items())})
    if r == 1:
        rr.solved = {} if control else {lab: m.mean is not None and m.mean < SOLVED_FRACTION * chance
                                         for lab, m in rr.means.items()}
        missing = [lab for lab, ok in rr.solved.items() if not ok]
        rr.verdict = ("nothing to copy here (fresh values): chance is the right answer" if control else
                      "solved by every condition (attention alone suffices, as it must)" if not missing else
                      f"NOT solved by {', '.join(missing)}: the pipeline did not learn even what attention can see; "
                      "train longer before reading anything else")
        return rr
    if "B-persistent" in per:
        for attr, x in (("kept_vs_reset", "B-reset"), ("kept_vs_a", "A-reset")):
            if x in per:
                setattr(rr, attr, paired_comparison(per[x], per["B-persistent"], (x, "B-persistent"), n_boot=n_boot,
                                                    subject="memory"))
    comps = [c for c in (rr.kept_vs_reset, rr.kept_vs_a) if c is not None]
    if not comps:
        rr.verdict = "cannot be judged: arm B was not evaluated with its memory kept and reset"
    elif control:
        c = rr.kept_vs_reset or comps[0]
        rr.detected = not (c.rel_change is not None and abs(c.rel_change) < CONTROL_MAX_REL
                           and (c.wilcoxon_p is None or c.wilcoxon_p >= DETECT_P))
        rr.verdict = ("no false detection (keeping the memory changes nothing here, as it must)" if not rr.detected
                      else f"keeping the memory changes the loss by {_pct(c)} where there is nothing to remember: "
                      "the measurement is biased")
    else:
        rr.detected = len(comps) == 2 and all(
            c.rel_change is not None and c.rel_change <= DETECT_REL and c.wilcoxon_p is not None
            and c.wilcoxon_p < DETECT_P for c in comps)
        rels = ", ".join(f"{_pct(c)} vs {c.x_name}" for c in comps)
        rr.verdict = (f"memory detected: B with its memory kept {rels}" if rr.detected else
                      f"memory not detected (needs <= {100 * DETECT_REL:.0f}% vs both B-reset and A-reset at "
                      f"p < {DETECT_P}): B with its memory kept {rels}")
    return rr


def analyse_ladder(evals: Sequence[EvalResult], corpus: str, chance: float, control: bool,
                   n_boot: int = 2000) -> LadderResult:
    """The verdict rule of this module on every evaluation of one ladder corpus (arms A/B in both memory
    modes, C, any seeds); ``chance``: the per-token loss of a predictor that knows nothing of the value
    (nats); ``control``: the control corpus (nothing to remember)."""
    conds: dict[str, list[EvalResult]] = {}
    for e in evals:
        conds.setdefault(e.label, []).append(e)
    rungs = []
    for r in (1, 2, 3):
        per = {lab: pool_seeds(res, f"rung{r}_loss") for lab, res in conds.items()}  # files: the unit
        per = {lab: v for lab, v in per.items() if any(x is not None for x in v.values())}
        if per:
            rungs.append(_rung(r, per, chance, control, n_boot))
    beyond = [rr for rr in rungs if rr.rung >= 2 and rr.detected is not None]
    if control:
        passed = bool(beyond) and not any(rr.detected for rr in beyond)
        verdict = ("control passed: no change where there is nothing to remember" if passed else
                   "control FAILED: keeping the memory changes the loss where there is nothing to remember"
                   if beyond else "control not evaluated (no beyond-reach targets or no arm B)")
    elif passed := any(rr.detected for rr in beyond):
        which = ", ".join(str(rr.rung) for rr in beyond if rr.detected)
        verdict = f"memory detected (rung {which}): this run can see a memory that helps"
    elif any(rr.rung == 1 and not all(rr.solved.values()) for rr in rungs):
        verdict = ("apparatus not working: even the within-reach rung is unsolved, so this run cannot tell "
                   "whether memory helps")
    else:
        verdict = ("memory not detected on the positive control: this run could not detect a memory that helps, "
                   "so a null result elsewhere in it is no evidence of absence")
    return LadderResult(corpus, control, chance, rungs, verdict, passed)
