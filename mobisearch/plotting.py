"""Accuracy-vs-cost frontier plots: compute the data (`frontier_info`), then draw it.

Computing is kept apart from drawing, as optuna's ``visualization`` does:
`frontier_info` turns study records into a `FrontierInfo` of plain arrays (tested by
equality, no matplotlib needed), and `plot_frontier` only draws one. matplotlib is imported
inside `plot_frontier`, so this module loads without it.

The x axis is a cost to minimise (latency, MACs, params), the y axis a quality to maximise
(validation accuracy); the front is ``pareto_mask([y, x], ["maximize", "minimize"])``.

Examples:
    >>> recs = [
    ...     {"display_id": "a", "latency_ms": 1.0, "val_accuracy": 0.5, "macs": 10},
    ...     {"display_id": "b", "latency_ms": 2.0, "val_accuracy": 0.4, "macs": 20},
    ...     {"display_id": "c", "latency_ms": 3.0, "val_accuracy": 0.9, "macs": 30},
    ... ]
    >>> info = frontier_info(recs)
    >>> info.ids, info.front.tolist(), info.xlabel
    (('a', 'b', 'c'), [True, False, True], 'latency (ms, batch 1)')
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import numpy as np

from mobisearch.pareto import pareto_mask

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# Axis labels with units for the record keys the study writes. Unknown keys label as-is.
_LABELS: dict[str, str] = {
    "val_accuracy": "validation accuracy",
    "accuracy": "accuracy",
    "macs": "MACs",
    "params": "parameters",
    "compile_s": "compile time (s)",
    "train_s": "training time (s)",
}


class FrontierInfo(NamedTuple):
    """Everything `plot_frontier` draws, as plain data.

    Attributes:
        ids: Display id of each kept candidate, e.g. ``"mnv1_w075_r160_k5"``.
        x: Cost of each candidate (minimised), shape ``[n]``.
        y: Quality of each candidate (maximised), shape ``[n]``.
        color: Colour value of each candidate, shape ``[n]``; NaN where the record lacks it.
        front: True for candidates on the Pareto front, shape ``[n]``.
        xlabel: x-axis label, with units.
        ylabel: y-axis label, with units.
        colorlabel: Colour-bar label, with units.
        title: Plot title ("" for none).
    """

    ids: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    color: np.ndarray
    front: np.ndarray
    xlabel: str
    ylabel: str
    colorlabel: str
    title: str
    rung: np.ndarray | None = None


_RUNG_MARKERS = ("o", "s", "^", "D", "v")


def _as_number(value: Any, where: str) -> float:
    """Return `value` as a float (NaN for None); raise ValueError naming `where` otherwise."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} (={value!r}) must be a number") from e


def _batch_size(records: Sequence[Mapping[str, Any]]) -> int:
    """Return the common ``latency_batch`` of the records (1 if none records one)."""
    sizes = {r["latency_batch"] for r in records if r.get("latency_batch") is not None}
    if len(sizes) > 1:
        raise ValueError(
            f"records were measured at different batch sizes {sorted(sizes)}; their "
            "latencies are not comparable. Plot one batch size at a time"
        )
    return int(sizes.pop()) if sizes else 1


def _label(key: str, batch_size: int) -> str:
    if key == "latency_ms":
        return f"latency (ms, batch {batch_size})"
    return _LABELS.get(key, key)


def frontier_info(
    records: Sequence[Mapping[str, Any]],
    *,
    x: str = "latency_ms",
    y: str = "val_accuracy",
    color: str = "macs",
    title: str = "",
) -> FrontierInfo:
    """Compute the data of a frontier plot from study records.

    Records missing `x` or `y`, or whose value there is None or NaN (an unfinished or
    failed trial), are dropped. A missing or None `color` value becomes NaN (drawn grey).
    The kept records stay in their given order.

    Args:
        records: Plain dicts, one per candidate, each with ``"display_id"`` and the `x`,
            `y` and `color` keys. An optional ``"latency_batch"`` key (the batch size the
            latency was measured at, as `mobisearch.results` records it) sets the latency
            label; without it the label says batch 1.
        x: Key of the cost to minimise (x axis).
        y: Key of the quality to maximise (y axis).
        color: Key of the value that colours the points.
        title: Plot title.

    Returns:
        The frontier data; ``front`` is ``pareto_mask([y, x], ["maximize", "minimize"])``.

    Raises:
        ValueError: If a kept record lacks ``"display_id"`` or holds a non-number under
            `x`, `y` or `color`, or the records carry different ``"latency_batch"`` values.

    Examples:
        >>> info = frontier_info(
        ...     [{"display_id": "a", "macs": 5, "val_accuracy": 0.7}, {"display_id": "b"}],
        ...     x="macs", color="macs",
        ... )
        >>> info.ids, info.x.tolist(), info.xlabel
        (('a',), [5.0], 'MACs')
    """
    ids: list[str] = []
    xs: list[float] = []
    ys: list[float] = []
    cs: list[float] = []
    rungs: list[float] = []
    kept: list[Mapping[str, Any]] = []
    for i, rec in enumerate(records):
        xv = _as_number(rec.get(x), f"records[{i}][{x!r}]")
        yv = _as_number(rec.get(y), f"records[{i}][{y!r}]")
        if math.isnan(xv) or math.isnan(yv):
            continue
        if "display_id" not in rec:
            raise ValueError(
                f"records[{i}] has no 'display_id' (keys: {sorted(rec)}); every record "
                "needs one to label the plot"
            )
        ids.append(str(rec["display_id"]))
        xs.append(xv)
        ys.append(yv)
        cs.append(_as_number(rec.get(color), f"records[{i}][{color!r}]"))
        rungs.append(_as_number(rec.get("rung"), f"records[{i}]['rung']"))
        kept.append(rec)

    x_arr = np.asarray(xs, dtype=np.float64)
    y_arr = np.asarray(ys, dtype=np.float64)
    front = pareto_mask(np.stack([y_arr, x_arr], axis=1), ["maximize", "minimize"])
    batch_size = _batch_size(kept)
    return FrontierInfo(
        ids=tuple(ids),
        x=x_arr,
        y=y_arr,
        color=np.asarray(cs, dtype=np.float64),
        front=front,
        xlabel=_label(x, batch_size),
        ylabel=_label(y, batch_size),
        colorlabel=_label(color, batch_size),
        title=title,
        rung=np.asarray(rungs, dtype=np.float64) if any(r == r for r in rungs) else None,
    )


@overload
def plot_frontier(info: FrontierInfo, ax: Axes | None = None, *, path: None = None) -> Axes: ...


@overload
def plot_frontier(
    info: FrontierInfo, ax: Axes | None = None, *, path: str | os.PathLike[str]
) -> str: ...


def plot_frontier(
    info: FrontierInfo,
    ax: Axes | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
) -> Axes | str:
    """Draw a frontier: every candidate coloured by `info.color`, the front as a staircase.

    Each candidate is a scatter point coloured by ``info.color`` (with a labelled colour
    bar; points without a colour value are grey). The front is drawn as a step line in
    order of x (``where="post"``: for a cost to minimise and a quality to maximise, the best
    quality reachable at cost ``c`` is that of the last front point with ``x <= c``), and
    its members are annotated with their display ids.

    Args:
        info: The data, from `frontier_info`.
        ax: Axes to draw on. If None, a new figure is made: a standalone
            ``matplotlib.figure.Figure`` (Agg-rendered, no pyplot, no display needed) when
            `path` is given, else ``pyplot.subplots()`` so it shows in notebooks.
        path: If given, save the figure there as a PNG (dpi 150, tight bounding box).

    Returns:
        `path` as a string if it was given, else the Axes drawn on (its figure is
        ``ax.figure``).

    Raises:
        ImportError: If matplotlib is not installed (install the ``[plot]`` extra).
    """
    try:
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError as e:
        raise ImportError(
            "plot_frontier needs matplotlib; install it with `pip install 'mobisearch[plot]'`"
        ) from e
    del matplotlib  # imported first only so a missing install fails with the message above

    if ax is None:
        if path is not None:
            ax = Figure(figsize=(7.0, 4.5)).add_subplot()
        else:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(7.0, 4.5))
    fig = ax.figure

    has_color = ~np.isnan(info.color)
    if has_color.any():
        # In a multi-fidelity search the marker says the highest rung a candidate reached.
        rung = info.rung if info.rung is not None else np.zeros(len(info.x))
        points: Any = None
        for r in np.unique(rung[has_color]):
            at = has_color & (rung == r)
            points = ax.scatter(
                info.x[at],
                info.y[at],
                c=info.color[at],
                cmap="viridis",
                vmin=np.nanmin(info.color),
                vmax=np.nanmax(info.color),
                marker=_RUNG_MARKERS[int(r) % len(_RUNG_MARKERS)] if r == r else "o",
                s=28 + 14 * (int(r) if r == r else 0),
                alpha=0.85,
                zorder=2,
                label=f"rung {int(r)}" if info.rung is not None and r == r else None,
            )
        if info.rung is not None:
            ax.legend(loc="lower right", fontsize=8, title="highest rung")
        colorbar = fig.colorbar(points, ax=ax, label=info.colorlabel)
        if np.nanmax(np.abs(info.color)) >= 1e4:
            # MACs and params read better as "150M" than as 1.5 with a "1e8" offset.
            colorbar.ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    if (~has_color).any():
        ax.scatter(
            info.x[~has_color],
            info.y[~has_color],
            color="0.6",
            s=28,
            zorder=2,
            label=f"no {info.colorlabel}",
        )
        ax.legend(loc="lower right", fontsize=8)

    if info.front.any():
        fx, fy = info.x[info.front], info.y[info.front]
        order = np.lexsort((-fy, fx))
        fx, fy = fx[order], fy[order]
        ax.step(fx, fy, where="post", color="C3", linewidth=1.5, zorder=3)
        ax.scatter(fx, fy, facecolors="none", edgecolors="C3", s=70, linewidths=1.2, zorder=4)
        # Identical front points share one annotation ("a, b") instead of overprinting.
        labels: dict[tuple[float, float], list[str]] = {}
        for i in np.flatnonzero(info.front):
            labels.setdefault((float(info.x[i]), float(info.y[i])), []).append(info.ids[i])
        # The staircase leaves each front point to the right and reaches it from below, so
        # the space above-left of a point is free; left-half points label above-right
        # instead, so that no label runs off the axes.
        mid_x = (float(info.x.min()) + float(info.x.max())) / 2
        # Neighbours closer than a label's size alternate above and below their point, so
        # the ids of a crowded stretch of the front do not overprint each other.
        span_x = float(np.ptp(info.x)) or 1.0
        span_y = float(np.ptp(info.y)) or 1.0
        previous: tuple[float, float] | None = None
        below = False
        for (px, py), names in sorted(labels.items()):
            right_half = px > mid_x
            crowded = previous is not None and (
                abs(px - previous[0]) / span_x < 0.25 and abs(py - previous[1]) / span_y < 0.08
            )
            below = crowded and not below
            previous = (px, py)
            ax.annotate(
                ", ".join(names),
                (px, py),
                xytext=(-5 if right_half else 5, -7 if below else 5),
                textcoords="offset points",
                ha="right" if right_half else "left",
                va="top" if below else "baseline",
                fontsize=7,
                zorder=5,
            )
    elif len(info.ids) == 0:
        ax.text(
            0.5, 0.5, "no finished candidates", ha="center", va="center", transform=ax.transAxes
        )

    ax.set_xlabel(info.xlabel)
    ax.set_ylabel(info.ylabel)
    if info.title:
        ax.set_title(info.title)
    ax.grid(True, alpha=0.3)

    if path is not None:
        # NOTE: a SubFigure cannot save itself; its `.figure` is the root Figure.
        root = fig if isinstance(fig, Figure) else fig.figure
        root.savefig(path, dpi=150, bbox_inches="tight")
        return os.fspath(path)
    return ax
