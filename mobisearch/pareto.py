"""Pareto dominance and the Pareto front of a set of points (numpy only).

Conventions, stated once:

* Each objective has a direction, spelled out as ``"maximize"`` or ``"minimize"``.
  Internally every objective is turned into a loss by negating the ``"maximize"`` columns
  (as optuna's ``_normalize_value`` does), so "better" always means "smaller".
* Point ``a`` *dominates* point ``b`` when ``a`` is no worse than ``b`` in every objective
  and strictly better in at least one.
* The *front* is the set of points that no other point dominates.
* **Ties and duplicates.** Identical points never dominate each other, so duplicates share
  one fate: either all copies are on the front or none is. A point that ties another in one
  objective and is strictly better in another dominates it.
* **NaN.** A point with a NaN in any objective is never on the front and dominates nothing;
  the front of the other points is computed as if it were absent. ``inf`` and ``-inf`` are
  ordinary (comparable) values.

The algorithm follows optuna's ``optuna.study._multi_objective``: lexsort the unique loss
rows, then for two objectives keep each point whose second loss is a new running minimum
(``_is_pareto_front_2d``); for other counts of objectives, repeatedly take the first
remaining (non-dominated) point and drop every point it dominates (``_is_pareto_front_nd``).

Pure module: numpy only (no jax, no optuna), so it loads and tests in milliseconds.

Examples:
    >>> import numpy as np
    >>> acc_lat = np.array([[0.70, 5.0], [0.80, 9.0], [0.75, 9.0], [0.60, 4.0]])
    >>> pareto_mask(acc_lat, ["maximize", "minimize"])
    array([ True,  True, False,  True])
    >>> dominates([0.80, 9.0], [0.75, 9.0], ["maximize", "minimize"])
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

Direction = Literal["maximize", "minimize"]
DIRECTIONS: tuple[str, ...] = ("maximize", "minimize")


def _check_directions(directions: Sequence[str], n_objectives: int | None = None) -> None:
    """Raise ValueError unless `directions` is a non-empty sequence of valid directions."""
    # NOTE: a bare string is a Sequence too; "maximize" would read as 8 directions.
    if isinstance(directions, str) or not isinstance(directions, Sequence):
        raise ValueError(
            f"`directions` (={directions!r}) must be a sequence such as "
            "['maximize', 'minimize'], one entry per objective"
        )
    if len(directions) == 0:
        raise ValueError("`directions` (=[]) must name at least one objective")
    for i, d in enumerate(directions):
        if d not in DIRECTIONS:
            raise ValueError(f"`directions[{i}]` (={d!r}) must be 'maximize' or 'minimize'")
    if n_objectives is not None and len(directions) != n_objectives:
        raise ValueError(
            f"`directions` has {len(directions)} entries ({list(directions)!r}) but the "
            f"values have {n_objectives} objectives (columns); expected one direction each"
        )


def _as_float_array(name: str, values: object) -> np.ndarray:
    """Convert `values` to a float64 array, or raise ValueError naming `name`."""
    try:
        arr = np.asarray(values)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"`{name}` must be a rectangular array of numbers: {e}") from e
    if arr.dtype.kind not in "biuf":
        raise ValueError(
            f"`{name}` must hold real numbers (bool, int or float), got dtype {arr.dtype}"
        )
    return arr.astype(np.float64, copy=False)


def _as_points(values: object) -> np.ndarray:
    """`values` as a float64 `[n_points, n_objectives]` array, or raise ValueError."""
    arr = _as_float_array("values", values)
    if arr.ndim != 2:
        raise ValueError(
            f"`values` must be a 2-D array of shape [n_points, n_objectives], got shape "
            f"{arr.shape}"
        )
    return arr


def _to_loss(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Return `values` as losses: negate the "maximize" columns (optuna `_normalize_value`)."""
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    # NOTE: `+ 0.0` turns the -0.0 produced by negating 0.0 into 0.0, so it prints cleanly
    # (comparisons treat the two as equal either way).
    return values * sign + 0.0


def _unique_lexsorted(loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the unique rows of `loss` in lexicographic order and each row's unique index.

    Column 0 is the primary sort key. Equivalent to ``np.unique(loss, axis=0,
    return_inverse=True)``, but built from ``np.lexsort`` and float comparisons, so -0.0
    and 0.0 count as the same value.
    """
    order = np.lexsort(loss.T[::-1])
    sorted_loss = loss[order]
    is_new = np.ones(len(loss), dtype=bool)
    is_new[1:] = np.any(sorted_loss[1:] != sorted_loss[:-1], axis=1)
    inverse = np.empty(len(loss), dtype=np.intp)
    inverse[order] = np.cumsum(is_new) - 1
    return sorted_loss[is_new], inverse


def _front_2d(unique_lexsorted: np.ndarray) -> np.ndarray:
    """Front of unique, lexsorted 2-objective losses: a running minimum of column 1.

    Every earlier row has a smaller or equal first loss, so row ``i`` is dominated iff some
    earlier row has a second loss ``<=`` its own; it is on the front iff its second loss is a
    strict new minimum. Later rows cannot dominate it (larger first loss, or an equal first
    loss and a larger second loss).
    """
    second = unique_lexsorted[:, 1]
    running_min = np.minimum.accumulate(second)
    on_front = np.ones(len(second), dtype=bool)
    on_front[1:] = second[1:] < running_min[:-1]
    return on_front


def _front_nd(unique_lexsorted: np.ndarray) -> np.ndarray:
    """Front of unique, lexsorted losses with any number of objectives (optuna-style loop).

    Because of the lexsort no row can be dominated by a later row, so the first remaining
    row is always on the front; drop every row it dominates and repeat. A row survives iff
    it is strictly better than the new front row in some objective (rows are unique, so
    "no worse everywhere" means "dominated").
    """
    n = len(unique_lexsorted)
    on_front = np.zeros(n, dtype=bool)
    remaining = np.arange(n)
    while len(remaining):
        top = remaining[0]
        on_front[top] = True
        better_somewhere = np.any(unique_lexsorted[remaining] < unique_lexsorted[top], axis=1)
        remaining = remaining[better_somewhere]
    return on_front


def pareto_mask(values: npt.ArrayLike, directions: Sequence[Direction]) -> np.ndarray:
    """Mark the points on the Pareto front.

    Ties and duplicates: identical points do not dominate each other, so all copies of a
    front point are on the front. A point that ties another in some objectives and is
    strictly better in at least one dominates it. NaN: a point with a NaN in any objective
    is never on the front and does not affect which other points are. The result does not
    depend on the order of the points.

    Args:
        values: Objective values, shape ``[n, d]`` (an array or nested sequences): one row
            per point, one column per objective. Any real dtype; ``n`` may be 0.
        directions: One of ``"maximize"``/``"minimize"`` per column, length ``d``.

    Returns:
        A boolean array of shape ``[n]``, True where the point is on the front.

    Raises:
        ValueError: If `values` is not a 2-D array of real numbers, or `directions` is not a
            sequence of ``d`` valid directions.

    Examples:
        >>> import numpy as np
        >>> pts = np.array([[0.9, 8.0], [0.9, 8.0], [0.9, 9.0], [0.5, 1.0], [np.nan, 0.1]])
        >>> pareto_mask(pts, ["maximize", "minimize"])  # duplicates both on; NaN row off
        array([ True,  True, False,  True, False])
        >>> pareto_mask(np.array([[3.0], [1.0], [1.0]]), ["minimize"])
        array([False,  True,  True])
    """
    arr = _as_points(values)
    _check_directions(directions, arr.shape[1])
    n, d = arr.shape

    on_front = np.zeros(n, dtype=bool)
    valid = ~np.isnan(arr).any(axis=1)
    if not valid.any():
        return on_front
    loss = _to_loss(arr[valid], directions)
    unique, inverse = _unique_lexsorted(loss)
    if d == 1:
        unique_front = np.zeros(len(unique), dtype=bool)
        unique_front[0] = True  # the single smallest loss
    elif d == 2:
        unique_front = _front_2d(unique)
    else:
        unique_front = _front_nd(unique)
    on_front[valid] = unique_front[inverse]
    return on_front


def dominates(a: npt.ArrayLike, b: npt.ArrayLike, directions: Sequence[Direction]) -> bool:
    """Return whether point `a` Pareto-dominates point `b`.

    `a` dominates `b` when it is no worse in every objective and strictly better in at
    least one. Identical points do not dominate each other, and a point with a NaN neither
    dominates nor is dominated.

    Args:
        a: Objective values of the first point, length ``d``.
        b: Objective values of the second point, length ``d``.
        directions: One of ``"maximize"``/``"minimize"`` per objective, length ``d``.

    Returns:
        True if `a` dominates `b`.

    Raises:
        ValueError: If `a` or `b` is not a 1-D sequence of ``d`` real numbers, or
            `directions` is not a sequence of valid directions.

    Examples:
        >>> dominates([0.9, 5.0], [0.8, 5.0], ["maximize", "minimize"])
        True
        >>> dominates([0.9, 5.0], [0.9, 5.0], ["maximize", "minimize"])
        False
        >>> dominates([0.9, 6.0], [0.8, 5.0], ["maximize", "minimize"])  # a trade-off
        False
    """
    _check_directions(directions)
    pa = _as_float_array("a", a)
    pb = _as_float_array("b", b)
    for name, p in (("a", pa), ("b", pb)):
        if p.shape != (len(directions),):
            raise ValueError(
                f"`{name}` must have shape ({len(directions)},), one value per direction, "
                f"got shape {p.shape}"
            )
    if np.isnan(pa).any() or np.isnan(pb).any():
        return False
    la = _to_loss(pa, directions)
    lb = _to_loss(pb, directions)
    return bool(np.all(la <= lb) and np.any(la < lb))


def nondominated_fronts(
    values: npt.ArrayLike, directions: Sequence[Direction]
) -> list[np.ndarray]:
    """Non-dominated sorting: the indices of front 0 (the Pareto front), front 1 (the front
    once front 0 is removed), and so on, each sorted ascending. NaN rows come last, in a
    front of their own.

    Examples:
      >>> v = np.array([[0.9, 5.0], [0.8, 3.0], [0.7, 4.0], [0.6, 6.0]])
      >>> [f.tolist() for f in nondominated_fronts(v, ["maximize", "minimize"])]
      [[0, 1], [2], [3]]
    """
    v = _as_points(values)
    _check_directions(directions, v.shape[1])
    left = np.arange(len(v))
    nan = np.isnan(v).any(axis=1)
    fronts = []
    remaining = left[~nan]
    while remaining.size:
        mask = pareto_mask(v[remaining], directions)
        fronts.append(remaining[mask])
        remaining = remaining[~mask]
    if nan.any():
        fronts.append(left[nan])
    return fronts


def crowding_distance(values: npt.ArrayLike) -> np.ndarray:
    """NSGA-II's crowding distance of each point of one front: per objective, the gap
    between its two neighbours in that objective's order, over the objective's range,
    summed; the extremes of every objective get infinity (they are kept first).

    Examples:
      >>> crowding_distance(np.array([[1.0, 4.0], [2.0, 3.0], [3.0, 1.0]])).tolist()
      [inf, 2.0, inf]
    """
    v = _as_points(values)
    n = len(v)
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for col in v.T:
        order = np.argsort(col, kind="stable")
        span = col[order[-1]] - col[order[0]]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (col[order[2:]] - col[order[:-2]]) / span
    return distance


def rank_points(values: npt.ArrayLike, directions: Sequence[Direction]) -> np.ndarray:
    """All points ordered best first: by non-dominated front, then inside a front by
    crowding distance (largest first: the front's extremes and its sparse regions), then
    by index (a stable, documented tie-break). The first `k` are what successive halving
    promotes.

    Examples:
      >>> v = np.array([[0.9, 5.0], [0.8, 3.0], [0.85, 4.0], [0.6, 6.0]])
      >>> rank_points(v, ["maximize", "minimize"]).tolist()
      [0, 1, 2, 3]
    """
    v = _as_float_array("values", values)
    out = []
    for front in nondominated_fronts(v, directions):
        if np.isnan(v[front]).any():
            out.extend(front.tolist())
            continue
        dist = crowding_distance(v[front])
        out.extend(front[np.lexsort((front, -dist))].tolist())
    return np.asarray(out, dtype=np.intp)


def hypervolume_2d(values: npt.ArrayLike, reference: Sequence[float]) -> float:
    """The area a set of (quality to maximise, cost to minimise) points dominates above
    `reference` (a quality floor, a cost ceiling): the larger, the better the frontier.
    Points outside the reference box add nothing.

    Examples:
      >>> hypervolume_2d(np.array([[0.8, 2.0], [0.9, 4.0]]), (0.5, 5.0))
      1.0
    """
    v = _as_float_array("values", values)
    floor, ceiling = float(reference[0]), float(reference[1])
    v = v[(v[:, 0] > floor) & (v[:, 1] < ceiling)]
    if len(v) == 0:
        return 0.0
    front = v[pareto_mask(v, ["maximize", "minimize"])]
    front = front[np.lexsort((front[:, 0], front[:, 1]))]
    area, previous = 0.0, floor
    for quality, cost in front:
        area += (quality - previous) * (ceiling - cost)
        previous = quality
    return float(area)
