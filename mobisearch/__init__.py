"""mobisearch: find the most accurate MobileNet-style network for a compute budget.

`import mobisearch` never loads jax: the Flax model lives in `mobisearch.models`
(`from mobisearch.models import build_model`). `load_best` (which reads an optuna study or
an exported JSON file) loads optuna on first use.
"""

from mobisearch.arch import ArchSpec, BlockSpec, LayerSpec, round_channels
from mobisearch.cost import Cost, count_cost
from mobisearch.presets import mobilenet_v1, mobilenet_v1_small, tiny


def load_best(*args, **kwargs):  # type: ignore[no-untyped-def]
    """The best architecture of a study or exported JSON; see `mobisearch.results.load_best`."""
    from mobisearch.results import load_best as _load_best

    return _load_best(*args, **kwargs)


__all__ = [
    "ArchSpec",
    "BlockSpec",
    "Cost",
    "count_cost",
    "load_best",
    "LayerSpec",
    "mobilenet_v1",
    "mobilenet_v1_small",
    "round_channels",
    "tiny",
]
__version__ = "0.1.0"
