"""The experiment report, ``report.md`` and ``results.json``: the positive control first, then per corpus the
conditions, the contrasts with the decision rule and the chance level, plots, run facts and the command.

A condition is ``(train_mode, eval_mode)``, never an arm letter, so a renamed arm cannot swap the contrasts.
Only contrast (ii) on the primary metric (the recall-target loss when the corpus has recall targets, else the
later-chunk loss) decides; the other p-values are descriptive. Seeds are averaged per file before the paired
test; each seed alone gives the spread. When no arm is credibly below the recall targets' chance level
(:func:`chance_verdict`), the report says so first and decides nothing.
"""

from __future__ import annotations

import json
import math
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
from pydantic import ConfigDict, TypeAdapter

from ..runtime import run_facts
from . import plots, stats
from .ladder import DETECT_P, DETECT_REL, LadderResult
from .results import Corpus, EvalResult
from .stats import Comparison, MeanCI

Condition = tuple[str, str]
B_PERSISTENT, B_RESET, A_RESET = ("persistent", "persistent"), ("persistent", "reset"), ("reset", "reset")
A_PERSISTENT, NO_TTT = ("reset", "persistent"), ("none", "none")
CONVENTIONAL: dict[Condition, str] = {B_PERSISTENT: "B-persistent", B_RESET: "B-reset",  # also the display order
                                      A_PERSISTENT: "A-persistent", A_RESET: "A-reset", NO_TTT: "C"}
METRICS = {"later_chunk_loss": "later-chunk loss (chunks >= 1)", "recall_loss": "recall-target loss"}
HEADLINE, N_BOOT_PER_SEED = "ii", 2000
CHANCE_MARGIN = 0.01  # learned recall: the whole 95% CI this far (relative) below chance
AT_CHANCE_STATEMENT = ("no arm learned the recall targets (all at chance): this run cannot tell whether memory "
                       "helps")
Contrast = namedtuple("Contrast", "id x y question subject primary")  # Y vs X, X and Y conditions
CONTRASTS: tuple[Contrast, ...] = (
    Contrast("i", B_RESET, B_PERSISTENT, "memory at evaluation: same weights (trained persistent), memory carried "
             "vs reset every chunk", "persistence", True),
    Contrast("ii", A_RESET, B_PERSISTENT, "the full persistent system vs the baseline trained and evaluated with "
             "the memory reset every chunk", "persistence", True),
    Contrast("iii", NO_TTT, B_PERSISTENT, "persistent TTT vs no TTT", "persistent TTT", True),
    Contrast("iv", A_RESET, A_PERSISTENT, "memory carried at evaluation by weights trained with resets",
             "persistence", False),
    Contrast("v", NO_TTT, A_RESET, "TTT with resets vs no TTT", "TTT", False),
)


@dataclass
class ContrastResult:
    """One contrast on one metric of one corpus (``x``/``y``: conventional names, ``*_label``: as evaluated)."""

    id: str
    primary: bool
    metric: str
    x: str
    y: str
    x_label: str | None
    y_label: str | None
    skipped: str | None = None
    comparison: Comparison | None = None
    per_seed: dict[int, Comparison] | None = None
    seed_spread: stats.SeedSpread | None = None


def chance_verdict(recall: Mapping[str, MeanCI], chance: float | None) -> str | None:
    """:data:`AT_CHANCE_STATEMENT` when no arm's recall-target loss (``{label: mean across files}``) is
    credibly below ``chance``: its 95% CI upper bound (its mean without a CI) more than CHANCE_MARGIN (relative)
    below; else None, also when chance is unknown. Comparisons of arms all at chance measure noise, not memory."""
    tops = [ci.high if ci.high is not None else ci.mean for ci in recall.values() if ci.mean is not None]
    return None if chance is None or not tops or any(t < chance * (1 - CHANCE_MARGIN) for t in tops) else \
        AT_CHANCE_STATEMENT


# ---- analysis ---------------------------------------------------------------------------------


@dataclass
class _Corpus:
    name: str
    groups: dict[Condition, list[EvalResult]] = field(default_factory=dict)
    labels: dict[Condition, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _group(evals: Sequence[EvalResult]) -> dict[str, _Corpus]:
    """Results by corpus and condition (display order); arms and seeds must be unambiguous."""
    corpora: dict[str, _Corpus] = {}
    for r in evals:
        name = r.corpus_name or r.corpus  # two corpora of one kind stay apart
        corpora.setdefault(name, _Corpus(name)).groups.setdefault(r.condition, []).append(r)
    for c in corpora.values():
        c.groups = {k: sorted(c.groups[k], key=lambda r: r.seed) for k in CONVENTIONAL if k in c.groups}
        for cond, rs in c.groups.items():
            if len(arms := sorted({r.arm for r in rs})) > 1:
                raise ValueError(f"corpus {c.name}: arms {arms} all have train_mode={cond[0]!r}, "
                                 f"eval_mode={cond[1]!r}; the contrasts would be ambiguous: report them separately")
            if dup := sorted(r.seed for r, nxt in zip(rs, rs[1:]) if r.seed == nxt.seed):
                raise ValueError(f"corpus {c.name}: {rs[0].label} has more than one result for seed {dup[0]}")
            if (label := c.labels.setdefault(cond, rs[0].label)) != CONVENTIONAL[cond]:
                c.notes.append(f"{label} plays the role of {CONVENTIONAL[cond]} (train_mode={cond[0]}, "
                               f"eval_mode={cond[1]})")
        every = [r for rs in c.groups.values() for r in rs]
        if len(setups := sorted({(r.chunk_frames, r.context) for r in every})) > 1:
            c.notes.append(f"WARNING: conditions were evaluated with different (chunk_frames, context): {setups}; "
                           "the comparison is not like for like")
        if len(data := sorted({r.data for r in every})) > 1:
            c.notes.append(f"conditions were evaluated on different data paths: {data} (files are still matched "
                           "by file_id)")
    rank = {n: i for i, n in enumerate(get_args(Corpus))}  # the known kinds first, in that order
    return {k: corpora[k] for k in sorted(corpora, key=lambda n: (rank.get(n, len(rank)), n))}


def _contrast(c: _Corpus, con: Contrast, metric: str, n_boot: int) -> ContrastResult:
    e = ContrastResult(con.id, con.primary, metric, CONVENTIONAL[con.x], CONVENTIONAL[con.y], c.labels.get(con.x),
                       c.labels.get(con.y))
    if missing := [CONVENTIONAL[k] for k in (con.x, con.y) if k not in c.groups]:
        e.skipped = f"{' and '.join(missing)} not evaluated on this corpus"
        return e
    xr, yr = c.groups[con.x], c.groups[con.y]

    def compare(xs: list[EvalResult], ys: list[EvalResult], n: int) -> Comparison:
        return stats.paired_comparison(stats.pool_seeds(xs, metric), stats.pool_seeds(ys, metric),
                                       (e.x_label, e.y_label), n, subject=con.subject)  # type: ignore[arg-type]

    try:
        if all(v is None for rs in (xr, yr) for v in stats.pool_seeds(rs, metric).values()):
            e.skipped = "no recall targets in this corpus" if metric == "recall_loss" else \
                "no file has more than one chunk"
            return e
        e.comparison = compare(xr, yr, n_boot)
        if len(common := sorted({r.seed for r in xr} & {r.seed for r in yr})) > 1:
            e.per_seed = {s: compare([r for r in xr if r.seed == s], [r for r in yr if r.seed == s],
                                     min(n_boot, N_BOOT_PER_SEED)) for s in common}
            if rels := [p.rel_change for p in e.per_seed.values() if p.rel_change is not None]:
                e.seed_spread = stats.spread_across_seeds(rels)
        elif len({r.seed for r in xr + yr}) > 1:
            e.comparison.notes.append("the two arms share fewer than two seeds: no per-seed spread")
    except ValueError as err:
        raise ValueError(f"corpus {c.name}, contrast ({con.id}) {e.y_label} vs {e.x_label}, {metric}: {err}") from err
    return e


def _find(res: dict[str, Any], cid: str, metric: str) -> ContrastResult:
    return next(e for e in res["contrasts"] if e.id == cid and e.metric == metric)


def _analyse_corpus(c: _Corpus, out_dir: Path, n_boot: int, make_plots: bool) -> dict[str, Any]:
    conditions = {c.labels[k]: {
        "role": CONVENTIONAL[k], "arm": rs[0].arm, "train_mode": k[0], "eval_mode": k[1], "seeds": [r.seed for r in rs],
        "checkpoints": [r.checkpoint for r in rs], "n_files": len(rs[0].files),
        **{m: stats.mean_ci(stats.pool_seeds(rs, m).values()) for m in METRICS},
        "per_chunk_loss": stats.chunk_curve(rs, "loss"), "per_chunk_state_drift": stats.chunk_curve(rs, "state_drift")}
        for k, rs in c.groups.items()}
    res: dict[str, Any] = {"conditions": conditions, "notes": c.notes,
                           "contrasts": [_contrast(c, con, m, n_boot) for con in CONTRASTS for m in METRICS]}
    primary = "recall_loss" if _find(res, HEADLINE, "recall_loss").comparison is not None else "later_chunk_loss"
    head = _find(res, HEADLINE, primary)
    chances = [r.recall_chance_nats for rs in c.groups.values() for r in rs if r.recall_chance_nats is not None]
    chance = float(np.mean(chances)) if chances else None  # corpora of one layout agree; else their mean
    at_chance = chance_verdict({k: s["recall_loss"] for k, s in conditions.items()}, chance)
    decided = head.comparison is not None and not (at_chance and primary == "recall_loss")
    res |= {"primary_metric": primary, "chance": {"recall_loss": chance, "margin": CHANCE_MARGIN,
                                                  "statement": at_chance},
            "headline": {"contrast": HEADLINE, "metric": primary, "at_chance": at_chance is not None,
                         "decision": head.comparison.decision if decided else None,  # type: ignore[union-attr]
                         "verdict": head.comparison.verdict if decided else  # type: ignore[union-attr]
                         at_chance if head.comparison else f"not decided: {head.skipped}"}}
    res["figures"] = _corpus_plots(c, res, out_dir) if make_plots else {}
    return res


def _corpus_plots(c: _Corpus, res: dict[str, Any], out: Path) -> dict[str, str]:
    figs, conds, name = {}, res["conditions"], c.name
    if curves := {k: s["per_chunk_loss"] for k, s in conds.items() if s["per_chunk_loss"] is not None}:
        ref = A_RESET if A_RESET in c.groups else next(iter(c.groups))  # the baseline: memory reset every chunk
        diffs = {c.labels[k]: d for k, rs in c.groups.items()
                 if k != ref and (d := stats.chunk_curve(rs, "loss", baseline=c.groups[ref])) is not None}
        figs["loss_by_chunk"] = plots.plot_curves(curves, out / f"loss_by_chunk_{name}.png", f"Loss by chunk ({name} "
                                                  "corpus)", "per-token loss (nats)", diffs or None, c.labels[ref]).name
    for m, chance in (("recall_loss", res["chance"]["recall_loss"]), ("later_chunk_loss", None)):
        if bars := {k: [s[m]] for k, s in conds.items() if s[m].mean is not None}:
            figs[m] = plots.plot_means([""], bars, out / f"{m}_{name}.png", f"{METRICS[m]} per arm ({name} corpus)",
                                       "per-token loss (nats)", chance).name
    if drift := {k: s["per_chunk_state_drift"] for k, s in conds.items() if s["per_chunk_state_drift"] is not None}:
        figs["state_drift"] = plots.plot_curves(drift, out / f"state_drift_{name}.png", f"TTT state drift across a "
                                                f"file ({name} corpus)", "state drift at chunk end").name
    if forest := {f"({e.id}) {e.y_label} vs {e.x_label}, {METRICS[e.metric]}": e.comparison
                  for e in res["contrasts"] if e.comparison is not None}:
        figs["contrasts"] = plots.plot_contrasts(forest, out / f"contrasts_{name}.png",
                                                 f"Relative change, Y vs X ({name} corpus)").name
    return figs


def _sanity(corpora: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Long-memory vs control: an effect of memory should be present on the first and absent on the second."""
    if "long-memory" not in corpora or "control" not in corpora:
        return None
    metric = corpora["long-memory"]["primary_metric"]
    found = [(cid, a, b) for cid in (HEADLINE, "i") if (a := _find(corpora["long-memory"], cid, metric).comparison)
             and (b := _find(corpora["control"], cid, metric).comparison)]
    if not found:
        return {"contrast": None, "metric": metric, "statement": "sanity check not possible: the headline contrast "
                "is missing on one of the two corpora"}
    cid, ca, cb = found[0]
    gains = tuple(x.decision in ("keep", "improvement below threshold") for x in (ca, cb))
    stmt = {(True, False): "the effect on the long-memory corpus is absent on the control: it is specific to "
            "long-range dependence, as expected of a memory. Sanity check passed",
            (True, True): "WARNING: the control improves significantly too, where memory cannot help by construction: "
            "at least part of the gain is not long-range memory (e.g. generic adaptation). Sanity check failed",
            (False, True): "no memory effect on the long-memory corpus, but a significant improvement on the control: "
            "not a memory effect", (False, False): "no significant improvement on either corpus"}[gains]
    return {"contrast": cid, "metric": metric, "long_memory_decision": ca.decision, "control_decision": cb.decision,
            "long_memory_rel_change": ca.rel_change, "control_rel_change": cb.rel_change, "passed": not gains[1],
            "statement": f"Long-memory vs control, contrast ({cid}) {ca.y_name} vs {ca.x_name} on {METRICS[metric]} "
            f"(long-memory {fmt_pct(ca.rel_change)}, p = {fmt_p(ca.wilcoxon_p)}; control {fmt_pct(cb.rel_change)}, "
            f"p = {fmt_p(cb.wilcoxon_p)}): {stmt}."}


def _train_summary(logs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    out = {}
    for arm, rows in logs.items():
        losses = [(r.get("step"), r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
        finite = [(s, v) for s, v in losses if math.isfinite(v)]
        tail = [v for _, v in finite[-max(1, len(finite) // 10):]]
        out[arm] = {"rows": len(rows), "non_finite_losses": len(losses) - len(finite),
                    "last_step": max((s for s, _ in finite if isinstance(s, (int, float))), default=None),
                    "final_loss": float(np.mean(tail)) if tail else None, "final_loss_window": len(tail)}
    return out


# ---- markdown ---------------------------------------------------------------------------------


def _fmt(spec: str, scale: float = 1.0) -> Callable[[float | None], str]:
    return lambda v: "n/a" if v is None else f"{scale * v:{spec}}" + ("%" if scale == 100 else "")


fmt_loss, fmt_diff, fmt_p = _fmt(".4f"), _fmt("+.4f"), _fmt(".3g")
fmt_pct, fmt_std = _fmt("+.2f", 100), _fmt(".2f", 100)


def _est(fmt: Callable[[float | None], str], v: float | None, lo: float | None = None, hi: float | None = None) -> str:
    """``v [lo, hi]`` in ``fmt``; just ``v`` without both bounds ("–" without ``v``)."""
    return "–" if v is None else fmt(v) + ("" if lo is None or hi is None else f" [{fmt(lo)}, {fmt(hi)}]")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table, then a blank line."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""])


def _contrast_row(e: ContrastResult) -> list[Any]:
    tag, c = f"({e.id})" + ("" if e.primary else " secondary"), e.comparison
    if c is None:
        return [tag, METRICS[e.metric], e.x_label or e.x, e.y_label or e.y, *["–"] * 7, f"skipped: {e.skipped}"]
    return [tag, METRICS[e.metric], c.x_name, c.y_name, c.n, fmt_loss(c.mean_x), fmt_loss(c.mean_y),
            _est(fmt_diff, c.mean_diff, c.diff_ci_low, c.diff_ci_high),
            _est(fmt_pct, c.rel_change, c.rel_ci_low, c.rel_ci_high), fmt_p(c.wilcoxon_p), fmt_p(c.ttest_p), c.decision]


def _corpus_md(name: str, res: dict[str, Any]) -> list[str]:
    head, ch, conds = res["headline"], res["chance"], res["conditions"]
    L = [f"## Corpus: {name}", "", f"**Decision (contrast ({head['contrast']}), {METRICS[head['metric']]}):** "
         f"{head['verdict']}", ""]
    if any(s["recall_loss"].mean is not None for s in conds.values()):
        L += ["Chance level of the recall-target loss: " + ("unknown (not recorded in the evaluation files)." if
              ch["recall_loss"] is None else f"{fmt_loss(ch['recall_loss'])} nats per token (a uniform guess, the best "
              "a model without a working memory can do). An arm has learned the recall targets only if its 95% CI lies "
              f"more than {ch['margin']:.0%} below it.")
              + (" **No arm did: the recall-target rows below are descriptive only.**" if ch["statement"] else ""), ""]
    L += ["### Conditions", ""] + _table(
        ["condition", "role", "train mode", "eval mode", "training seeds", "files", "later-chunk loss [95% CI]",
         "recall-target loss [95% CI]"],
        [[k, s["role"], s["train_mode"], s["eval_mode"], ", ".join(map(str, s["seeds"])), s["n_files"],
          *(_est(fmt_loss, s[m].mean, s[m].low, s[m].high) for m in METRICS)] for k, s in conds.items()])
    L += ["### Contrasts", "", "Questions: " + "; ".join(f"({con.id}) {con.question}" for con in CONTRASTS) + ". "
          "Differences are Y − X over files paired by id, relative change (mean Y − mean X) / mean X (negative: Y has "
          "the lower loss), CIs by paired bootstrap over files.", ""]
    L += _table(["contrast", "metric", "X", "Y", "n", "mean X", "mean Y", "diff Y−X [95% CI]", "rel. change [95% CI]",
                 "Wilcoxon p", "t-test p", "decision"], map(_contrast_row, res["contrasts"]))
    notes = res["notes"] + [f"({e.id}) {e.metric}: {n}" for e in res["contrasts"] if e.comparison
                            for n in e.comparison.notes] + [
        f"({e.id}) {e.metric}, each training seed alone: relative change {fmt_pct(sp.mean)} (std {fmt_std(sp.std)}, "
        f"{fmt_pct(sp.min)} to {fmt_pct(sp.max)}); decisions " + ", ".join(f"seed {k}: {p.decision}" for k, p in
                                                                           (e.per_seed or {}).items())
        for e in res["contrasts"] if (sp := e.seed_spread) is not None]
    L += (["Notes:", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]) if notes else []
    return L + [line for key, f in res["figures"].items() for line in (f"![{key.replace('_', ' ')} ({name})]({f})", "")]


def _conclusion(corpora: dict[str, dict[str, Any]], sanity: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    deciding = next((n for n in ("long-memory", "real", "control") if n in corpora), None)
    if deciding is None:
        return ["## Conclusion", "", "No long-memory, real or control corpus evaluated.", ""], {
            "corpus": None, "decision": None, "verdict": "no results"}
    head = corpora[deciding]["headline"]
    descriptive = head["at_chance"] and head["metric"] == "recall_loss"
    L = ["## Conclusion", "", f"**Verdict: {head['verdict']}.**", "", (
        "No model learned to recall, so differences between arms measure how each one misses, not memory: what "
        "follows is descriptive only; train longer, with more files or real weights, until some arm is below chance."
        if descriptive else f"The decision rule on the {deciding} corpus, contrast (ii) (memory carried across chunks "
        f"in training and evaluation vs reset every chunk in both), on the {METRICS[head['metric']]}.")
        + (" Only the control corpus was evaluated: it cannot show a memory effect by construction." * (
            deciding == "control"))]
    L += [("Descriptive only: " if descriptive else "") + sanity["statement"]] if sanity else []
    L += ["", f"Decision rule: persistent memory is kept only if the persistent arm has the lower loss with a "
          f"two-sided Wilcoxon signed-rank p < {stats.ALPHA:g} and by more than {stats.MIN_REL_IMPROVEMENT:.0%} "
          "relative (mean over files); otherwise the simpler arm is kept. Only the headline contrast (ii) decides, and "
          "only when some arm is below chance on the recall targets; the other p-values are descriptive (no "
          "multiple-comparison correction).", ""]
    return L, {"corpus": deciding, "contrast": HEADLINE, "metric": head["metric"], "decision": head["decision"],
               "verdict": head["verdict"], "at_chance": head["at_chance"]}


def _ladder_md(ladders: Sequence[LadderResult], out_dir: Path, make_plots: bool) -> list[str]:
    """The first section: can this run see a memory? (the positive control and its control)."""
    L = ["## Can this run see a memory? (positive control)", ""] + [f"- **{r.corpus}**: {r.verdict}." for r in ladders]
    if any(not r.control for r in ladders):
        L += ["", "The apparatus detects a memory that helps, and nothing where there is nothing to remember: the "
              "results on the other corpora below can be read as evidence either way." if all(r.passed for r in ladders)
              else "**The apparatus could not detect memory in this run** (positive control not passed, or its control "
              "failed): a null result on the other corpora below is no evidence that memory does not help."]
    for r in ladders:
        labels = sorted({k for rr in r.rungs for k in rr.means})
        kind = "control (fresh values: nothing to remember)" if r.control else "positive control"
        L += ["", f"### {r.corpus}: key -> value ladder, {kind}", "", f"**{r.verdict}.**", "",
              f"Per-token recall loss in nats (chance {r.chance:.3f}: a predictor that knows nothing of the value); "
              "mean over held-out files [95% CI]; B kept vs B reset and vs A: relative change [95% CI] (Wilcoxon p), "
              f"paired by file. Rule: {-DETECT_REL:.0%} lower at p < {DETECT_P} against both baselines (control: "
              "|change| < 2%, not significant); rung 1 counts as solved below half of chance.", ""]
        L += _table(["rung", *labels, "B kept vs B reset", "B kept vs A", "verdict"], [
            [f"{rr.rung}: {rr.name}", *(_est(_fmt(".3f"), m.mean, m.low, m.high) if (m := rr.means.get(k)) else "–"
                                        for k in labels),
             *(_est(fmt_pct, c.rel_change, c.rel_ci_low, c.rel_ci_high) + f" (p {fmt_p(c.wilcoxon_p)})" if c else "–"
               for c in (rr.kept_vs_reset, rr.kept_vs_a)), rr.verdict] for rr in r.rungs])
        if make_plots:
            L.append(f"![{r.corpus} ladder](" + plots.plot_means(
                [f"rung {rr.rung}\n{rr.name}" for rr in r.rungs],
                {k: [rr.means.get(k) for rr in r.rungs] for k in labels},
                out_dir / f"ladder_{r.corpus}.png", f"{r.corpus}: {r.verdict[:70]}", "recall loss (nats per token)",
                r.chance).name + ")")
    return L + [""]


# ---- entry point ------------------------------------------------------------------------------

_JSON = TypeAdapter(Any, config=ConfigDict(ser_json_inf_nan="null"))


def _json(obj: Any) -> str:
    """Dataclasses as mappings, tuples as lists, NaN and infinities as null (pydantic does the walking)."""
    return json.dumps(json.loads(_JSON.dump_json(obj)), indent=1, allow_nan=False) + "\n"


def write_report(out_dir: str | Path, evals: list[EvalResult], train_logs: dict[str, list[dict]] | None,
                 config: dict, command: str, *, n_boot: int = 10000, make_plots: bool = True,
                 facts: Mapping[str, Any] | None = None, ladders: Sequence[LadderResult] = ()) -> Path:
    """Analyse evaluations (any mix of corpora, conditions and seeds); write ``results.json``, ``report.md``
    and PNGs into ``out_dir`` and return the path of ``report.md``. train_logs: ``{arm: rows of metrics.jsonl}``
    or None; config, command: written as given; n_boot: bootstrap resamples (seed 0); facts: run facts (None:
    gathered now); ladders: the positive control (:func:`~moshi_ttt.eval.ladder.analyse_ladder`), shown first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not evals:
        raise ValueError("write_report: no evaluation results")
    corpora = {name: _analyse_corpus(c, out_dir, n_boot, make_plots) for name, c in _group(evals).items()}
    sanity = _sanity(corpora)
    conclusion, overall = _conclusion(corpora, sanity)
    facts = run_facts() if facts is None else facts
    train = _train_summary(train_logs) if train_logs else None
    train_fig = plots.plot_training_curves(train_logs, out_dir / "training_curves.png").name \
        if train_logs and make_plots else None
    if ladders:
        (out_dir / "ladder.json").write_text(_json(list(ladders)))
    (out_dir / "results.json").write_text(_json({
        "format": "moshi-ttt-report", "version": 1, "command": command, "config": config,
        "decision_rule": {"test": "two-sided Wilcoxon signed-rank over files", "alpha": stats.ALPHA,
                          "min_rel_improvement": stats.MIN_REL_IMPROVEMENT, "headline_contrast": HEADLINE,
                          "n_boot": n_boot, "bootstrap_seed": 0},
        "contrasts": [con._asdict() for con in CONTRASTS], "overall": overall, "sanity_check": sanity,
        "corpora": corpora, "training": train, "training_figure": train_fig, "run_facts": dict(facts)}))

    L = ["# Persistent TTT memory: experiment report", ""]
    L += _ladder_md(ladders, out_dir, make_plots) if ladders else []
    if overall.get("at_chance"):  # the first thing a reader sees: nothing below can be read as a decision
        L += [f"**{AT_CHANCE_STATEMENT[0].upper() + AT_CHANCE_STATEMENT[1:]}.**", ""]
    L += ["Does carrying the TTT memory state across chunks of a long recording (persistent) help, hurt, or do "
          "nothing, compared with resetting it every chunk, and with no TTT at all? Every loss here is a per-token "
          "loss: cross-entropy in nats averaged over the tokens concerned (all text and audio tokens, or the recall "
          "targets only), lower is better; the training loss alone is the text loss plus the audio loss.", ""]
    L += conclusion + [line for name, res in corpora.items() for line in _corpus_md(name, res)]
    if train is not None:
        L += ["## Training", ""] + _table(
            ["arm", "logged rows", "last step", "final training loss, text + audio (mean of last 10%)",
             "non-finite losses"],
            [[arm, t["rows"], t["last_step"], fmt_loss(t["final_loss"]), t["non_finite_losses"]]
             for arm, t in train.items()]) + ([f"![Training curves]({train_fig})", ""] if train_fig else [])

    def fact(key: str, v: Any) -> str:
        if key == "wall_time_s" and isinstance(v, (int, float)):
            return f"{v:.0f} s ({v / 60:.1f} min)"
        return "unknown" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    L += ["## Run facts", ""] + _table(["fact", "value"], [[k.replace("_", " "), fact(k, v)] for k, v in facts.items()])
    L += ["## Configuration", "", "```json", _json(config).rstrip(), "```", "", "## Command", "", "```", command, "```",
          ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(L))
    return path
