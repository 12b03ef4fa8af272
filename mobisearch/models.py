"""Flax NNX MobileNet built from a resolved layer list, and the depthwise-conv hot spot.

The model reads `ArchSpec.resolve()` and nothing else: every channel count, kernel size
and stride comes from a `LayerSpec`, so the model and `mobisearch.cost` cannot disagree.
Layout is NHWC throughout.

State paths are stable and mirror `LayerSpec.name` (so saved params stay loadable):

* `stem/conv/kernel`, `stem/bn/{scale,bias,mean,var}`
* `blocks/<i>/dw/conv/kernel`, `blocks/<i>/dw/bn/...`, `blocks/<i>/pw/conv/kernel`,
  `blocks/<i>/pw/bn/...`
* `head/{kernel,bias}`

The depthwise convolution, `H·W·C·k²` of the block's `H·W·C·k² + H·W·C·C_out` MACs
(paper §3.1), is the one layer whose speed depends strongly on how it is written. It is
kept behind `depthwise_conv(x, kernel, stride=..., impl=...)`; `DEPTHWISE_IMPLS` lists the
variants and `default_depthwise_impl` picks one per backend, by measurement
(`scripts/bench_depthwise.py`). All variants take the same `(k, k, 1, C)` kernel as a
grouped `nnx.Conv`, so params are interchangeable between them.

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
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.custom_derivatives import custom_vjp_primal_tree_values

from mobisearch import kernels

if TYPE_CHECKING:
    from mobisearch.arch import ArchSpec, LayerSpec

__all__ = [
    "DEPTHWISE_ENV_VAR",
    "DEPTHWISE_IMPLS",
    "ConvBN",
    "DepthwiseConv",
    "DepthwiseSeparable",
    "MobileNet",
    "PointwiseConv",
    "abstract_split",
    "build_model",
    "default_depthwise_impl",
    "depthwise_conv",
    "inference_apply",
    "inference_shapes",
    "inference_state",
    "same_pads",
    "split_model",
    "state_size",
]

Array = jax.Array

# --- depthwise convolution -------------------------------------------------------------

#: Every depthwise implementation; `"grouped"` is the reference the others are tested against.
#:
#: * `"grouped"`: `lax.conv_general_dilated(..., feature_group_count=C)`, i.e. what
#:   `nnx.Conv(C, C, (k, k), feature_group_count=C)` runs.
#: * `"shift"`: shift-and-add. Pad once, then sum k² (strided) slices of the padded input,
#:   each times its per-channel weight; XLA fuses this into one elementwise loop. Its
#:   gradient is whatever JAX's autodiff makes of the slices (pads and reductions).
#: * `"shift_vjp"`: the same forward, with a `jax.custom_vjp` whose input gradient is again
#:   shift-and-add (a correlation of the dilated, padded cotangent with the flipped kernel)
#:   and whose kernel gradient is k² multiply-reduce. Reverse mode only (no `jax.jvp`).
#:   Measured no faster than `"shift"` on CPU (the kernel gradient dominates both).
#: * `"patches"`: stack the k² slices into `[b, h, w, k², C]` and contract with the kernel
#:   (`einsum`); materialises k² copies of the activations. Measured well behind `"shift"`
#:   (slower than `"grouped"` in the forward, faster in forward+backward).
#: * `"native"`: C++ XLA FFI kernels (`mobisearch.kernels`, CPU, float32), built on first
#:   use, reading each output's k×k window once with channels innermost. Under
#:   differentiation the forward and the backward pass (input and kernel gradients in one
#:   sweep) are native; `depthwise_conv` not differentiated is `"shift"`, which XLA fuses
#:   with the BatchNorm and ReLU around it. Elsewhere (GPU, other dtypes) it is `"shift"`.
#:   A model built with `"native"` also runs its training-mode BatchNorm+ReLU natively
#:   (`BatchNorm`), and in eval mode each depthwise conv with its BatchNorm and ReLU as
#:   one native pass (`ConvBN`).
DEPTHWISE_IMPLS: tuple[str, ...] = ("grouped", "shift", "shift_vjp", "patches", "native")

#: Environment variable that overrides `default_depthwise_impl` (e.g. `=grouped`).
DEPTHWISE_ENV_VAR = "MOBISEARCH_DEPTHWISE"


def same_pads(in_size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TF/Keras SAME padding along one spatial axis.

    `out = ceil(in / stride)`, `pad_total = max((out - 1)·stride + k - in, 0)`, with the
    smaller half before: `low = pad_total // 2`, `high = pad_total - low`.

    Args:
      in_size: input height (or width).
      kernel: kernel size.
      stride: stride.

    Returns:
      `(out, low, high)`.

    Examples:
      >>> same_pads(28, 3, 1), same_pads(28, 3, 2), same_pads(7, 3, 2)
      ((28, 1, 1), (14, 0, 1), (4, 1, 1))
    """
    out = -(-in_size // stride)
    total = max((out - 1) * stride + kernel - in_size, 0)
    return out, total // 2, total - total // 2


def _check_depthwise_args(x: Array, kernel: Array, stride: int, impl: str) -> None:
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"`impl` (={impl!r}) must be one of {DEPTHWISE_IMPLS}")
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


def _pad_same(x: Array, k: int, stride: int) -> tuple[Array, int, int]:
    """Zero-pad `x: [b, h, w, c]` for a SAME k×k conv; returns `(x_padded, out_h, out_w)`."""
    out_h, lo_h, hi_h = same_pads(x.shape[1], k, stride)
    out_w, lo_w, hi_w = same_pads(x.shape[2], k, stride)
    xp = jnp.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
    return xp, out_h, out_w


def _tap(xp: Array, i: int, j: int, stride: int, out_h: int, out_w: int) -> Array:
    """The (i, j) tap: `xp[:, i::stride, j::stride, :]` cut to `[b, out_h, out_w, c]`."""
    b, _, _, c = xp.shape
    return lax.slice(
        xp,
        (0, i, j, 0),
        (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
        (1, stride, stride, 1),
    )


def _shift_valid(xp: Array, kernel: Array, stride: int, out_h: int, out_w: int) -> Array:
    """VALID depthwise correlation of an already padded `xp` as a sum of k² shifted taps.

    `y[b, o, p, c] = Σ_ij xp[b, o·s + i, p·s + j, c] · kernel[i, j, 0, c]`.
    """
    k = kernel.shape[0]
    y = None
    for i in range(k):
        for j in range(k):
            term = _tap(xp, i, j, stride, out_h, out_w) * kernel[i, j][None, None]
            y = term if y is None else y + term
    assert y is not None
    return y


def _shift(x: Array, kernel: Array, stride: int) -> Array:
    xp, out_h, out_w = _pad_same(x, kernel.shape[0], stride)
    return _shift_valid(xp, kernel, stride, out_h, out_w)


def _patches(x: Array, kernel: Array, stride: int) -> Array:
    k = kernel.shape[0]
    xp, out_h, out_w = _pad_same(x, k, stride)
    taps = [_tap(xp, i, j, stride, out_h, out_w) for i in range(k) for j in range(k)]
    return jnp.einsum("bhwtc,tc->bhwc", jnp.stack(taps, axis=3), kernel.reshape(k * k, -1))


def _grouped(x: Array, kernel: Array, stride: int) -> Array:
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shift_cvjp(x: Array, kernel: Array, stride: int) -> Array:
    return _shift(x, kernel, stride)


def _shift_cvjp_fwd(x: Array, kernel: Array, stride: int) -> tuple[Array, Any]:
    return _shift(x, kernel, stride), (x, kernel)


def _shift_cvjp_bwd(stride: int, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = res
    k = kernel.shape[0]
    _, h, w, _ = x.shape
    out_h, lo_h, _ = same_pads(h, k, stride)
    out_w, lo_w, _ = same_pads(w, k, stride)
    # Input gradient. With x_pad[p] = x[p - lo], forward is y[o] = Σ_i x_pad[o·s + i]·w[i],
    # so dx[p] = Σ_j g_dil[p + lo + j - (k - 1)] · w[k - 1 - j], where g_dil puts g[o] at
    # o·s and zeros between. That is a stride-1 shift-and-add of g_dil padded by k-1-lo
    # before (and enough after to give `h` outputs) with the flipped kernel.
    gp = lax.pad(
        g,
        jnp.zeros((), g.dtype),
        (
            (0, 0, 0),
            (k - 1 - lo_h, h - 1 + lo_h - (out_h - 1) * stride, stride - 1),
            (k - 1 - lo_w, w - 1 + lo_w - (out_w - 1) * stride, stride - 1),
            (0, 0, 0),
        ),
    )
    dx = _shift_valid(gp, kernel[::-1, ::-1], 1, h, w)
    # Kernel gradient: one multiply-reduce over (b, h, w) per tap.
    xp, _, _ = _pad_same(x, k, stride)
    dk = jnp.stack(
        [
            jnp.sum(_tap(xp, i, j, stride, out_h, out_w) * g, axis=(0, 1, 2))
            for i in range(k)
            for j in range(k)
        ]
    )
    return dx, dk.reshape(kernel.shape)


_shift_cvjp.defvjp(_shift_cvjp_fwd, _shift_cvjp_bwd)


def _shift_vjp(x: Array, kernel: Array, stride: int) -> Array:
    return _shift_cvjp(x, kernel, stride)


def _native_pads(x: Array, k: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    out_h, lo_h, _ = same_pads(x.shape[1], k, stride)
    out_w, lo_w, _ = same_pads(x.shape[2], k, stride)
    return (lo_h, lo_w), (out_h, out_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _native_cvjp(x: Array, kernel: Array, stride: int) -> Array:
    # Not differentiated (inference): shift-and-add, which XLA fuses with the BatchNorm
    # and ReLU around it and which measured faster than the native forward there.
    return _shift(x, kernel, stride)


def _native_fwd(x: Array, kernel: Array, stride: int) -> tuple[Array, Any]:
    pads, out_hw = _native_pads(x, kernel.shape[0], stride)
    y = kernels.depthwise_forward(x, kernel, stride=stride, pads=pads, out_hw=out_hw)
    return y, (x, kernel)


def _native_bwd(stride: int, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = res
    pads, _ = _native_pads(x, kernel.shape[0], stride)
    return kernels.depthwise_backward(x, kernel, g, stride=stride, pads=pads)


_native_cvjp.defvjp(_native_fwd, _native_bwd)


def _native_handles(*arrays: Array) -> bool:
    """Whether the native FFI handlers apply to `arrays`: they are built (`kernels.available`),
    and they are CPU-only and float32-only."""
    return (
        jax.default_backend() == "cpu"
        and all(a.dtype == jnp.float32 for a in arrays)
        and kernels.available()
    )


def _native(x: Array, kernel: Array, stride: int) -> Array:
    if not kernels.available():
        raise RuntimeError(
            f"depthwise impl 'native' is unavailable: {kernels.unavailable_reason()}"
        )
    if not _native_handles(x, kernel):
        return _shift(x, kernel, stride)
    return _native_cvjp(x, kernel, stride)


# NOTE: eval mode, native impl: the depthwise conv, its BatchNorm (an affine from the
# running averages) and ReLU as one native pass instead of shift-and-add, which XLA fused
# with them. 2-core Xeon, jax 0.10.2, median forward ms, shift -> fused (ad hoc, one run):
# mnv1 α1/224 b1 9.7 -> 9.4, b32 296 -> 285; α0.5/128 b1 2.06 -> 1.99, b32 36.9 -> 34.9;
# mnv1_w050_r28_k3 b1000 (the validation batch) 270 -> 236; Fashion-MNIST candidates at
# b1 within ±3%. Its compile is shorter: 0.66-1.24 s -> 0.38-0.74 s per program.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _native_dw_affine(
    x: Array, kernel: Array, scale: Array, shift: Array, stride: int, relu: bool
) -> Array:
    # Not differentiated (inference): one native pass, the affine and ReLU fused in.
    pads, out_hw = _native_pads(x, kernel.shape[0], stride)
    return kernels.depthwise_forward(
        x, kernel, stride=stride, pads=pads, out_hw=out_hw, scale=scale, shift=shift, relu=relu
    )


def _affine(y: Array, scale: Array, shift: Array, relu: bool) -> Array:
    """`y·scale + shift` per channel of NHWC `y`, then ReLU if `relu`."""
    y = y * scale.reshape(1, 1, 1, -1) + shift.reshape(1, 1, 1, -1)
    return jax.nn.relu(y) if relu else y


def _dw_affine_reference(
    x: Array, kernel: Array, scale: Array, shift: Array, stride: int, relu: bool
) -> Array:
    return _affine(_native_cvjp(x, kernel, stride), scale, shift, relu)


def _native_dw_affine_fwd(x, kernel, scale, shift, stride, relu):  # type: ignore[no-untyped-def]
    return _native_dw_affine(x, kernel, scale, shift, stride, relu), (x, kernel, scale, shift)


def _native_dw_affine_bwd(stride, relu, res, g):  # type: ignore[no-untyped-def]
    # Differentiating an eval-mode model (e.g. frozen statistics) is rare: recompute.
    _, vjp = jax.vjp(lambda *a: _dw_affine_reference(*a, stride, relu), *res)
    return vjp(g)


_native_dw_affine.defvjp(_native_dw_affine_fwd, _native_dw_affine_bwd)


_DEPTHWISE_FNS = {
    "grouped": _grouped,
    "native": _native,
    "shift": _shift,
    "shift_vjp": _shift_vjp,
    "patches": _patches,
}


def depthwise_conv(x: Array, kernel: Array, *, stride: int, impl: str = "grouped") -> Array:
    """Depthwise k×k convolution with TF/Keras SAME padding (see `same_pads`).

    `y[b, o, p, c] = Σ_ij x_pad[b, o·s + i, p·s + j, c] · kernel[i, j, 0, c]`: the same
    numbers as `nnx.Conv(C, C, (k, k), strides=s, padding="SAME", feature_group_count=C,
    use_bias=False)` with that kernel.

    Args:
      x: input `[b, h, w, C]` (NHWC).
      kernel: `[k, k, 1, C]`, the layout of a grouped `nnx.Conv` kernel.
      stride: 1 or 2 (both spatial axes).
      impl: one of `DEPTHWISE_IMPLS`.

    Returns:
      `[b, ceil(h / stride), ceil(w / stride), C]`.

    Raises:
      ValueError: on an unknown `impl`, a bad stride or mismatched shapes.

    Examples:
      >>> x = jnp.ones((1, 5, 5, 2))
      >>> k = jnp.ones((3, 3, 1, 2))
      >>> depthwise_conv(x, k, stride=2, impl="shift")[0, :, :, 0]
      Array([[4., 6., 4.],
             [6., 9., 6.],
             [4., 6., 4.]], dtype=float32)
    """
    _check_depthwise_args(x, kernel, stride, impl)
    return _DEPTHWISE_FNS[impl](x, kernel, stride)


# NOTE: chosen by measurement: `python scripts/bench_depthwise.py --repeats 20`, CPU backend,
# jax 0.10.2, 2-core Intel Xeon VM, median ms of 20 interleaved rounds
# (results/benchmarks/bench-depthwise-cpu-jax0.10.2.csv; k7: the -k7 file, an earlier run
# without "native").
#                                            grouped   shift  shift_vjp  patches  native
#   13 dw layers, mnv1-small 28x28 w0.5, batch 128, k3:
#     forward                                 176.1     24.8      27.3    230.3    34.7
#     forward+backward                        537.1    101.0     119.2    248.3    22.2
#   13 dw layers, mnv1 224x224 w1.0, batch 1 (inference), k3:
#     forward                                  37.5      2.9       2.8     49.1     4.6
#     forward+backward                        168.5     26.5      24.2     56.3     6.1
#   whole mnv1-small 28x28 w0.5, batch 128, train mode, k3:
#     forward                                 257.9     28.4      27.2    172.8    30.8
#     loss gradient                          1063.8    321.4     326.6    578.3   249.3
# Shift-and-add is 6-13x faster than XLA's grouped conv in the forward; the native kernels
# make forward+backward another 4.5x faster than shift-and-add (24x grouped), and the whole
# training step (with the train step's compile options, scripts/bench_models.py) 1.6-3.6x.
# In the forward alone, "native" is shift-and-add (see DEPTHWISE_IMPLS; its lowered HLO has
# the same slices and no custom call), yet it measured 8-60% slower than "shift" in this
# run, and 3-7% slower in the whole-model inference of scripts/bench_models.py: a gap not
# explained by the program, left for a later look.
# GPU/TPU: NOT measured (no accelerator here); "grouped" because cuDNN and the TPU compiler
# have dedicated depthwise kernels. Re-run the benchmark there and revisit.
_DEFAULT_IMPL_BY_BACKEND = {"cpu": "native"}
_DEFAULT_IMPL_OTHER = "grouped"
# Where the native kernels cannot be built (no C++ compiler): the best pure-XLA variant.
_CPU_FALLBACK_IMPL = "shift"


def default_depthwise_impl(backend: str | None = None) -> str:
    """The depthwise implementation to use on `backend`, chosen by measurement.

    The environment variable `MOBISEARCH_DEPTHWISE` (one of `DEPTHWISE_IMPLS`), if set,
    overrides the choice for every backend.

    Args:
      backend: `"cpu"`, `"gpu"`, `"tpu"`, ...; default `jax.default_backend()`.

    Returns:
      One of `DEPTHWISE_IMPLS`.

    Raises:
      ValueError: if `MOBISEARCH_DEPTHWISE` names no implementation.
    """
    override = os.environ.get(DEPTHWISE_ENV_VAR, "").strip()
    if override:
        if override not in DEPTHWISE_IMPLS:
            raise ValueError(
                f"environment variable {DEPTHWISE_ENV_VAR} (={override!r}) must be one of "
                f"{DEPTHWISE_IMPLS}"
            )
        return override
    if backend is None:
        backend = jax.default_backend()
    impl = _DEFAULT_IMPL_BY_BACKEND.get(backend, _DEFAULT_IMPL_OTHER)
    if impl == "native" and not kernels.available():
        return _CPU_FALLBACK_IMPL
    return impl


# --- modules ---------------------------------------------------------------------------

# NOTE: BatchNorm momentum 0.9 (PyTorch/timm's 0.1 in the other convention) rather than
# NNX's 0.99: the search trains each candidate for only a few hundred steps, and with 0.99
# the running averages would still be close to their initial (0, 1) at evaluation time.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _native_bn(
    x: Array,
    scale: Array,
    bias: Array,
    running_mean: Array,
    running_var: Array,
    epsilon: float,
    relu: bool,
    momentum: float,
) -> tuple[Array, Array, Array, Array, Array]:
    return kernels.batch_norm_forward(
        x, scale, bias, running_mean, running_var, epsilon=epsilon, relu=relu, momentum=momentum
    )


def _native_bn_fwd(x, scale, bias, running_mean, running_var, epsilon, relu, momentum):  # type: ignore[no-untyped-def]
    out = kernels.batch_norm_forward(
        x, scale, bias, running_mean, running_var, epsilon=epsilon, relu=relu, momentum=momentum
    )
    y, mean, var, _, _ = out
    return out, (x, y, scale, mean, var)


def _native_bn_bwd(epsilon, relu, momentum, res, cts):  # type: ignore[no-untyped-def]
    x, y, scale, mean, var = res
    # cts[1:] (statistics, running averages) only feed the running averages, which are not
    # differentiated (they leave the train step as aux output), nor are the old ones.
    dx, dscale, dbias = kernels.batch_norm_backward(
        x, y, scale, mean, var, cts[0], epsilon=epsilon, relu=relu
    )
    return dx, dscale, dbias, jnp.zeros_like(mean), jnp.zeros_like(var)


_native_bn.defvjp(_native_bn_fwd, _native_bn_bwd)


# NOTE: With nnx.BatchNorm, XLA compiled ~15 fusions per BatchNorm+ReLU of a train step
# (statistics, normalisation, their gradients); the native pair leaves two custom calls.
# mnv1_w050_r28_k3, batch 128, 2-core Xeon, jax 0.10.2: train-step compile 3.5 -> 1.7 s
# (721 -> 370 fusions), step 140 -> 120 ms (median of 20).
class BatchNorm(nnx.BatchNorm, pytree=False):
    """`nnx.BatchNorm` over the last axis, with the ReLU that follows it fused in.

    With `native=True`, training mode (batch statistics) runs as one native call per
    direction (`mobisearch.kernels.batch_norm_forward` / `_backward`, CPU, float32): autodiff
    of the generic version left XLA a dozen fusions per layer to compile. Same state
    (`scale`, `bias`, `mean`, `var`), train/eval switch, statistics and running averages as
    `nnx.BatchNorm` otherwise.
    """

    def __init__(self, num_features: int, *, native: bool = False, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.native = native

    def __call__(self, x: Array, *, relu: bool = False) -> Array:  # type: ignore[override]
        """`[..., C] -> [..., C]`: normalise (batch statistics in training, running averages
        in eval mode), scale and shift, then ReLU if `relu`."""
        if self.native and not self.use_running_average and _native_handles(x):
            assert self.scale is not None and self.bias is not None  # use_scale, use_bias
            y, _, _, mean, var = _native_bn(
                x,
                self.scale[...],
                self.bias[...],
                self.mean[...],
                self.var[...],
                self.epsilon,
                relu,
                self.momentum,
            )
            # No stop_gradient: the running averages leave the train step as value_and_grad's
            # aux output, which is not differentiated. `set_value(v)`, not `[...] = v`,
            # which asks the tracer for its sharding and pays for an error message.
            self.mean.set_value(mean)
            self.var.set_value(var)
            return y
        y = super().__call__(x)
        return jax.nn.relu(y) if relu else y

    def scale_and_bias(self) -> tuple[Array, Array]:
        """The learned `(scale, bias)`."""
        assert self.scale is not None and self.bias is not None  # use_scale, use_bias
        return self.scale[...], self.bias[...]

    def affine(self) -> tuple[Array, Array]:
        """Eval mode as a per-channel affine: `(a, b)` with `BatchNorm(x) == x·a + b`, from
        the running averages."""
        scale, bias = self.scale_and_bias()
        a = scale * lax.rsqrt(self.var[...] + self.epsilon)
        return a, bias - self.mean[...] * a


def _kernel_init(rngs: nnx.Rngs) -> Any:
    """LeCun normal, flax's default for conv kernels; zeros while the model is built for its
    shapes only (`_ShapeOnlyRngs`, whose values are never used), which trace in one op
    instead of a truncated normal's dozen."""
    if isinstance(rngs, _ShapeOnlyRngs):
        return nnx.initializers.zeros_init()
    return nnx.initializers.lecun_normal()


class DepthwiseConv(nnx.Module, pytree=False):
    """Depthwise k×k conv (no bias) holding a `(k, k, 1, C)` kernel, computed by `impl`.

    The kernel has the shape, the initialiser (LeCun normal, fan-in k²) and therefore the
    parameter count of `nnx.Conv(C, C, (k, k), feature_group_count=C, use_bias=False)`.
    """

    def __init__(
        self, channels: int, kernel: int, stride: int, *, impl: str, rngs: nnx.Rngs
    ) -> None:
        """Create the kernel.

        Args:
          channels: C, channels in and out.
          kernel: k, the square kernel size.
          stride: 1 or 2.
          impl: one of `DEPTHWISE_IMPLS`.
          rngs: RNG streams; `params` initialises the kernel.

        Raises:
          ValueError: on an unknown `impl`.
        """
        if impl not in DEPTHWISE_IMPLS:
            raise ValueError(f"`depthwise` (={impl!r}) must be one of {DEPTHWISE_IMPLS}")
        init = _kernel_init(rngs)
        self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, 1, channels)))
        self.stride = stride
        self.impl = impl

    def __call__(self, x: Array) -> Array:
        """Apply the conv: `[b, h, w, C] -> [b, ceil(h/s), ceil(w/s), C]` (NHWC)."""
        return depthwise_conv(x, self.kernel[...], stride=self.stride, impl=self.impl)


class PointwiseConv(nnx.Module, pytree=False):
    """1×1 conv (no bias) as a matmul over channels, holding a `(1, 1, C_in, C_out)` kernel.

    The kernel has the shape, initialiser and parameter count of
    `nnx.Conv(C_in, C_out, (1, 1), use_bias=False)`; only the computation differs.
    """

    # NOTE: on CPU (jax 0.10.2) XLA ran a 1×1 `conv_general_dilated` about 3× slower than
    # the same contraction written as a dot (one-off measurement, median of 5, the 13 pw
    # layers of mnv1-small 28×28 w0.5 at batch 128: forward 37 ms vs 12 ms,
    # forward+backward 88 ms vs 74 ms).

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs) -> None:
        """Create the kernel.

        Args:
          in_ch: C_in.
          out_ch: C_out.
          rngs: RNG streams; `params` initialises the kernel (LeCun normal, fan-in C_in).
        """
        init = _kernel_init(rngs)
        self.kernel = nnx.Param(init(rngs.params(), (1, 1, in_ch, out_ch)))

    # NOTE: a 2-D dot on the flattened pixels, not `einsum("bhwc,cd->bhwd")`: the same
    # inference speed, but a faster train step (2-core Xeon, jax 0.10.2, native impl, batch
    # 128, median of 35 steps, ad hoc: mnv1_w050_r28_k3 115.6 -> 100.4 ms, mnv1_w025_r20_k3
    # 33.4 -> 31.0 ms; compile unchanged). The einsum's gradients were 4-D dot_generals.

    def __call__(self, x: Array) -> Array:
        """`[b, h, w, C_in] -> [b, h, w, C_out]` (NHWC)."""
        return _pointwise(x, self.kernel[...])


def _pointwise(x: Array, kernel: Array) -> Array:
    """`[b, h, w, C_in]` times a `(1, 1, C_in, C_out)` kernel, as a 2-D dot on the pixels
    (what `PointwiseConv` differentiates: the kernel gradient of a dot contracting the
    pixels of 4-D arrays made XLA transpose its input)."""
    k = kernel[0, 0]
    return jnp.dot(x.reshape(-1, k.shape[0]), k).reshape(*x.shape[:-1], k.shape[1])


def _pointwise_nd(x: Array, kernel: Array) -> Array:
    """`_pointwise` as one dot over the channels, for the programs that are not
    differentiated by JAX (the native network's forward, whose backward is written out,
    and `inference_apply`): two operations to trace and lower instead of four."""
    return lax.dot_general(x, kernel.reshape(kernel.shape[2:]), (((3,), (0,)), ((), ())))


class ConvBN(nnx.Module, pytree=False):
    """One resolved conv layer: conv (no bias) → BatchNorm → ReLU if `layer.act`.

    `op="conv"` uses `nnx.Conv` (SAME padding), `op="pw"` `PointwiseConv` and `op="dw"`
    `DepthwiseConv`. Attributes: `conv`, `bn`.
    """

    def __init__(self, layer: LayerSpec, *, depthwise: str, rngs: nnx.Rngs) -> None:
        """Build from a `LayerSpec` with `op` in `conv`, `dw`, `pw`.

        Args:
          layer: the resolved layer (channels, kernel, stride, act).
          depthwise: the `DEPTHWISE_IMPLS` entry used when `layer.op == "dw"`.
          rngs: RNG streams.

        Raises:
          ValueError: if `layer.op` is not a conv op.
        """
        self.conv: DepthwiseConv | PointwiseConv | nnx.Conv
        if layer.op == "dw":
            if layer.groups != layer.in_ch or layer.in_ch != layer.out_ch:
                raise ValueError(
                    f"{layer.name}: depthwise layer needs groups == in_ch == out_ch, got "
                    f"groups={layer.groups}, in_ch={layer.in_ch}, out_ch={layer.out_ch}"
                )
            self.conv = DepthwiseConv(
                layer.in_ch, layer.kernel, layer.stride, impl=depthwise, rngs=rngs
            )
        elif layer.op == "pw":
            if layer.groups != 1 or layer.kernel != 1 or layer.stride != 1:
                raise ValueError(
                    f"{layer.name}: a pointwise layer needs kernel 1, stride 1 and groups 1, "
                    f"got kernel={layer.kernel}, stride={layer.stride}, groups={layer.groups}"
                )
            self.conv = PointwiseConv(layer.in_ch, layer.out_ch, rngs=rngs)
        elif layer.op == "conv":
            if layer.groups != 1:
                raise ValueError(f"{layer.name}: `groups` (={layer.groups}) must be 1")
            self.conv = nnx.Conv(
                layer.in_ch,
                layer.out_ch,
                (layer.kernel, layer.kernel),
                strides=layer.stride,
                padding="SAME",
                use_bias=False,
                rngs=rngs,
            )
        else:
            raise ValueError(
                f"{layer.name}: `op` (={layer.op!r}) must be 'conv', 'dw' or 'pw' for ConvBN"
            )
        self.bn = BatchNorm(
            layer.out_ch,
            native=depthwise == "native",
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            rngs=rngs,
        )
        self.act = layer.act

    def __call__(self, x: Array) -> Array:
        """`[b, h, w, in_ch] -> [b, ceil(h/s), ceil(w/s), out_ch]` (NHWC)."""
        conv = self.conv
        if (
            isinstance(conv, DepthwiseConv)
            and conv.impl == "native"
            and self.bn.use_running_average
            and _native_handles(x)
        ):
            scale, shift = self.bn.affine()
            return _native_dw_affine(x, conv.kernel[...], scale, shift, conv.stride, self.act)
        return self.bn(conv(x), relu=self.act)


class DepthwiseSeparable(nnx.Module, pytree=False):
    """A depthwise-separable block: `dw` (ConvBN) → `pw` (ConvBN) [+ input if residual].

    MACs: `H·W·C_in·k² + H·W·C_in·C_out` (paper §3.1), H×W being the output size.
    """

    def __init__(self, dw: LayerSpec, pw: LayerSpec, *, depthwise: str, rngs: nnx.Rngs) -> None:
        """Build from the block's two resolved layers.

        Args:
          dw: the `op="dw"` layer.
          pw: the `op="pw"` layer that follows it; `pw.residual` adds the block input.
          depthwise: the `DEPTHWISE_IMPLS` entry.
          rngs: RNG streams.

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
        self.dw = ConvBN(dw, depthwise=depthwise, rngs=rngs)
        self.pw = ConvBN(pw, depthwise=depthwise, rngs=rngs)
        self.residual = pw.residual

    def __call__(self, x: Array) -> Array:
        """`[b, h, w, C_in] -> [b, ceil(h/s), ceil(w/s), C_out]` (NHWC)."""
        y = self.pw(self.dw(x))
        return y + x if self.residual else y


# --- training mode, native kernels: the whole network as one custom VJP -----------------

# NOTE: differentiated layer by layer, the train step's autodiff (linearize, then transpose)
# went through 41 custom VJPs, 42 dots with their reshapes, and zero cotangents for every
# BatchNorm statistic. With the whole network as one custom VJP, whose backward pass is
# written out (the same native calls, and the dot_generals JAX's transpose rules emit), the
# train step traced in 0.07 s instead of 0.11 s (median of 8 Fashion-MNIST candidates,
# cold caches, 2-core AMD EPYC, jax 0.10.2, ad hoc), and its losses, parameters and running
# averages after 12 steps were identical bit for bit.


def _stem_conv(x: Array, kernel: Array, stride: int) -> Array:
    """`nnx.Conv(..., padding="SAME", use_bias=False)`'s computation on NHWC `x`."""
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _network_forward(
    layers: tuple[LayerSpec, ...], weights: tuple[Any, ...], stats: tuple[Any, ...], x: Array
) -> tuple[tuple[Array, tuple[Any, ...]], tuple[Any, ...]]:
    """Training-mode `MobileNet.__call__` on arrays, natively: `((logits, new running
    averages), what the backward pass needs)`.

    `weights`: `(kernel, scale, bias)` per conv layer, then `(kernel, bias)` of the head;
    `stats`: `(mean, var)` running averages per conv layer.
    """
    y, block_in, saved, new_stats = x, x, [], []
    for layer, (kernel, scale, bias), (mean, var) in zip(layers, weights[:-1], stats, strict=True):
        if layer.op == "dw":
            block_in = y
            z, _ = _native_fwd(y, kernel, layer.stride)
        elif layer.op == "pw":
            z = _pointwise_nd(y, kernel)
        else:
            z = _stem_conv(y, kernel, layer.stride)
        out, batch_mean, batch_var, new_mean, new_var = kernels.batch_norm_forward(
            z, scale, bias, mean, var, epsilon=BN_EPSILON, relu=layer.act, momentum=BN_MOMENTUM
        )
        saved.append((y, z, out, batch_mean, batch_var))
        new_stats.append((new_mean, new_var))
        y = out + block_in if layer.residual else out
    logits, pooled = kernels.head_forward(y, *weights[-1])  # global average pool, dense
    return (logits, tuple(new_stats)), (tuple(saved), pooled)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _native_network(
    layers: tuple[LayerSpec, ...], weights: tuple[Any, ...], stats: tuple[Any, ...], x: Array
) -> tuple[Array, tuple[Any, ...]]:
    return _network_forward(layers, weights, stats, x)[0]


def _native_network_fwd(layers, weights, stats, x):  # type: ignore[no-untyped-def]
    # symbolic_zeros: the leaves come as CustomVJPPrimal; an image batch is not perturbed
    # in training, and then the stem's input gradient is not traced at all.
    x_perturbed = x.perturbed
    weights, stats, x = custom_vjp_primal_tree_values((weights, stats, x))
    out, (saved, pooled) = _network_forward(layers, weights, stats, x)
    return out, (weights, saved, pooled, x if x_perturbed else None)


def _native_network_bwd(layers, res, cts):  # type: ignore[no-untyped-def]
    weights, saved, pooled, x_for_dx = res
    g = cts[0]  # the running averages' cotangents are not used: they are not differentiated
    head_kernel, _ = weights[-1]
    dy, *d_head = kernels.head_backward(pooled, head_kernel, g, saved[-1][2].shape)
    grads: list[Any] = []
    skip = None  # the cotangent of a residual block's output, owed to its input
    dx = None
    for layer, (kernel, scale, _), (y, z, out, batch_mean, batch_var) in reversed(
        list(zip(layers, weights[:-1], saved, strict=True))
    ):
        if layer.residual:
            skip = dy
        dz, d_scale, d_bias = kernels.batch_norm_backward(
            z, out, scale, batch_mean, batch_var, dy, epsilon=BN_EPSILON, relu=layer.act
        )
        if layer.op == "pw":
            # The kernel gradient natively: XLA's contracts the pixels in Eigen, slower than
            # YNNPACK's forward product (csrc/pointwise.cc); the input gradient stays XLA's.
            d_kernel = kernels.pointwise_kernel_grad(y, dz)
            c_in, c_out = kernel.shape[2:]
            dy = lax.dot_general(dz, kernel.reshape(c_in, c_out), (((3,), (1,)), ((), ())))
        elif layer.op == "dw":
            dy, d_kernel = _native_bwd(layer.stride, (y, kernel), dz)
            if skip is not None:
                dy, skip = dy + skip, None
        else:
            # The stem's kernel gradient natively: XLA emits its own through LLVM, slower
            # to compile and to run (csrc/conv.cc); the images' gradient stays XLA's.
            pads, _ = _native_pads(y, kernel.shape[0], layer.stride)
            d_kernel = kernels.conv_kernel_grad(
                y, dz, k=kernel.shape[0], stride=layer.stride, pads=pads
            )
            if x_for_dx is not None:
                _, vjp = jax.vjp(lambda x, k=kernel, s=layer.stride: _stem_conv(x, k, s), y)
                (dx,) = vjp(dz)
        grads.append((d_kernel, d_scale, d_bias))
    return (*reversed(grads), tuple(d_head)), None, dx


_native_network.defvjp(_native_network_fwd, _native_network_bwd, symbolic_zeros=True)


class MobileNet(nnx.Module, pytree=False):
    """MobileNet-style classifier: `stem` → `blocks` → global average pool → `head`.

    Build it with `build_model`. Train/eval mode is NNX's: `model.train()` makes every
    BatchNorm normalise with batch statistics and update its running averages (the state
    right after construction); `model.eval()` makes it use the running averages.

    Attributes:
      stem: `ConvBN` for the `stem` layer.
      blocks: `nnx.List` of `DepthwiseSeparable`, `blocks[i]` built from `blocks/<i>/*`.
      head: `nnx.Linear` classifier with bias.
      layers: the resolved layers it was built from.
      in_ch, num_classes: input channels and classifier outputs.
    """

    def __init__(self, layers: Sequence[LayerSpec], *, depthwise: str, rngs: nnx.Rngs) -> None:
        """Build from a resolved layer list (`ArchSpec.resolve()`).

        Args:
          layers: `stem`, then `dw`/`pw` pairs, then `pool` and `head`, in that order.
          depthwise: the `DEPTHWISE_IMPLS` entry for every depthwise conv.
          rngs: RNG streams.

        Raises:
          ValueError: if the layer list does not have that structure.
        """
        layers = tuple(layers)
        ops = [layer.op for layer in layers]
        if (
            len(layers) < 3
            or ops[0] != "conv"
            or ops[-2:] != ["pool", "fc"]
            or ops[1:-2] != ["dw", "pw"] * ((len(ops) - 3) // 2)
        ):
            raise ValueError(
                f"`layers` (ops {ops}) must be conv, (dw, pw)*, pool, fc as ArchSpec.resolve() "
                "returns them"
            )
        self.layers = layers
        self.in_ch = layers[0].in_ch
        self.num_classes = layers[-1].out_ch
        self.stem = ConvBN(layers[0], depthwise=depthwise, rngs=rngs)
        self.blocks = nnx.List(
            [
                DepthwiseSeparable(dw, pw, depthwise=depthwise, rngs=rngs)
                for dw, pw in zip(layers[1:-2:2], layers[2:-2:2], strict=True)
            ]
        )
        fc = layers[-1]
        self.head = nnx.Linear(fc.in_ch, fc.out_ch, use_bias=True, rngs=rngs)

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
        if self._trains_natively(x):
            return self._native_train_call(x)
        y = self.stem(x)
        for block in self.blocks:
            y = block(y)
        y = jnp.mean(y, axis=(1, 2))  # global average pool: [b, h, w, c] -> [b, c]
        return self.head(y)

    def _conv_bns(self) -> list[ConvBN]:
        return [self.stem, *(cb for block in self.blocks for cb in (block.dw, block.pw))]

    def _trains_natively(self, x: Array) -> bool:
        """Whether this call runs `_native_network`: training mode, built with the native
        impl, and the native kernels apply to `x` (CPU, float32, built)."""
        bn = self.stem.bn
        return bool(bn.native and not bn.use_running_average and _native_handles(x))

    def _native_train_call(self, x: Array) -> Array:
        """Training mode as one native custom VJP (`_native_network`): the same logits and
        running-average updates as the layer-by-layer call, and the same gradients."""
        conv_bns = self._conv_bns()
        assert self.head.bias is not None  # use_bias
        weights = (
            *((cb.conv.kernel[...], *cb.bn.scale_and_bias()) for cb in conv_bns),
            (self.head.kernel[...], self.head.bias[...]),
        )
        stats = tuple((cb.bn.mean[...], cb.bn.var[...]) for cb in conv_bns)
        logits, new_stats = _native_network(self.layers[:-2], weights, stats, x)
        for cb, (mean, var) in zip(conv_bns, new_stats, strict=True):
            # As in `BatchNorm.__call__`: `set_value`, no stop_gradient.
            cb.bn.mean.set_value(mean)
            cb.bn.var.set_value(var)
        return logits


def _conv_layer_path(j: int) -> tuple[Any, ...]:
    """The module path of conv layer `j` of a resolved layer list (0: the stem; then each
    block's depthwise and pointwise `ConvBN`), as `MobileNet` names its submodules."""
    return ("stem",) if j == 0 else ("blocks", (j - 1) // 2, "dw" if j % 2 else "pw")


def _indexed_leaves(tree: Any, what: str) -> tuple[list[Any], Any, dict[tuple[Any, ...], int]]:
    """`tree`'s leaves and treedef (as `jax.tree.flatten` gives them) and `{path: position}`
    of each leaf, from one flatten; a path is the keys (`nnx.State`'s dict keys, then the
    Variable's `value`)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    index = {}
    for i, (keys, _) in enumerate(flat):
        index[tuple(getattr(k, "key", getattr(k, "name", k)) for k in keys)] = i
    if not index:
        raise ValueError(f"native_loss_and_grads: no {what} arrays")
    return [leaf for _, leaf in flat], treedef, index


def native_loss_and_grads(
    layers: Sequence[LayerSpec],
    params: Any,
    rest: Any,
    x: Array,
    labels: Array,
    smoothing: float,
) -> tuple[Array, Any, Any]:
    """One training-mode forward and backward pass of a natively built `MobileNet` on its
    split state, without autodiff and without NNX: `_native_network`'s forward and
    backward passes called directly, and the loss of `kernels.softmax_cross_entropy`
    (optax's mean softmax cross-entropy and label smoothing).

    The same numbers, bit for bit, as `jax.value_and_grad` of that loss of
    `nnx.merge(graphdef, params, rest)(x)` (with the BatchNorm statistics as its aux). A
    train step traced NNX's merge and state calls (~40% of its trace) and JAX's
    linearisation of the custom VJP to get them.

    Args:
      layers: the resolved layers the model was built from (`ArchSpec.resolve()`).
      params, rest: `nnx.split(model, nnx.Param, ...)`'s states (or their abstract shapes).
      x: float32 images, `[b, h, w, in_ch]`; labels: int32 `[b]`.

    Returns:
      `(loss, grads, new_rest)`: `grads` shaped like `params`, `new_rest` like `rest` with
      the updated running averages.

    Raises:
      ValueError: if `params` or `rest` lacks an array the layers need.
    """
    p_leaves, p_def, p_at = _indexed_leaves(params, "parameter")
    r_leaves, r_def, r_at = _indexed_leaves(rest, "statistic")

    def at(index: dict[tuple[Any, ...], int], path: tuple[Any, ...]) -> int:
        if path not in index:
            raise ValueError(f"native_loss_and_grads: no array at {'/'.join(map(str, path))}")
        return index[path]

    convs = tuple(layers[:-2])
    w_at = [
        tuple(
            at(p_at, (*_conv_layer_path(j), *name, "value"))
            for name in (("conv", "kernel"), ("bn", "scale"), ("bn", "bias"))
        )
        for j in range(len(convs))
    ]
    w_at.append((at(p_at, ("head", "kernel", "value")), at(p_at, ("head", "bias", "value"))))
    s_at = [
        tuple(at(r_at, (*_conv_layer_path(j), "bn", name, "value")) for name in ("mean", "var"))
        for j in range(len(convs))
    ]
    weights = tuple(tuple(p_leaves[i] for i in idx) for idx in w_at)
    stats = tuple(tuple(r_leaves[i] for i in idx) for idx in s_at)
    (logits, new_stats), (saved, pooled) = _network_forward(convs, weights, stats, x)
    loss, dlogits = kernels.softmax_cross_entropy(logits, labels, smoothing=smoothing)
    grads = _native_network_bwd(convs, (weights, saved, pooled, None), (dlogits, None))[0]
    g_leaves: list[Any] = [None] * len(p_leaves)
    for idx, values in zip(w_at, grads, strict=True):
        for i, value in zip(idx, values, strict=True):
            g_leaves[i] = value
    new_r = list(r_leaves)
    for idx, values in zip(s_at, new_stats, strict=True):
        for i, value in zip(idx, values, strict=True):
            new_r[i] = value
    if any(g is None for g in g_leaves):
        raise ValueError("native_loss_and_grads: `params` has arrays the layers do not use")
    return loss, jax.tree.unflatten(p_def, g_leaves), jax.tree.unflatten(r_def, new_r)


def build_model(arch: ArchSpec, *, rngs: nnx.Rngs, depthwise: str | None = None) -> MobileNet:
    """Build the Flax NNX model for `arch` (the only constructor the rest of the code uses).

    Initialisation is flax's default for these layers: kernels LeCun normal (truncated
    normal with standard deviation `1/sqrt(fan_in)`, fan-in `k²·C_in/groups`), biases 0,
    BatchNorm scale 1, running mean 0 and variance 1. The kernels are drawn in one RNG call
    (see `_init_state`), so building compiles one random op rather than one per layer.

    Args:
      arch: the architecture; its `resolve()` gives every channel count.
      rngs: RNG streams, e.g. `nnx.Rngs(seed)`; one `params` key initialises the weights.
      depthwise: one of `DEPTHWISE_IMPLS`; default `default_depthwise_impl()`.

    Returns:
      A `MobileNet` in training mode (call `.eval()` for inference).

    Raises:
      ValueError: on an unknown `depthwise`.
    """
    graphdef, state = abstract_split(arch, depthwise=depthwise)
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


# NOTE: building a MobileNet under `nnx.eval_shape` cost 0.14-0.27 s of Python, and a candidate
# needed it twice: for its compiled train step and to build the model it trains. Most of it
# was flax updating each RNG stream's counter on a tracer (83 draws, each `getattr(tracer,
# "sharding")` building JAX's error text); with `_ShapeOnlyRngs` it is 0.05-0.06 s, the same
# graph and state structure (2-core Xeon, flax 0.12.8, Fashion-MNIST candidates, ad hoc).
# The values come from `_init_state` anyway. Now once per architecture, here.
# Our modules are not JAX pytrees (`pytree=False`): nothing passes a module through a JAX
# transform (they are split into states first), and flax's check of every attribute
# assignment for pytree data then goes: 0.051 -> 0.038 s per abstract model, median of 16
# Fashion-MNIST candidates, the same state (2-core AMD EPYC, flax 0.12.8, ad hoc).
@functools.lru_cache(maxsize=64)
def _abstract_split(arch: ArchSpec, impl: str) -> tuple[Any, Any]:
    layers = arch.resolve()
    abstract = nnx.eval_shape(lambda: MobileNet(layers, depthwise=impl, rngs=_ShapeOnlyRngs()))  # type: ignore[arg-type]
    return nnx.split(abstract)


def abstract_split(arch: ArchSpec, *, depthwise: str | None = None) -> tuple[Any, Any]:
    """`nnx.split` of `build_model(arch, ...)` without its values: `(graphdef, state)`, the
    model in training mode, `jax.ShapeDtypeStruct` leaves. Built once per architecture
    and implementation (cached: do not modify the state's Variables)."""
    impl = default_depthwise_impl() if depthwise is None else depthwise
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"`depthwise` (={impl!r}) must be one of {DEPTHWISE_IMPLS}")
    return _abstract_split(arch, impl)


# Variable names by initial value; a new kind of variable must be added here on purpose.
_ONES = ("scale", "var")
_ZEROS = ("bias", "mean")


def _init_state(state: Any, key: Array) -> Any:
    """A new state like the abstract `state`, holding the initial values: kernels from ONE
    random draw. (`state` itself is left as it is.)

    NOTE: on CPU, XLA compiles every `jax.random` call of a new shape separately (~70 ms
    each, threefry), so flax's layer-by-layer init took ~7 s for MobileNet-V1 (55 kernels),
    eagerly or under `jit`; one draw of a power-of-two length takes ~0.3 s once and is then
    cached. Each kernel takes the next slice of the draw and is scaled as
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
        # Slice on the host: eager slices on the device would each compile again. Under a
        # transform (`nnx.eval_shape`, `jit`) the same code slices the traced array.
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

    Args:
      model: any NNX module, e.g. from `build_model`.

    Returns:
      The count.
    """
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


# --- eval-mode inference as one pure function ------------------------------------------

# NOTE: the search's eval step and latency forward compiled the NNX model in eval mode, where
# each BatchNorm's affine (scale·rsqrt(var + eps), bias - mean·a) was three small fusions of
# its own: 40 of the 55 fusions of a Fashion-MNIST candidate's forward, ~0.4 s of XLA per
# program. Computing the affines once on the host (`inference_state`) leaves XLA the convs
# and one elementwise fusion after each (with the native kernels, one native call instead:
# `inference_apply`), and compiling needs no model, only the layers.


#: `inference_state`'s value: `(kernel, a, b)` per conv layer, then `(kernel, bias)`.
InferenceState = tuple[tuple[Any, ...], ...]


def inference_state(layers: Sequence[LayerSpec], params: Any, rest: Any) -> InferenceState:
    """A trained `(params, rest)` in the form `inference_apply` takes: every BatchNorm
    folded to the per-channel affine `y·a + b` of eval mode, computed once, on the host.

    Args:
      layers: `ArchSpec.resolve()` of the model.
      params, rest: `split_model` of it (any mode), e.g. `TrainResult.state`.

    Returns:
      One `(kernel, a, b)` per conv layer (`stem`, `dw`, `pw`) in `layers` order, then
      `(kernel, bias)` of the head, as device arrays: see `inference_shapes`.
    """
    p, r = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def at(tree: Any, name: str) -> Any:
        for key in name.split("/"):
            tree = tree[int(key) if key.isdigit() else key]
        return tree

    out: list[tuple[Any, ...]] = []
    for layer in layers:
        if layer.op in ("conv", "dw", "pw"):
            bn, stats = at(p, layer.name)["bn"], at(r, layer.name)["bn"]
            var = np.asarray(stats["var"], np.float32)
            a = np.asarray(bn["scale"], np.float32) / np.sqrt(var + np.float32(BN_EPSILON))
            b = np.asarray(bn["bias"], np.float32) - np.asarray(stats["mean"], np.float32) * a
            out.append((at(p, layer.name)["conv"]["kernel"], a, b))
        elif layer.op == "fc":
            head = at(p, layer.name)
            out.append((head["kernel"], head["bias"]))
    return tuple(jax.device_put(out))


def inference_shapes(layers: Sequence[LayerSpec]) -> InferenceState:
    """`inference_state`'s structure and shapes (`jax.ShapeDtypeStruct` float32 leaves),
    from the layers alone: what the eval programs compile against.

    Examples:
      >>> from mobisearch.presets import tiny
      >>> [tuple(s.shape for s in t) for t in inference_shapes(tiny().resolve())][:2]
      [((3, 3, 3, 8), (8,), (8,)), ((3, 3, 1, 8), (8,), (8,))]
    """

    def f32(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    out: list[tuple[jax.ShapeDtypeStruct, ...]] = []
    for layer in layers:
        k, i, o = layer.kernel, layer.in_ch, layer.out_ch
        if layer.op in ("conv", "pw"):
            out.append((f32(k, k, i, o), f32(o), f32(o)))
        elif layer.op == "dw":
            out.append((f32(k, k, 1, o), f32(o), f32(o)))
        elif layer.op == "fc":
            out.append((f32(i, o), f32(o)))
    return tuple(out)


def inference_apply(
    layers: Sequence[LayerSpec], state: InferenceState, x: Array, *, depthwise: str
) -> Array:
    """The eval-mode `MobileNet` as a pure function: logits `[b, num_classes]` of NHWC `x`.

    The same network as `build_model(arch, depthwise=depthwise)` in eval mode, with each
    BatchNorm as the affine `inference_state` computed (equal to float32 rounding). With the
    native kernels each depthwise conv, its affine and ReLU are one pass, as in `ConvBN`,
    and the affine, ReLU and residual add after every other conv one native call
    (`mobisearch.kernels.affine`) instead of an XLA fusion each: a forward pass then
    compiled in 0.04-0.055 s instead of 0.11-0.13 s (XLA's part, median of 8 candidates at
    batch 1000 and 1, 2-core AMD EPYC, jax 0.10.2).

    Args:
      layers: `ArchSpec.resolve()`.
      state: `inference_state(layers, params, rest)` (or its `inference_shapes` under jit).
      x: `[b, h, w, in_ch]` float32 images.
      depthwise: one of `DEPTHWISE_IMPLS`.
    """
    convs = [layer for layer in layers if layer.op in ("conv", "dw", "pw")]
    y, block_in = x, x
    for layer, (kernel, a, b) in zip(convs, state[:-1], strict=True):
        if layer.op == "dw":
            block_in = y
            if depthwise == "native" and _native_handles(y, kernel):
                y = _native_dw_affine(y, kernel, a, b, layer.stride, layer.act)
                continue
            y = depthwise_conv(y, kernel, stride=layer.stride, impl=depthwise)
        elif layer.op == "pw":
            y = _pointwise_nd(y, kernel)
        else:
            y = _stem_conv(y, kernel, layer.stride)
        if depthwise == "native" and _native_handles(y, a, b):
            residual = block_in if layer.residual else None
            y = kernels.affine(y, a, b, relu=layer.act, residual=residual)
            continue
        y = _affine(y, a, b, layer.act)
        if layer.residual:
            y = y + block_in
    kernel, bias = state[-1]
    if depthwise == "native" and _native_handles(y, kernel, bias):
        return kernels.head_forward(y, kernel, bias)[0]
    return jnp.dot(jnp.mean(y, axis=(1, 2)), kernel) + bias.reshape(1, -1)
