"""The report's figures as inline SVG (matplotlib, text kept as text): grouped bars with interval
bars and value labels, the distribution of turns per episode and training curves."""

from __future__ import annotations

import io
from dataclasses import dataclass

COLORS = ("#3b6fb6", "#e0803a", "#3a9a5b", "#c0413b", "#8a63b8", "#8c6d4f", "#d36fb0", "#7f7f7f", "#b5b83a", "#3ab5c4")


@dataclass
class Series:
    """One run's bars: a value per category in [0, 1], optional 95% interval bounds."""

    label: str
    values: list[float | None]
    lo: list[float | None] | None = None
    hi: list[float | None] | None = None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "sage", "font.size": 9})
    return plt


def svg(fig) -> str:
    """A figure as an inline <svg> element (no XML prolog)."""
    plt = _pyplot()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def bars(title: str, categories: list[str], series: list[Series], axis_label: str = "success (%)",
         percent: bool = True, full_scale: bool = True) -> str:
    """Horizontal grouped bars, one group per category, one bar per series, each with its value written
    beside it (a 0% bar shows a stub and "0"), and interval bars where bounds are given.
    ``full_scale``: a percent axis runs to 100 (else it fits the largest bar)."""
    import numpy as np

    plt = _pyplot()
    scale = 100 if percent else 1
    n = max(1, len(series))
    height = 0.8 / n
    fig, ax = plt.subplots(figsize=(5.6, 0.9 + 0.2 * max(1, len(categories)) * n + 0.18 * n))
    y = np.arange(len(categories))
    top = max([scale * (v or 0) for s in series for v in (s.hi or s.values) if v is not None] + [1e-9])
    limit = 100 if percent and full_scale and top <= 100 else max(top * 1.25, 1.0)
    for i, s in enumerate(series):
        pos = y + (i - (n - 1) / 2) * height
        vals = np.array([np.nan if v is None else scale * v for v in s.values], dtype=float)
        color = COLORS[i % len(COLORS)]
        shown = np.where(vals == 0, limit * 0.004, vals)  # a stub, so that a 0 bar is seen
        ax.barh(pos, np.nan_to_num(shown), height=height * 0.92, color=color, label=s.label)
        if s.lo is not None and s.hi is not None:
            lo = np.array([np.nan if v is None else scale * v for v in s.lo], dtype=float)
            hi = np.array([np.nan if v is None else scale * v for v in s.hi], dtype=float)
            ok = ~np.isnan(lo) & ~np.isnan(vals)
            err = np.clip(np.vstack([vals - lo, hi - vals]), 0, None)  # float noise never crosses the mean
            ax.errorbar(vals[ok], pos[ok], xerr=err[:, ok], fmt="none", ecolor="#222", elinewidth=0.8, capsize=2)
        for k, (p, v, h) in enumerate(zip(pos, vals, (s.hi or [None] * len(vals)))):
            if np.isnan(v):
                continue
            end = max(v, scale * h if h is not None else v)
            ax.text(end + limit * 0.01, p, f"{v:.0f}" if percent and full_scale else f"{v:.3g}", va="center", fontsize=7,
                    gid=f"value-label-{i}-{k}")
    ax.set_yticks(y, categories)
    ax.invert_yaxis()
    ax.set_xlim(0, limit * 1.08)
    ax.set_xlabel(axis_label)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return svg(fig)


def turns_distribution(title: str, series: dict[str, list[int]], max_turns: int) -> str:
    """How many episodes lasted how many turns: side-by-side bars per turn count, one colour per run."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 2.6))
    top = max([max_turns] + [max(v) for v in series.values() if v])
    x = np.arange(1, top + 1)
    width = 0.8 / max(1, len(series))
    for i, (label, turns) in enumerate(series.items()):
        counts = np.bincount(np.clip(turns, 0, top), minlength=top + 1)[1:] if turns else np.zeros(top)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, counts, width=width, color=COLORS[i % len(COLORS)], label=label)
    ax.set_xlabel("turns per episode")
    ax.set_ylabel("episodes")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlim(0.4, top + 0.6)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return svg(fig)


def curves(title: str, panels: dict[str, dict[str, list[tuple[int, float]]]]) -> str:
    """Small line plots sharing the step axis: ``{panel title: {line label: [(step, value), ...]}}``."""
    plt = _pyplot()
    shown = {k: v for k, v in panels.items() if any(v.values())}
    cols = min(3, max(1, len(shown)))
    rows = (len(shown) + cols - 1) // cols or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, shown.items()):
        for i, (label, points) in enumerate(lines.items()):
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, color=COLORS[i % len(COLORS)],
                        label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return svg(fig)
