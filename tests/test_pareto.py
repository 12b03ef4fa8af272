"""Tests for `mobisearch.pareto`: known fronts, dominance invariants, and input errors."""

from __future__ import annotations

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
    dominates,
    pareto_mask,
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
