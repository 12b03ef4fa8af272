"""The Flax NNX MobileNet, built from a resolved layer list: the one network every path runs.

The model reads `ArchSpec.resolve()` and nothing else: every channel count, kernel size and
stride comes from a `LayerSpec`, so the model and `mobisearch.cost` cannot disagree. Layout
is NHWC throughout. Training, validation, latency and export all run this model (train or
eval mode); its layers call the operations of `mobisearch.ops` on the model's `backend`
(`"xla"` or `"native"`, see `mobisearch.ops.default_backend`), which changes how a layer
is computed, never what it computes or what state it holds.

State paths are stable and mirror `LayerSpec.name` (so saved params stay loadable):

* `stem/conv/kernel`, `stem/bn/{scale,bias,mean,var}`
* `blocks/<i>/dw/conv/kernel`, `blocks/<i>/dw/bn/...`, `blocks/<i>/pw/conv/kernel`,
  `blocks/<i>/pw/bn/...`
* `head/{kernel,bias}`

Examples:
    >>> from flax import nnx
    >>> from mobisearch.presets import tiny
    >>> model = build_model(tiny(), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
    >>> state_size(model)
    1722
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mobisearch import ops

if TYPE_CHECKING:
    from mobisearch.arch import ArchSpec, LayerSpec

__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "BatchNorm",
    "Classifier",
    "Conv",
    "ConvBN",
    "DepthwiseConv",
    "DepthwiseSeparable",
    "MobileNet",
    "PointwiseConv",
    "abstract_split",
    "build_model",
    "split_model",
    "state_size",
]

Array = jax.Array

# NOTE: BatchNorm momentum 0.9 (PyTorch/timm's 0.1 in the other convention) rather than
# NNX's 0.99: a search trains each candidate for a few hundred steps, and with 0.99 the
# running averages would still be near their initial (0, 1) when it is evaluated.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class BatchNorm(nnx.BatchNorm, pytree=False):
    """`nnx.BatchNorm` over the last axis, with the ReLU and the residual add that follow it.

    Same state (`scale`, `bias`, `mean`, `var`), train/eval switch, statistics and running
    averages as `nnx.BatchNorm`. On the `"native"` backend each mode is one native call
    (`mobisearch.ops.batch_norm_train` / `batch_norm_eval`).
    """

    def __init__(self, num_features: int, *, backend: str, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.backend = ops.check_backend(backend)

    def params(self) -> tuple[Array, Array, Array, Array]:
        """`(scale, bias, running_mean, running_var)`."""
        assert self.scale is not None and self.bias is not None  # use_scale, use_bias
        return self.scale[...], self.bias[...], self.mean[...], self.var[...]

    def __call__(  # type: ignore[override]
        self, x: Array, *, relu: bool = False, residual: Array | None = None
    ) -> Array:
        """`[..., C] -> [..., C]`: normalise (batch statistics in training, running averages
        in eval mode), scale and shift, ReLU if `relu`, then `+ residual` if given."""
        if ops.native_applies(self.backend, x):
            if self.use_running_average:
                return ops.batch_norm_eval(
                    x, self.params(), epsilon=self.epsilon, relu=relu, residual=residual
                )
            y, mean, var = ops.batch_norm_train(
                x, self.params(), epsilon=self.epsilon, momentum=self.momentum, relu=relu
            )
            # `set_value`, not `[...] = v`: the latter asks a tracer for its sharding and
            # pays for an error message it does not raise.
            self.mean.set_value(mean)
            self.var.set_value(var)
        else:
            y = super().__call__(x)
            if relu:
                y = jax.nn.relu(y)
        return y if residual is None else y + residual


def _kernel_init(rngs: nnx.Rngs) -> Any:
    """LeCun normal, flax's default for conv kernels; zeros while the model is built for its
    shapes only (`_ShapeOnlyRngs`: the values are never used, and zeros trace in one op)."""
    if isinstance(rngs, _ShapeOnlyRngs):
        return nnx.initializers.zeros_init()
    return nnx.initializers.lecun_normal()


class DepthwiseConv(nnx.Module, pytree=False):
    """Depthwise k×k SAME conv (no bias) holding a `(k, k, 1, C)` kernel: the shape, the
    initialiser (LeCun normal, fan-in k²) and the parameter count of
    `nnx.Conv(C, C, (k, k), feature_group_count=C, use_bias=False)`."""

    def __init__(
        self, channels: int, kernel: int, stride: int, *, backend: str, rngs: nnx.Rngs
    ) -> None:
        self.kernel = nnx.Param(_kernel_init(rngs)(rngs.params(), (kernel, kernel, 1, channels)))
        self.stride = stride
        self.backend = ops.check_backend(backend)

    def __call__(self, x: Array) -> Array:
        """`[b, h, w, C] -> [b, ceil(h/s), ceil(w/s), C]`."""
        return ops.depthwise_conv(x, self.kernel[...], stride=self.stride, backend=self.backend)


class PointwiseConv(nnx.Module, pytree=False):
    """1×1 conv (no bias) holding a `(1, 1, C_in, C_out)` kernel: the shape, initialiser
    and parameter count of `nnx.Conv(C_in, C_out, (1, 1), use_bias=False)`."""

    def __init__(self, in_ch: int, out_ch: int, *, backend: str, rngs: nnx.Rngs) -> None:
        self.kernel = nnx.Param(_kernel_init(rngs)(rngs.params(), (1, 1, in_ch, out_ch)))
        self.backend = ops.check_backend(backend)

    def __call__(self, x: Array) -> Array:
        """`[b, h, w, C_in] -> [b, h, w, C_out]`."""
        return ops.pointwise_conv(x, self.kernel[...], backend=self.backend)


class Conv(nnx.Module, pytree=False):
    """Standard k×k SAME conv (no bias) holding an HWIO `(k, k, C_in, C_out)` kernel: the
    state and numbers of `nnx.Conv(C_in, C_out, (k, k), strides=s, padding="SAME",
    use_bias=False)`."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, *, backend: str, rngs: nnx.Rngs
    ) -> None:
        shape = (kernel, kernel, in_ch, out_ch)
        self.kernel = nnx.Param(_kernel_init(rngs)(rngs.params(), shape))
        self.stride = stride
        self.backend = ops.check_backend(backend)

    def __call__(self, x: Array) -> Array:
        """`[b, h, w, C_in] -> [b, ceil(h/s), ceil(w/s), C_out]`."""
        return ops.conv(x, self.kernel[...], stride=self.stride, backend=self.backend)


class ConvBN(nnx.Module, pytree=False):
    """One resolved conv layer: conv (no bias) → BatchNorm → ReLU if `layer.act`.

    `op="conv"` uses `Conv`, `op="dw"` `DepthwiseConv` and `op="pw"` `PointwiseConv`.
    Attributes: `conv`, `bn`, `act`.
    """

    def __init__(self, layer: LayerSpec, *, backend: str, rngs: nnx.Rngs) -> None:
        """Build from a `LayerSpec` with `op` in `conv`, `dw`, `pw`.

        Raises:
          ValueError: if `layer` is not a conv layer of a consistent shape.
        """
        self.conv: DepthwiseConv | PointwiseConv | Conv
        if layer.op == "dw":
            if layer.groups != layer.in_ch or layer.in_ch != layer.out_ch:
                raise ValueError(
                    f"{layer.name}: depthwise layer needs groups == in_ch == out_ch, got "
                    f"groups={layer.groups}, in_ch={layer.in_ch}, out_ch={layer.out_ch}"
                )
            self.conv = DepthwiseConv(
                layer.in_ch, layer.kernel, layer.stride, backend=backend, rngs=rngs
            )
        elif layer.op == "pw":
            if layer.groups != 1 or layer.kernel != 1 or layer.stride != 1:
                raise ValueError(
                    f"{layer.name}: a pointwise layer needs kernel 1, stride 1 and groups 1, "
                    f"got kernel={layer.kernel}, stride={layer.stride}, groups={layer.groups}"
                )
            self.conv = PointwiseConv(layer.in_ch, layer.out_ch, backend=backend, rngs=rngs)
        elif layer.op == "conv":
            if layer.groups != 1:
                raise ValueError(f"{layer.name}: `groups` (={layer.groups}) must be 1")
            self.conv = Conv(
                layer.in_ch, layer.out_ch, layer.kernel, layer.stride, backend=backend, rngs=rngs
            )
        else:
            raise ValueError(
                f"{layer.name}: `op` (={layer.op!r}) must be 'conv', 'dw' or 'pw' for ConvBN"
            )
        self.bn = BatchNorm(
            layer.out_ch, backend=backend, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs
        )
        self.act = layer.act

    def __call__(self, x: Array, *, residual: Array | None = None) -> Array:
        """`[b, h, w, in_ch] -> [b, ceil(h/s), ceil(w/s), out_ch]`, `+ residual` if given."""
        conv = self.conv
        if (
            isinstance(conv, DepthwiseConv)
            and residual is None
            and self.bn.use_running_average
            and ops.native_applies(conv.backend, x)
        ):
            # Eval mode: the conv, its BatchNorm and ReLU in one native pass.
            return ops.depthwise_batch_norm_eval(
                x,
                conv.kernel[...],
                self.bn.params(),
                stride=conv.stride,
                epsilon=self.bn.epsilon,
                relu=self.act,
            )
        return self.bn(conv(x), relu=self.act, residual=residual)


class DepthwiseSeparable(nnx.Module, pytree=False):
    """A depthwise-separable block: `dw` (ConvBN) → `pw` (ConvBN) [+ input if residual].

    MACs: `H·W·C_in·k² + H·W·C_in·C_out` (paper §3.1), H×W being the output size.
    """

    def __init__(self, dw: LayerSpec, pw: LayerSpec, *, backend: str, rngs: nnx.Rngs) -> None:
        """Build from the block's two resolved layers.

        Raises:
          ValueError: if the layers do not form a block.
        """
        if dw.op != "dw" or pw.op != "pw" or dw.block != pw.block or dw.out_ch != pw.in_ch:
            raise ValueError(f"layers {dw.name!r} and {pw.name!r} do not form a dw → pw block")
        if dw.residual:
            raise ValueError(f"{dw.name}: `residual` is only supported on the pw layer")
        if pw.residual and (dw.stride != 1 or dw.in_ch != pw.out_ch):
            raise ValueError(
                f"{pw.name}: a residual needs stride 1 and in_ch == out_ch, got stride "
                f"{dw.stride}, {dw.in_ch} -> {pw.out_ch} channels"
            )
        self.dw = ConvBN(dw, backend=backend, rngs=rngs)
        self.pw = ConvBN(pw, backend=backend, rngs=rngs)
        self.residual = pw.residual

    def __call__(self, x: Array) -> Array:
        """`[b, h, w, C_in] -> [b, ceil(h/s), ceil(w/s), C_out]`."""
        return self.pw(self.dw(x), residual=x if self.residual else None)


class Classifier(nnx.Module, pytree=False):
    """Global average pool, then a dense layer with bias: the state (`kernel` `[C, K]`,
    `bias` `[K]`) and initialisation of `nnx.Linear(C, K)` after `mean` over (h, w)."""

    def __init__(self, in_ch: int, out_ch: int, *, backend: str, rngs: nnx.Rngs) -> None:
        self.kernel = nnx.Param(_kernel_init(rngs)(rngs.params(), (in_ch, out_ch)))
        self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
        self.backend = ops.check_backend(backend)

    def __call__(self, x: Array) -> Array:
        """`[b, h, w, C] -> [b, K]` logits."""
        return ops.head(x, self.kernel[...], self.bias[...], backend=self.backend)


class MobileNet(nnx.Module, pytree=False):
    """MobileNet-style classifier: `stem` → `blocks` → global average pool → `head`.

    Build it with `build_model`. Train/eval mode is NNX's: `model.train()` makes every
    BatchNorm normalise with batch statistics and update its running averages (the state
    right after construction); `model.eval()` makes it use the running averages.

    Attributes:
      stem: `ConvBN` for the `stem` layer.
      blocks: `nnx.List` of `DepthwiseSeparable`, `blocks[i]` built from `blocks/<i>/*`.
      head: `Classifier` (pool and dense).
      layers: the resolved layers it was built from.
      backend: the backend its operations run on.
      in_ch, num_classes: input channels and classifier outputs.
    """

    def __init__(self, layers: Sequence[LayerSpec], *, backend: str, rngs: nnx.Rngs) -> None:
        """Build from a resolved layer list (`ArchSpec.resolve()`).

        Raises:
          ValueError: if the layer list is not conv, (dw, pw)*, pool, fc.
        """
        layers = tuple(layers)
        ops_ = [layer.op for layer in layers]
        if (
            len(layers) < 3
            or ops_[0] != "conv"
            or ops_[-2:] != ["pool", "fc"]
            or ops_[1:-2] != ["dw", "pw"] * ((len(ops_) - 3) // 2)
        ):
            raise ValueError(
                f"`layers` (ops {ops_}) must be conv, (dw, pw)*, pool, fc as "
                "ArchSpec.resolve() returns them"
            )
        self.layers = layers
        self.backend = ops.check_backend(backend)
        self.in_ch = layers[0].in_ch
        self.num_classes = layers[-1].out_ch
        self.stem = ConvBN(layers[0], backend=backend, rngs=rngs)
        self.blocks = nnx.List(
            [
                DepthwiseSeparable(dw, pw, backend=backend, rngs=rngs)
                for dw, pw in zip(layers[1:-2:2], layers[2:-2:2], strict=True)
            ]
        )
        fc = layers[-1]
        self.head = Classifier(fc.in_ch, fc.out_ch, backend=backend, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """Classify a batch of images.

        Args:
          x: `[b, h, w, in_ch]` float images (NHWC). Any h, w work (the pool is global),
            but the cost model assumes `h = w = arch.resolution`.

        Returns:
          Logits `[b, num_classes]`.

        Raises:
          ValueError: if `x` is not 4-D with `in_ch` channels.
        """
        if x.ndim != 4 or x.shape[-1] != self.in_ch:
            raise ValueError(
                f"`x` must be NHWC [b, h, w, {self.in_ch}], got shape {tuple(x.shape)}"
            )
        y = self.stem(x)
        for block in self.blocks:
            y = block(y)
        return self.head(y)

    def loss(self, x: Array, labels: Array, *, smoothing: float = 0.0) -> Array:
        """Mean softmax cross-entropy of `self(x)` against integer `labels` `[b]`, with
        optax's label smoothing: what training minimises."""
        return ops.softmax_cross_entropy(
            self(x), labels, smoothing=smoothing, backend=self.backend
        )


def build_model(arch: ArchSpec, *, rngs: nnx.Rngs, backend: str | None = None) -> MobileNet:
    """Build the Flax NNX model for `arch` (the only constructor the rest of the code uses).

    Initialisation is flax's default for these layers: kernels LeCun normal (truncated
    normal with standard deviation `1/sqrt(fan_in)`, fan-in `k²·C_in/groups`), biases 0,
    BatchNorm scale 1, running mean 0 and variance 1; the kernels come from one RNG draw
    (`_init_state`).

    Args:
      arch: the architecture; its `resolve()` gives every channel count.
      rngs: RNG streams, e.g. `nnx.Rngs(seed)`; one `params` key initialises the weights.
      backend: one of `mobisearch.ops.BACKENDS`; default `mobisearch.ops.default_backend()`.

    Returns:
      A `MobileNet` in training mode (call `.eval()` for inference).

    Raises:
      ValueError: on an unknown `backend`.
    """
    graphdef, state = abstract_split(arch, backend=backend)
    return nnx.merge(graphdef, _init_state(state, rngs.params()))


class _ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` while a model is built for its shapes only: every stream
    gives the same key, and no RNG counter is updated."""

    def __init__(self) -> None:
        self._key = jax.random.key(0)

    def __getattr__(self, stream: str) -> Any:
        if stream.startswith("_"):
            raise AttributeError(stream)
        return lambda: self._key


# NOTE: building a model under `nnx.eval_shape` with real `nnx.Rngs` spends most of its time
# updating RNG counters on tracers; `_ShapeOnlyRngs` gives the same graph and state, and
# the values come from `_init_state` anyway. Our modules are not JAX pytrees
# (`pytree=False`): nothing passes a module through a transform unsplit, and flax then
# skips its check of every attribute assignment.
@functools.lru_cache(maxsize=64)
def _abstract_split(arch: ArchSpec, backend: str) -> tuple[Any, Any]:
    layers = arch.resolve()
    rngs: Any = _ShapeOnlyRngs()
    abstract = nnx.eval_shape(lambda: MobileNet(layers, backend=backend, rngs=rngs))
    return nnx.split(abstract)


def abstract_split(arch: ArchSpec, *, backend: str | None = None) -> tuple[Any, Any]:
    """`nnx.split` of `build_model(arch, ...)` without its values: `(graphdef, state)`, the
    model in training mode, `jax.ShapeDtypeStruct` leaves. Built once per architecture and
    backend (cached: do not modify the state's Variables)."""
    backend = ops.default_backend() if backend is None else ops.check_backend(backend)
    return _abstract_split(arch, backend)


# Variable names by initial value; a new kind of variable must be added here on purpose.
_ONES = ("scale", "var")
_ZEROS = ("bias", "mean")


def _init_state(state: Any, key: Array) -> Any:
    """A new state like the abstract `state`, holding the initial values: kernels from ONE
    random draw (`state` itself is left as it is).

    NOTE: XLA:CPU compiles every `jax.random` call of a new shape separately, so flax's
    layer-by-layer init would compile one program per kernel shape; one draw of a
    power-of-two length compiles once. Each kernel takes the next slice of the draw, scaled as
    `nnx.initializers.lecun_normal()` scales it.
    """
    flat = nnx.to_flat_state(state)
    kernels = [(path, var) for path, var in flat if path[-1] == "kernel"]
    total = sum(math.prod(var.shape) for _, var in kernels)
    length = max(1024, 1 << (total - 1).bit_length())
    # lecun_normal = variance_scaling(1, "fan_in", "truncated_normal"): a normal truncated to
    # [-2, 2] (std 0.8796), rescaled to std sqrt(1 / fan_in).
    draw: Any = jax.random.truncated_normal(key, -2.0, 2.0, (length,), jnp.float32)
    if not isinstance(draw, jax.core.Tracer):
        # Slice on the host: eager slices on the device would each compile again.
        draw = np.asarray(draw)
    values, offset = {}, 0
    for path, var in flat:
        name, shape = path[-1], tuple(var.shape)
        if name == "kernel":
            size = math.prod(shape)
            fan_in = math.prod(shape[:-1])
            std = np.float32(1.0 / math.sqrt(fan_in) / 0.87962566103423978)
            value = draw[offset : offset + size].reshape(shape) * std
            offset += size
        elif name in _ONES:
            value = np.ones(shape, var.dtype)
        elif name in _ZEROS:
            value = np.zeros(shape, var.dtype)
        else:
            raise ValueError(
                f"no initial value defined for model variable {'/'.join(map(str, path))}"
            )
        values[path] = jnp.asarray(value, var.dtype)
    return nnx.from_flat_state([(path, var.replace(values[path])) for path, var in flat])


def split_model(model: nnx.Module) -> tuple[Any, Any, Any]:
    """`(graphdef, params, rest)`: the static graph, the `nnx.Param`s, everything else
    (BatchNorm statistics), as `nnx.split(model, nnx.Param, ...)` gives them."""
    parts: Any = nnx.split(model, nnx.Param, ...)
    return parts[0], parts[1], parts[2]


def state_size(model: nnx.Module) -> int:
    """Number of scalars in the model's params plus BatchNorm statistics.

    This is `mobisearch.cost.count_cost(arch).params`: conv and fc weights, the fc bias,
    and 4 per BatchNorm channel (scale, bias, running mean, running variance).
    """
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))
