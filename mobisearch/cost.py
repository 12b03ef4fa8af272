"""Analytic cost model: exact MACs, parameters and activation sizes of a resolved network.

Everything here is computed from `ArchSpec.resolve()`, the one list of concrete layers that
the Flax model also builds from; no channel count or spatial size is re-derived.

Counting convention (MobileNet paper, Howard et al., https://arxiv.org/abs/1704.04861):

* **MACs.** One MAC is one multiply-add. BatchNorm, activations, residual adds and pooling
  are not counted (the paper's "Mult-Adds" column does the same). With `Df` the *output*
  spatial size, `k` the kernel, `M` input and `N` output channels:

  - standard conv: `Df²·k²·M·N / groups`;
  - depthwise conv: `Df²·M·k²`;
  - pointwise (1×1) conv: `Df²·M·N`;
  - fully connected: `M·N`; global average pooling: 0.

  A depthwise-separable block therefore costs `H·W·C_in·k² + H·W·C_in·C_out` (paper §3.1),
  against `H·W·C_in·C_out·k²` for a standard conv: a ratio of `1/C_out + 1/k²`.

* **`params`** follows Keras (`keras.applications.MobileNet(weights=None).count_params()`):
  conv weights (no conv bias), plus BatchNorm's 4 values per channel (scale, offset, moving
  mean, moving variance) after every conv, depthwise and pointwise layer, plus the
  classifier's weights and bias.

* **`weights`** follows the paper's "Parameters" column: conv and classifier weights only,
  with no BatchNorm and no bias.

* **Activations.** A layer's `activation_bytes` is the size of its input plus its output
  tensor at batch size 1 (`dtype_bytes` per value, 4 for float32). `peak_activation_bytes`
  is the largest of these: the memory a layer-by-layer executor needs at once. Tensors kept
  alive for a residual add are not included.

All counting is integer arithmetic; only `breakdown` returns floats (shares).

Examples:
    >>> from mobisearch.presets import mobilenet_v1
    >>> cost = count_cost(mobilenet_v1())
    >>> format_count(cost.macs), f"{cost.params:,}", f"{cost.weights:,}"
    ('568.7M', '4,253,864', '4,209,088')
    >>> cost.peak_activation_bytes  # blocks/0/pw: 112x112x32 in, 112x112x64 out, float32
    4816896
    >>> round(100 * breakdown(cost)["pw"][0], 2)  # paper Table 2: 94.86% of mult-adds
    94.86
    >>> parse_count("150M")
    150000000
"""

from __future__ import annotations

import dataclasses
import functools
import re
from decimal import Decimal, localcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mobisearch.arch import ArchSpec, LayerSpec

# BatchNorm keeps 4 values per channel: scale, offset, moving mean, moving variance (Keras).
_BN_VALUES_PER_CHANNEL = 4

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
# ASCII digits only: `\d` would also accept other scripts' digits.
_COUNT_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([kmg]?)", re.IGNORECASE)
_COUNT_FORMS = "a positive whole number with an optional K, M or G suffix (12345, 800K, 1.5G)"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayerCost:
    """The cost of one resolved layer.

    Attributes:
      name: the layer's path, as in `LayerSpec.name` (`"stem"`, `"blocks/3/dw"`, ...).
      op: the layer kind, as in `LayerSpec.op` (`"conv"`, `"dw"`, `"pw"`, `"pool"`, `"fc"`).
      macs: multiply-adds at batch size 1.
      params: Keras-convention parameters (weights + BatchNorm, or weights + bias for `fc`).
      weights: paper-convention parameters (conv or fc weights only).
      activation_bytes: bytes of the input plus the output tensor at batch size 1.
    """

    name: str
    op: str
    macs: int
    params: int
    weights: int
    activation_bytes: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Cost:
    """The cost of a whole network (see the module docstring for the convention).

    Attributes:
      macs: total multiply-adds at batch size 1, classifier included.
      params: Keras-convention parameter count (conv weights + BatchNorm + fc weights and bias).
      weights: paper-convention parameter count (conv + fc weights only).
      peak_activation_bytes: the largest `LayerCost.activation_bytes` of any layer.
      by_layer: per-layer costs in forward order.
    """

    macs: int
    params: int
    weights: int
    peak_activation_bytes: int
    by_layer: tuple[LayerCost, ...]


def _check_dtype_bytes(dtype_bytes: object) -> int:
    if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, int) or dtype_bytes < 1:
        raise ValueError(f"`dtype_bytes` (={dtype_bytes!r}) must be a positive integer")
    return dtype_bytes


def layer_cost(layer: LayerSpec, *, dtype_bytes: int = 4) -> LayerCost:
    """Count the MACs, parameters and activation bytes of one resolved layer.

    Args:
      layer: a layer from `ArchSpec.resolve()` (or built directly).
      dtype_bytes: bytes per activation value (4 for float32, 2 for bfloat16).

    Returns:
      The layer's `LayerCost`.

    Raises:
      ValueError: if `layer.op` is unknown, `groups` does not divide the channels of a
        standard conv, a depthwise layer changes the channel count, a pointwise layer has a
        kernel other than 1, or `dtype_bytes` is not a positive integer.

    Examples:
      >>> from mobisearch.arch import LayerSpec
      >>> dw = LayerSpec(name="dw", op="dw", in_ch=512, out_ch=512, kernel=3, in_hw=14,
      ...                out_hw=14, groups=512)
      >>> pw = LayerSpec(name="pw", op="pw", in_ch=512, out_ch=512, in_hw=14, out_hw=14)
      >>> layer_cost(dw).macs + layer_cost(pw).macs  # paper §3.3: 52.3M mult-adds
      52283392
    """
    _check_dtype_bytes(dtype_bytes)
    op = layer.op
    m, n, k, df = layer.in_ch, layer.out_ch, layer.kernel, layer.out_hw
    if op == "conv":
        g = layer.groups
        if g < 1 or m % g or n % g:
            raise ValueError(
                f"layer {layer.name!r}: `groups` (={g}) must divide in_ch (={m}) and out_ch (={n})"
            )
        weights = k * k * (m // g) * n
        macs = df * df * weights  # Df²·k²·M·N / groups
        params = weights + _BN_VALUES_PER_CHANNEL * n
    elif op == "dw":
        if m != n:
            raise ValueError(
                f"layer {layer.name!r}: depthwise in_ch (={m}) and out_ch (={n}) must be "
                "equal (depth multiplier 1)"
            )
        weights = k * k * m
        macs = df * df * weights  # Df²·M·k²
        params = weights + _BN_VALUES_PER_CHANNEL * m
    elif op == "pw":
        if k != 1:
            raise ValueError(f"layer {layer.name!r}: pointwise `kernel` (={k}) must be 1")
        weights = m * n
        macs = df * df * weights  # M·N·Df²
        params = weights + _BN_VALUES_PER_CHANNEL * n
    elif op == "fc":
        weights = m * n
        macs = weights
        params = weights + n  # + bias
    elif op == "pool":
        weights = macs = params = 0
    else:
        raise ValueError(
            f"layer {layer.name!r}: `op` (={op!r}) must be one of conv, dw, pw, pool, fc"
        )
    values = layer.in_hw * layer.in_hw * m + layer.out_hw * layer.out_hw * n
    return LayerCost(
        name=layer.name,
        op=op,
        macs=macs,
        params=params,
        weights=weights,
        activation_bytes=values * dtype_bytes,
    )


# NOTE: the candidates of a search space repeat most of their layers, and a fit report
# costs thousands of candidates; LayerCost is frozen, so sharing one per layer is safe.
@functools.lru_cache(maxsize=1 << 15)
def _layer_cost_cached(layer: LayerSpec, dtype_bytes: int) -> LayerCost:
    return layer_cost(layer, dtype_bytes=dtype_bytes)


def count_cost(arch: ArchSpec, *, dtype_bytes: int = 4) -> Cost:
    """Count the cost of a whole network from its resolved layers.

    Args:
      arch: the architecture.
      dtype_bytes: bytes per activation value (4 for float32).

    Returns:
      The totals and the per-layer costs.

    Raises:
      ValueError: if the architecture does not resolve (a channel count rounds to 0) or
        `dtype_bytes` is not a positive integer.

    Examples:
      >>> from mobisearch.presets import mobilenet_v1
      >>> c = count_cost(mobilenet_v1(width=0.25))
      >>> c.macs, c.params, c.weights
      (41030272, 475544, 463600)
    """
    _check_dtype_bytes(dtype_bytes)
    by_layer = tuple(_layer_cost_cached(layer, dtype_bytes) for layer in arch.resolve())
    return Cost(
        macs=sum(c.macs for c in by_layer),
        params=sum(c.params for c in by_layer),
        weights=sum(c.weights for c in by_layer),
        peak_activation_bytes=max(c.activation_bytes for c in by_layer),
        by_layer=by_layer,
    )


def breakdown(cost: Cost) -> dict[str, tuple[float, float]]:
    """Share of the MACs and of the weights per op kind (paper Table 2).

    Args:
      cost: a `Cost` from `count_cost`.

    Returns:
      `{op: (macs_share, weights_share)}` with shares as fractions in [0, 1], keyed by
      `LayerSpec.op` (`"conv"` = standard conv, `"dw"`, `"pw"` = 1×1, `"fc"`) in order of
      first appearance. Ops with neither MACs nor weights (pooling) are left out.

    Raises:
      ValueError: if the cost has no MACs or no weights to share out.

    Examples:
      >>> from mobisearch.presets import mobilenet_v1
      >>> {op: round(100 * w, 2) for op, (_, w) in breakdown(count_cost(mobilenet_v1())).items()}
      {'conv': 0.02, 'dw': 1.06, 'pw': 74.59, 'fc': 24.33}
    """
    if cost.macs <= 0 or cost.weights <= 0:
        raise ValueError(
            f"cannot share out macs (={cost.macs}) and weights (={cost.weights}); "
            "both must be positive"
        )
    totals: dict[str, list[int]] = {}
    for c in cost.by_layer:
        if c.macs or c.weights:
            t = totals.setdefault(c.op, [0, 0])
            t[0] += c.macs
            t[1] += c.weights
    return {op: (m / cost.macs, w / cost.weights) for op, (m, w) in totals.items()}


def parse_count(text: str) -> int:
    """Parse a human count such as a MAC budget: `"150M"`, `"20m"`, `"1.5G"`, `"800K"`.

    Suffixes are decimal and case-insensitive: K = 10³, M = 10⁶, G = 10⁹.

    Args:
      text: the count.

    Returns:
      The count as a positive integer.

    Raises:
      ValueError: naming `text` and the accepted forms if it is malformed, not a whole
        number once scaled, zero or negative.

    Examples:
      >>> parse_count("150M"), parse_count("1.5g"), parse_count("12345")
      (150000000, 1500000000, 12345)
    """
    if not isinstance(text, str):
        raise ValueError(f"count (={text!r}) must be a string: {_COUNT_FORMS}")
    match = _COUNT_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"count (={text!r}) must be {_COUNT_FORMS}")
    number, suffix = match.groups()
    with localcontext() as ctx:
        ctx.prec = len(number) + 10  # exact: the default 28 digits would round long inputs
        value = Decimal(number) * _SUFFIXES[suffix.lower()]
    if value != value.to_integral_value():
        raise ValueError(f"count (={text!r}) is not a whole number; expected {_COUNT_FORMS}")
    if value <= 0:
        raise ValueError(f"count (={text!r}) must be positive; expected {_COUNT_FORMS}")
    return int(value)


def format_count(n: int) -> str:
    """Format a count with one decimal and a K, M or G suffix: `568740352` → `"568.7M"`.

    Counts below 1000 are printed as they are. Rounding is half-up to one decimal, and a
    count that rounds to 1000 of a unit moves to the next unit (`999_960` → `"1.0M"`).

    Args:
      n: a non-negative count.

    Returns:
      The short form, which `parse_count` reads back to within half of the last digit.

    Raises:
      ValueError: if `n` is not a non-negative integer.

    Examples:
      >>> format_count(568_740_352), format_count(4_253_864), format_count(999)
      ('568.7M', '4.3M', '999')
      >>> format_count(20_000_000), format_count(20_000_001)
      ('20M', '20.0M')
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"count (={n!r}) must be a non-negative integer")
    if n < 1000:
        return str(n)
    suffix, unit = "G", 10**9  # beyond 999.9M; G has no cap
    for s, u in (("K", 10**3), ("M", 10**6)):
        if (10 * n + u // 2) // u < 10_000:
            suffix, unit = s, u
            break
    if n % unit == 0:
        return f"{n // unit}{suffix}"  # exact: `20M`, as a user types a budget
    tenths = (10 * n + unit // 2) // unit  # integer half-up rounding to 0.1 unit
    return f"{tenths // 10}.{tenths % 10}{suffix}"


def cost_record(arch: ArchSpec, cost: Cost | None = None) -> dict[str, Any]:
    """A flat, JSON-ready summary of a candidate and its cost (CLI output, trial attrs).

    Examples:
      >>> from mobisearch.presets import mobilenet_v1
      >>> cost_record(mobilenet_v1(0.5, 160))["macs"]
      76524800
    """
    cost = count_cost(arch) if cost is None else cost
    return {
        "display_id": arch.display_id,
        "width": arch.width,
        "resolution": arch.resolution,
        "kernel": arch.kernel,
        "macs": cost.macs,
        "params": cost.params,
        "weights": cost.weights,
        "peak_activation_bytes": cost.peak_activation_bytes,
    }
