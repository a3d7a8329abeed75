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
from matplotlib.ticker import MaxNLocator

from moshi_ttt.eval.schema import PerPosition
from moshi_ttt.eval.stats import ChunkCurve, Comparison, MeanCI

DPI = 110


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    return path


def _style(label: str) -> dict[str, Any]:
    # Same condition, same look in every plot: persistent solid, reset dashed, no TTT dotted.
    if label.endswith("-persistent"):
        return {"linestyle": "-"}
    if label.endswith("-reset"):
        return {"linestyle": "--"}
    return {"linestyle": ":"}


def _band(ax: Any, curve: ChunkCurve, label: str, color: str | None = None) -> None:
    x = np.asarray(curve.chunk_index, dtype=float)
    m = np.asarray(curve.mean, dtype=float)
    (line,) = ax.plot(x, m, marker="o", markersize=3, label=label, color=color, **_style(label))
    ok = np.array([lo is not None and hi is not None for lo, hi in zip(curve.low, curve.high)])
    if ok.any():
        lo = np.array([v if v is not None else np.nan for v in curve.low], dtype=float)
        hi = np.array([v if v is not None else np.nan for v in curve.high], dtype=float)
        ax.fill_between(x, lo, hi, where=ok, alpha=0.18, color=line.get_color(), linewidth=0)


def plot_loss_by_chunk(curves: Mapping[str, ChunkCurve], path: str | Path, title: str = "Loss by chunk",
                       ylabel: str = "per-token loss (nats)", differences: Mapping[str, ChunkCurve] | None = None,
                       reference: str | None = None) -> Path:
    """Mean loss vs chunk index, one line per condition (arm / eval mode), 95% CI bands across files.

    Args:
        curves: ``{label: ChunkCurve}`` (see :func:`moshi_ttt.eval.stats.chunk_curve`).
        differences: optional ``{label: ChunkCurve}`` of paired differences from ``reference``
            (:func:`moshi_ttt.eval.stats.paired_chunk_curve`), drawn in a second panel: the
            between-file spread cancels there, so it shows where along a file the arms differ.
        reference: name of the condition the differences are taken from.
    """
    two = bool(differences)
    fig = Figure(figsize=(7.5, 7.8 if two else 4.5))
    ax = fig.add_subplot(2 if two else 1, 1, 1)
    for label, curve in curves.items():
        _band(ax, curve, label)
    ax.set_ylabel(ylabel)
    ax.set_title(title + "\n(mean over files, shaded: 95% CI across files)")
    axes = [ax]
    if two:
        ax2 = fig.add_subplot(2, 1, 2, sharex=ax)
        for i, (label, curve) in enumerate(differences.items()):  # type: ignore[union-attr]
            _band(ax2, curve, label, color=f"C{list(curves).index(label) if label in curves else i}")
        ax2.axhline(0, color="black", linewidth=0.8)
        ax2.set_ylabel(f"loss minus {reference or 'reference'}")
        ax2.set_title(f"Paired difference from {reference or 'reference'} (same file and chunk; shaded: 95% CI)",
                      fontsize=10)
        axes.append(ax2)
    for a in axes:
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if a.get_legend_handles_labels()[0]:
            a.legend(title="arm-eval mode", fontsize=8)
    axes[-1].set_xlabel("chunk index within file (0 = first chunk; memory can only matter from chunk 1)")
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


def plot_metric_bars(values: Mapping[str, MeanCI], path: str | Path, title: str = "Recall-target loss",
                     ylabel: str = "mean recall-target loss per token (nats)", chance: float | None = None) -> Path:
    """Mean of a per-file metric per condition, 95% CI error bars, ``n`` files in the tick labels.

    Points rather than bars, on an axis sized to the data (and to the chance line when given): the
    arms differ by a few percent, which bars from zero would hide.

    Args:
        chance: the metric's chance level (a uniform guess), drawn as a labelled horizontal line.
    """
    labels = [k for k, v in values.items() if v.mean is not None]
    fig = Figure(figsize=(max(4.5, 1.1 * len(labels) + 2), 4.5))
    ax = fig.add_subplot()
    means = np.array([values[k].mean for k in labels], dtype=float)
    lows = np.array([values[k].low if values[k].low is not None else m for k, m in zip(labels, means)], dtype=float)
    highs = np.array([values[k].high if values[k].high is not None else m for k, m in zip(labels, means)],
                     dtype=float)
    xpos = np.arange(len(labels))
    for i in range(len(labels)):
        ax.errorbar([xpos[i]], [means[i]], yerr=[[means[i] - lows[i]], [highs[i] - means[i]]], fmt="o",
                    capsize=5, color=f"C{i}", markersize=7)
    if chance is not None:
        ax.axhline(chance, color="black", linestyle="--", linewidth=1.0,
                   label=f"chance (uniform guess): {chance:.3f}")
        ax.legend(fontsize=8, loc="best")
    if labels:
        ax.set_ylim(*metric_limits([values[k] for k in labels], chance))
        ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_xticks(xpos, [f"{k}\n(n={values[k].n})" for k in labels], rotation=0, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title + "\n(mean over files, error bars: 95% CI; axis does not start at 0)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_recall_loss(values: Mapping[str, MeanCI], path: str | Path, title: str = "Recall-target loss per arm",
                     chance: float | None = None) -> Path:
    """Recall-target loss per condition with 95% CI across files and the chance line."""
    return plot_metric_bars(values, path, title=title, chance=chance)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in rows:
        v, s = r.get(key), r.get("step")
        if isinstance(v, (int, float)) and isinstance(s, (int, float)) and math.isfinite(v):
            xs.append(float(s))
            ys.append(float(v))
    order = np.argsort(xs, kind="stable")
    return np.asarray(xs)[order], np.asarray(ys)[order]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or y.size < window:
        return y
    # Trailing moving average: the value at step s uses only steps <= s.
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    out[window - 1:] = (c[window:] - c[:-window]) / window
    out[:window - 1] = c[1:window] / np.arange(1, window)
    return out


def plot_training_curves(logs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                         title: str = "Training curves", smooth: int | None = None) -> Path:
    """Training loss (and ``ttt_state_drift`` / ``gate_mean`` when logged) vs step, one line per arm.

    Args:
        logs: ``{arm: rows}``, rows as read from ``metrics.jsonl``: dicts with ``step`` and ``loss``
            and optionally ``ttt_state_drift``, ``gate_mean``; rows lacking a key or with a
            non-finite value are skipped for that panel.
        smooth: moving-average window for the loss (default: ~1/50 of the longest run).
    """
    keys = ["loss"] + [k for k in ("ttt_state_drift", "gate_mean")
                       if any(_series(rows, k)[0].size for rows in logs.values())]
    ylabels = {"loss": "training loss (text + audio)", "ttt_state_drift": "TTT state drift",
               "gate_mean": "mean gate tanh(alpha)"}
    fig = Figure(figsize=(7.5, 3.2 * len(keys)))
    axes = [fig.add_subplot(len(keys), 1, i + 1) for i in range(len(keys))]
    longest = max((len(rows) for rows in logs.values()), default=0)
    window = smooth if smooth is not None else max(1, longest // 50)
    for i, (arm, rows) in enumerate(logs.items()):
        color = f"C{i}"
        for ax, key in zip(axes, keys):
            s, v = _series(rows, key)
            if not s.size:
                continue
            if key == "loss" and window > 1:
                ax.plot(s, v, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(s, _smooth(v, window), color=color, label=f"{arm} (moving avg {window})")
            else:
                ax.plot(s, v, color=color, label=arm)
    for ax, key in zip(axes, keys):
        ax.set_ylabel(ylabels[key])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title(title)
    return _save(fig, path)


def plot_state_drift(curves: Mapping[str, ChunkCurve], path: str | Path,
                     title: str = "TTT state drift across a file") -> Path:
    """TTT fast-weight drift from the learned initial weights at the end of each chunk, per condition.

    Persistent memory should drift more and more along a file; with resets it stays flat.
    """
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    for label, curve in curves.items():
        _band(ax, curve, label)
    ax.set_xlabel("chunk index within file")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("state drift at chunk end")
    ax.set_title(title + "\n(mean over files, shaded: 95% CI)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(title="arm-eval mode", fontsize=8)
    return _save(fig, path)


def plot_per_position(per_position: Mapping[str, PerPosition], path: str | Path,
                      title: str = "Loss by position within a chunk") -> Path:
    """Mean loss by frame position within a chunk, one line per condition."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    for label, pp in per_position.items():
        ax.plot(pp.bins, pp.loss, marker="o", markersize=3, label=label, **_style(label))
    ax.set_xlabel("frame position within chunk (bin start)")
    ax.set_ylabel("per-token loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if per_position:
        ax.legend(fontsize=8)
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
    from matplotlib.lines import Line2D

    labels = list(comparisons)
    fig = Figure(figsize=(7.5, 0.55 * len(labels) + 1.8))
    ax = fig.add_subplot()
    used: dict[str, tuple[str, str]] = {}
    for i, k in enumerate(labels):
        c = comparisons[k]
        if c.rel_change is None:
            continue
        y = len(labels) - 1 - i
        color, meaning = DECISION_COLORS.get(c.decision, OTHER_DECISION)
        used[color] = (color, meaning)
        if c.rel_ci_low is not None and c.rel_ci_high is not None:
            ax.plot([100 * c.rel_ci_low, 100 * c.rel_ci_high], [y, y], color=color, linewidth=2)
        ax.plot([100 * c.rel_change], [y], "o", color=color)
    lo, hi = contrast_limits(list(comparisons.values()))
    ax.axvline(0, color="black", linewidth=0.8)
    handles = [Line2D([], [], color=c, marker="o", linewidth=2, label=m) for c, m in used.values()]
    thr = -100 * threshold
    if lo <= thr <= hi:
        handles.append(ax.axvline(thr, color="black", linestyle="--", linewidth=0.8,
                                  label=f"-{threshold:.0%} (decision threshold)"))
        where = ""
    else:
        where = f"; decision threshold -{threshold:.0%} is off this scale"
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(labels)), labels[::-1], fontsize=8)
    ax.set_xlabel("relative change of mean loss, % ((Y - X) / X; negative = Y better)")
    ax.set_title(title + f"\n(dot: estimate, bar: bootstrap 95% CI{where})")
    ax.grid(axis="x", alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")
    return _save(fig, path)
