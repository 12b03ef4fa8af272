"""The operations the model's layers call, on one of two backends.

* `"xla"`: plain JAX, differentiated by JAX. Runs on every platform; the reference.
* `"native"`: on the CPU, the C++ kernels of `mobisearch.kernels` (float32), each paired
  with its gradient in a `jax.custom_vjp`, so the layers stay ordinary differentiable
  functions and the train step is JAX autodiff of the model's own loss. Where a kernel
  does not apply (another platform, another dtype, the library could not be built) the
  operation runs its XLA form.

`default_backend()` picks `"native"` on a CPU where the kernels build, `"xla"` otherwise;
`$MOBISEARCH_BACKEND` overrides it. Why each native operation exists is written next to
it; the measurements are in docs/performance.md.

Layout is NHWC throughout; convolutions use TF/Keras SAME padding (`same_pads`).

Examples:
    >>> x = jnp.ones((1, 5, 5, 2))
    >>> k = jnp.ones((3, 3, 1, 2))
    >>> depthwise_conv(x, k, stride=2, backend="xla")[0, :, :, 0]
    Array([[4., 6., 4.],
           [6., 9., 6.],
           [4., 6., 4.]], dtype=float32)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.custom_derivatives import SymbolicZero

from mobisearch import kernels

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "batch_norm_eval",
    "batch_norm_train",
    "check_backend",
    "conv",
    "default_backend",
    "depthwise_batch_norm_eval",
    "depthwise_conv",
    "depthwise_grouped",
    "depthwise_shift",
    "grouped_depthwise",
    "head",
    "inference_backend",
    "native_applies",
    "pointwise_conv",
    "same_pads",
    "softmax_cross_entropy",
    "take_rows",
]

Array = jax.Array
#: The backends an operation can run on.
BACKENDS: tuple[str, ...] = ("xla", "native")
#: Environment variable that overrides `default_backend` (`xla` or `native`).
BACKEND_ENV_VAR = "MOBISEARCH_BACKEND"


def check_backend(backend: object) -> str:
    """Return `backend` if it names one of `BACKENDS`; raise ValueError naming it otherwise."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"`backend` (={backend!r}) must be one of {BACKENDS}")
    return backend


def default_backend(platform: str | None = None) -> str:
    """`"native"` on a CPU where the kernels build, `"xla"` elsewhere; `$MOBISEARCH_BACKEND`
    overrides it.

    Args:
      platform: `"cpu"`, `"gpu"`, ...; default `jax.default_backend()`.

    Raises:
      ValueError: if `$MOBISEARCH_BACKEND` names no backend.
    """
    override = os.environ.get(BACKEND_ENV_VAR, "").strip()
    if override:
        if override not in BACKENDS:
            raise ValueError(
                f"environment variable {BACKEND_ENV_VAR} (={override!r}) must be one of {BACKENDS}"
            )
        return override
    platform = platform or jax.default_backend()
    return "native" if platform == "cpu" and kernels.available() else "xla"


@functools.cache
def _cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512 (Linux: `/proc/cpuinfo`'s flags; elsewhere assumed)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return True


# NOTE: the eval-mode native kernels (the fused depthwise + BatchNorm + ReLU pass, the
# BatchNorm affine) beat XLA's fusions on the AVX-512 CPUs measured, but on an AVX2-only
# CPU XLA's shift-and-add with YNNPACK's fusions ran every inference case faster
# (docs/performance.md). Training keeps the native kernels on both.
def inference_backend(backend: str) -> str:
    """The backend a model trained on `backend` runs its eval-mode programs (validation,
    latency) on: `"native"` only on a CPU with AVX-512, else `"xla"`; the same network and
    state either way."""
    if check_backend(backend) == "native" and not _cpu_has_avx512():
        return "xla"
    return backend


def native_applies(backend: str, *arrays: Any) -> bool:
    """Whether `backend` runs the native kernels on `arrays`: it is `"native"`, JAX runs on
    the CPU, every array is float32, and the kernels are built."""
    return (
        backend == "native"
        and jax.default_backend() == "cpu"
        and all(a.dtype == jnp.float32 for a in arrays)
        and kernels.available()
    )


def same_pads(in_size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TF/Keras SAME padding along one spatial axis.

    `out = ceil(in / stride)`, `pad_total = max((out - 1)·stride + k - in, 0)`, with the
    smaller half before: `low = pad_total // 2`, `high = pad_total - low`.

    Returns:
      `(out, low, high)`.

    Examples:
      >>> same_pads(28, 3, 1), same_pads(28, 3, 2), same_pads(7, 3, 2)
      ((28, 1, 1), (14, 0, 1), (4, 1, 1))
    """
    out = -(-in_size // stride)
    total = max((out - 1) * stride + kernel - in_size, 0)
    return out, total // 2, total - total // 2


def _lead_pads(x: Array, k: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """`((lo_h, lo_w), (out_h, out_w))` of a SAME k×k conv of NHWC `x`."""
    out_h, lo_h, _ = same_pads(x.shape[1], k, stride)
    out_w, lo_w, _ = same_pads(x.shape[2], k, stride)
    return (lo_h, lo_w), (out_h, out_w)


# --- depthwise convolution ---------------------------------------------------------------


def _check_depthwise_args(x: Array, kernel: Array, stride: int) -> None:
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"`stride` (={stride!r}) must be 1 or 2")
    if x.ndim != 4:
        raise ValueError(f"`x` must be NHWC [b, h, w, c], got shape {tuple(x.shape)}")
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 1:
        raise ValueError(f"`kernel` must have shape (k, k, 1, C), got {tuple(kernel.shape)}")
    if kernel.shape[3] != x.shape[3]:
        raise ValueError(
            f"`kernel` has {kernel.shape[3]} channels but `x` has {x.shape[3]} "
            f"(x: {tuple(x.shape)}, kernel: {tuple(kernel.shape)})"
        )


def depthwise_grouped(x: Array, kernel: Array, stride: int) -> Array:
    """Depthwise SAME conv as XLA's grouped convolution (`feature_group_count=C`): what
    `nnx.Conv(C, C, (k, k), feature_group_count=C)` runs, and the reference of the others."""
    k = kernel.shape[0]
    _, lo_h, hi_h = same_pads(x.shape[1], k, stride)
    _, lo_w, hi_w = same_pads(x.shape[2], k, stride)
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((lo_h, hi_h), (lo_w, hi_w)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[3],
    )


def depthwise_shift(x: Array, kernel: Array, stride: int) -> Array:
    """Depthwise SAME conv as shift-and-add: pad once, then sum the k² strided slices of
    the padded input, each times its per-channel weight (XLA fuses it into one loop).

    `y[b, o, p, c] = Σ_ij x_pad[b, o·s + i, p·s + j, c] · kernel[i, j, 0, c]`.
    """
    k = kernel.shape[0]
    out_h, lo_h, hi_h = same_pads(x.shape[1], k, stride)
    out_w, lo_w, hi_w = same_pads(x.shape[2], k, stride)
    xp = jnp.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
    b, _, _, c = xp.shape
    terms = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
            (1, stride, stride, 1),
        )
        * kernel[i, j][None, None]
        for i in range(k)
        for j in range(k)
    ]
    return functools.reduce(lambda a, t: a + t, terms)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_native(x: Array, kernel: Array, stride: int) -> Array:
    pads, out_hw = _lead_pads(x, kernel.shape[0], stride)
    return kernels.depthwise_forward(x, kernel, stride=stride, pads=pads, out_hw=out_hw)


def _depthwise_native_fwd(x: Array, kernel: Array, stride: int) -> tuple[Array, Any]:
    return _depthwise_native(x, kernel, stride), (x, kernel)


def _depthwise_native_bwd(stride: int, res: Any, g: Array) -> tuple[Array, Array]:
    x, kernel = res
    pads, _ = _lead_pads(x, kernel.shape[0], stride)
    return kernels.depthwise_backward(x, kernel, g, stride=stride, pads=pads)


_depthwise_native.defvjp(_depthwise_native_fwd, _depthwise_native_bwd)


_GROUPED_DEPTHWISE = contextvars.ContextVar("mobisearch_grouped_depthwise", default=False)


@contextlib.contextmanager
def grouped_depthwise() -> Iterator[None]:
    """Within it, `depthwise_conv` on `"xla"` traces `depthwise_grouped` on the CPU too.

    For ONNX export (`mobisearch.export`): an exporter maps the grouped convolution to one
    ONNX `Conv` with `group=C`, where shift-and-add would become k² slices. Same numbers.
    """
    token = _GROUPED_DEPTHWISE.set(True)
    try:
        yield
    finally:
        _GROUPED_DEPTHWISE.reset(token)


# NOTE: on the CPU, XLA's grouped convolution is an order of magnitude slower than
# shift-and-add in the forward and the backward pass; on GPU/TPU the grouped convolution
# reaches cuDNN's and the TPU compiler's depthwise kernels.
def depthwise_conv(x: Array, kernel: Array, *, stride: int, backend: str = "xla") -> Array:
    """Depthwise k×k convolution with SAME padding.

    The same numbers as `nnx.Conv(C, C, (k, k), strides=s, padding="SAME",
    feature_group_count=C, use_bias=False)` with that kernel. On `"xla"` it is
    `depthwise_shift` on the CPU (`depthwise_grouped` inside `grouped_depthwise()`) and
    `depthwise_grouped` elsewhere; on `"native"` one C++ pass forward and one backward
    (input and kernel gradients in a single sweep).

    Args:
      x: input `[b, h, w, C]`.
      kernel: `[k, k, 1, C]`, the layout of a grouped `nnx.Conv` kernel.
      stride: 1 or 2 (both spatial axes).
      backend: one of `BACKENDS`.

    Returns:
      `[b, ceil(h / stride), ceil(w / stride), C]`.

    Raises:
      ValueError: on a bad stride, mismatched shapes or an unknown backend.
    """
    _check_depthwise_args(x, kernel, stride)
    if native_applies(check_backend(backend), x, kernel):
        return _depthwise_native(x, kernel, stride)
    if jax.default_backend() == "cpu" and not _GROUPED_DEPTHWISE.get():
        return depthwise_shift(x, kernel, stride)
    return depthwise_grouped(x, kernel, stride)


def _bn_eval_xla(
    y: Array,
    bn: tuple[Array, Array, Array, Array],
    epsilon: float,
    relu: bool,
    residual: Array | None,
) -> Array:
    """flax's eval-mode BatchNorm, then ReLU, then `+ residual`, in XLA."""
    shape = (1,) * (y.ndim - 1) + (-1,)
    scale, bias, mean, var = (v.reshape(shape) for v in bn)
    y = (y - mean) * (lax.rsqrt(var + epsilon) * scale) + bias
    y = jax.nn.relu(y) if relu else y
    return y if residual is None else y + residual


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _depthwise_bn_eval(
    x: Array, kernel: Array, bn: Any, stride: int, epsilon: float, relu: bool
) -> Array:
    pads, out_hw = _lead_pads(x, kernel.shape[0], stride)
    return kernels.depthwise_batch_norm_eval(
        x, kernel, bn, stride=stride, pads=pads, out_hw=out_hw, epsilon=epsilon, relu=relu
    )


def _depthwise_bn_eval_fwd(x, kernel, bn, stride, epsilon, relu):  # type: ignore[no-untyped-def]
    return _depthwise_bn_eval(x, kernel, bn, stride, epsilon, relu), (x, kernel, bn)


def _depthwise_bn_eval_bwd(stride, epsilon, relu, res, g):  # type: ignore[no-untyped-def]
    # Differentiating an eval-mode network is rare (frozen statistics): recompute unfused.
    def unfused(x, kernel, bn):  # type: ignore[no-untyped-def]
        return _bn_eval_xla(_depthwise_native(x, kernel, stride), bn, epsilon, relu, None)

    return jax.vjp(unfused, *res)[1](g)


_depthwise_bn_eval.defvjp(_depthwise_bn_eval_fwd, _depthwise_bn_eval_bwd)


# NOTE: in eval mode the conv, its BatchNorm (folded from the layer's state inside the
# kernel) and ReLU are one pass over the activations, and nothing is left for XLA to fuse.
def depthwise_batch_norm_eval(
    x: Array,
    kernel: Array,
    bn: tuple[Array, Array, Array, Array],
    *,
    stride: int,
    epsilon: float,
    relu: bool,
) -> Array:
    """Eval mode of a depthwise conv, its BatchNorm and ReLU as one native pass.

    `bn` is `(scale, bias, running_mean, running_var)`. Call only where
    `native_applies("native", x, kernel)`. Differentiable (through the unfused operations).
    """
    return _depthwise_bn_eval(x, kernel, bn, stride, epsilon, relu)


# --- the stem's standard convolution -----------------------------------------------------


def _conv_xla(x: Array, kernel: Array, stride: int) -> Array:
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_native(x: Array, kernel: Array, stride: int) -> Array:
    return _conv_xla(x, kernel, stride)


def _conv_native_fwd(x: Any, kernel: Any, stride: int) -> tuple[Array, Any]:
    # symbolic_zeros: the primals come wrapped with `.perturbed`; images are not perturbed
    # in training, and then their gradient (XLA's transposed conv) is not traced at all.
    y = _conv_xla(x.value, kernel.value, stride)
    return y, (x.value, kernel.value, x.perturbed)


def _conv_native_bwd(stride: int, res: Any, g: Any) -> tuple[Any, Any]:
    x, kernel, x_perturbed = res
    if isinstance(g, SymbolicZero):
        return None, None
    pads, _ = _lead_pads(x, kernel.shape[0], stride)
    dk = kernels.conv_kernel_grad(x, g, k=kernel.shape[0], stride=stride, pads=pads)
    dx = None
    if x_perturbed:
        _, vjp = jax.vjp(lambda x: _conv_xla(x, kernel, stride), x)
        (dx,) = vjp(g)
    return dx, dk


_conv_native.defvjp(_conv_native_fwd, _conv_native_bwd, symbolic_zeros=True)


# NOTE: XLA:CPU emits the stem's kernel gradient (a transposed convolution) through LLVM:
# slow to compile and to run; the native kernel gradient is a single call.
def conv(x: Array, kernel: Array, *, stride: int, backend: str = "xla") -> Array:
    """Standard SAME convolution of NHWC `x` with an HWIO `kernel` (no bias): what
    `nnx.Conv(..., padding="SAME", use_bias=False)` computes. On `"native"` its kernel
    gradient is a C++ call; the forward and the input gradient stay XLA's."""
    if native_applies(check_backend(backend), x, kernel):
        return _conv_native(x, kernel, stride)
    return _conv_xla(x, kernel, stride)


# --- pointwise (1×1) convolution ---------------------------------------------------------


def _pointwise_dot(x: Array, kernel: Array) -> Array:
    """One dot over the channels: `[b, h, w, C_in] · [C_in, C_out]`."""
    return lax.dot_general(x, kernel.reshape(kernel.shape[2:]), (((3,), (0,)), ((), ())))


@jax.custom_vjp
def _pointwise_native(x: Array, kernel: Array) -> Array:
    return _pointwise_dot(x, kernel)


def _pointwise_native_fwd(x: Array, kernel: Array) -> tuple[Array, Any]:
    return _pointwise_dot(x, kernel), (x, kernel)


def _pointwise_native_bwd(res: Any, g: Array) -> tuple[Array, Array]:
    x, kernel = res
    c_in, c_out = kernel.shape[2:]
    dx = lax.dot_general(g, kernel.reshape(c_in, c_out), (((3,), (1,)), ((), ())))
    return dx, kernels.pointwise_kernel_grad(x, g)


_pointwise_native.defvjp(_pointwise_native_fwd, _pointwise_native_bwd)


# NOTE: XLA:CPU gives the kernel gradient of a 1×1 conv (a product contracting every pixel)
# to Eigen, slower than the native register-blocked kernel; its input gradient and the
# forward stay XLA's (YNNPACK) dots. A 1×1 `conv_general_dilated` runs ~3x slower than the
# same contraction as a dot, hence dots; on "xla" a 2-D dot on the flattened pixels, whose
# autodiff kernel gradient needs no transpose of the input.
def pointwise_conv(x: Array, kernel: Array, *, backend: str = "xla") -> Array:
    """1×1 convolution of NHWC `x` with a `(1, 1, C_in, C_out)` kernel, as a matmul over
    the channels: `[b, h, w, C_in] -> [b, h, w, C_out]`."""
    if native_applies(check_backend(backend), x, kernel):
        return _pointwise_native(x, kernel)
    k = kernel[0, 0]
    return jnp.dot(x.reshape(-1, k.shape[0]), k).reshape(*x.shape[:-1], k.shape[1])


# --- BatchNorm with its ReLU (native backend) --------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _batch_norm_native(
    x: Array,
    scale: Array,
    bias: Array,
    mean: Array,
    var: Array,
    epsilon: float,
    momentum: float,
    relu: bool,
) -> tuple[Array, Array, Array]:
    y, _, _, new_mean, new_var = kernels.batch_norm_forward(
        x, scale, bias, mean, var, epsilon=epsilon, relu=relu, momentum=momentum
    )
    return y, new_mean, new_var


def _batch_norm_native_fwd(  # type: ignore[no-untyped-def]
    x, scale, bias, mean, var, epsilon, momentum, relu
):
    y, batch_mean, batch_var, new_mean, new_var = kernels.batch_norm_forward(
        x, scale, bias, mean, var, epsilon=epsilon, relu=relu, momentum=momentum
    )
    return (y, new_mean, new_var), (x, y, scale, batch_mean, batch_var)


def _batch_norm_native_bwd(epsilon, momentum, relu, res, cts):  # type: ignore[no-untyped-def]
    x, y, scale, batch_mean, batch_var = res
    # The running averages' cotangents are dropped: they leave the train step as the
    # loss's auxiliary output, which is not differentiated.
    dx, dscale, dbias = kernels.batch_norm_backward(
        x, y, scale, batch_mean, batch_var, cts[0], epsilon=epsilon, relu=relu
    )
    return dx, dscale, dbias, jnp.zeros_like(batch_mean), jnp.zeros_like(batch_var)


_batch_norm_native.defvjp(_batch_norm_native_fwd, _batch_norm_native_bwd)


# NOTE: autodiff of a generic BatchNorm leaves XLA a dozen fusions per layer to compile
# (statistics, normalisation, their gradients); natively each direction is one call.
def batch_norm_train(
    x: Array,
    bn: tuple[Array, Array, Array, Array],
    *,
    epsilon: float,
    momentum: float,
    relu: bool,
) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm (batch statistics) with its ReLU, natively.

    The same numbers, to float32 rounding, as `flax.nnx.BatchNorm` followed by `relu`;
    call only where `native_applies("native", x)`.

    Args:
      x: `[..., C]` float32.
      bn: the layer's `(scale, bias, running_mean, running_var)`.
      epsilon, momentum: flax's BatchNorm settings (`running' = momentum·running +
        (1 - momentum)·batch`).
      relu: apply ReLU to the output.

    Returns:
      `(y, new_running_mean, new_running_var)`.
    """
    return _batch_norm_native(x, *bn, epsilon, momentum, relu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_eval_native(
    x: Array, bn: Any, residual: Array | None, epsilon: float, relu: bool
) -> Array:
    return kernels.batch_norm_eval(x, bn, epsilon=epsilon, relu=relu, residual=residual)


def _bn_eval_native_fwd(x, bn, residual, epsilon, relu):  # type: ignore[no-untyped-def]
    return _bn_eval_native(x, bn, residual, epsilon, relu), (x, bn, residual)


def _bn_eval_native_bwd(epsilon, relu, res, g):  # type: ignore[no-untyped-def]
    x, bn, residual = res
    return jax.vjp(lambda *a: _bn_eval_xla(*a[:2], epsilon, relu, a[2]), x, bn, residual)[1](g)


_bn_eval_native.defvjp(_bn_eval_native_fwd, _bn_eval_native_bwd)


def batch_norm_eval(
    x: Array,
    bn: tuple[Array, Array, Array, Array],
    *,
    epsilon: float,
    relu: bool,
    residual: Array | None = None,
) -> Array:
    """Eval-mode BatchNorm (running averages), ReLU and residual add as one native call;
    call only where `native_applies("native", x)`. Differentiable (recomputed in XLA)."""
    return _bn_eval_native(x, bn, residual, epsilon, relu)


# --- classifier head and loss ------------------------------------------------------------


@jax.custom_vjp
def _head_native(x: Array, kernel: Array, bias: Array) -> Array:
    return kernels.head_forward(x, kernel, bias)[0]


def _head_native_fwd(x: Array, kernel: Array, bias: Array) -> tuple[Array, Any]:
    logits, pooled = kernels.head_forward(x, kernel, bias)
    return logits, (pooled, kernel, x.shape)


def _head_native_bwd(res: Any, g: Array) -> tuple[Array, Array, Array]:
    pooled, kernel, x_shape = res
    return kernels.head_backward(pooled, kernel, g, x_shape)


_head_native.defvjp(_head_native_fwd, _head_native_bwd)


# NOTE: the head's pool, dense and bias are the last kernels XLA:CPU would emit through LLVM
# in a native program (slow to compile); as one call each way they compile to nothing.
def head(x: Array, kernel: Array, bias: Array, *, backend: str = "xla") -> Array:
    """Global average pool over (h, w), then `pooled @ kernel + bias`: `[b, h, w, C] ->
    [b, K]`."""
    if native_applies(check_backend(backend), x, kernel, bias):
        return _head_native(x, kernel, bias)
    return jnp.dot(jnp.mean(x, axis=(1, 2)), kernel) + bias.reshape(1, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _xent_native(logits: Array, labels: Array, smoothing: float) -> Array:
    return kernels.softmax_cross_entropy(logits, labels, smoothing=smoothing)[0]


def _xent_native_fwd(logits: Array, labels: Array, smoothing: float) -> tuple[Array, Any]:
    loss, dlogits = kernels.softmax_cross_entropy(logits, labels, smoothing=smoothing)
    return loss, dlogits


def _xent_native_bwd(smoothing: float, dlogits: Array, g: Array) -> tuple[Array, None]:
    return g * dlogits, None


_xent_native.defvjp(_xent_native_fwd, _xent_native_bwd)


# NOTE: optax's loss and its autodiff leave XLA:CPU a dozen small fusions (log-softmax,
# take_along_axis and its scatter-add transpose); natively one call gives both.
def softmax_cross_entropy(
    logits: Array, labels: Array, *, smoothing: float = 0.0, backend: str = "xla"
) -> Array:
    """Mean softmax cross-entropy of `[B, C]` logits against integer `[B]` labels, with
    optax's label smoothing (`(1 - smoothing)·one_hot + smoothing / C`): optax's numbers."""
    if native_applies(check_backend(backend), logits):
        return _xent_native(logits, labels, smoothing)
    if smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# NOTE: two XLA gathers (images, labels) per step become one native copy of whole rows.
def take_rows(x: Array, y: Array, idx: Array, *, backend: str = "xla") -> tuple[Array, Array]:
    """A minibatch `(x[idx], y[idx])` of images `x` `[N, ...]` and labels `y` `[N]`. On
    `"native"` an index outside `[0, N)` fails the call (XLA would clamp it)."""
    if native_applies(check_backend(backend), x):
        return kernels.take_rows(x, y, idx)
    return x[idx], y[idx]
