"""A latency model from analytic features, fitted to measured candidates (numpy only).

A sampled space is too large to measure every draw before training, so a search with a
latency budget measures a seeded sample of candidates (untrained: weights do not change
latency) and fits `LatencyModel` to them: a least-squares regression of the latency on
features of the resolved layers that the cost model gives for free (MACs of the depthwise,
pointwise and other layers, activation traffic, parameters, and the number of layers,
which stands for the per-call overhead of each kernel). It predicts a draw's latency in
microseconds; `error_report` says how good the predictions are (leave-one-out:
the share of candidates predicted within ±10%, as nn-Meter reports it).

Pure module: numpy only.

Examples:
    >>> from mobisearch.presets import mobilenet_v1_small
    >>> archs = [mobilenet_v1_small(w, r) for w in (0.25, 0.5, 0.75, 1.0) for r in (20, 28)]
    >>> ms = [0.05 + count_cost(a).macs / 1e8 for a in archs]  # a made-up device
    >>> model = LatencyModel.fit(archs, ms)
    >>> new = mobilenet_v1_small(0.6, 24)
    >>> abs(model.predict(new) - (0.05 + count_cost(new).macs / 1e8)) < 0.01
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from mobisearch.arch import ArchSpec
from mobisearch.cost import count_cost

__all__ = ["FEATURES", "LatencyModel", "error_report", "features"]

#: The features, in order.
FEATURES: tuple[str, ...] = (
    "dw_macs",
    "pw_macs",
    "other_macs",
    "activations",
    "params",
    "layers",
)


def features(arch: ArchSpec) -> np.ndarray:
    """The analytic features of `arch` (`FEATURES`), from `count_cost` and `resolve()`."""
    cost = count_cost(arch)
    macs = {"dw": 0, "pw": 0, "other": 0}
    activations = 0
    for layer, lc in zip(arch.resolve(), cost.by_layer, strict=True):
        kind = layer.op if layer.op in ("dw", "pw") else "other"
        macs[kind] += lc.macs
        activations += layer.out_hw * layer.out_hw * layer.out_ch
    return np.array(
        [
            macs["dw"],
            macs["pw"],
            macs["other"],
            activations,
            cost.params,
            len(arch.resolve()),
        ],
        dtype=np.float64,
    )


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """`latency_ms ≈ intercept + Σ weight_i · feature_i` (non-negative weights), fitted by
    least squares on features scaled to unit range.

    Attributes:
      weights: one per feature of `FEATURES`, in ms per unit of the feature.
      intercept: ms.
      n: the candidates it was fitted to.
    """

    weights: tuple[float, ...]
    intercept: float
    n: int

    @classmethod
    def fit(cls, archs: Sequence[ArchSpec], latency_ms: Sequence[float]) -> LatencyModel:
        """Fit to measured candidates (at least 2).

        Raises:
          ValueError: fewer than 2 candidates, lengths that differ, or a latency that is
            not a positive number.
        """
        y = np.asarray(latency_ms, dtype=np.float64)
        if len(archs) != len(y) or len(y) < 2:
            raise ValueError(
                f"need at least 2 candidates with one latency each, got {len(archs)} "
                f"candidates and {len(y)} latencies"
            )
        if not np.all(np.isfinite(y)) or np.any(y <= 0):
            raise ValueError(f"`latency_ms` must be positive numbers, got {y.tolist()}")
        x = np.stack([features(a) for a in archs])
        scale = np.maximum(np.abs(x).max(axis=0), 1.0)
        design = np.concatenate([np.ones((len(y), 1)), x / scale], axis=1)
        coef = _nonnegative_lstsq(design, y)
        return cls(tuple(float(w) for w in coef[1:] / scale), float(coef[0]), len(y))

    def predict(self, arch: ArchSpec) -> float:
        """The predicted latency of `arch`, in ms."""
        return float(self.intercept + np.dot(self.weights, features(arch)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(FEATURES),
            "weights": list(self.weights),
            "intercept": self.intercept,
            "n": self.n,
        }


def _nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient but the intercept kept >= 0 (a feature never
    makes a network faster): drop the most negative one and refit until none is."""
    active = list(range(a.shape[1]))
    while True:
        coef_active, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        coef = np.zeros(a.shape[1])
        coef[active] = coef_active
        negative = [i for i in active[1:] if coef[i] < 0]
        if not negative:
            return coef
        active.remove(min(negative, key=lambda i: coef[i]))


def error_report(
    archs: Sequence[ArchSpec], latency_ms: Sequence[float], *, tolerance: float = 0.10
) -> dict[str, Any]:
    """Leave-one-out error of `LatencyModel` on measured candidates: each one predicted by
    a model fitted to the others.

    Returns:
      `n`, `within` (the share predicted within `tolerance` of the measurement),
      `tolerance`, `median_abs_error` (relative) and `max_abs_error` (relative).

    Raises:
      ValueError: fewer than 3 candidates.
    """
    if len(archs) < 3:
        raise ValueError(f"need at least 3 measured candidates, got {len(archs)}")
    y = np.asarray(latency_ms, dtype=np.float64)
    errors = []
    for i in range(len(archs)):
        rest = [j for j in range(len(archs)) if j != i]
        model = LatencyModel.fit([archs[j] for j in rest], y[rest].tolist())
        errors.append(abs(model.predict(archs[i]) - y[i]) / y[i])
    e = np.asarray(errors)
    return {
        "n": len(archs),
        "within": float(np.mean(e <= tolerance)),
        "tolerance": tolerance,
        "median_abs_error": float(np.median(e)),
        "max_abs_error": float(e.max()),
    }
