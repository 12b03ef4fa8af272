"""Tests for `mobisearch.ops`: every operation on both backends gives the numbers (forward
and gradients) of `lax.conv_general_dilated`, flax's layers and optax, to float32 rounding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from mobisearch import kernels, ops

needs_native = pytest.mark.skipif(
    not kernels.available(), reason=f"native kernels unavailable: {kernels.unavailable_reason()}"
)


pytestmark = pytest.mark.usefixtures("fast_compile")


def _assert_close(actual: object, desired: object, what: str, rtol: float = 1e-5) -> None:
    """float32 agreement, with an absolute floor scaled to the size of the values compared."""
    desired = np.asarray(desired)
    atol = rtol * (1.0 + float(np.max(np.abs(desired), initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=atol, err_msg=what)


def _normal(seed: int, *shape: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


def _value_and_grads(f, *args):  # type: ignore[no-untyped-def]
    """`(f(*args), d<f(*args), ct>/d args)` for a fixed random cotangent `ct`."""
    y, vjp = jax.vjp(f, *args)
    ct = jax.random.normal(jax.random.key(99), y.shape, y.dtype)
    return (y, *vjp(ct))


# --- depthwise convolution ---------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("stride",))
def _depthwise_all(x: jax.Array, kernel: jax.Array, *, stride: int) -> dict[str, tuple]:
    """`{formulation: (output, d/dx, d/dkernel)}` in one compile."""
    fns = {
        "grouped": lambda x, k: ops.depthwise_grouped(x, k, stride),
        "shift": lambda x, k: ops.depthwise_shift(x, k, stride),
        "xla": lambda x, k: ops.depthwise_conv(x, k, stride=stride, backend="xla"),
        "native": lambda x, k: ops.depthwise_conv(x, k, stride=stride, backend="native"),
    }
    return {name: _value_and_grads(f, x, kernel) for name, f in fns.items()}


def _check_depthwise(b: int, h: int, w: int, c: int, k: int, s: int) -> None:
    x, kernel = _normal(h + 16 * w, b, h, w, c), _normal(k, k, k, 1, c)
    results = _depthwise_all(x, kernel, stride=s)
    ref = results.pop("grouped")
    assert ref[0].shape == (b, -(-h // s), -(-w // s), c)
    case = f"x {tuple(x.shape)}, k {k}, stride {s}"
    for name, got in results.items():
        for what, actual, desired in zip(("y", "d/dx", "d/dkernel"), got, ref, strict=True):
            assert actual.shape == desired.shape, f"{name} {what}, {case}"
            _assert_close(actual, desired, f"{name} {what}, {case}")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_depthwise_formulations_match_grouped(kernel: int, stride: int) -> None:
    # Even and odd heights and widths, non-square, and (for k >= 5) smaller than the kernel.
    for h, w in [(6, 5), (3, 4)]:
        _check_depthwise(2, h, w, 3, kernel, stride)


@settings(max_examples=6, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    c=st.integers(1, 5),
    k=st.sampled_from([1, 3, 5]),
    s=st.sampled_from([1, 2]),
)
def test_depthwise_formulations_match_grouped_property(
    b: int, h: int, w: int, c: int, k: int, s: int
) -> None:
    _check_depthwise(b, h, w, c, k, s)


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_depthwise_conv_is_flax_s_grouped_conv(backend: str) -> None:
    """The numbers of `nnx.Conv(..., feature_group_count=C, padding="SAME")`, same kernel."""
    for stride, (h, w) in [(1, (6, 5)), (2, (7, 6))]:
        conv = nnx.Conv(
            4, 4, (3, 3), strides=stride, padding="SAME", feature_group_count=4,
            use_bias=False, rngs=nnx.Rngs(1),
        )  # fmt: skip
        x = _normal(2, 2, h, w, 4)
        y = ops.depthwise_conv(x, conv.kernel[...], stride=stride, backend=backend)
        _assert_close(y, conv(x), f"{backend}, stride {stride}")


# --- stem conv, pointwise conv, head -----------------------------------------------------


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize(("k", "stride", "hw"), [(3, 1, 9), (3, 2, 9), (5, 2, 8), (1, 1, 4)])
def test_conv_is_lax_conv_with_its_gradients(backend: str, k: int, stride: int, hw: int) -> None:
    x, kernel = _normal(1, 3, hw, hw, 2), _normal(2, k, k, 2, 5)

    def reference(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    got = _value_and_grads(lambda x, k: ops.conv(x, k, stride=stride, backend=backend), x, kernel)
    want = _value_and_grads(reference, x, kernel)
    for what, a, b in zip(("y", "dx", "dk"), got, want, strict=True):
        _assert_close(a, b, f"{backend} {what}")


@needs_native
def test_conv_kernel_gradient_alone_leaves_out_the_image_gradient() -> None:
    """In training the images are not differentiated: the native stem's backward then has
    no transposed convolution in it."""
    x, kernel = _normal(1, 2, 8, 8, 1), _normal(2, 3, 3, 1, 4)

    def loss(kernel: jax.Array) -> jax.Array:
        return jnp.sum(ops.conv(x, kernel, stride=1, backend="native") ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(kernel).as_text()
    assert hlo.count("mobisearch_conv_kernel_grad") == 1
    assert hlo.count("convolution(") == 1  # the forward only


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_pointwise_conv_is_flax_s_1x1_conv(backend: str) -> None:
    conv = nnx.Conv(3, 5, (1, 1), use_bias=False, rngs=nnx.Rngs(0))
    x = _normal(1, 2, 4, 3, 3)
    got = _value_and_grads(
        lambda x, k: ops.pointwise_conv(x, k, backend=backend), x, conv.kernel[...]
    )

    graphdef, state = nnx.split(conv)

    def reference(x: jax.Array, k: jax.Array) -> jax.Array:
        m = nnx.merge(graphdef, state, copy=True)
        m.kernel[...] = k
        return m(x)

    want = _value_and_grads(reference, x, conv.kernel[...])
    for what, a, b in zip(("y", "dx", "dk"), got, want, strict=True):
        _assert_close(a, b, f"{backend} {what}")


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_head_is_mean_pool_then_dense(backend: str) -> None:
    x, kernel, bias = _normal(1, 3, 4, 5, 6), _normal(2, 6, 7), _normal(3, 7)

    def reference(x: jax.Array, k: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2)) @ k + b[None]

    got = _value_and_grads(lambda x, k, b: ops.head(x, k, b, backend=backend), x, kernel, bias)
    want = _value_and_grads(reference, x, kernel, bias)
    for what, a, b in zip(("y", "dx", "dk", "db"), got, want, strict=True):
        _assert_close(a, b, f"{backend} {what}")


# --- BatchNorm ---------------------------------------------------------------------------


def _flax_bn(c: int, *, eval_mode: bool) -> nnx.BatchNorm:
    bn = nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    bn.scale[...] = 1.0 + 0.5 * _normal(5, c)
    bn.bias[...] = _normal(6, c)
    bn.mean[...] = 0.1 * _normal(7, c)
    bn.var[...] = 1.0 + 0.5 * jnp.abs(_normal(8, c))
    if eval_mode:
        bn.eval()
    return bn


@needs_native
@pytest.mark.parametrize("relu", [True, False])
def test_batch_norm_train_is_flax_s_with_relu(relu: bool) -> None:
    """Output, running averages and gradients of flax's training-mode BatchNorm (then
    ReLU), for input, scale and bias."""
    c = 6
    x = 2.0 + 3.0 * _normal(4, 3, 5, 5, c)  # off-centre, so the mean matters
    ref_bn = _flax_bn(c, eval_mode=False)
    graphdef, state = nnx.split(ref_bn)
    bn = (ref_bn.scale[...], ref_bn.bias[...], ref_bn.mean[...], ref_bn.var[...])

    def reference(x, scale, bias):  # type: ignore[no-untyped-def]
        m = nnx.merge(graphdef, state, copy=True)
        m.scale[...], m.bias[...] = scale, bias
        y = m(x)
        return jax.nn.relu(y) if relu else y

    def native(x, scale, bias):  # type: ignore[no-untyped-def]
        y, _, _ = ops.batch_norm_train(
            x, (scale, bias, *bn[2:]), epsilon=1e-5, momentum=0.9, relu=relu
        )
        return y

    got = _value_and_grads(native, x, *bn[:2])
    want = _value_and_grads(reference, x, *bn[:2])
    for what, a, b in zip(("y", "dx", "dscale", "dbias"), got, want, strict=True):
        _assert_close(a, b, what, rtol=1e-4)
    _, mean, var = ops.batch_norm_train(x, bn, epsilon=1e-5, momentum=0.9, relu=relu)
    ref_bn(x)  # flax updates its running averages
    _assert_close(mean, ref_bn.mean[...], "running mean")
    _assert_close(var, ref_bn.var[...], "running var")


@needs_native
@pytest.mark.parametrize("residual", [True, False])
def test_batch_norm_eval_is_flax_s_with_relu_and_residual(residual: bool) -> None:
    c = 5
    x, r = _normal(1, 2, 3, 3, c), (_normal(2, 2, 3, 3, c) if residual else None)
    ref_bn = _flax_bn(c, eval_mode=True)
    bn = (ref_bn.scale[...], ref_bn.bias[...], ref_bn.mean[...], ref_bn.var[...])
    got = ops.batch_norm_eval(x, bn, epsilon=1e-5, relu=True, residual=r)
    want = jax.nn.relu(ref_bn(x))
    _assert_close(got, want if r is None else want + r, "eval BatchNorm")


@needs_native
def test_depthwise_batch_norm_eval_is_the_three_ops() -> None:
    x, kernel = _normal(1, 2, 7, 7, 4), _normal(2, 5, 5, 1, 4)
    ref_bn = _flax_bn(4, eval_mode=True)
    bn = (ref_bn.scale[...], ref_bn.bias[...], ref_bn.mean[...], ref_bn.var[...])
    got = ops.depthwise_batch_norm_eval(x, kernel, bn, stride=2, epsilon=1e-5, relu=True)
    want = jax.nn.relu(ref_bn(ops.depthwise_grouped(x, kernel, 2)))
    _assert_close(got, want, "fused depthwise + BatchNorm + ReLU")


# --- loss and minibatch ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_is_optax_s(backend: str, smoothing: float) -> None:
    logits, labels = 3.0 * _normal(1, 16, 10), jnp.arange(16, dtype=jnp.int32) % 10

    def reference(logits: jax.Array) -> jax.Array:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, 10), smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()

    def loss(logits: jax.Array) -> jax.Array:
        return ops.softmax_cross_entropy(logits, labels, smoothing=smoothing, backend=backend)

    value, grad = jax.value_and_grad(loss)(logits)
    ref_value, ref_grad = jax.value_and_grad(reference)(logits)
    _assert_close(value, ref_value, "loss", rtol=1e-6)
    _assert_close(grad, ref_grad, "d loss / d logits", rtol=1e-5)


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_take_rows_is_indexing(backend: str) -> None:
    x, y = _normal(1, 20, 3, 3, 1), jnp.arange(20, dtype=jnp.int32)
    idx = jnp.array([3, 3, 19, 0], jnp.int32)
    xb, yb = jax.jit(functools.partial(ops.take_rows, backend=backend))(x, y, idx)
    np.testing.assert_array_equal(xb, x[idx])
    np.testing.assert_array_equal(yb, y[idx])


# --- choosing a backend, errors ----------------------------------------------------------


def test_default_backend_per_platform_and_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ops.BACKEND_ENV_VAR, raising=False)
    # Native where the kernels build; tests/test_kernels.py checks the fallback in a
    # process without a compiler.
    assert ops.default_backend("cpu") == ("native" if kernels.available() else "xla")
    assert ops.default_backend("gpu") == "xla"
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "xla")
    assert ops.default_backend("cpu") == "xla"
    monkeypatch.setenv(ops.BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{ops.BACKEND_ENV_VAR}.*'fast'"):
        ops.default_backend()


def test_native_applies_only_to_float32_on_the_cpu() -> None:
    f32, i32 = jnp.zeros(2, jnp.float32), jnp.zeros(2, jnp.int32)
    assert not ops.native_applies("xla", f32)
    assert not ops.native_applies("native", f32, i32)
    assert ops.native_applies("native", f32) == (
        jax.default_backend() == "cpu" and kernels.available()
    )


def test_errors_name_the_bad_value() -> None:
    x, k = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 1, 2))
    with pytest.raises(ValueError, match=r"`stride` \(=3\)"):
        ops.depthwise_conv(x, k, stride=3)
    with pytest.raises(ValueError, match="3 channels but `x` has 2"):
        ops.depthwise_conv(x, jnp.zeros((3, 3, 1, 3)), stride=1)
    with pytest.raises(ValueError, match=r"`backend` \(='fft'\)"):
        ops.depthwise_conv(x, k, stride=1, backend="fft")
    with pytest.raises(ValueError, match=r"must be NHWC"):
        ops.depthwise_conv(jnp.zeros((4, 4, 2)), k, stride=1)
