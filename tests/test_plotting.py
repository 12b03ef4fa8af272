"""Tests for `mobisearch.plotting`: `frontier_info` by equality, `plot_frontier` by output."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mobisearch.plotting import FrontierInfo, frontier_info, plot_frontier


def _rec(display_id: str, latency_ms: Any, val_accuracy: Any, macs: Any = 1_000_000) -> dict:
    return {
        "display_id": display_id,
        "latency_ms": latency_ms,
        "val_accuracy": val_accuracy,
        "macs": macs,
    }


RECORDS = [
    _rec("mnv1_w025_r128_k3", 1.0, 0.40, 14_000_000),
    _rec("mnv1_w050_r128_k3", 2.0, 0.55, 49_000_000),
    _rec("mnv1_w050_r160_k3", 3.0, 0.50, 77_000_000),  # slower and worse than w050_r128
    _rec("mnv1_w075_r160_k3", 4.0, 0.65, 162_000_000),
    _rec("mnv1_w100_r224_k3", 8.0, 0.70, 569_000_000),
]


def assert_info_equal(actual: FrontierInfo, expected: FrontierInfo) -> None:
    assert actual._fields == expected._fields
    for name, a, e in zip(actual._fields, actual, expected, strict=True):
        if isinstance(e, np.ndarray):
            assert isinstance(a, np.ndarray) and a.dtype == e.dtype, name
            np.testing.assert_array_equal(a, e, err_msg=name)
        else:
            assert a == e, name


def test_frontier_info_equality() -> None:
    info = frontier_info(RECORDS, title="quick")
    expected = FrontierInfo(
        ids=tuple(r["display_id"] for r in RECORDS),
        x=np.array([1.0, 2.0, 3.0, 4.0, 8.0]),
        y=np.array([0.40, 0.55, 0.50, 0.65, 0.70]),
        color=np.array([14e6, 49e6, 77e6, 162e6, 569e6]),
        front=np.array([True, True, False, True, True]),
        xlabel="latency (ms, batch 1)",
        ylabel="validation accuracy",
        colorlabel="MACs",
        title="quick",
    )
    assert_info_equal(info, expected)


def test_frontier_info_drops_incomplete_records() -> None:
    records: list[dict[str, Any]] = [
        _rec("ok", 2.0, 0.5),
        {"display_id": "no_latency", "val_accuracy": 0.9, "macs": 1},
        {"display_id": "no_accuracy", "latency_ms": 0.1, "macs": 1},
        _rec("nan_accuracy", 0.1, math.nan),
        _rec("none_latency", None, 0.99),
        {"display_id": "no_macs", "latency_ms": 3.0, "val_accuracy": 0.6},
    ]
    info = frontier_info(records)
    assert_info_equal(
        info,
        FrontierInfo(
            ids=("ok", "no_macs"),
            x=np.array([2.0, 3.0]),
            y=np.array([0.5, 0.6]),
            color=np.array([1e6, np.nan]),
            front=np.array([True, True]),
            xlabel="latency (ms, batch 1)",
            ylabel="validation accuracy",
            colorlabel="MACs",
            title="",
        ),
    )


def test_frontier_info_other_axes_and_batch_size() -> None:
    records = [{**r, "latency_batch": 8} for r in RECORDS]
    info = frontier_info(records, x="macs", y="val_accuracy", color="latency_ms")
    assert info.xlabel == "MACs"
    assert info.colorlabel == "latency (ms, batch 8)"
    np.testing.assert_array_equal(info.front, [True, True, False, True, True])


def test_frontier_info_empty_and_errors() -> None:
    info = frontier_info([])
    assert info.ids == () and info.x.shape == (0,) and info.front.shape == (0,)
    with pytest.raises(ValueError, match=r"records\[0\] has no 'display_id'"):
        frontier_info([{"latency_ms": 1.0, "val_accuracy": 0.5}])
    with pytest.raises(ValueError, match=r"records\[1\]\['latency_ms'\] \(='fast'\)"):
        frontier_info([_rec("a", 1.0, 0.5), _rec("b", "fast", 0.5)])
    with pytest.raises(ValueError, match="different batch sizes"):
        frontier_info([{**RECORDS[0], "latency_batch": 1}, {**RECORDS[1], "latency_batch": 2}])


def test_plot_frontier_writes_png(tmp_path: Path) -> None:
    from matplotlib.image import imread

    info = frontier_info(RECORDS, title="quick.toml frontier")
    path = tmp_path / "frontier.png"
    assert plot_frontier(info, path=str(path)) == str(path)
    assert path.stat().st_size > 10_000
    image = imread(path)
    height, width = image.shape[:2]
    # 7 x 4.5 in at 150 dpi, give or take the tight bounding box.
    assert 800 <= width <= 1300 and 500 <= height <= 900
    assert image.std() > 0  # not a blank canvas


def test_plot_frontier_draws_on_given_axes(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    info = frontier_info(RECORDS + [_rec("no_color", 5.0, 0.1, None)])
    ax = Figure().add_subplot()
    assert plot_frontier(info, ax) is ax
    (step,) = ax.lines
    np.testing.assert_array_equal(step.get_xdata(), [1.0, 2.0, 4.0, 8.0])
    np.testing.assert_array_equal(step.get_ydata(), [0.40, 0.55, 0.65, 0.70])
    assert step.get_drawstyle() == "steps-post"
    texts = {t.get_text() for t in ax.texts}
    assert texts == {r["display_id"] for r in RECORDS} - {"mnv1_w050_r160_k3"}
    assert ax.get_xlabel() == "latency (ms, batch 1)"
    assert ax.get_ylabel() == "validation accuracy"
    assert ax.get_legend() is not None  # explains the grey, colourless point
    # With both `ax` and `path`, the axes' figure is saved.
    saved = plot_frontier(info, Figure().add_subplot(), path=tmp_path / "with_ax.png")
    assert saved == str(tmp_path / "with_ax.png") and Path(saved).stat().st_size > 0


def test_plot_frontier_duplicates_share_a_label() -> None:
    from matplotlib.figure import Figure

    info = frontier_info([_rec("a", 1.0, 0.5), _rec("b", 1.0, 0.5), _rec("c", 2.0, 0.4)])
    ax = Figure().add_subplot()
    plot_frontier(info, ax)
    assert [t.get_text() for t in ax.texts] == ["a, b"]


def test_plot_frontier_empty_info(tmp_path: Path) -> None:
    path = plot_frontier(frontier_info([]), path=tmp_path / "empty.png")
    assert Path(path).stat().st_size > 0


def test_plot_frontier_with_pyplot() -> None:
    import matplotlib.pyplot as plt

    ax = plot_frontier(frontier_info(RECORDS))
    try:
        assert ax.get_title() == ""
        assert len(ax.lines) == 1
    finally:
        plt.close(ax.figure)  # type: ignore[arg-type]


def test_plot_frontier_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"mobisearch\[plot\]"):
        plot_frontier(frontier_info(RECORDS))
