"""The experiment report: contrasts between arms, the decision rule, plots, results.json and report.md.

Conditions are identified by ``(train_mode, eval_mode)``, not by arm letters, so a renamed arm
cannot silently swap the contrasts. By convention:

=====================  ============  ===========  ==================================================
label                  train_mode    eval_mode    meaning
=====================  ============  ===========  ==================================================
B-persistent           persistent    persistent   the full persistent-memory system
B-reset                persistent    reset        same weights, memory reset every chunk
A-reset                reset         reset        the baseline: memory reset every chunk
A-persistent           reset         persistent   baseline weights, memory carried at evaluation
C                      none          none         no TTT
=====================  ============  ===========  ==================================================

Primary contrasts (Y vs X, differences Y - X, lower loss is better):
(i) B-persistent vs B-reset: memory at evaluation, same weights;
(ii) B-persistent vs A-reset: persistent vs reset memory, each trained as evaluated (the headline);
(iii) B-persistent vs C: TTT vs no TTT.
Secondary (descriptive): (iv) A-persistent vs A-reset, (v) A-reset vs C.

Each contrast is computed on both per-file metrics (later-chunk loss, recall-target loss), per
corpus. The headline decision is contrast (ii) on the *primary metric*: the recall-target loss
when the corpus has recall targets (they are what long-term memory is for), otherwise the
later-chunk loss. Only that one pre-specified test drives the decision; all other p-values are
descriptive (no multiple-comparison correction). Training seeds: per-file values are averaged over
the training seeds of a condition before the paired test (files are the unit); per-seed results are
reported alongside as the spread across training seeds.

Chance: a recall target cannot be predicted from the attention window, so a model without a working
memory is at best at chance on it (the entropy of a uniform guess, ``ln 60`` nats for text and
``ln 64`` for audio on the tiny synthetic corpus; the evaluator records the token-weighted value as
``recall_chance_nats``). When no arm is below chance (:func:`chance_verdict`), the comparisons of
arms cannot say whether memory helps, and the report says so in its first lines instead of a decision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict, TypeAdapter

from . import plots
from .results import EvalResult
from .stats import (
    ALPHA,
    METRIC_TITLES,
    MIN_REL_IMPROVEMENT,
    Comparison,
    MeanCI,
    chunk_curve,
    mean_ci,
    paired_comparison,
    pool_seeds,
    spread_across_seeds,
)

REPORT_FORMAT = "moshi-ttt-report"
REPORT_VERSION = 1

Condition = tuple[str, str]
B_PERSISTENT: Condition = ("persistent", "persistent")
B_RESET: Condition = ("persistent", "reset")
A_RESET: Condition = ("reset", "reset")
A_PERSISTENT: Condition = ("reset", "persistent")
NO_TTT: Condition = ("none", "none")
CONDITION_ORDER: tuple[Condition, ...] = (B_PERSISTENT, B_RESET, A_PERSISTENT, A_RESET, NO_TTT)
CONVENTIONAL = {B_PERSISTENT: "B-persistent", B_RESET: "B-reset", A_RESET: "A-reset",
                A_PERSISTENT: "A-persistent", NO_TTT: "C"}
METRIC_ORDER = ("later_chunk_loss", "recall_loss")
CORPUS_ORDER = ("kv", "kv-control", "long-memory", "control", "real")


@dataclass(frozen=True)
class Contrast:
    """Y vs X, where X and Y are conditions ``(train_mode, eval_mode)``."""

    id: str
    x: Condition
    y: Condition
    question: str
    subject: str
    primary: bool


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
HEADLINE = "ii"
N_BOOT_PER_SEED = 2000
# An arm has learned the recall targets only if its whole 95% CI lies this far (relative) below chance.
CHANCE_MARGIN = 0.01
AT_CHANCE_STATEMENT = ("no arm learned the recall targets (all at chance): this run cannot tell whether memory "
                       "helps")


# ---- chance level -----------------------------------------------------------------------------


def chance_level(results: Sequence[EvalResult]) -> float | None:
    """The recall-target loss of a uniform guess, as recorded by the evaluator, or None if unknown.

    ``recall_chance_nats`` is the token-weighted entropy of a uniform guess over each recall token's
    alphabet (text or audio). Results that disagree (different corpora layouts) give their mean,
    which is still the right reference to within the spread of the recall token mix.
    """
    values = [r.recall_chance_nats for r in results if r.recall_chance_nats is not None]
    return float(np.mean(values)) if values else None


def learned_recall(ci: MeanCI, chance: float, margin: float = CHANCE_MARGIN) -> bool:
    """True if an arm's recall-target loss is credibly below chance: its 95% CI upper bound (its mean
    when there is no CI) lies more than ``margin`` (relative) below the chance level."""
    top = ci.high if ci.high is not None else ci.mean
    return top is not None and top < chance * (1 - margin)


def chance_verdict(recall: Mapping[str, MeanCI], chance: float | None, margin: float = CHANCE_MARGIN
                   ) -> str | None:
    """The at-chance statement when no arm learned the recall targets, else None.

    Args:
        recall: ``{arm label: recall-target loss across files}`` for every arm evaluated.
        chance: the recall targets' chance level in nats (:func:`chance_level`); None (unknown)
            never produces a statement.
        margin: relative distance below chance that counts as learned (:func:`learned_recall`).

    Comparisons between arms that are all at chance measure noise in how each arm misses, not
    memory, so callers print this statement instead of a decision.
    """
    arms = [ci for ci in recall.values() if ci.mean is not None]
    if chance is None or not arms:
        return None
    if any(learned_recall(ci, chance, margin) for ci in arms):
        return None
    return AT_CHANCE_STATEMENT


# ---- helpers ----------------------------------------------------------------------------------


def load_evals(paths: Sequence[str | Path]) -> list[EvalResult]:
    """Read and validate evaluation JSON files (errors name the file and the field)."""
    return [EvalResult.load(p) for p in paths]


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy (dataclasses -> dicts, tuples -> lists, NaN/inf -> null) through pydantic."""
    return json.loads(_ANY.dump_json(obj))


_ANY = TypeAdapter(Any, config=ConfigDict(ser_json_inf_nan="null"))


def _fmt(spec: str, scale: float = 1.0) -> Callable[[float | None], str]:
    return lambda v: "n/a" if v is None else f"{scale * v:{spec}}" + ("%" if scale == 100 else "")


fmt_loss, fmt_diff, fmt_p = _fmt(".4f"), _fmt("+.4f"), _fmt(".3g")
fmt_pct, fmt_std = _fmt("+.2f", 100), _fmt(".2f", 100)


def _est(fmt: Callable[[float | None], str], v: float | None, lo: float | None, hi: float | None) -> str:
    """``v [lo, hi]`` in ``fmt``; just ``v`` without both bounds."""
    return fmt(v) + ("" if lo is None or hi is None else f" [{fmt(lo)}, {fmt(hi)}]")


# ---- per-corpus analysis ----------------------------------------------------------------------


@dataclass
class _Corpus:
    name: str
    groups: dict[Condition, list[EvalResult]]
    labels: dict[Condition, str]
    notes: list[str]


def _group(evals: Sequence[EvalResult]) -> dict[str, _Corpus]:
    """Group results by corpus and condition; check that arms and seeds are unambiguous."""
    corpora: dict[str, _Corpus] = {}
    for r in evals:
        name = r.corpus_name or r.corpus  # two corpora of one kind stay apart
        c = corpora.setdefault(name, _Corpus(name, {}, {}, []))
        c.groups.setdefault(r.condition, []).append(r)
    for c in corpora.values():
        for cond, rs in c.groups.items():
            arms = sorted({r.arm for r in rs})
            if len(arms) > 1:
                raise ValueError(f"corpus {c.name}: arms {arms} all have train_mode={cond[0]!r}, "
                                 f"eval_mode={cond[1]!r}; the contrasts would be ambiguous: report them separately")
            seeds = [r.seed for r in rs]
            dup = {s for s in seeds if seeds.count(s) > 1}
            if dup:
                raise ValueError(f"corpus {c.name}: {rs[0].label} has more than one result for seed {min(dup)}")
            rs.sort(key=lambda r: r.seed)
            c.labels[cond] = rs[0].label
            if c.labels[cond] != CONVENTIONAL[cond]:
                c.notes.append(f"{c.labels[cond]} plays the role of {CONVENTIONAL[cond]} "
                               f"(train_mode={cond[0]}, eval_mode={cond[1]})")
        setups = {(r.chunk_frames, r.context) for rs in c.groups.values() for r in rs}
        if len(setups) > 1:
            c.notes.append(f"WARNING: conditions were evaluated with different (chunk_frames, context): "
                           f"{sorted(setups)}; the comparison is not like for like")
        data = {r.data for rs in c.groups.values() for r in rs}
        if len(data) > 1:
            c.notes.append(f"conditions were evaluated on different data paths: {sorted(data)} (files are still "
                           "matched by file_id)")
    def order(n: str) -> tuple[int, str]:
        return (CORPUS_ORDER.index(n) if n in CORPUS_ORDER else len(CORPUS_ORDER), n)

    return {k: corpora[k] for k in sorted(corpora, key=order)}


def _analyse_contrast(c: _Corpus, con: Contrast, metric: str, n_boot: int, seed: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": con.id, "question": con.question, "primary": con.primary, "metric": metric,
                             "x": CONVENTIONAL[con.x], "y": CONVENTIONAL[con.y], "x_label": c.labels.get(con.x),
                             "y_label": c.labels.get(con.y), "skipped": None, "comparison": None,
                             "per_seed": None, "seed_spread": None}
    missing = [CONVENTIONAL[k] for k in (con.x, con.y) if k not in c.groups]
    if missing:
        entry["skipped"] = f"{' and '.join(missing)} not evaluated on this corpus"
        return entry
    xr, yr = c.groups[con.x], c.groups[con.y]
    names = (c.labels[con.x], c.labels[con.y])
    try:
        xv, yv = pool_seeds(xr, metric), pool_seeds(yr, metric)
        if all(v is None for v in xv.values()) and all(v is None for v in yv.values()):
            entry["skipped"] = ("no recall targets in this corpus" if metric == "recall_loss"
                                else "no file has more than one chunk")
            return entry
        comp = paired_comparison(xv, yv, names, n_boot=n_boot, seed=seed, metric=metric, subject=con.subject)
    except ValueError as e:
        raise ValueError(f"corpus {c.name}, contrast ({con.id}) {names[1]} vs {names[0]}, {metric}: {e}") from e
    entry["comparison"] = comp
    common = sorted({r.seed for r in xr} & {r.seed for r in yr})
    if len(common) > 1:
        per_seed = {}
        for s in common:
            cs = paired_comparison(pool_seeds([r for r in xr if r.seed == s], metric),
                                   pool_seeds([r for r in yr if r.seed == s], metric), names,
                                   n_boot=min(n_boot, N_BOOT_PER_SEED), seed=seed, metric=metric, subject=con.subject)
            per_seed[s] = {"rel_change": cs.rel_change, "mean_diff": cs.mean_diff, "wilcoxon_p": cs.wilcoxon_p,
                           "decision": cs.decision}
        entry["per_seed"] = per_seed
        rels = [v["rel_change"] for v in per_seed.values() if v["rel_change"] is not None]
        if rels:
            entry["seed_spread"] = spread_across_seeds(rels)
    elif len({r.seed for r in xr} | {r.seed for r in yr}) > 1:
        comp.notes.append("the two arms share fewer than two seeds: no per-seed spread")
    return entry


def _primary_metric(contrasts: list[dict[str, Any]]) -> str:
    """Recall-target loss if the corpus has recall targets (for the headline contrast), else later-chunk loss."""
    for e in contrasts:
        if e["id"] == HEADLINE and e["metric"] == "recall_loss" and e["comparison"] is not None:
            return "recall_loss"
    return "later_chunk_loss"


def _find(contrasts: list[dict[str, Any]], cid: str, metric: str) -> dict[str, Any] | None:
    return next((e for e in contrasts if e["id"] == cid and e["metric"] == metric), None)


def _analyse_corpus(c: _Corpus, out_dir: Path, n_boot: int, seed: int, make_plots: bool) -> dict[str, Any]:
    conds = [k for k in CONDITION_ORDER if k in c.groups]
    summary: dict[str, Any] = {}
    bars: dict[str, dict[str, MeanCI]] = {m: {} for m in METRIC_ORDER}
    loss_curves, drift_curves = {}, {}
    for cond in conds:
        rs = c.groups[cond]
        label = c.labels[cond]
        s: dict[str, Any] = {"role": CONVENTIONAL[cond], "arm": rs[0].arm, "train_mode": cond[0],
                             "eval_mode": cond[1], "seeds": [r.seed for r in rs],
                             "checkpoints": [r.checkpoint for r in rs], "n_files": len(rs[0].files)}
        for m in METRIC_ORDER:
            ci = mean_ci(v for v in pool_seeds(rs, m).values() if v is not None)
            s[m] = ci
            if ci.mean is not None:
                bars[m][label] = ci
        curve = chunk_curve(rs, "loss")
        s["per_chunk_loss"] = curve
        if curve is not None:
            loss_curves[label] = curve
        drift = chunk_curve(rs, "state_drift")
        s["per_chunk_state_drift"] = drift
        if drift is not None:
            drift_curves[label] = drift
        summary[label] = s

    contrasts = [_analyse_contrast(c, con, m, n_boot, seed) for con in CONTRASTS for m in METRIC_ORDER]
    primary = _primary_metric(contrasts)
    head = _find(contrasts, HEADLINE, primary)
    chance = chance_level([r for rs in c.groups.values() for r in rs])
    at_chance = chance_verdict(bars["recall_loss"], chance)
    headline = {"contrast": HEADLINE, "metric": primary,
                "decision": None if head is None or head["comparison"] is None else head["comparison"].decision,
                "verdict": (head["comparison"].verdict if head is not None and head["comparison"] is not None
                            else f"not decided: {head['skipped'] if head else 'contrast missing'}"),
                "at_chance": at_chance is not None}
    if at_chance is not None and primary == "recall_loss":
        # A decision between arms that all miss the targets equally would be read as evidence.
        headline["decision"] = None
        headline["verdict"] = at_chance

    figures: dict[str, str] = {}
    if make_plots:
        slug = c.name
        if loss_curves:
            # Differences from the baseline (A-reset: memory reset every chunk), or the first condition present.
            ref = A_RESET if A_RESET in c.groups else conds[0]
            diffs = {c.labels[k]: d for k in conds if k != ref
                     and (d := chunk_curve(c.groups[k], "loss", baseline=c.groups[ref])) is not None}
            figures["loss_by_chunk"] = plots.plot_curves(
                loss_curves, out_dir / f"loss_by_chunk_{slug}.png", f"Loss by chunk ({c.name} corpus)",
                "per-token loss (nats)", differences=diffs or None, reference=c.labels[ref]).name
        if bars["recall_loss"]:
            figures["recall_loss"] = plots.plot_metric_bars(
                bars["recall_loss"], out_dir / f"recall_loss_{slug}.png", f"Recall-target loss per arm ({c.name} "
                "corpus)", "mean recall-target loss per token (nats)", chance=chance).name
        if bars["later_chunk_loss"]:
            figures["later_chunk_loss"] = plots.plot_metric_bars(
                bars["later_chunk_loss"], out_dir / f"later_chunk_loss_{slug}.png",
                f"Later-chunk loss per arm ({c.name} corpus)", "per-token loss (nats), chunks >= 1").name
        if drift_curves:
            figures["state_drift"] = plots.plot_curves(
                drift_curves, out_dir / f"state_drift_{slug}.png", f"TTT state drift across a file ({c.name} corpus)",
                "state drift at chunk end").name
        forest = {f"({e['id']}) {e['y_label']} vs {e['x_label']}, {e['metric'].replace('_', ' ')}": e["comparison"]
                  for e in contrasts if e["comparison"] is not None}
        if forest:
            figures["contrasts"] = plots.plot_contrasts(
                forest, out_dir / f"contrasts_{slug}.png",
                title=f"Relative change, Y vs X ({c.name} corpus)", threshold=MIN_REL_IMPROVEMENT).name
    return {"conditions": summary, "contrasts": contrasts, "headline": headline, "primary_metric": primary,
            "chance": {"recall_loss": chance, "margin": CHANCE_MARGIN, "statement": at_chance},
            "figures": figures, "notes": c.notes}


def _sanity(corpora: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Long-memory vs control: an effect of memory should be present on the first, absent on the second."""
    if "long-memory" not in corpora or "control" not in corpora:
        return None
    lm, ct = corpora["long-memory"], corpora["control"]
    metric = lm["primary_metric"]
    for cid in (HEADLINE, "i"):
        a, b = _find(lm["contrasts"], cid, metric), _find(ct["contrasts"], cid, metric)
        if a and b and a["comparison"] is not None and b["comparison"] is not None:
            break
    else:
        return {"contrast": None, "metric": metric, "statement": "sanity check not possible: the headline contrast "
                "is missing on one of the two corpora"}
    ca: Comparison = a["comparison"]
    cb: Comparison = b["comparison"]
    lm_gain = ca.decision in ("keep", "improvement below threshold")
    ct_gain = cb.decision in ("keep", "improvement below threshold")
    what = f"contrast ({cid}) {ca.y_name} vs {ca.x_name} on {METRIC_TITLES[metric]}"
    nums = (f"long-memory {fmt_pct(ca.rel_change)} (p = {fmt_p(ca.wilcoxon_p)}), "
            f"control {fmt_pct(cb.rel_change)} (p = {fmt_p(cb.wilcoxon_p)})")
    if lm_gain and not ct_gain:
        stmt = (f"The effect on the long-memory corpus is absent on the control ({what}: {nums}): it is "
                "specific to long-range dependence, as expected of a memory. Sanity check passed.")
        passed = True
    elif lm_gain and ct_gain:
        stmt = (f"WARNING: the control shows a significant improvement too ({what}: {nums}). On the control, memory "
                "cannot help by construction, so at least part of the gain is not long-range memory (e.g. "
                "generic adaptation or a better-trained model). Sanity check failed.")
        passed = False
    elif ct_gain:
        stmt = (f"No memory effect on the long-memory corpus, but a significant improvement on the control "
                f"({what}: {nums}); this is not a memory effect.")
        passed = False
    else:
        stmt = (f"No significant improvement on either corpus ({what}: {nums}); the control shows nothing to "
                "explain away.")
        passed = True
    return {"contrast": cid, "metric": metric, "long_memory_decision": ca.decision, "control_decision": cb.decision,
            "long_memory_rel_change": ca.rel_change, "control_rel_change": cb.rel_change, "passed": passed,
            "statement": stmt}


def _train_summary(train_logs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    out = {}
    for arm, rows in train_logs.items():
        losses = [(r.get("step"), r.get("loss")) for r in rows if isinstance(r.get("loss"), (int, float))]
        finite = [(s, v) for s, v in losses if math.isfinite(v)]
        tail = finite[-max(1, len(finite) // 10):] if finite else []
        out[arm] = {"rows": len(rows), "loss_rows": len(losses), "non_finite_losses": len(losses) - len(finite),
                    "last_step": max((s for s, _ in finite if isinstance(s, (int, float))), default=None),
                    "final_loss": float(np.mean([v for _, v in tail])) if tail else None,
                    "final_loss_window": len(tail)}
    return out


# ---- markdown ---------------------------------------------------------------------------------

CONTRAST_HEADER = ("| contrast | metric | X | Y | n | mean X | mean Y | diff Y−X [95% CI] | "
                   "rel. change [95% CI] | Wilcoxon p | t-test p | decision |")


def contrast_row(e: dict[str, Any]) -> str:
    """One markdown table row of a contrast entry (as in ``results.json``)."""
    tag = f"({e['id']})" + ("" if e["primary"] else " secondary")
    metric = METRIC_TITLES[e["metric"]]
    c: Comparison | None = e["comparison"]
    if c is None:
        return (f"| {tag} | {metric} | {e['x_label'] or e['x']} | {e['y_label'] or e['y']} | – | – | – | – | – | – | – "
                f"| skipped: {e['skipped']} |")
    diff = _est(fmt_diff, c.mean_diff, c.diff_ci_low, c.diff_ci_high)
    rel = _est(fmt_pct, c.rel_change, c.rel_ci_low, c.rel_ci_high)
    return (f"| {tag} | {metric} | {c.x_name} | {c.y_name} | {c.n} | {fmt_loss(c.mean_x)} | {fmt_loss(c.mean_y)} | "
            f"{diff} | {rel} | {fmt_p(c.wilcoxon_p)} | {fmt_p(c.ttest_p)} | {c.decision} |")


def _ci_cell(ci: MeanCI) -> str:
    return "n/a" if ci.mean is None else _est(fmt_loss, ci.mean, ci.low, ci.high)


def _corpus_md(name: str, res: dict[str, Any]) -> list[str]:
    L = [f"## Corpus: {name}", ""]
    head = res["headline"]
    L += [f"**Decision (contrast ({head['contrast']}), {METRIC_TITLES[head['metric']]}):** {head['verdict']}", ""]
    ch = res.get("chance", {})
    if ch.get("recall_loss") is not None:
        L += [f"Chance level of the recall-target loss: {fmt_loss(ch['recall_loss'])} nats per token (a uniform "
              "guess; no model without a working memory can do better). An arm counts as having learned the "
              f"recall targets only if its 95% CI lies more than {ch['margin']:.0%} below it."
              + (" **No arm did.**" if ch.get("statement") else ""), ""]
    elif any(s_["recall_loss"].mean is not None for s_ in res["conditions"].values()):
        L += ["Chance level of the recall-target loss: unknown (not recorded in the evaluation files).", ""]
    L += ["### Conditions", "",
          "| condition | role | train mode | eval mode | training seeds | files | later-chunk loss [95% CI] | "
          "recall-target loss [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for label, s in res["conditions"].items():
        L.append(f"| {label} | {s['role']} | {s['train_mode']} | {s['eval_mode']} | "
                 f"{', '.join(map(str, s['seeds']))} | {s['n_files']} | {_ci_cell(s['later_chunk_loss'])} | "
                 f"{_ci_cell(s['recall_loss'])} |")
    L.append("")
    # The 2x2 (train mode x eval mode) of the primary metric, with no-TTT beside it.
    conds = {(s["train_mode"], s["eval_mode"]): s for s in res["conditions"].values()}
    for m in METRIC_ORDER:
        if not any(s[m].mean is not None for s in conds.values()):
            continue
        L += [f"2x2 of {METRIC_TITLES[m]} (mean over files):", "",
              "| trained \\ evaluated | reset | persistent |", "|---|---|---|"]
        for tm, name_ in (("reset", "A (trained with resets)"), ("persistent", "B (trained persistent)")):
            cells = [fmt_loss(conds[(tm, em)][m].mean) if (tm, em) in conds else "–" for em in ("reset", "persistent")]
            L.append(f"| {name_} | {cells[0]} | {cells[1]} |")
        if NO_TTT in conds:
            L.append(f"| C (no TTT) | {fmt_loss(conds[NO_TTT][m].mean)} | |")
        L.append("")
    L += ["### Contrasts", "",
          "Differences are Y − X over files paired by id; relative change = (mean Y − mean X) / mean X, "
          "negative = Y has the lower (better) loss; CIs: paired bootstrap over files (95%).", "",
          CONTRAST_HEADER, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    L += [contrast_row(e) for e in res["contrasts"]]
    L.append("")
    L += ["Questions: " + "; ".join(f"({con.id}) {con.question}" for con in CONTRASTS) + ".", ""]
    verdicts = [e for e in res["contrasts"] if e["comparison"] is not None and e["primary"]]
    if verdicts:
        L += ["Verdicts of the decision rule (primary contrasts):", ""]
        for e in verdicts:
            c = e["comparison"]
            caveat = (" (descriptive only: every arm is at chance on the recall targets)"
                      if ch.get("statement") and e["metric"] == "recall_loss" else "")
            L.append(f"- ({e['id']}) {METRIC_TITLES[e['metric']]}: {c.verdict}{caveat}.")
        L.append("")
    seeded = [e for e in res["contrasts"] if e["seed_spread"] is not None]
    if seeded:
        L += ["Spread across training seeds of the relative change (each seed analysed alone):", "",
              "| contrast | metric | seeds | mean | std | min | max | decisions per seed |",
              "|---|---|---|---|---|---|---|---|"]
        for e in seeded:
            sp = e["seed_spread"]
            decisions = ", ".join(f"{s}: {v['decision']}" for s, v in e["per_seed"].items())
            L.append(f"| ({e['id']}) {e['y_label']} vs {e['x_label']} | {METRIC_TITLES[e['metric']]} | {sp.n} | "
                     f"{fmt_pct(sp.mean)} | {fmt_std(sp.std)} | {fmt_pct(sp.min)} | {fmt_pct(sp.max)} | "
                     f"{decisions} |")
        L.append("")
    notes = list(res["notes"])
    for e in res["contrasts"]:
        if e["comparison"] is not None:
            notes += [f"({e['id']}) {e['metric']}: {n}" for n in e["comparison"].notes]
    if notes:
        L += ["Notes:", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    titles = {"contrasts": "Relative change per contrast", "loss_by_chunk": "Loss by chunk",
              "recall_loss": "Recall-target loss", "later_chunk_loss": "Later-chunk loss",
              "state_drift": "TTT state drift"}
    for key, fname in res["figures"].items():
        L += [f"![{titles.get(key, key)} ({name})]({fname})", ""]
    return L


def _conclusion(corpora: dict[str, dict[str, Any]], sanity: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    deciding = next((n for n in ("long-memory", "real", "control") if n in corpora), None)
    L = ["## Conclusion", ""]
    if deciding is None:
        return L + ["No evaluation results."], {"corpus": None, "decision": None, "verdict": "no results"}
    res = corpora[deciding]
    head = res["headline"]
    m = METRIC_TITLES[head["metric"]]
    if head.get("at_chance") and head["metric"] == "recall_loss":
        L += [f"**Verdict: {head['verdict']}.**", "",
              f"On the {deciding} corpus no arm's {m} is credibly below its chance level "
              f"({fmt_loss(res['chance']['recall_loss'])} nats; at or above it counts as chance): no model "
              "learned to recall, so differences "
              "between arms measure how each one misses, not memory. The comparisons below are descriptive "
              "only; train longer, with more files or real weights, until at least one arm is below chance."]
    else:
        L += [f"**Verdict: {head['verdict']}.**", "",
              f"This is the decision rule applied on the {deciding} corpus to the main comparison (contrast (ii): "
              f"memory carried across chunks in training and evaluation vs reset every chunk in both), on the {m}."]
    if deciding == "control":
        L.append("(Only the control corpus was evaluated: it cannot show a memory effect by construction, so this "
                 "is not evidence about memory.)")
    descriptive = "Descriptive only: " if head.get("at_chance") and head["metric"] == "recall_loss" else ""
    for cid, what in (("i", f"{descriptive}Carrying the memory at evaluation with the same weights (i)"),
                      ("iii", f"{descriptive}Compared with no TTT (iii)")):
        e = _find(res["contrasts"], cid, head["metric"])
        if e is None or e["comparison"] is None:
            L.append(f"{what}: not measured ({e['skipped'] if e else 'missing'}).")
        else:
            c = e["comparison"]
            rel = _est(fmt_pct, c.rel_change, c.rel_ci_low, c.rel_ci_high)
            L.append(f"{what}: {c.verdict} (relative change {rel}).")
    other = "later_chunk_loss" if head["metric"] == "recall_loss" else None
    if other:
        e = _find(res["contrasts"], HEADLINE, other)
        if e is not None and e["comparison"] is not None:
            L.append(f"On the {METRIC_TITLES[other]}, all tokens, contrast (ii): "
                     f"{e['comparison'].verdict}.")
    if sanity is not None:
        L.append(descriptive + sanity["statement"])
    for name, r in corpora.items():
        if name != deciding and not (name == "control" and sanity is not None):
            L.append(f"On the {name} corpus: {r['headline']['verdict']}.")
    L += ["", f"Decision rule: persistent memory is kept only if the persistent arm has the lower loss with a "
          f"two-sided Wilcoxon signed-rank p < {ALPHA:g} and by more than {MIN_REL_IMPROVEMENT:.0%} relative "
          "(mean over files); otherwise the simpler arm (memory reset every chunk) is kept. Only the headline test "
          "decides, and only when some arm is below chance on the recall targets; the other p-values are "
          "descriptive and not corrected for multiple comparisons.", ""]
    overall = {"corpus": deciding, "contrast": HEADLINE, "metric": head["metric"], "decision": head["decision"],
               "verdict": head["verdict"], "at_chance": bool(head.get("at_chance"))}
    return L, overall


def _fact(key: str, value: Any) -> str:
    if value is None:
        return "unknown"
    if key == "wall_time_s" and isinstance(value, (int, float)):
        return f"{value:.0f} s ({value / 60:.1f} min)"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


# ---- entry point ------------------------------------------------------------------------------


def write_report(out_dir: str | Path, evals: list[EvalResult], train_logs: dict[str, list[dict]] | None,
                 config: dict, command: str, *, n_boot: int = 10000, seed: int = 0, make_plots: bool = True,
                 facts: Mapping[str, Any] | None = None) -> Path:
    """Analyse evaluation results and write ``results.json``, ``report.md`` and PNGs into ``out_dir``.

    Args:
        out_dir: output folder (created).
        evals: evaluation results, any mix of corpora, conditions and seeds.
        train_logs: ``{arm: rows of metrics.jsonl}`` for the training-curve plot, or None.
        config: the experiment configuration, written into the report as is.
        command: the exact command that produced the results (quoted in the report).
        n_boot, seed: bootstrap resamples and random seed.
        make_plots: False skips the PNGs (numbers only).
        facts: run facts (wall time, versions, hardware, load, commit) from
            :func:`moshi_ttt.runtime.run_facts`; None gathers them now (without a wall time).

    Returns:
        the path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not evals:
        raise ValueError("write_report: no evaluation results")
    grouped = _group(evals)
    corpora = {name: _analyse_corpus(c, out_dir, n_boot, seed, make_plots) for name, c in grouped.items()}
    sanity = _sanity(corpora)
    conclusion, overall = _conclusion(corpora, sanity)

    if facts is None:
        from ..runtime import run_facts

        facts = run_facts()
    train = _train_summary(train_logs) if train_logs else None
    train_fig = None
    if train_logs and make_plots:
        train_fig = plots.plot_training_curves(train_logs, out_dir / "training_curves.png").name

    results = {"format": REPORT_FORMAT, "version": REPORT_VERSION, "command": command, "config": config,
               "decision_rule": {"test": "two-sided Wilcoxon signed-rank over files", "alpha": ALPHA,
                                 "min_rel_improvement": MIN_REL_IMPROVEMENT, "headline_contrast": HEADLINE,
                                 "n_boot": n_boot, "bootstrap_seed": seed},
               "contrasts": [asdict(con) for con in CONTRASTS], "overall": overall, "sanity_check": sanity,
               "corpora": corpora, "training": train, "training_figure": train_fig, "run_facts": dict(facts),
               "inputs": [{"arm": r.arm, "label": r.label, "train_mode": r.train_mode, "eval_mode": r.eval_mode,
                           "seed": r.seed, "corpus": r.corpus, "checkpoint": r.checkpoint, "data": r.data,
                           "chunk_frames": r.chunk_frames, "context": r.context, "n_files": len(r.files)}
                          for r in evals]}
    (out_dir / "results.json").write_text(json.dumps(_jsonable(results), indent=1, allow_nan=False) + "\n")

    L = ["# Persistent TTT memory: experiment report", ""]
    if overall.get("at_chance"):
        # First thing a reader sees: nothing below can be read as a decision.
        L += [f"**{AT_CHANCE_STATEMENT[0].upper() + AT_CHANCE_STATEMENT[1:]}.**", ""]
    L += ["Does carrying the TTT memory state across chunks of a long recording (persistent) help, hurt, or do "
          "nothing, compared with resetting it every chunk, and with no TTT at all?", "",
          "Every loss in this report is a per-token loss: cross-entropy in nats averaged over the tokens "
          "concerned (all text and audio tokens, or the recall targets only), lower is better. The training "
          "table is the exception: the training loss is the text loss plus the audio loss.", ""]
    L += conclusion
    for name, res in corpora.items():
        L += _corpus_md(name, res)
    if train is not None:
        L += ["## Training", "",
              "| arm | logged rows | last step | final training loss, text + audio (mean of last 10%) | "
              "non-finite losses |",
              "|---|---|---|---|---|"]
        for arm, t in train.items():
            L.append(f"| {arm} | {t['rows']} | {t['last_step']} | {fmt_loss(t['final_loss'])} | "
                     f"{t['non_finite_losses']} |")
        L.append("")
        if train_fig:
            L += [f"![Training curves]({train_fig})", ""]
    L += ["## Run facts", "", "| fact | value |", "|---|---|"]
    L += [f"| {k.replace('_', ' ')} | {_fact(k, v)} |" for k, v in facts.items()]
    L += ["", "## Configuration", "", "```json", json.dumps(_jsonable(config), indent=1), "```", "",
          "## Command", "", "```", command, "```", "",
          "## Inputs", "", "| label | seed | corpus | checkpoint | data | chunk frames | context | files |",
          "|---|---|---|---|---|---|---|---|"]
    for r in evals:
        L.append(f"| {r.label} | {r.seed} | {r.corpus} | `{r.checkpoint}` | `{r.data}` | {r.chunk_frames} | "
                 f"{r.context} | {len(r.files)} |")
    L.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(L))
    return path
