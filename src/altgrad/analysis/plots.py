"""Matplotlib figures for run and matrix reports (object API with the Agg canvas: no display, no pyplot).

Every function takes already-extracted data (pandas Series indexed by step) and returns a Figure;
deciding whether there is anything to plot is the caller's job.

Example::

    >>> fig = layer_lines_figure({"h.0.mlp": run.series("stall_ratio/h.0.mlp")}, None,
    ...                          "Stall ratio per layer", "stall ratio")    # doctest: +SKIP
    >>> fig.savefig("stall.png")                                          # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

LINESTYLES = ("-", "--", ":", "-.")
BASELINE_STYLES = {"fp32": ("black", "--"), "bf16": ("dimgray", ":")}
Curves = dict[tuple[str, str], pd.Series]
"""Curves keyed by (format, optimizer): color says the format, line style the optimizer."""


def _figure(
    rows: int = 1, cols: int = 1, width: float = 8.0, height: float = 3.6
) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(width, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def _colors(labels: Sequence[str]) -> dict[str, tuple]:
    palette = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: palette(i % palette.N) for i, label in enumerate(labels)}


def _legend(ax: Axes, entries: int) -> None:
    if entries == 0:
        return
    if entries > 8:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(fontsize=8)


def _style(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def loss_figure(train: pd.Series, val: pd.Series) -> Figure:
    """Train loss (line) and val loss (markers) of one run."""
    figure, axes = _figure()
    ax = axes[0, 0]
    if len(train):
        ax.plot(train.index, train.to_numpy(), lw=1.2, label="train loss")
    if len(val):
        ax.plot(val.index, val.to_numpy(), "o-", ms=3, lw=1.0, label="val loss")
    _style(ax, "Loss", "loss")
    _legend(ax, int(len(train) > 0) + int(len(val) > 0))
    return figure


def layer_lines_figure(
    per_layer: dict[str, pd.Series], mean: pd.Series | None, title: str, ylabel: str
) -> Figure:
    """One thin line per layer, and the mean over layers as a thick black line."""
    figure, axes = _figure(width=10.0)
    ax = axes[0, 0]
    colors = _colors(list(per_layer))
    for layer, series in per_layer.items():
        ax.plot(series.index, series.to_numpy(), lw=0.9, alpha=0.8, color=colors[layer], label=layer)
    if mean is not None and len(mean):
        ax.plot(mean.index, mean.to_numpy(), lw=2.2, color="black", label="mean")
    _style(ax, title, ylabel)
    _legend(ax, len(per_layer) + int(mean is not None and len(mean) > 0))
    return figure


def rank_figure(stable: dict[str, pd.Series], effective: dict[str, pd.Series], warnings: list[int]) -> Figure:
    """Stable and effective rank per parameter; rank warnings as red vertical lines."""
    panels = [(name, data) for name, data in (("stable rank", stable), ("effective rank", effective)) if data]
    figure, axes = _figure(rows=len(panels), width=10.0)
    for (label, per_param), ax in zip(panels, axes[:, 0], strict=True):
        colors = _colors(list(per_param))
        for param, series in per_param.items():
            ax.plot(series.index, series.to_numpy(), lw=0.9, color=colors[param], label=param)
        for i, step in enumerate(warnings):
            ax.axvline(step, color="red", ls=":", lw=1.0, label="rank warning" if i == 0 else None)
        _style(ax, f"{label.capitalize()} per parameter (red: rank_warning events)", label)
        _legend(ax, len(per_param) + int(bool(warnings)))
    return figure


def fractions_figure(overflow: dict[str, pd.Series], underflow: dict[str, pd.Series]) -> Figure:
    """Overflow and underflow fractions by tensor kind (weight / activation / grad) over steps."""
    figure, axes = _figure(cols=2, width=11.0)
    panels = (("Overflow fraction", overflow), ("Underflow fraction", underflow))
    for ax, (title, per_kind) in zip(axes[0], panels, strict=True):
        for kind, series in per_kind.items():
            ax.plot(series.index, series.to_numpy(), lw=1.2, label=kind)
        if not per_kind:
            ax.text(0.5, 0.5, "not recorded in this run", ha="center", va="center", transform=ax.transAxes)
        _style(ax, title, "fraction of elements")
        _legend(ax, len(per_kind))
    return figure


def _curves(ax: Axes, curves: Curves, colors: dict[str, tuple], styles: dict[str, str]) -> None:
    for (fmt, optimizer), series in curves.items():
        label = f"{fmt} / {optimizer}" if len(styles) > 1 else fmt
        ax.plot(series.index, series.to_numpy(), lw=1.2, color=colors[fmt], ls=styles[optimizer], label=label)


def _palette(curves: Curves) -> tuple[dict[str, tuple], dict[str, str]]:
    formats = list(dict.fromkeys(fmt for fmt, _ in curves))
    optimizers = list(dict.fromkeys(optimizer for _, optimizer in curves))
    styles = {optimizer: LINESTYLES[i % len(LINESTYLES)] for i, optimizer in enumerate(optimizers)}
    return _colors(formats), styles


def curves_figure(
    curves: Curves,
    title: str,
    ylabel: str,
    markers: dict[tuple[str, str], pd.Series] | None = None,
    marker_label: str = "",
) -> Figure:
    """Curves colored by format, styled by optimizer; optional markers (e.g. rank warnings) on them."""
    figure, axes = _figure(width=10.0, height=4.0)
    ax = axes[0, 0]
    colors, styles = _palette(curves)
    _curves(ax, curves, colors, styles)
    first = True
    for (fmt, _), points in (markers or {}).items():
        if len(points):
            ax.plot(
                points.index,
                points.to_numpy(),
                "v",
                ms=7,
                color=colors.get(fmt, "red"),
                mec="red",
                label=marker_label if first else None,
            )
            first = False
    _style(ax, title, ylabel)
    _legend(ax, len(curves) + int(not first))
    return figure


def format_loss_figure(
    per_format: dict[str, dict[str, pd.Series]], baselines: dict[str, pd.Series]
) -> Figure:
    """One panel per format: its loss curve per optimizer, with the baselines (fp32, bf16) dashed."""
    cols = min(3, max(1, len(per_format)))
    rows = math.ceil(len(per_format) / cols)
    figure, axes = _figure(rows=rows, cols=cols, width=4.2 * cols, height=3.2)
    optimizers = list(dict.fromkeys(opt for curves in per_format.values() for opt in curves))
    colors = _colors(optimizers)
    for ax, (fmt, curves) in zip(axes.flat, per_format.items(), strict=False):
        for name, series in baselines.items():
            color, style = BASELINE_STYLES.get(name, ("gray", "--"))
            ax.plot(series.index, series.to_numpy(), color=color, ls=style, lw=1.0, label=name)
        for optimizer, series in curves.items():
            ax.plot(series.index, series.to_numpy(), lw=1.2, color=colors[optimizer], label=optimizer)
        _style(ax, fmt, "loss")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(per_format) :]:
        ax.set_visible(False)
    return figure


def fractions_by_format_figure(panels: dict[tuple[str, str], Curves]) -> Figure:
    """A grid of panels keyed by (tensor kind, overflow|underflow), each with one curve per format."""
    kinds = list(dict.fromkeys(kind for kind, _ in panels))
    sides = ["overflow", "underflow"]
    everything: Curves = {key: series for curves in panels.values() for key, series in curves.items()}
    colors, styles = _palette(everything)
    figure, axes = _figure(rows=len(kinds), cols=2, width=11.0, height=3.0)
    for row, kind in enumerate(kinds):
        for col, side in enumerate(sides):
            ax = axes[row, col]
            curves = panels.get((kind, side), {})
            _curves(ax, curves, colors, styles)
            if not curves:
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
            _style(ax, f"{kind}: {side} fraction", "fraction")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        figure.legend(
            list(handles.values()), list(handles), loc="outside right upper", fontsize=7, frameon=False
        )
    return figure


def heatmap_figure(table: pd.DataFrame, title: str, colorbar_label: str) -> Figure:
    """A layer x column heatmap; NaN cells (not recorded) are left blank and marked '—'."""
    rows, cols = table.shape
    figure, axes = _figure(width=max(5.0, 0.8 * cols + 4.0), height=max(2.5, 0.35 * rows + 1.5))
    ax = axes[0, 0]
    values = table.to_numpy(dtype=float)
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(cols), [str(c) for c in table.columns], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(rows), [str(r) for r in table.index], fontsize=8)
    if rows * cols <= 400:
        for (i, j), value in np.ndenumerate(values):
            text = "—" if math.isnan(value) else f"{value:.2f}"
            ax.text(
                j, i, text, ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black"
            )
    ax.set_title(title, fontsize=10)
    figure.colorbar(image, ax=ax, label=colorbar_label)
    return figure


def lr_sweep_figure(sweeps: dict[str, dict[str, pd.Series]], chosen: dict[str, dict[str, float]]) -> Figure:
    """One panel per optimizer (lrs are in its own unit): mean final val loss over seeds against the lr,
    one line per setting; a star marks the chosen lr of each line."""
    cols = min(2, max(1, len(sweeps)))
    rows = math.ceil(len(sweeps) / cols)
    figure, axes = _figure(rows=rows, cols=cols, width=5.5 * cols, height=3.4)
    for ax, (optimizer, lines) in zip(axes.flat, sweeps.items(), strict=False):
        colors = _colors(list(lines))
        for setting, series in lines.items():
            ax.plot(series.index, series.to_numpy(), "o-", ms=3, lw=1.0, color=colors[setting], label=setting)
            best = chosen.get(optimizer, {}).get(setting)
            if best is not None and best in series.index:
                ax.plot([best], [series[best]], "*", ms=11, color=colors[setting], mec="black")
        ax.set_xscale("log")
        ax.set_title(f"{optimizer} (star: chosen lr)", fontsize=10)
        ax.set_xlabel("lr (the optimizer's own unit)")
        ax.set_ylabel("final val loss, mean over seeds")
        ax.grid(alpha=0.3)
        _legend(ax, len(lines))
    for ax in list(axes.flat)[len(sweeps) :]:
        ax.set_visible(False)
    return figure
