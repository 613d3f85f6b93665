"""The report's plots as PNG bytes: cost bars, loss curves, quality vs trainable parameters.

Plots use matplotlib's Agg backend (no display needed); matplotlib is imported on first use so
that reading a report's tables needs no plotting library. One colour per strategy (tab10), the
same in every plot. Only plots with data are made.
"""

from __future__ import annotations

import io
from typing import Any

from loralab.report.collect import (
    StrategyResult,
    StudyData,
    as_number,
    lower_is_better,
    primary_metric,
)
from loralab.report.tables import TRAINING_COSTS, fmt_value

Colors = dict[str, Any]  # strategy name -> matplotlib colour


def pareto_front(points: list[tuple[float, float]], lower_better: bool
                 ) -> list[tuple[float, float]]:
    """Points not dominated by any other (fewer or equal params AND better or equal quality),
    sorted by parameter count. `points` are (trainable parameters, quality)."""
    sign = 1 if lower_better else -1
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if not front or sign * y < sign * front[-1][1]:
            front.append((x, y))
    return front


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(plt: Any, fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _bar(plt: Any, data: StudyData, colors: Colors, cost: str, scale: float, xlabel: str,
         log: bool = False) -> bytes | None:
    """Horizontal bars of one cost per strategy (mean, std as error bar), value labels at the
    bar ends; strategies that train nothing are left out of training costs."""
    items = [(s.name, s.costs[cost]) for s in data.strategies if cost in s.costs
             and (s.trains or cost not in TRAINING_COSTS)]
    if not items:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1.4))
    y = range(len(items))
    means = [st.mean * scale for _, st in items]
    errs = [st.std * scale for _, st in items]
    ax.barh(list(y), means, xerr=errs if any(errs) else None,
            color=[colors[n] for n, _ in items])
    ax.set_yticks(list(y), [n for n, _ in items])
    ax.invert_yaxis()
    if log and any(m > 0 for m in means):
        ax.set_xscale("log")
        ax.set_xlim(left=max(min(m for m in means if m > 0) / 3, 1))
    for yi, m, e in zip(y, means, errs, strict=True):  # label right of the bar and error bar
        ax.text(m + e if m > 0 else ax.get_xlim()[0], yi,
                " " + fmt_value(m, "int" if log else "num"), va="center", fontsize=8)
    ax.set_xlim(right=ax.get_xlim()[1] * (3 if log else 1.15))
    ax.set_xlabel(xlabel)
    ax.set_title(f"{data.name}: {xlabel}")
    return _png(plt, fig)


def _has_curve(s: StrategyResult, key: str) -> bool:
    return any((r.get("curves") or {}).get(key) for r in s.runs)


def _curve_panel(ax: Any, data: StudyData, colors: Colors, key: str) -> None:
    """One loss curve per run (first seed opaque, others faded); on the validation panel,
    strategies without a curve (untrained) get their validation loss as a dashed line."""
    for s in data.strategies:
        for j, run in enumerate(s.runs):
            pts = (run.get("curves") or {}).get(key) or []
            pts = [p for p in pts if len(p) == 2 and as_number(p[1]) is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[s.name],
                    marker="o" if len(pts) < 12 else None, markersize=3,
                    alpha=1.0 if j == 0 else 0.5, label=s.name if j == 0 else None)
    if key == "val_loss":
        for s in data.strategies:
            st = s.metrics.get("validation", {}).get("loss")
            if not _has_curve(s, key) and st is not None:
                ax.axhline(st.mean, color=colors[s.name], ls="--", lw=1,
                           label=f"{s.name} (no training)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(key.replace("_", " "))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not recorded", ha="center", transform=ax.transAxes)


def _loss_curves(plt: Any, data: StudyData, colors: Colors) -> bytes | None:
    """Training and validation loss side by side, every seed, one colour per strategy."""
    keys = ("train_loss", "val_loss")
    if not any(_has_curve(s, k) for k in keys for s in data.strategies):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, keys, strict=True):
        _curve_panel(ax, data, colors, key)
    return _png(plt, fig)


def _pareto_panel(ax: Any, data: StudyData, colors: Colors, set_name: str, metric: str) -> None:
    """Quality (mean, std as error bar) vs trainable parameters, with the Pareto frontier."""
    pts = [(s.name, s.costs["trainable_params"].mean, s.metrics[set_name][metric])
           for s in data.strategies if "trainable_params" in s.costs
           and metric in s.metrics.get(set_name, {})]
    same_x: dict[float, int] = {}
    for n, x, st in pts:
        ax.errorbar([x], [st.mean], yerr=[st.std] if st.n > 1 else None, fmt="o",
                    color=colors[n], label=n)
        k = same_x[x] = same_x.get(x, -1) + 1  # stack labels of equal-size strategies
        ax.annotate(n, (x, st.mean), fontsize=8, xytext=(4, 4 - 11 * k),
                    textcoords="offset points")
    front = pareto_front([(x, st.mean) for _, x, st in pts], lower_is_better(metric))
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey",
                lw=1, label="Pareto frontier")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)")
    ax.set_title(f"{set_name}: {metric} vs trainable params")
    ax.legend(fontsize=7)


def _pareto(plt: Any, data: StudyData, colors: Colors) -> bytes | None:
    """One panel per eval set, showing its primary metric (`primary_metric`)."""
    panels = [(e, m) for e in data.eval_sets if (m := primary_metric(data, e))]
    if not panels or not any("trainable_params" in s.costs for s in data.strategies):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (set_name, metric) in zip(axes[0], panels, strict=True):
        _pareto_panel(ax, data, colors, set_name, metric)
    return _png(plt, fig)


def make_plots(data: StudyData) -> dict[str, bytes]:
    """Plot name -> PNG bytes, in the report's order. Only plots with data are made."""
    plt = _pyplot()
    colors = {s.name: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(data.strategies)}
    made = {
        "trainable_params": _bar(plt, data, colors, "trainable_params", 1,
                                 "trainable parameters (log)", log=True),
        "peak_memory": _bar(plt, data, colors, "peak_memory_bytes", 1e-6, "peak memory (MB)"),
        "train_time": _bar(plt, data, colors, "train_seconds", 1, "training time (s)"),
        "loss_curves": _loss_curves(plt, data, colors),
        "pareto": _pareto(plt, data, colors),
    }
    return {key: png for key, png in made.items() if png is not None}
