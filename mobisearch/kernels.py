"""The native CPU kernels, one function per XLA FFI handler (`csrc/*.cc`; float32, CPU).

Each function here is a raw `jax.ffi.ffi_call`: not differentiable by itself, and only
valid after `available()` (which builds and registers the library, `mobisearch.kernel_build`)
returned True. `mobisearch.ops` pairs them into differentiable operations and falls back to
XLA where they do not apply. What each kernel replaces, and why, is in the header comment of
its source file and in docs/performance.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mobisearch.kernel_build import available, unavailable_reason

__all__ = [
    "available",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_forward",
    "conv_kernel_grad",
    "depthwise_backward",
    "depthwise_batch_norm_eval",
    "depthwise_forward",
    "flat_size",
    "head_backward",
    "head_forward",
    "optimizer_update",
    "pointwise_kernel_grad",
    "softmax_cross_entropy",
    "take_rows",
    "unavailable_reason",
]


def _attrs(stride: int, pads: tuple[int, int]) -> dict[str, np.int32]:
    return {"stride": np.int32(stride), "lo_h": np.int32(pads[0]), "lo_w": np.int32(pads[1])}


def depthwise_forward(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int,
    pads: tuple[int, int],
    out_hw: tuple[int, int],
) -> jax.Array:
    """Depthwise convolution of float32 NHWC `x` with a `(k, k, 1, C)` kernel.

    `y[b, o, p, c] = Σ_ij x[b, o·s + i - lo_h, p·s + j - lo_w, c] · kernel[i, j, 0, c]`,
    taps outside `x` counting as zero.

    Args:
      x: `[b, h, w, C]` float32.
      kernel: `[k, k, 1, C]` float32.
      stride: the stride of both spatial axes.
      pads: `(lo_h, lo_w)`, zero padding before the first row and column.
      out_hw: `(out_h, out_w)`, the output size.

    Returns:
      `y`, `[b, out_h, out_w, C]`.
    """
    b, _, _, c = x.shape
    out = jax.ShapeDtypeStruct((b, *out_hw, c), x.dtype)
    return jax.ffi.ffi_call("mobisearch_depthwise_fwd", out)(x, kernel, **_attrs(stride, pads))


def depthwise_batch_norm_eval(
    x: jax.Array,
    kernel: jax.Array,
    bn: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    *,
    stride: int,
    pads: tuple[int, int],
    out_hw: tuple[int, int],
    epsilon: float,
    relu: bool,
) -> jax.Array:
    """`depthwise_forward`, then an eval-mode BatchNorm and ReLU, in one pass.

    `bn` is the layer's `(scale, bias, running_mean, running_var)`, `[C]` each; the kernel
    folds it to `y·a + b` with `a = scale / sqrt(var + epsilon)`, `b = bias - mean·a`, and
    applies `max(·, 0)` if `relu`.
    """
    b, _, _, c = x.shape
    out = jax.ShapeDtypeStruct((b, *out_hw, c), x.dtype)
    return jax.ffi.ffi_call("mobisearch_depthwise_fwd_bn", out)(
        x,
        kernel,
        *bn,
        **_attrs(stride, pads),
        epsilon=np.float32(epsilon),
        relu=np.int32(relu),
    )


def depthwise_backward(
    x: jax.Array, kernel: jax.Array, g: jax.Array, *, stride: int, pads: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """Input and kernel gradients of `depthwise_forward` for the output cotangent `g`.

    One sweep over `g`: each output pixel scatters `g · kernel` into its input window and
    accumulates `g · x` into the kernel gradient.

    Returns:
      `(dx, dkernel)`, shaped like `x` and `kernel`.
    """
    call = jax.ffi.ffi_call(
        "mobisearch_depthwise_bwd",
        (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(kernel.shape, x.dtype)),
    )
    dx, dk = call(x, kernel, g, **_attrs(stride, pads))
    return dx, dk


def conv_kernel_grad(
    x: jax.Array, g: jax.Array, *, k: int, stride: int, pads: tuple[int, int]
) -> jax.Array:
    """Kernel gradient of a standard convolution of float32 NHWC `x` with a `(k, k, Cin,
    Cout)` kernel, for the output cotangent `g` (`[b, out_h, out_w, Cout]`), natively.

    `dk[i, j, ci, co] = Σ_{b,o,p} x[b, o·s + i - lo_h, p·s + j - lo_w, ci] · g[b, o, p, co]`,
    taps outside `x` counting as zero: the gradient of `lax.conv_general_dilated(x, kernel,
    (s, s), padding, ("NHWC", "HWIO", "NHWC"))` with `pads` = `(lo_h, lo_w)` its leading
    padding.

    Returns:
      `dk`, `[k, k, Cin, Cout]`.
    """
    shape = jax.ShapeDtypeStruct((k, k, x.shape[3], g.shape[3]), x.dtype)
    return jax.ffi.ffi_call("mobisearch_conv_kernel_grad", shape)(x, g, **_attrs(stride, pads))


def pointwise_kernel_grad(y: jax.Array, dz: jax.Array) -> jax.Array:
    """Kernel gradient of a 1×1 convolution of float32 NHWC `y` with a `[1, 1, Cin, Cout]`
    kernel, for the output cotangent `dz` (`[..., Cout]`, the same leading axes), natively:
    `dk[0, 0, ci, co] = Σ_p y[p, ci] · dz[p, co]` over every pixel `p` of the batch.

    Returns:
      `dk`, `[1, 1, Cin, Cout]`.
    """
    shape = jax.ShapeDtypeStruct((1, 1, y.shape[-1], dz.shape[-1]), y.dtype)
    return jax.ffi.ffi_call("mobisearch_pointwise_kernel_grad", shape)(y, dz)


def head_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A MobileNet's classifier head on float32 NHWC `x`, natively: the global average pool
    `pooled = mean over (h, w)`, then `logits = pooled @ kernel + bias` (`kernel` `[C, K]`).

    Returns:
      `(logits, pooled)`, `[b, K]` and `[b, C]`.
    """
    b, k = x.shape[0], kernel.shape[1]
    out = (jax.ShapeDtypeStruct((b, k), x.dtype), jax.ShapeDtypeStruct((b, x.shape[3]), x.dtype))
    logits, pooled = jax.ffi.ffi_call("mobisearch_head_fwd", out)(x, kernel, bias)
    return logits, pooled


def head_backward(
    pooled: jax.Array, kernel: jax.Array, g: jax.Array, x_shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of `head_forward` for the logits' cotangent `g`, from its `pooled` output:
    `(dx, dkernel, dbias)`, `dx` of `x_shape` (each pixel gets `(g @ kernel.T) / (h·w)`)."""
    out = (
        jax.ShapeDtypeStruct(tuple(x_shape), g.dtype),
        jax.ShapeDtypeStruct(kernel.shape, g.dtype),
        jax.ShapeDtypeStruct((kernel.shape[1],), g.dtype),
    )
    dx, dk, db = jax.ffi.ffi_call("mobisearch_head_bwd", out)(pooled, kernel, g)
    return dx, dk, db


def _bn_attrs(epsilon: float, relu: bool) -> dict[str, np.float32 | np.int32]:
    return {"epsilon": np.float32(epsilon), "relu": np.int32(relu)}


def batch_norm_forward(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    running_mean: jax.Array,
    running_var: jax.Array,
    *,
    epsilon: float,
    relu: bool,
    momentum: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm of float32 `x` (channels last) with batch statistics, natively.

    `y = act((x - mean) / sqrt(var + epsilon) · scale + bias)`, `act` ReLU if `relu` else
    identity, with `mean` and (biased) `var` over every axis but the last, `var` computed as
    `E[x²] - E[x]²` (in double) and clipped at 0; and the running averages updated as flax
    updates them, `momentum · running + (1 - momentum) · batch` in float32.

    Returns:
      `(y, mean, var, new_running_mean, new_running_var)`: `y` shaped like `x`, the others
      like `scale`, `[C]`.
    """
    stat = jax.ShapeDtypeStruct(scale.shape, x.dtype)
    call = jax.ffi.ffi_call(
        "mobisearch_batch_norm_fwd",
        (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat, stat, stat),
    )
    y, mean, var, new_mean, new_var = call(
        x,
        scale,
        bias,
        running_mean,
        running_var,
        **_bn_attrs(epsilon, relu),
        momentum=np.float32(momentum),
        keep=np.float32(1 - momentum),
    )
    return y, mean, var, new_mean, new_var


def batch_norm_backward(
    x: jax.Array,
    y: jax.Array,
    scale: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    g: jax.Array,
    *,
    epsilon: float,
    relu: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of `batch_norm_forward`'s `y` for the cotangent `g` (the batch statistics
    count as outputs without a gradient).

    Args:
      x, scale: the forward's inputs; `y`, `mean`, `var`: its outputs.
      g: the cotangent of `y`.

    Returns:
      `(dx, dscale, dbias)`, shaped like `x`, `scale` and `scale`.
    """
    call = jax.ffi.ffi_call(
        "mobisearch_batch_norm_bwd",
        (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(scale.shape, x.dtype),
            jax.ShapeDtypeStruct(scale.shape, x.dtype),
        ),
    )
    dx, dscale, dbias = call(x, y, scale, mean, var, g, **_bn_attrs(epsilon, relu))
    return dx, dscale, dbias


def batch_norm_eval(
    x: jax.Array,
    bn: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    *,
    epsilon: float,
    relu: bool,
    residual: jax.Array | None = None,
) -> jax.Array:
    """Eval-mode BatchNorm of float32 `x` (channels last) with its ReLU and residual add.

    `bn` is `(scale, bias, running_mean, running_var)`, `[C]` each, folded by the kernel to
    `a = scale / sqrt(var + epsilon)`, `b = bias - mean·a`; then `y = x·a + b`, `max(·, 0)`
    if `relu`, `+ residual` if given (shaped like `x`).
    """
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    attrs = {"epsilon": np.float32(epsilon), "relu": np.int32(relu)}
    if residual is None:
        return jax.ffi.ffi_call("mobisearch_batch_norm_eval", out)(x, *bn, **attrs)
    return jax.ffi.ffi_call("mobisearch_batch_norm_eval_add", out)(x, *bn, residual, **attrs)


def optimizer_update(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    moments: Sequence[jax.Array],
    table: Any,
    count: jax.Array,
    *,
    b1: float,
    b2: float = 0.0,
    eps: float = 0.0,
    weight_decay: float,
    decay: Sequence[bool],
    apply: bool = True,
) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
    """One optimizer step of every float32 parameter array, natively, in one call.

    With two moments `(m, v)`, AdamW: `m' = (1-b1)·g + b1·m`, `v' = (1-b2)·g² + b2·v`,
    `u = (m'/bc1) / (sqrt(v'/bc2) + eps)`; with one `(m,)`, SGD with Nesterov momentum
    `b1`: `t = g`, `m' = t + b1·m`, `u = t + b1·m'`. Weight decay adds `weight_decay·p` (to
    `u` for AdamW, to `t` for SGD) for the arrays whose `decay` flag is set. The update is
    `(-lr)·u`, and with `apply` the new parameter `p + (-lr)·u`. The same float32
    operations, in the same order, as optax's `adamw` and `chain(add_decayed_weights,
    sgd(nesterov=True))` (then `optax.apply_updates`).

    Args:
      params, grads: the parameter arrays and their gradients, in the same order.
      moments: `(m, v)` for AdamW, `(m,)` for SGD, each ONE flat float32 array of
        `sum(p.size for p in params)` elements: the arrays' moments raveled one after the
        other, in `params` order (see `flat_size`).
      table: float32 `[steps, 3]`, row `t` the `[lr, bc1, bc2]` of step `t` (`bc` = Adam's
        bias corrections, any value for SGD): the recipe's schedule, computed once.
      count: int32 scalar, this step's row of `table` (the steps done so far).
      b1, b2, eps: Adam's decay rates and epsilon, or SGD's momentum as `b1`.
      weight_decay: the decay rate.
      decay: one flag per array.
      apply: return the new parameters instead of the updates.

    Returns:
      `(new_params or updates, new_moments, count + 1)`, shaped like `params`, `moments`,
      `count`. A
      `count` past the table's last row fails the call with an error that says so.

    Raises:
      ValueError: if the lists differ in length, a moment is not `flat_size(params)` long, or
        `table` is not `[steps, 3]`.
    """
    n = len(params)
    if not (len(grads) == len(decay) == n and 1 <= len(moments) <= 2):
        raise ValueError(
            "optimizer_update: params, grads and decay differ in length, or moments is not "
            "(m, v) for AdamW or (m,) for SGD"
        )
    total = flat_size(params)
    for m in moments:
        if m.shape != (total,):
            raise ValueError(
                f"optimizer_update: a moment of shape {m.shape}, expected ({total},): the "
                "parameters' sizes, summed"
            )
    if len(np.shape(table)) != 2 or np.shape(table)[1] != 3:
        raise ValueError(
            f"optimizer_update: a coefficient table of shape {np.shape(table)}, expected "
            "(steps, 3)"
        )
    shapes = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params]
    flat = jax.ShapeDtypeStruct((total,), jnp.float32)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    out = jax.ffi.ffi_call(
        "mobisearch_optimizer_update", [step, *shapes, *([flat] * len(moments))]
    )(
        jnp.asarray(table, jnp.float32),
        jnp.asarray(count, jnp.int32),
        *params,
        *grads,
        *moments,
        adam=np.int32(len(moments) == 2),
        apply=np.int32(apply),
        b1=np.float32(b1),
        c1=np.float32(1 - b1),
        b2=np.float32(b2),
        c2=np.float32(1 - b2),
        eps=np.float32(eps),
        weight_decay=np.float32(weight_decay),
        decay=np.asarray(decay, np.int32),
    )
    return list(out[1 : n + 1]), list(out[n + 1 :]), out[0]


def flat_size(params: Sequence[Any]) -> int:
    """The length of `optimizer_update`'s flat moments for `params` (arrays or shapes)."""
    return sum(math.prod(p.shape) for p in params)


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy of float32 `[B, C]` logits against int32 `[B]` labels, and
    its gradient, natively (in double; `csrc/loss.cc`).

    The targets are one-hot, or with `smoothing` optax's `smooth_labels`:
    `(1 - smoothing)·one_hot + smoothing / C`. Not differentiable by itself:
    `mobisearch.ops` uses the returned gradient in a `jax.custom_vjp`. A label outside
    `[0, C)` fails the call, naming the row.

    Returns:
      `(loss, dlogits)`: a float32 scalar, and float32 `[B, C]` = d loss / d logits.
    """
    call = jax.ffi.ffi_call(
        "mobisearch_softmax_cross_entropy",
        (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct(logits.shape, jnp.float32)),
    )
    loss, dlogits = call(logits, labels.astype(jnp.int32), smoothing=np.float32(smoothing))
    return loss, dlogits


def take_rows(x: jax.Array, y: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(x[idx], y[idx])` natively (`csrc/batch.cc`): a minibatch of images `x` `[N, ...]`
    and int32 labels `y` `[N]` at int32 indices `idx` `[B]`, by copying whole rows. An index
    outside `[0, N)` fails the call, naming it (where `x[idx]` would clamp it).
    """
    b = idx.shape[0]
    call = jax.ffi.ffi_call(
        "mobisearch_take_rows",
        (
            jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype),
            jax.ShapeDtypeStruct((b,), jnp.int32),
        ),
    )
    xb, yb = call(x, y.astype(jnp.int32), idx.astype(jnp.int32))
    return xb, yb
