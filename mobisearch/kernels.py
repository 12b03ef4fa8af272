"""Native CPU kernels for XLA, built on first use: depthwise convolution and BatchNorm.

XLA:CPU has no fast depthwise convolution (see `mobisearch.models.DEPTHWISE_IMPLS`), so
`csrc/depthwise.cc` implements its forward and backward pass as two XLA FFI handlers.
`csrc/batchnorm.cc` does the same for training-mode BatchNorm with its ReLU, which XLA
otherwise compiles as a dozen separate fusions per layer (and for the eval-mode affine, ReLU
and residual add that follow a convolution at inference, one fusion per layer otherwise),
`csrc/optimizer.cc` for a train step's whole AdamW or SGD update, which XLA otherwise
compiles as one kernel per parameter array, and `csrc/loss.cc` for its softmax
cross-entropy and gradient (a dozen small fusions otherwise). `csrc/conv.cc` and
`csrc/pointwise.cc` compute the kernel gradients of the stem and of the pointwise
convolutions (XLA emits the first through LLVM and gives the second to Eigen), and
`csrc/head.cc` the classifier head (pool, dense, bias) and its gradients. The first call
of `available()` compiles them with the system C++ compiler against the FFI headers that
ship with jaxlib (`jax.ffi.include_dir()`), caches the shared library, loads it and
registers the handlers for the `cpu` platform. Nothing is downloaded.

The library is cached under `$MOBISEARCH_KERNEL_DIR` (default
`$XDG_CACHE_HOME/mobisearch/kernels`, i.e. `~/.cache/mobisearch/kernels`), in a folder named
by a hash of the sources, the compiler command, jaxlib's version and this CPU's model and
flags (it is built with `-march=native`), so a stale or foreign build is never loaded.

Without a C++ compiler (`$CXX`, else `c++`) or with `MOBISEARCH_NATIVE=0`, `available()` is
False, `unavailable_reason()` says why, and `mobisearch.models` falls back to shift-and-add.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mobisearch.data import cache_dir

__all__ = [
    "KERNEL_DIR_ENV_VAR",
    "NATIVE_ENV_VAR",
    "HEADERS",
    "SOURCES",
    "affine",
    "available",
    "batch_norm_backward",
    "batch_norm_forward",
    "conv_kernel_grad",
    "depthwise_backward",
    "depthwise_forward",
    "head_backward",
    "head_forward",
    "library_path",
    "optimizer_update",
    "pointwise_kernel_grad",
    "softmax_cross_entropy",
    "take_rows",
    "unavailable_reason",
]

_CSRC = pathlib.Path(__file__).parent / "csrc"
#: The C++ sources compiled into the library, and the header they share.
SOURCES = (
    _CSRC / "depthwise.cc",
    _CSRC / "batchnorm.cc",
    _CSRC / "optimizer.cc",
    _CSRC / "loss.cc",
    _CSRC / "batch.cc",
    _CSRC / "conv.cc",
    _CSRC / "head.cc",
    _CSRC / "pointwise.cc",
)
HEADERS = (_CSRC / "parallel.h",)
#: Folder for built libraries (default `~/.cache/mobisearch/kernels`).
KERNEL_DIR_ENV_VAR = "MOBISEARCH_KERNEL_DIR"
#: `MOBISEARCH_NATIVE=0` turns the native kernels off.
NATIVE_ENV_VAR = "MOBISEARCH_NATIVE"

_FWD_TARGET = "mobisearch_depthwise_fwd"
_FWD_AFFINE_TARGET = "mobisearch_depthwise_fwd_affine"
_BWD_TARGET = "mobisearch_depthwise_bwd"
_BN_FWD_TARGET = "mobisearch_batch_norm_fwd"
_BN_BWD_TARGET = "mobisearch_batch_norm_bwd"
_OPT_TARGET = "mobisearch_optimizer_update"
_AFFINE_TARGET = "mobisearch_affine"
_AFFINE_ADD_TARGET = "mobisearch_affine_add"
_XENT_TARGET = "mobisearch_softmax_cross_entropy"
_TAKE_TARGET = "mobisearch_take_rows"
_CONV_DK_TARGET = "mobisearch_conv_kernel_grad"
_HEAD_FWD_TARGET = "mobisearch_head_fwd"
_HEAD_BWD_TARGET = "mobisearch_head_bwd"
_PW_DK_TARGET = "mobisearch_pointwise_kernel_grad"
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _cpu_id() -> str:
    """This CPU's model name and feature flags (what `-march=native` compiles for)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _cxx() -> str:
    return os.environ.get("CXX", "c++")


def _compile_command(source: pathlib.Path, output: pathlib.Path) -> list[str]:
    """Compile one source to an object file."""
    flags = ["-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-fPIC", "-w"]
    return [_cxx(), *flags, f"-I{jax.ffi.include_dir()}", "-c", str(source), "-o", str(output)]


def library_path() -> pathlib.Path:
    """Where the library for these sources, compiler, jaxlib and CPU is (or will be) cached."""
    folder = pathlib.Path(os.environ.get(KERNEL_DIR_ENV_VAR) or cache_dir("kernels")).expanduser()
    key = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        key.update(path.read_bytes())
    for p in SOURCES:
        key.update(" ".join(_compile_command(pathlib.Path(p.name), pathlib.Path("o"))).encode())
    key.update(importlib.metadata.version("jaxlib").encode())
    key.update(_cpu_id().encode())
    return folder / key.hexdigest()[:16] / "libmobisearch_kernels.so"


def _spawn(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


def _wait(jobs: list[tuple[str, subprocess.Popen[str]]]) -> None:
    """Wait for `(what, process)` compiler jobs; on a failure, stop the others and raise."""
    try:
        for what, job in jobs:
            _, err = job.communicate(timeout=300)
            if job.returncode != 0:
                raise RuntimeError(
                    f"building {what} failed (exit {job.returncode}): {err.strip()[-2000:]}"
                )
    finally:
        for _, job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()


def _build(path: pathlib.Path) -> None:
    """Compile `SOURCES` to `path` atomically (a concurrent builder cannot leave half a file).

    The sources compile side by side, one compiler process each, then link.
    """
    cxx = _cxx()
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, suffix=".tmp") as work:
        objects = [pathlib.Path(work) / f"{src.stem}.o" for src in SOURCES]
        _wait(
            [
                (src.name, _spawn(_compile_command(src, obj)))
                for src, obj in zip(SOURCES, objects, strict=True)
            ]
        )
        lib = pathlib.Path(work) / "lib.so"
        _wait([("the link", _spawn([cxx, "-shared", *map(str, objects), "-o", str(lib)]))])
        os.replace(lib, path)


def _load() -> None:
    if os.environ.get(NATIVE_ENV_VAR, "").strip() == "0":
        raise RuntimeError(f"turned off by {NATIVE_ENV_VAR}=0")
    path = library_path()
    if not path.exists():
        _build(path)
    lib = ctypes.CDLL(str(path))
    for target, symbol in (
        (_FWD_TARGET, lib.MobisearchDepthwiseForward),
        (_FWD_AFFINE_TARGET, lib.MobisearchDepthwiseForwardAffine),
        (_BWD_TARGET, lib.MobisearchDepthwiseBackward),
        (_BN_FWD_TARGET, lib.MobisearchBatchNormForward),
        (_BN_BWD_TARGET, lib.MobisearchBatchNormBackward),
        (_OPT_TARGET, lib.MobisearchOptimizerUpdate),
        (_AFFINE_TARGET, lib.MobisearchAffine),
        (_AFFINE_ADD_TARGET, lib.MobisearchAffineAdd),
        (_XENT_TARGET, lib.MobisearchSoftmaxCrossEntropy),
        (_TAKE_TARGET, lib.MobisearchTakeRows),
        (_CONV_DK_TARGET, lib.MobisearchConvKernelGrad),
        (_HEAD_FWD_TARGET, lib.MobisearchHeadForward),
        (_HEAD_BWD_TARGET, lib.MobisearchHeadBackward),
        (_PW_DK_TARGET, lib.MobisearchPointwiseKernelGrad),
    ):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    _STATE["lib"] = lib  # keep the library loaded


def available() -> bool:
    """Build (once), load and register the native kernels; True if they can be used."""
    with _LOCK:
        if "ok" not in _STATE:
            try:
                _load()
                _STATE["ok"] = True
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                _STATE["ok"] = False
                _STATE["reason"] = str(e)
        return bool(_STATE["ok"])


def unavailable_reason() -> str:
    """Why `available()` is False ("" if it is True or was not called yet)."""
    return str(_STATE.get("reason", ""))


def _attrs(stride: int, pads: tuple[int, int]) -> dict[str, np.int32]:
    return {"stride": np.int32(stride), "lo_h": np.int32(pads[0]), "lo_w": np.int32(pads[1])}


def depthwise_forward(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int,
    pads: tuple[int, int],
    out_hw: tuple[int, int],
    scale: jax.Array | None = None,
    shift: jax.Array | None = None,
    relu: bool = False,
) -> jax.Array:
    """Depthwise convolution of float32 NHWC `x` with a `(k, k, 1, C)` kernel, natively.

    `y[b, o, p, c] = Σ_ij x[b, o·s + i - lo_h, p·s + j - lo_w, c] · kernel[i, j, 0, c]`,
    taps outside `x` counting as zero. With `scale` and `shift`, each output is then
    `y · scale[c] + shift[c]` (an inference-mode BatchNorm), and `max(·, 0)` if `relu`, in
    the same pass. Not differentiable by itself: `mobisearch.models` pairs it with
    `depthwise_backward` in a `jax.custom_vjp`. Call `available()` first.

    Args:
      x: `[b, h, w, C]` float32.
      kernel: `[k, k, 1, C]` float32.
      stride: the stride of both spatial axes.
      pads: `(lo_h, lo_w)`, zero padding before the first row and column.
      out_hw: `(out_h, out_w)`, the output size.
      scale, shift: `[C]` float32 each, or both None (then `relu` must be False).
      relu: apply ReLU after the affine.

    Returns:
      `y`, `[b, out_h, out_w, C]`.

    Raises:
      ValueError: if only one of `scale` and `shift` is given, or `relu` without them.
    """
    b, _, _, c = x.shape
    out = jax.ShapeDtypeStruct((b, *out_hw, c), x.dtype)
    if scale is None and shift is None:
        if relu:
            raise ValueError("depthwise_forward: `relu` needs `scale` and `shift`")
        return jax.ffi.ffi_call(_FWD_TARGET, out)(x, kernel, **_attrs(stride, pads))
    if scale is None or shift is None:
        raise ValueError("depthwise_forward: give both `scale` and `shift`, or neither")
    return jax.ffi.ffi_call(_FWD_AFFINE_TARGET, out)(
        x, kernel, scale, shift, **_attrs(stride, pads), relu=np.int32(relu)
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
        _BWD_TARGET,
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
    padding. Call `available()` first.

    Returns:
      `dk`, `[k, k, Cin, Cout]`.
    """
    shape = jax.ShapeDtypeStruct((k, k, x.shape[3], g.shape[3]), x.dtype)
    return jax.ffi.ffi_call(_CONV_DK_TARGET, shape)(x, g, **_attrs(stride, pads))


def pointwise_kernel_grad(y: jax.Array, dz: jax.Array) -> jax.Array:
    """Kernel gradient of a 1×1 convolution of float32 NHWC `y` with a `[1, 1, Cin, Cout]`
    kernel, for the output cotangent `dz` (`[..., Cout]`, the same leading axes), natively:
    `dk[0, 0, ci, co] = Σ_p y[p, ci] · dz[p, co]` over every pixel `p` of the batch. Call
    `available()` first.

    Returns:
      `dk`, `[1, 1, Cin, Cout]`.
    """
    shape = jax.ShapeDtypeStruct((1, 1, y.shape[-1], dz.shape[-1]), y.dtype)
    return jax.ffi.ffi_call(_PW_DK_TARGET, shape)(y, dz)


def head_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A MobileNet's classifier head on float32 NHWC `x`, natively: the global average pool
    `pooled = mean over (h, w)`, then `logits = pooled @ kernel + bias` (`kernel` `[C, K]`).
    Call `available()` first.

    Returns:
      `(logits, pooled)`, `[b, K]` and `[b, C]`.
    """
    b, k = x.shape[0], kernel.shape[1]
    out = (jax.ShapeDtypeStruct((b, k), x.dtype), jax.ShapeDtypeStruct((b, x.shape[3]), x.dtype))
    logits, pooled = jax.ffi.ffi_call(_HEAD_FWD_TARGET, out)(x, kernel, bias)
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
    dx, dk, db = jax.ffi.ffi_call(_HEAD_BWD_TARGET, out)(pooled, kernel, g)
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
    updates them, `momentum · running + (1 - momentum) · batch` in float32. Not
    differentiable by itself: `mobisearch.models.BatchNorm` pairs it with
    `batch_norm_backward`. Call `available()` first.

    Returns:
      `(y, mean, var, new_running_mean, new_running_var)`: `y` shaped like `x`, the others
      like `scale`, `[C]`.
    """
    stat = jax.ShapeDtypeStruct(scale.shape, x.dtype)
    call = jax.ffi.ffi_call(
        _BN_FWD_TARGET, (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat, stat, stat)
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
        _BN_BWD_TARGET,
        (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(scale.shape, x.dtype),
            jax.ShapeDtypeStruct(scale.shape, x.dtype),
        ),
    )
    dx, dscale, dbias = call(x, y, scale, mean, var, g, **_bn_attrs(epsilon, relu))
    return dx, dscale, dbias


def affine(
    x: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    *,
    relu: bool,
    residual: jax.Array | None = None,
) -> jax.Array:
    """Eval-mode BatchNorm of float32 `x` (channels last) as its folded affine, natively:
    `x · scale[c] + shift[c]`, then `max(·, 0)` if `relu`, then `+ residual` if given (the
    same float32 operations in the same order as XLA's fusion of them). Not differentiable
    (inference only). Call `available()` first.

    Args:
      x: `[..., C]` float32.
      scale, shift: `[C]` float32 each.
      relu: apply ReLU after the affine.
      residual: float32 shaped like `x`, added last, or None.
    """
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    if residual is None:
        return jax.ffi.ffi_call(_AFFINE_TARGET, out)(x, scale, shift, relu=np.int32(relu))
    return jax.ffi.ffi_call(_AFFINE_ADD_TARGET, out)(
        x, scale, shift, residual, relu=np.int32(relu)
    )


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
) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
    """One optimizer step of every float32 parameter array, natively, in one call.

    With two moments `(m, v)`, AdamW: `m' = (1-b1)·g + b1·m`, `v' = (1-b2)·g² + b2·v`,
    `u = (m'/bc1) / (sqrt(v'/bc2) + eps)`; with one `(m,)`, SGD with Nesterov momentum
    `b1`: `t = g`, `m' = t + b1·m`, `u = t + b1·m'`. Weight decay adds `weight_decay·p` (to
    `u` for AdamW, to `t` for SGD) for the arrays whose `decay` flag is set. Then
    `p' = p + (-lr)·u`. The same float32 operations, in the same order, as optax's `adamw`
    and `chain(add_decayed_weights, sgd(nesterov=True))`. Call `available()` first.

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

    Returns:
      `(new_params, new_moments, count + 1)`, shaped like `params`, `moments`, `count`. A
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
    out = jax.ffi.ffi_call(_OPT_TARGET, [step, *shapes, *([flat] * len(moments))])(
        jnp.asarray(table, jnp.float32),
        jnp.asarray(count, jnp.int32),
        *params,
        *grads,
        *moments,
        adam=np.int32(len(moments) == 2),
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
    `mobisearch.train` uses the returned gradient in a `jax.custom_vjp`. A label outside
    `[0, C)` fails the call, naming the row. Call `available()` first.

    Returns:
      `(loss, dlogits)`: a float32 scalar, and float32 `[B, C]` = d loss / d logits.
    """
    call = jax.ffi.ffi_call(
        _XENT_TARGET,
        (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct(logits.shape, jnp.float32)),
    )
    loss, dlogits = call(logits, labels.astype(jnp.int32), smoothing=np.float32(smoothing))
    return loss, dlogits


def take_rows(x: jax.Array, y: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(x[idx], y[idx])` natively (`csrc/batch.cc`): a minibatch of images `x` `[N, ...]`
    and int32 labels `y` `[N]` at int32 indices `idx` `[B]`, by copying whole rows. An index
    outside `[0, N)` fails the call, naming it (where `x[idx]` would clamp it). Call
    `available()` first.
    """
    b = idx.shape[0]
    call = jax.ffi.ffi_call(
        _TAKE_TARGET,
        (
            jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype),
            jax.ShapeDtypeStruct((b,), jnp.int32),
        ),
    )
    xb, yb = call(x, y.astype(jnp.int32), idx.astype(jnp.int32))
    return xb, yb
