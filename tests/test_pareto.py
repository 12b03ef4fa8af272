"""Tests for `mobisearch.pareto`: known fronts, dominance invariants, and input errors."""

from __future__ import annotations

import math
import subprocess
import sys

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobisearch.pareto import (
    Direction,
    _front_2d,
    _front_nd,
    _to_loss,
    _unique_lexsorted,
    crowding_distance,
    dominates,
    nondominated_fronts,
    pareto_mask,
    rank_points,
)

MAX_MIN: list[Direction] = ["maximize", "minimize"]

# A small pool of values makes ties and exact duplicates common; the wider floats (with
# infinities) cover the general case.
_elements = st.one_of(
    st.sampled_from([-1.0, 0.0, -0.0, 0.5, 1.0, 2.0]),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([np.inf, -np.inf]),
)


@st.composite
def problems(
    draw: st.DrawFn, min_d: int = 1, max_d: int = 4
) -> tuple[np.ndarray, list[Direction]]:
    """Draw (values [n, d], directions) with n in [0, 25]."""
    d = draw(st.integers(min_d, max_d))
    n = draw(st.integers(0, 25))
    values = draw(hnp.arrays(np.float64, (n, d), elements=_elements))
    directions = draw(st.lists(st.sampled_from(MAX_MIN), min_size=d, max_size=d))
    return values, directions


def _reference_mask(values: np.ndarray, directions: list[Direction]) -> np.ndarray:
    """O(n^2) definition: on the front iff finite and no other point dominates it."""
    n = len(values)
    mask = np.zeros(n, dtype=bool)
    for i in range(n):
        mask[i] = not np.isnan(values[i]).any() and not any(
            dominates(values[j], values[i], directions) for j in range(n)
        )
    return mask


# --- known small examples ---------------------------------------------------------------


def test_known_2d_front() -> None:
    # (accuracy, latency_ms): c is beaten by b (same latency, lower accuracy); e by a.
    values = np.array(
        [
            [0.70, 5.0],  # a
            [0.80, 9.0],  # b
            [0.75, 9.0],  # c
            [0.60, 4.0],  # d
            [0.65, 6.0],  # e
        ]
    )
    np.testing.assert_array_equal(pareto_mask(values, MAX_MIN), [True, True, False, True, False])


def test_known_3d_front() -> None:
    # (accuracy, latency_ms, macs)
    values = np.array(
        [
            [0.9, 10.0, 500],
            [0.8, 5.0, 100],
            [0.8, 5.0, 200],  # dominated by row 1 (more MACs, else equal)
            [0.7, 20.0, 50],
            [0.6, 30.0, 60],  # dominated by row 3
        ]
    )
    mask = pareto_mask(values, ["maximize", "minimize", "minimize"])
    np.testing.assert_array_equal(mask, [True, True, False, True, False])


def test_single_objective() -> None:
    np.testing.assert_array_equal(
        pareto_mask(np.array([[3.0], [1.0], [2.0], [1.0]]), ["minimize"]),
        [False, True, False, True],
    )
    np.testing.assert_array_equal(
        pareto_mask(np.array([[3.0], [1.0], [3.0]]), ["maximize"]), [True, False, True]
    )


def test_integer_and_list_input() -> None:
    np.testing.assert_array_equal(
        pareto_mask([[1, 2], [2, 1], [2, 2]], ["minimize", "minimize"]), [True, True, False]
    )


def test_empty_and_single() -> None:
    empty = pareto_mask(np.zeros((0, 2)), MAX_MIN)
    assert empty.dtype == bool and empty.shape == (0,)
    np.testing.assert_array_equal(pareto_mask(np.array([[0.5, 1.0]]), MAX_MIN), [True])


def test_duplicates_share_their_fate() -> None:
    values = np.array([[0.9, 5.0], [0.9, 5.0], [0.8, 5.0], [0.8, 5.0]])
    np.testing.assert_array_equal(pareto_mask(values, MAX_MIN), [True, True, False, False])


def test_signed_zero_is_a_duplicate() -> None:
    values = np.array([[0.0, 1.0], [-0.0, 1.0]])
    np.testing.assert_array_equal(pareto_mask(values, MAX_MIN), [True, True])


def test_nan_rows_are_off_and_ignored() -> None:
    values = np.array([[np.nan, 0.0], [0.5, 2.0], [0.9, np.nan], [0.4, 3.0]])
    np.testing.assert_array_equal(pareto_mask(values, MAX_MIN), [False, True, False, False])
    assert not pareto_mask(np.full((3, 2), np.nan), MAX_MIN).any()


def test_infinities_compare() -> None:
    values = np.array([[np.inf, 1.0], [1.0, -np.inf], [1.0, 1.0]])
    np.testing.assert_array_equal(
        pareto_mask(values, ["maximize", "minimize"]), [True, True, False]
    )


def test_dominates_examples() -> None:
    assert dominates([0.9, 5.0], [0.8, 5.0], MAX_MIN)
    assert not dominates([0.8, 5.0], [0.9, 5.0], MAX_MIN)
    assert not dominates([0.9, 5.0], [0.9, 5.0], MAX_MIN)  # identical
    assert not dominates([0.9, 6.0], [0.8, 5.0], MAX_MIN)  # trade-off
    assert dominates([0.9, 4.0], [0.8, 5.0], MAX_MIN)
    assert not dominates([np.nan, 1.0], [0.0, 9.0], MAX_MIN)
    assert not dominates([1.0, 1.0], [np.nan, 9.0], MAX_MIN)


# --- properties ---------------------------------------------------------------------------


@settings(deadline=None, max_examples=200)
@given(problems())
def test_front_matches_definition(problem: tuple[np.ndarray, list[Direction]]) -> None:
    values, directions = problem
    mask = pareto_mask(values, directions)
    assert mask.dtype == bool and mask.shape == (len(values),)
    # Nothing on the front is dominated by any point.
    for i in np.flatnonzero(mask):
        assert not any(dominates(v, values[i], directions) for v in values)
    # Everything finite off the front is dominated by something on the front.
    front = values[mask]
    for i in np.flatnonzero(~mask):
        if not np.isnan(values[i]).any():
            assert any(dominates(f, values[i], directions) for f in front)
    np.testing.assert_array_equal(mask, _reference_mask(values, directions))


@settings(deadline=None, max_examples=200)
@given(problems(), st.randoms(use_true_random=False))
def test_permutation_invariance(problem: tuple[np.ndarray, list[Direction]], rng) -> None:  # type: ignore[no-untyped-def]
    values, directions = problem
    perm = np.array(rng.sample(range(len(values)), len(values)), dtype=np.intp)
    mask = pareto_mask(values, directions)
    np.testing.assert_array_equal(pareto_mask(values[perm], directions), mask[perm])


@settings(deadline=None, max_examples=200)
@given(problems(min_d=2, max_d=2))
def test_2d_fast_path_equals_general_path(problem: tuple[np.ndarray, list[Direction]]) -> None:
    values, directions = problem
    finite = values[~np.isnan(values).any(axis=1)]
    if len(finite) == 0:
        return
    unique, _ = _unique_lexsorted(_to_loss(finite, directions))
    np.testing.assert_array_equal(_front_2d(unique), _front_nd(unique))


@settings(deadline=None, max_examples=100)
@given(problems(), st.integers(2, 3))
def test_duplicating_every_point_duplicates_the_mask(
    problem: tuple[np.ndarray, list[Direction]], copies: int
) -> None:
    values, directions = problem
    mask = pareto_mask(values, directions)
    np.testing.assert_array_equal(
        pareto_mask(np.tile(values, (copies, 1)), directions), np.tile(mask, copies)
    )


@settings(deadline=None, max_examples=100)
@given(problems(), st.data())
def test_nan_points_do_not_change_the_rest(
    problem: tuple[np.ndarray, list[Direction]], data: st.DataObject
) -> None:
    values, directions = problem
    d = values.shape[1]
    nan_row = np.full(d, np.inf)
    nan_row[data.draw(st.integers(0, d - 1))] = np.nan  # would dominate all, but for NaN
    with_nan = np.vstack([values, nan_row])
    mask = pareto_mask(with_nan, directions)
    assert not mask[-1]
    np.testing.assert_array_equal(mask[:-1], pareto_mask(values, directions))


@settings(deadline=None, max_examples=100)
@given(problems())
def test_nonempty_finite_input_has_a_front(problem: tuple[np.ndarray, list[Direction]]) -> None:
    values, directions = problem
    finite = values[~np.isnan(values).any(axis=1)]
    assert pareto_mask(finite, directions).any() == (len(finite) > 0)


# --- input errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "directions", "match"),
    [
        (np.array([1.0, 2.0]), MAX_MIN, "2-D array"),
        (np.zeros((2, 2, 1)), MAX_MIN, "2-D array"),
        (np.zeros((3, 2)), ["maximize"], "1 entries"),
        (np.zeros((3, 2)), ["maximize", "min"], r"directions\[1\]` \(='min'\)"),
        (np.zeros((3, 2)), "maximize", "must be a sequence"),
        (np.zeros((3, 0)), [], "at least one objective"),
        (np.array([["a", "b"]]), MAX_MIN, "real numbers"),
        ([[1.0, 2.0], [3.0]], MAX_MIN, "rectangular"),
        (np.array([[1 + 1j, 2.0]]), MAX_MIN, "real numbers"),
    ],
)
def test_pareto_mask_errors(values: object, directions: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pareto_mask(values, directions)  # type: ignore[arg-type]


def test_dominates_errors() -> None:
    with pytest.raises(ValueError, match=r"`a` must have shape \(2,\)"):
        dominates([1.0], [1.0, 2.0], MAX_MIN)
    with pytest.raises(ValueError, match=r"`b` must have shape \(2,\)"):
        dominates([1.0, 2.0], [[1.0, 2.0]], MAX_MIN)
    with pytest.raises(ValueError, match="'up'"):
        dominates([1.0], [2.0], ["up"])  # type: ignore[list-item]


def test_import_loads_no_jax_or_optuna() -> None:
    code = (
        "import sys, mobisearch.pareto; "
        "bad = [m for m in ('jax', 'optuna', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- non-dominated sorting, crowding distance, promotion ----------------------------------


def _reference_fronts(values: np.ndarray, directions: list[Direction]) -> list[list[int]]:
    """The definition: front k is the points of what is left that nothing left dominates;
    NaN rows last, in a front of their own."""
    finite = [i for i in range(len(values)) if not np.isnan(values[i]).any()]
    fronts = []
    while finite:
        front = [
            i
            for i in finite
            if not any(dominates(values[j], values[i], directions) for j in finite)
        ]
        fronts.append(front)
        finite = [i for i in finite if i not in front]
    nan = [i for i in range(len(values)) if np.isnan(values[i]).any()]
    return fronts + ([nan] if nan else [])


def _reference_crowding(values: np.ndarray) -> list[float]:
    """NSGA-II's crowding distance, as documented, one point at a time: per objective, the
    points in order of value (ties by position), the two ends infinite, every other one the
    gap between its neighbours over the objective's range."""
    n = len(values)
    if n <= 2:
        return [math.inf] * n
    distance = [0.0] * n
    for col in values.T:
        order = sorted(range(n), key=lambda i: (col[i], i))
        distance[order[0]] = distance[order[-1]] = math.inf
        span = col[order[-1]] - col[order[0]]
        for k in range(1, n - 1):
            if span > 0:
                distance[order[k]] += (col[order[k + 1]] - col[order[k - 1]]) / span
    return distance


def _reference_keys(values: np.ndarray, directions: list[Direction]) -> dict[int, tuple]:
    """Each point's promotion key: (front, -crowding distance in its front); NaN rows have
    only their front."""
    keys = {}
    for f, front in enumerate(_reference_fronts(values, directions)):
        if np.isnan(values[front]).any():
            keys |= {i: (f, 0.0) for i in front}
            continue
        dist = _reference_crowding(values[front])
        keys |= {i: (f, -d) for i, d in zip(front, dist, strict=True)}
    return keys


def _reference_rank(values: np.ndarray, directions: list[Direction]) -> list[int]:
    keys = _reference_keys(values, directions)
    return sorted(range(len(values)), key=lambda i: (*keys[i], i))


def _reference_promotion(values: np.ndarray, directions: list[Direction], k: int) -> list[int]:
    """Successive halving's selection, built front by front: whole fronts while they fit,
    then the most crowded-apart points of the next one; each front's points best first
    (largest crowding distance, ties by position)."""
    chosen: list[int] = []
    for front in _reference_fronts(values, directions):
        if not np.isnan(values[front]).any():
            dist = _reference_crowding(values[front])
            front = [
                i for i, _ in sorted(zip(front, dist, strict=True), key=lambda p: (-p[1], p[0]))
            ]
        chosen += front[: k - len(chosen)]
        if len(chosen) == k:
            break
    return chosen


# Finite values with frequent ties (crowding distances are ranges: no infinities).
_finite = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(-1e3, 1e3))


@st.composite
def finite_problems(
    draw: st.DrawFn, min_d: int = 1, max_d: int = 3, nan: bool = False
) -> tuple[np.ndarray, list[Direction]]:
    """(values [n, d], directions) with finite values (and NaN rows if `nan`), n in [0, 15]."""
    d = draw(st.integers(min_d, max_d))
    n = draw(st.integers(0, 15))
    elements = st.one_of(_finite, st.just(np.nan)) if nan else _finite
    values = draw(hnp.arrays(np.float64, (n, d), elements=elements))
    directions = draw(st.lists(st.sampled_from(MAX_MIN), min_size=d, max_size=d))
    return values, directions


@st.composite
def distinct_problems(draw: st.DrawFn) -> tuple[np.ndarray, list[Direction]]:
    """Two objectives, no two points equal in either (so no crowding ties but the ends')."""
    n = draw(st.integers(0, 12))
    cols = [
        draw(st.lists(st.integers(-1000, 1000), min_size=n, max_size=n, unique=True))
        for _ in range(2)
    ]
    values = np.array(cols, dtype=np.float64).T.reshape(n, 2)
    return values, draw(st.lists(st.sampled_from(MAX_MIN), min_size=2, max_size=2))


def test_known_fronts_and_ranking() -> None:
    # (accuracy, latency_ms)
    values = np.array(
        [
            [0.90, 9.0],  # 0: front 0 (most accurate)
            [0.80, 3.0],  # 1: front 0
            [0.85, 5.0],  # 2: front 0, between 0 and 1
            [0.70, 4.0],  # 3: front 1 (beaten by 1)
            [0.84, 6.0],  # 4: front 1 (beaten by 2)
            [0.60, 8.0],  # 5: front 2 (beaten by 3, 4)
            [np.nan, 1.0],  # 6: NaN, last
            [0.85, 5.0],  # 7: a copy of 2: front 0 too
        ]
    )
    fronts = [f.tolist() for f in nondominated_fronts(values, MAX_MIN)]
    assert fronts == [[0, 1, 2, 7], [3, 4], [5], [6]]
    # Front 0's crowding: 0 and 1 are the extremes; 2 and 7 tie in both objectives, so
    # (by position) 2 is the latency order's second point and 7 the third.
    # accuracy order 1, 2, 7, 0 (range 0.1); latency order 1, 2, 7, 0 (range 6):
    # 2: (0.85 - 0.80) / 0.1 + (5 - 3) / 6 = 0.8333; 7: (0.90 - 0.85) / 0.1 + (9 - 5) / 6.
    dist = crowding_distance(values[[0, 1, 2, 7]])
    np.testing.assert_allclose(dist, [np.inf, np.inf, 0.5 + 2 / 6, 0.5 + 4 / 6])
    assert rank_points(values, MAX_MIN).tolist() == [0, 1, 7, 2, 3, 4, 5, 6]


def test_crowding_distance_hand_computed() -> None:
    # Columns (1, 2, 4, 8) and (8, 4, 2, 1), ranges 7: point 1 (4 - 1)/7 + (8 - 2)/7,
    # point 2 (8 - 2)/7 + (4 - 1)/7.
    values = np.array([[1.0, 8.0], [2.0, 4.0], [4.0, 2.0], [8.0, 1.0]])
    np.testing.assert_allclose(crowding_distance(values), [np.inf, 9 / 7, 9 / 7, np.inf])
    # Columns (1, 2, 3, 8) and (8, 7, 2, 1): point 1 (3 - 1)/7 + (8 - 2)/7, point 2
    # (8 - 2)/7 + (7 - 1)/7: the sparser point goes first.
    values = np.array([[1.0, 8.0], [2.0, 7.0], [3.0, 2.0], [8.0, 1.0]])
    np.testing.assert_allclose(crowding_distance(values), [np.inf, 8 / 7, 12 / 7, np.inf])
    assert rank_points(values, ["minimize", "minimize"]).tolist() == [0, 3, 2, 1]
    # A constant objective adds nothing (its range is 0) but still marks two ends.
    flat = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    np.testing.assert_array_equal(crowding_distance(flat), [np.inf, 1.0, np.inf])
    assert crowding_distance(np.zeros((0, 2))).shape == (0,)
    np.testing.assert_array_equal(crowding_distance(np.ones((2, 2))), [np.inf, np.inf])


def test_sorting_empty_and_all_nan() -> None:
    assert nondominated_fronts(np.zeros((0, 2)), MAX_MIN) == []
    assert rank_points(np.zeros((0, 2)), MAX_MIN).tolist() == []
    nan = np.full((3, 2), np.nan)
    assert [f.tolist() for f in nondominated_fronts(nan, MAX_MIN)] == [[0, 1, 2]]
    assert rank_points(nan, MAX_MIN).tolist() == [0, 1, 2]


@pytest.mark.parametrize("fn", [nondominated_fronts, rank_points])
def test_sorting_errors(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="2-D array"):
        fn(np.array([1.0, 2.0]), MAX_MIN)
    with pytest.raises(ValueError, match="1 entries"):
        fn(np.zeros((3, 2)), ["maximize"])
    with pytest.raises(ValueError, match="real numbers"):
        fn(np.array([["a", "b"]]), MAX_MIN)


def test_crowding_distance_errors() -> None:
    with pytest.raises(ValueError, match=r"2-D array .* got shape \(3,\)"):
        crowding_distance(np.array([1.0, 2.0, 3.0]))


@settings(deadline=None, max_examples=60)
@given(problems(max_d=3))
def test_fronts_match_definition(problem: tuple[np.ndarray, list[Direction]]) -> None:
    values, directions = problem
    fronts = [f.tolist() for f in nondominated_fronts(values, directions)]
    assert fronts == _reference_fronts(values, directions)
    # A partition of the points, each front non-empty and sorted.
    assert sorted(i for f in fronts for i in f) == list(range(len(values)))
    assert all(f and f == sorted(f) for f in fronts)
    finite = [f for f in fronts if not np.isnan(values[f]).any()]
    for k, front in enumerate(finite):
        later = [j for f in finite[k:] for j in f]
        for i in front:  # nothing in front k is dominated by front k or a later one
            assert not any(dominates(values[j], values[i], directions) for j in later)
        if k + 1 < len(finite):  # everything in front k + 1 is dominated from front k
            for i in finite[k + 1]:
                assert any(dominates(values[j], values[i], directions) for j in front)
    if len(finite) < len(fronts):  # NaN rows: the last front, all of them
        assert fronts[-1] == np.flatnonzero(np.isnan(values).any(axis=1)).tolist()


@settings(deadline=None, max_examples=60)
@given(problems(max_d=3), st.randoms(use_true_random=False))
def test_fronts_do_not_depend_on_order(problem, rng) -> None:  # type: ignore[no-untyped-def]
    values, directions = problem
    perm = np.array(rng.sample(range(len(values)), len(values)), dtype=np.intp)
    fronts = [set(f.tolist()) for f in nondominated_fronts(values, directions)]
    permuted = [set(perm[f].tolist()) for f in nondominated_fronts(values[perm], directions)]
    assert permuted == fronts


@settings(deadline=None, max_examples=60)
@given(finite_problems(min_d=1, max_d=3))
def test_crowding_distance_matches_definition(
    problem: tuple[np.ndarray, list[Direction]],
) -> None:
    values, _ = problem
    dist = crowding_distance(values)
    np.testing.assert_allclose(dist, _reference_crowding(values), rtol=1e-12, atol=0)
    assert np.all(dist >= 0)
    if len(values):
        assert np.isinf(dist).sum() >= min(len(values), 2)


@settings(deadline=None, max_examples=60)
@given(finite_problems(nan=True))
def test_rank_points_matches_the_reference(problem: tuple[np.ndarray, list[Direction]]) -> None:
    values, directions = problem
    order = rank_points(values, directions)
    assert order.dtype == np.intp
    ref = _reference_rank(values, directions)
    # Crowding distances are float sums: equal up to rounding, so compare the keys.
    keys = _reference_keys(values, directions)
    assert [keys[i][0] for i in order] == [keys[i][0] for i in ref]
    np.testing.assert_allclose([keys[i][1] for i in order], [keys[i][1] for i in ref])
    assert sorted(order.tolist()) == list(range(len(values)))
    # NaN rows come last, in their original order.
    nan = np.isnan(values).any(axis=1)
    assert order[len(order) - nan.sum() :].tolist() == np.flatnonzero(nan).tolist()


@settings(deadline=None, max_examples=60)
@given(finite_problems(nan=True), st.integers(2, 4))
def test_promotion_is_the_brute_force_selection(
    problem: tuple[np.ndarray, list[Direction]], eta: int
) -> None:
    """The top ceil(n / eta) of `rank_points` are what successive halving promotes: whole
    fronts first, then the most crowded-apart of the next; nothing left out dominates a
    promoted point."""
    values, directions = problem
    k = math.ceil(len(values) / eta)
    top = rank_points(values, directions)[:k].tolist()
    assert top == _reference_promotion(values, directions, k)
    rest = sorted(set(range(len(values))) - set(top))
    for i in top:
        assert not any(dominates(values[j], values[i], directions) for j in rest)


@settings(deadline=None, max_examples=60)
@given(distinct_problems(), st.randoms(use_true_random=False))
def test_rank_points_does_not_depend_on_order(problem, rng) -> None:  # type: ignore[no-untyped-def]
    """Permuting the points permutes the ranking, up to ties (equal crowding distances,
    e.g. a front's extremes, are broken by position)."""
    values, directions = problem
    n = len(values)
    perm = np.array(rng.sample(range(n), n), dtype=np.intp)
    keys = _reference_keys(values, directions)
    order = rank_points(values, directions).tolist()
    permuted = perm[rank_points(values[perm], directions)].tolist()
    assert [keys[i] for i in permuted] == [keys[i] for i in order]
    for k in range(1, n):
        if keys[order[k - 1]] != keys[order[k]]:  # no tie at the cut: the same top k
            assert set(permuted[:k]) == set(order[:k])


@settings(deadline=None, max_examples=50)
@given(finite_problems(), st.integers(1, 3))
def test_nan_rows_do_not_change_the_ranking_of_the_rest(
    problem: tuple[np.ndarray, list[Direction]], extra: int
) -> None:
    values, directions = problem
    nan_rows = np.full((extra, values.shape[1]), -1e9)
    nan_rows[:, 0] = np.nan
    order = rank_points(np.vstack([values, nan_rows]), directions)
    n = len(values)
    assert order[:n].tolist() == rank_points(values, directions).tolist()
    assert order[n:].tolist() == list(range(n, n + extra))
