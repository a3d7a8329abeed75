"""PNG plots of the persistence experiment. Each function takes data and an output path, returns the path.

We draw on :class:`matplotlib.figure.Figure` objects directly (no ``pyplot``): savefig then uses
the Agg raster backend, nothing global is switched (a user's interactive backend is untouched),
and no figure is left open in a pyplot registry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .stats import ChunkCurve, Comparison, MeanCI

DPI = 110


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    return path


def _finish(ax: Any, xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
            legend: str | None = None) -> None:
    """Labels, a light grid, and a legend when something is labelled."""
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title=legend, fontsize=8)


def _errors(cis: Sequence[MeanCI | None]) -> tuple[np.ndarray, np.ndarray]:
    """Means [n] and asymmetric error bars [2, n] of CIs (0 where a bound is missing, NaN without a mean)."""
    m = np.array([c.mean if c and c.mean is not None else np.nan for c in cis], dtype=float)
    lo = np.array([c.low if c and c.low is not None else mv for c, mv in zip(cis, m)], dtype=float)
    hi = np.array([c.high if c and c.high is not None else mv for c, mv in zip(cis, m)], dtype=float)
    return m, np.nan_to_num(np.stack([m - lo, hi - m]))


def _band(ax: Any, curve: ChunkCurve, label: str, color: str | None = None) -> None:
    """Mean line and shaded 95% CI; persistent solid, reset dashed, no TTT dotted in every plot."""
    style = "-" if label.endswith("-persistent") else "--" if label.endswith("-reset") else ":"
    x = np.asarray(curve.chunk_index, dtype=float)
    (line,) = ax.plot(x, curve.mean, marker="o", markersize=3, label=label, color=color, linestyle=style)
    lo, hi = (np.array([np.nan if v is None else v for v in b], dtype=float) for b in (curve.low, curve.high))
    ax.fill_between(x, lo, hi, where=np.isfinite(lo), alpha=0.18, color=line.get_color(), linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(curves: Mapping[str, ChunkCurve], path: str | Path, title: str, ylabel: str,
                differences: Mapping[str, ChunkCurve] | None = None, reference: str | None = None) -> Path:
    """A per-chunk quantity vs chunk index, one line per condition, 95% CI bands across files.

    Args:
        curves: ``{label: ChunkCurve}`` (:func:`moshi_ttt.eval.stats.chunk_curve`): loss, state drift...
        differences: optional ``{label: ChunkCurve}`` of paired differences from ``reference``
            (``chunk_curve(..., baseline=...)``), drawn in a second panel: the between-file spread
            cancels there, so it shows where along a file the arms differ.
    """
    fig = Figure(figsize=(7.5, 7.8 if differences else 4.5))
    ax = fig.add_subplot(2 if differences else 1, 1, 1)
    for label, curve in curves.items():
        _band(ax, curve, label)
    _finish(ax, ylabel=ylabel, title=title + "\n(mean over files, shaded: 95% CI across files)",
            legend="arm-eval mode")
    if differences:
        ax = fig.add_subplot(2, 1, 2, sharex=ax)
        for i, (label, curve) in enumerate(differences.items()):
            _band(ax, curve, label, color=f"C{list(curves).index(label) if label in curves else i}")
        ax.axhline(0, color="black", linewidth=0.8)
        _finish(ax, ylabel=f"difference from {reference}", legend="arm-eval mode",
                title=f"Paired difference from {reference} (same file and chunk; shaded: 95% CI)")
    ax.set_xlabel("chunk index within file (0 = first chunk; memory can only matter from chunk 1)")
    return _save(fig, path)


def _padded(lo: float, hi: float, frac: float = 0.15) -> tuple[float, float]:
    """Axis limits around ``[lo, hi]`` with a margin, never of zero width."""
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.01
    return lo - frac * span, hi + frac * span


def metric_limits(values: Sequence[MeanCI], chance: float | None = None) -> tuple[float, float]:
    """y limits of a per-arm plot: every mean, CI bound and the chance line, with a margin (not from 0)."""
    extent = [v for ci in values for v in (ci.mean, ci.low, ci.high) if v is not None]
    extent += [chance] if chance is not None else []
    return _padded(min(extent), max(extent)) if extent else (0.0, 1.0)


def contrast_limits(comparisons: Sequence[Comparison]) -> tuple[float, float]:
    """x limits (percent) of the forest plot: 0, every estimate and CI bound, with a margin."""
    xs = [0.0] + [100 * v for c in comparisons for v in (c.rel_change, c.rel_ci_low, c.rel_ci_high)
                  if v is not None]
    return _padded(min(xs), max(xs))


def plot_metric_bars(values: Mapping[str, MeanCI], path: str | Path, title: str, ylabel: str,
                     chance: float | None = None) -> Path:
    """Mean of a per-file metric per condition, 95% CI error bars, ``n`` files in the tick labels.

    Points rather than bars, on an axis sized to the data (and to ``chance``, a uniform guess's
    loss, drawn as a labelled line): the arms differ by a few percent, which bars from 0 would hide.
    """
    labels = [k for k, v in values.items() if v.mean is not None]
    fig = Figure(figsize=(max(4.5, 1.1 * len(labels) + 2), 4.5))
    ax = fig.add_subplot()
    means, err = _errors([values[k] for k in labels])
    for i in range(len(labels)):
        ax.errorbar([i], means[i:i + 1], yerr=err[:, i:i + 1], fmt="o", capsize=5, color=f"C{i}", markersize=7)
    if chance is not None:
        ax.axhline(chance, color="black", linestyle="--", linewidth=1.0, label=f"chance (uniform guess): {chance:.3f}")
    if labels:
        ax.set_ylim(*metric_limits([values[k] for k in labels], chance))
        ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_xticks(range(len(labels)), [f"{k}\n(n={values[k].n})" for k in labels], fontsize=8)
    _finish(ax, ylabel=ylabel, title=title + "\n(mean over files, error bars: 95% CI; axis does not start at 0)")
    return _save(fig, path)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` in metrics rows, sorted by step; rows without a finite value skipped."""
    pts = sorted((float(r["step"]), float(r[key])) for r in rows
                 if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
                 and math.isfinite(r[key]))
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def plot_training_curves(logs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                         title: str = "Training curves", smooth: int | None = None) -> Path:
    """Training loss (and ``ttt_state_drift`` / ``gate_mean`` when logged) vs step, one line per arm.

    Args:
        logs: ``{arm: rows}`` of ``metrics.jsonl`` (``step``, ``loss``, optional keys above).
        smooth: trailing moving-average window for the loss (default: ~1/50 of the longest run).
    """
    keys = ["loss"] + [k for k in ("ttt_state_drift", "gate_mean") if any(_series(r, k)[0].size for r in logs.values())]
    ylabels = {"loss": "training loss (text + audio)", "ttt_state_drift": "TTT state drift",
               "gate_mean": "mean gate tanh(alpha)"}
    fig = Figure(figsize=(7.5, 3.2 * len(keys)))
    axes = [fig.add_subplot(len(keys), 1, i + 1) for i in range(len(keys))]
    window = smooth if smooth is not None else max(1, max(map(len, logs.values()), default=0) // 50)
    for i, (arm, rows) in enumerate(logs.items()):
        for ax, key in zip(axes, keys):
            s, v = _series(rows, key)
            if key == "loss" and window > 1 and v.size >= window:
                ax.plot(s, v, color=f"C{i}", alpha=0.25, linewidth=0.8)
                # Trailing mean: the value at step s uses only steps <= s (the first ones fewer).
                v = np.convolve(v, np.ones(window), "full")[:v.size] / np.minimum(np.arange(1, v.size + 1), window)
                ax.plot(s, v, color=f"C{i}", label=f"{arm} (moving avg {window})")
            elif s.size:
                ax.plot(s, v, color=f"C{i}", label=arm)
    for ax, key in zip(axes, keys):
        _finish(ax, ylabel=ylabels[key])
    axes[0].set_title(title)
    axes[-1].set_xlabel("optimizer step")
    return _save(fig, path)


DECISION_COLORS = {"keep": ("tab:green", "keep (significant, beyond the threshold)"),
                   "hurts": ("tab:red", "hurts (significantly worse)")}
OTHER_DECISION = ("tab:gray", "no decision (not significant, below threshold or mixed)")


def plot_contrasts(comparisons: Mapping[str, Comparison], path: str | Path,
                   title: str = "Relative change of loss (Y vs X)", threshold: float = 0.10) -> Path:
    """Forest plot: relative change with bootstrap 95% CI per contrast, line at 0.

    The x axis is sized to the estimates and their intervals; the decision threshold (-threshold) is
    drawn when it falls inside that range and named in the title otherwise. The legend lists exactly
    the colours drawn (one per decision present).
    """
    labels = list(comparisons)
    fig = Figure(figsize=(7.5, 0.55 * len(labels) + 1.8))
    ax = fig.add_subplot()
    used: dict[str, str] = {}
    for i, c in enumerate(comparisons.values()):
        if c.rel_change is None:
            continue
        y = len(labels) - 1 - i
        color, meaning = DECISION_COLORS.get(c.decision, OTHER_DECISION)
        used[color] = meaning
        if c.rel_ci_low is not None and c.rel_ci_high is not None:
            ax.plot([100 * c.rel_ci_low, 100 * c.rel_ci_high], [y, y], color=color, linewidth=2)
        ax.plot([100 * c.rel_change], [y], "o", color=color)
    lo, hi = contrast_limits(list(comparisons.values()))
    ax.axvline(0, color="black", linewidth=0.8)
    handles = [Line2D([], [], color=c, marker="o", linewidth=2, label=m) for c, m in used.items()]
    where = f"; decision threshold -{threshold:.0%} is off this scale"
    if lo <= -100 * threshold <= hi:
        handles.append(ax.axvline(-100 * threshold, color="black", linestyle="--", linewidth=0.8,
                                  label=f"-{threshold:.0%} (decision threshold)"))
        where = ""
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(labels)), labels[::-1], fontsize=8)
    _finish(ax, xlabel="relative change of mean loss, % ((Y - X) / X; negative = Y better)",
            title=title + f"\n(dot: estimate, bar: bootstrap 95% CI{where})")
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")
    return _save(fig, path)


def plot_grouped_bars(groups: Sequence[str], means: Mapping[str, Sequence[MeanCI | None]], path: str | Path,
                      title: str, ylabel: str, chance: float) -> Path:
    """Bars from 0 per group (the ladder's rungs), one per condition, 95% CI, and the chance line."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    width, xs = 0.8 / max(1, len(means)), np.arange(len(groups))
    top = chance
    for i, (label, cis) in enumerate(means.items()):
        m, err = _errors(cis)
        ax.bar(xs + (i - (len(means) - 1) / 2) * width, m, width, yerr=err, label=label, capsize=2)
        top = max(top, float(np.nanmax(np.append(m + err[1], top))))
    ax.axhline(chance, color="k", ls="--", lw=1, label=f"chance ({chance:.2f})")
    ax.set_xticks(xs, groups, fontsize=8)
    ax.set_ylim(0, top * 1.12)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
