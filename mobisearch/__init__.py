"""mobisearch: find the most accurate MobileNet-style network for a compute budget.

`import mobisearch` never loads jax: the Flax model lives in `mobisearch.models`
(`from mobisearch.models import build_model`). `load_best` (which reads an optuna study or
an exported JSON file) loads optuna on first use, `load_model` (a trained model from a
search's checkpoint) jax and flax.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mobisearch.arch import ArchSpec, BlockSpec, LayerSpec, round_channels
from mobisearch.cost import Cost, count_cost
from mobisearch.presets import mobilenet_v1, mobilenet_v1_small, tiny

if TYPE_CHECKING:
    from mobisearch.models import MobileNet


def load_best(*args, **kwargs):  # type: ignore[no-untyped-def]
    """The best architecture of a study or exported JSON; see `mobisearch.results.load_best`."""
    from mobisearch.results import load_best as _load_best

    return _load_best(*args, **kwargs)


def load_model(
    config: ArchSpec | str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    backend: str | None = None,
) -> MobileNet:
    """The trained Flax NNX model (eval mode) of a best-config JSON or `ArchSpec` and its
    checkpoint; see `mobisearch.export.load_trained_model`."""
    from mobisearch.export import load_trained_model

    return load_trained_model(config, checkpoint, backend=backend)


__all__ = [
    "ArchSpec",
    "BlockSpec",
    "Cost",
    "count_cost",
    "load_best",
    "load_model",
    "LayerSpec",
    "mobilenet_v1",
    "mobilenet_v1_small",
    "round_channels",
    "tiny",
]
__version__ = "0.1.0"
