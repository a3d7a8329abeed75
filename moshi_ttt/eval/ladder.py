"""The positive control: can this run detect a memory that helps? (the key -> value ladder)

The ladder corpus (``moshi_ttt.data.ladder``) labels each recall target with a rung: 1, within attention's
reach; 2, beyond it, written in the same training span; 3, beyond it, written in an earlier span. Per rung,
paired by held-out file, B with its memory kept is compared with the same weights reset every chunk and with
A-reset. The rule, fixed before any run: rung 1 is *solved* by a condition whose mean loss is below half the
chance level; rung 2 or 3 *detects memory* when B-kept is at least 50% lower than both, each at Wilcoxon
p < 0.01; on the control corpus (fresh values: nothing to remember) keeping the memory must change rungs 2-3
by less than 2% and not significantly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..data.ladder import RUNG_NAMES
from .results import EvalResult
from .stats import Comparison, MeanCI, mean_ci, paired_comparison, pool_seeds

SOLVED_FRACTION, DETECT_REL, DETECT_P, CONTROL_MAX_REL = 0.5, -0.5, 0.01, 0.02


@dataclass
class RungResult:
    rung: int
    name: str
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


def _rung(r: int, per: dict[str, dict[str, float | None]], chance: float, control: bool, n_boot: int) -> RungResult:
    rr = RungResult(r, RUNG_NAMES[r], {lab: mean_ci(v.values()) for lab, v in sorted(per.items())})
    if r == 1:
        rr.solved = {} if control else {k: m.mean is not None and m.mean < SOLVED_FRACTION * chance
                                        for k, m in rr.means.items()}
        missing = [k for k, ok in rr.solved.items() if not ok]
        rr.verdict = ("nothing to copy here (fresh values): chance is the right answer" if control else
                      f"NOT solved by {', '.join(missing)}: the pipeline did not learn even what attention can see; "
                      "train longer before reading anything else" if missing else
                      "solved by every condition (attention alone suffices, as it must)")
        return rr
    if "B-persistent" in per:
        rr.kept_vs_reset, rr.kept_vs_a = (paired_comparison(per[x], per["B-persistent"], (x, "B-persistent"), n_boot,
                                                            subject="memory") if x in per else None
                                          for x in ("B-reset", "A-reset"))
    comps = [c for c in (rr.kept_vs_reset, rr.kept_vs_a) if c is not None]
    rels = ", ".join(f"{100 * (c.rel_change or 0):+.1f}% vs {c.x_name} (p {c.wilcoxon_p or float('nan'):.2g})"
                     for c in comps)
    if not comps:
        rr.verdict = "cannot be judged: arm B was not evaluated with its memory kept and reset"
    elif control:
        c = comps[0]
        rr.detected = not (c.rel_change is not None and abs(c.rel_change) < CONTROL_MAX_REL
                           and (c.wilcoxon_p is None or c.wilcoxon_p >= DETECT_P))
        rr.verdict = (f"keeping the memory changes the loss ({rels}) where there is nothing to remember: the "
                      "measurement is biased" if rr.detected else
                      "no false detection (keeping the memory changes nothing here, as it must)")
    else:
        rr.detected = len(comps) == 2 and all(c.rel_change is not None and c.rel_change <= DETECT_REL
                                              and c.wilcoxon_p is not None and c.wilcoxon_p < DETECT_P for c in comps)
        rr.verdict = (f"memory detected: B with its memory kept {rels}" if rr.detected else
                      f"memory not detected (needs <= {DETECT_REL:.0%} vs both B-reset and A-reset at p < {DETECT_P}): "
                      f"B with its memory kept {rels}")
    return rr


def analyse_ladder(evals: Sequence[EvalResult], corpus: str, chance: float, control: bool,
                   n_boot: int = 2000) -> LadderResult:
    """The rule above on every evaluation of one ladder corpus (arms A/B in both memory modes, C, any seeds);
    ``chance``: the per-token loss of a predictor that knows nothing of the value (nats); ``control``: the
    control corpus (nothing to remember)."""
    conds: dict[str, list[EvalResult]] = {}
    for e in evals:
        conds.setdefault(e.label, []).append(e)
    rungs = []
    for r in RUNG_NAMES:
        per = {lab: pool_seeds(res, f"rung{r}_loss") for lab, res in conds.items()}  # files: the unit
        if per := {lab: v for lab, v in per.items() if any(x is not None for x in v.values())}:
            rungs.append(_rung(r, per, chance, control, n_boot))
    beyond = [rr for rr in rungs if rr.rung >= 2 and rr.detected is not None]
    if control:
        passed = bool(beyond) and not any(rr.detected for rr in beyond)
        verdict = ("control passed: no change where there is nothing to remember" if passed else
                   "control FAILED: keeping the memory changes the loss where there is nothing to remember"
                   if beyond else "control not evaluated (no beyond-reach targets or no arm B)")
    elif passed := any(rr.detected for rr in beyond):
        verdict = (f"memory detected (rung {', '.join(str(rr.rung) for rr in beyond if rr.detected)}): this run can "
                   "see a memory that helps")
    elif any(rr.rung == 1 and not all(rr.solved.values()) for rr in rungs):
        verdict = ("apparatus not working: even the within-reach rung is unsolved, so this run cannot tell whether "
                   "memory helps")
    else:
        verdict = ("memory not detected on the positive control: this run could not detect a memory that helps, so "
                   "a null result elsewhere in it is no evidence of absence")
    return LadderResult(corpus, control, chance, rungs, verdict, passed)
