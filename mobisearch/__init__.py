"""mobisearch: find the most accurate MobileNet-style network for a compute budget.

Only the pure core is imported here, so `import mobisearch` never loads jax. The Flax
model lives in `mobisearch.models` (`from mobisearch.models import build_model`).
"""

from mobisearch.arch import ArchSpec, BlockSpec, LayerSpec, round_channels
from mobisearch.presets import mobilenet_v1, mobilenet_v1_small, tiny

__all__ = [
    "ArchSpec",
    "BlockSpec",
    "LayerSpec",
    "mobilenet_v1",
    "mobilenet_v1_small",
    "round_channels",
    "tiny",
]
__version__ = "0.1.0"
