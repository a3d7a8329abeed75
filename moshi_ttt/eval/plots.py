"""PNG plots of the experiment, drawn on :class:`matplotlib.figure.Figure` objects (Agg, no pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .stats import MIN_REL_IMPROVEMENT, ChunkCurve, Comparison, MeanCI


def _save(fig: Figure, path: str | Path, *axes: tuple[Any, str | None, str | None, str | None]) -> Path:
    """Per ``(ax, xlabel, ylabel, title)``: labels, a light grid and a legend when something is labelled; the PNG."""
    for ax, *labels in axes:
        ax.set(**{k: v for k, v in zip(("xlabel", "ylabel", "title"), labels) if v})
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, format="png", bbox_inches="tight")
    return Path(path)


def _padded(values: Sequence[float]) -> tuple[float, float]:
    """Axis limits around ``values`` with a 15% margin, never of zero width."""
    lo, hi = min(values), max(values)
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.01
    return lo - 0.15 * span, hi + 0.15 * span


def metric_limits(values: Sequence[MeanCI | None], chance: float | None = None) -> tuple[float, float]:
    """y limits of a per-arm plot: every mean, CI bound and the chance line (not from 0)."""
    extent = [v for ci in values if ci for v in (ci.mean, ci.low, ci.high) if v is not None]
    return _padded(extent + ([chance] if chance is not None else [])) if extent else (0.0, 1.0)


def contrast_limits(comparisons: Sequence[Comparison]) -> tuple[float, float]:
    """x limits (percent) of the forest plot: 0, every estimate and CI bound."""
    return _padded([0.0] + [100 * v for c in comparisons for v in (c.rel_change, c.rel_ci_low, c.rel_ci_high)
                            if v is not None])


def plot_curves(curves: Mapping[str, ChunkCurve], path: str | Path, title: str, ylabel: str,
                differences: Mapping[str, ChunkCurve] | None = None, reference: str | None = None) -> Path:
    """A per-chunk quantity vs chunk index, a line per condition with its 95% CI band across files; in a second
    panel the ``differences`` from ``reference`` (paired per file and chunk: the between-file spread cancels).
    Persistent solid, reset dashed, no TTT dotted."""
    panels = [(curves, ylabel, title + "\n(mean over files, shaded: 95% CI across files)")] + ([(
        differences, f"difference from {reference}", f"Paired difference from {reference} (same file and chunk)")]
        if differences else [])
    fig = Figure(figsize=(7.5, 3.9 * len(panels) + 0.6))
    axes = [fig.add_subplot(len(panels), 1, p + 1) for p in range(len(panels))]
    for ax, (lines, _, _) in zip(axes, panels):
        for i, (name, c) in enumerate(lines.items()):
            x, color = np.asarray(c.chunk_index, float), f"C{list(curves).index(name) if name in curves else i}"
            ax.plot(x, c.mean, marker="o", markersize=3, label=name, color=color,
                    linestyle="-" if name.endswith("-persistent") else "--" if name.endswith("-reset") else ":")
            lo, hi = (np.array(b, float) for b in (c.low, c.high))  # a None bound: NaN, no band
            ax.fill_between(x, lo, hi, where=np.isfinite(lo), alpha=0.18, color=color, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if differences:
        axes[1].axhline(0, color="black", linewidth=0.8)
    xlabel = "chunk index within file (0 = first chunk; memory can only matter from chunk 1)"
    return _save(fig, path, *((ax, xlabel if ax is axes[-1] else None, y, t) for ax, (_, y, t) in zip(axes, panels)))


def plot_means(groups: Sequence[str], means: Mapping[str, Sequence[MeanCI | None]], path: str | Path, title: str,
               ylabel: str, chance: float | None = None) -> Path:
    """Per group (a metric, a ladder rung), each condition's mean with its 95% CI and the chance line (a uniform
    guess's loss), on an axis sized to the data: arms differ by percents, which bars from 0 would hide."""
    fig = Figure(figsize=(max(5.0, 1.5 * len(groups) + 0.6 * len(means) + 2), 4.5))
    ax = fig.add_subplot()
    for i, (label, cis) in enumerate(means.items()):
        m, lo, hi = (np.array([getattr(c, a) if c else None for c in cis], float) for a in ("mean", "low", "high"))
        ax.errorbar(np.arange(len(groups)) + (i - (len(means) - 1) / 2) * 0.8 / len(means), m, fmt="o", capsize=4,
                    yerr=np.nan_to_num([m - lo, hi - m]), color=f"C{i}",
                    label=f"{label} (n={', '.join(sorted({str(c.n) for c in cis if c}))})")
    if chance is not None:
        ax.axhline(chance, color="black", linestyle="--", linewidth=1.0, label=f"chance (uniform guess): {chance:.3f}")
    ax.set_ylim(*metric_limits([c for cis in means.values() for c in cis], chance))
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    return _save(fig, path, (ax, None, ylabel, title + "\n(mean over files, error bars: 95% CI; axis not from 0)"))


def plot_training_curves(logs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Training loss (and ``ttt_state_drift`` / ``gate_mean`` when logged) vs step from rows of ``metrics.jsonl``,
    a line per arm; the loss also as a trailing moving average over 1/50 of the longest run."""

    def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = sorted((float(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))
                     and isinstance(r.get("step"), (int, float)) and math.isfinite(r[key]))
        return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])

    ylabels = {"loss": "training loss (text + audio)", "ttt_state_drift": "TTT state drift",
               "gate_mean": "mean gate tanh(alpha)"}
    keys = [k for k in ylabels if k == "loss" or any(series(r, k)[0].size for r in logs.values())]
    fig = Figure(figsize=(7.5, 3.2 * len(keys)))
    axes = [fig.add_subplot(len(keys), 1, i + 1) for i in range(len(keys))]
    window = max(1, max(map(len, logs.values()), default=0) // 50)
    for i, (arm, rows) in enumerate(logs.items()):
        for ax, key in zip(axes, keys):
            s, v = series(rows, key)
            if not s.size:
                continue
            if smoothed := key == "loss" and window > 1 and v.size >= window:
                ax.plot(s, v, color=f"C{i}", alpha=0.25, linewidth=0.8)
                # Trailing mean: the value at step s uses only steps <= s (the first ones fewer).
                v = np.convolve(v, np.ones(window), "full")[:v.size] / np.minimum(np.arange(1, v.size + 1), window)
            ax.plot(s, v, color=f"C{i}", label=f"{arm} (moving avg {window})" if smoothed else arm)
    return _save(fig, path, *((ax, "optimizer step" if ax is axes[-1] else None, ylabels[k],
                               "Training curves" if ax is axes[0] else None) for ax, k in zip(axes, keys)))


def plot_contrasts(comparisons: Mapping[str, Comparison], path: str | Path, title: str) -> Path:
    """Forest plot: relative change with its bootstrap 95% CI per contrast, coloured by decision, a line at 0 and
    the decision threshold (named in the title when it is off the data's scale)."""
    fig = Figure(figsize=(7.5, 0.55 * len(comparisons) + 1.8))
    ax = fig.add_subplot()
    colors = {"keep": ("tab:green", "keep (significant, beyond the threshold)"),
              "hurts": ("tab:red", "hurts (significantly worse)")}
    seen = set()
    for y, c in zip(range(len(comparisons) - 1, -1, -1), comparisons.values()):
        color, meaning = colors.get(c.decision, ("tab:gray", "no decision (not significant, below threshold or mixed)"))
        ax.plot(100 * np.array([c.rel_ci_low, c.rel_ci_high], float), [y, y], color=color, linewidth=2)  # None: none
        if c.rel_change is not None:
            ax.plot([100 * c.rel_change], [y], "o", color=color, label=None if meaning in seen else meaning)
            seen.add(meaning)
    lo, hi = contrast_limits(list(comparisons.values()))
    ax.axvline(0, color="black", linewidth=0.8)
    where, t = f"; decision threshold -{MIN_REL_IMPROVEMENT:.0%} is off this scale", -100 * MIN_REL_IMPROVEMENT
    if lo <= t <= hi:
        ax.axvline(t, color="black", linestyle="--", linewidth=0.8, label=f"-{MIN_REL_IMPROVEMENT:.0%} (decision "
                   "threshold)")
        where = ""
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(comparisons)), list(comparisons)[::-1], fontsize=8)
    return _save(fig, path, (ax, "relative change of mean loss, % ((Y - X) / X; negative = Y better)", None,
                             title + f"\n(dot: estimate, bar: bootstrap 95% CI{where})"))
