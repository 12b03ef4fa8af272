"""Tests for `mobisearch.kernels` and `kernel_build`: build and cache, the fallback without a
compiler, and each kernel's numbers against XLA's.

The differentiable operations built on them (`mobisearch.ops`) are tested against XLA,
flax and optax over many shapes in tests/test_ops.py; here are the kernels' own calls at
sizes where the work is split over threads.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mobisearch import kernel_build, kernels
from mobisearch.ops import depthwise_grouped, same_pads

needs_native = pytest.mark.skipif(
    not kernels.available(), reason=f"native kernels unavailable: {kernels.unavailable_reason()}"
)

_PROBE = (
    "from mobisearch import kernel_build, ops;"
    "ok = kernel_build.available();"
    "print(ok, ops.default_backend('cpu'), kernel_build.library_path(), sep='|');"
    "print(kernel_build.unavailable_reason())"
)


def _probe(tmp_path: pathlib.Path, **env: str) -> tuple[bool, str, pathlib.Path, str]:
    """`available()`, the CPU default backend, the library path and the reason, in a new
    process whose kernel cache is `tmp_path`."""
    full_env = {**os.environ, kernel_build.KERNEL_DIR_ENV_VAR: str(tmp_path), **env}
    full_env.pop("MOBISEARCH_BACKEND", None)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=full_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    first, reason = done.stdout.splitlines()[0], "\n".join(done.stdout.splitlines()[1:])
    ok, impl, path = first.split("|")
    return ok == "True", impl, pathlib.Path(path), reason


@needs_native
def test_builds_once_into_the_kernel_dir_and_reuses_the_build(tmp_path: pathlib.Path) -> None:
    ok, backend, path, _ = _probe(tmp_path)
    assert ok and backend == "native"
    assert path.is_file() and tmp_path in path.parents
    built = path.stat().st_mtime_ns
    # A second process loads the cached build: no compiler on PATH, nothing is rebuilt.
    (tmp_path / "empty").mkdir()
    ok, backend, again, _ = _probe(tmp_path, PATH=str(tmp_path / "empty"))
    assert ok and backend == "native" and again == path
    assert path.stat().st_mtime_ns == built
    assert not list(path.parent.glob("*.tmp"))


def test_without_a_compiler_falls_back_to_xla(tmp_path: pathlib.Path) -> None:
    ok, backend, path, reason = _probe(tmp_path, CXX="/nonexistent/c++")
    assert not ok and backend == "xla" and not path.exists()
    assert "/nonexistent/c++" in reason


def test_turned_off_by_the_environment(tmp_path: pathlib.Path) -> None:
    ok, backend, _, reason = _probe(tmp_path, **{kernel_build.NATIVE_ENV_VAR: "0"})
    assert not ok and backend == "xla"
    assert f"{kernel_build.NATIVE_ENV_VAR}=0" in reason


@pytest.mark.parametrize(
    "which",
    ["depthwise.cc", "batchnorm.cc", "loss.cc", "conv.cc", "head.cc", "parallel.h", "fold.h"],
)
def test_library_path_changes_with_the_sources(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    monkeypatch.setenv(kernel_build.KERNEL_DIR_ENV_VAR, str(tmp_path))
    before = kernel_build.library_path()
    for attr in ("SOURCES", "HEADERS"):
        paths = list(getattr(kernel_build, attr))
        for i, path in enumerate(paths):
            if path.name == which:
                paths[i] = tmp_path / which
                paths[i].write_text(path.read_text() + "\n// edited\n")
        monkeypatch.setattr(kernel_build, attr, tuple(paths))
    assert kernel_build.library_path() != before
    assert kernel_build.library_path().parent.parent == before.parent.parent == tmp_path


def _reference(
    x: jax.Array, kernel: jax.Array, g: jax.Array, stride: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    y, vjp = jax.vjp(lambda x, k: depthwise_grouped(x, k, stride), x, kernel)
    return (y, *vjp(g))


@needs_native
@pytest.mark.parametrize(("b", "hw", "c", "k", "stride"), [(5, 9, 17, 3, 1), (3, 8, 40, 5, 2)])
def test_forward_and_backward_match_grouped(b: int, hw: int, c: int, k: int, stride: int) -> None:
    """Batches that do not divide evenly over the thread pool; channel counts that are not
    a multiple of the vector width."""
    kx, kk, kg = jax.random.split(jax.random.key(b), 3)
    out, lo, _ = same_pads(hw, k, stride)
    x = jax.random.normal(kx, (b, hw, hw, c))
    kernel = jax.random.normal(kk, (k, k, 1, c))
    g = jax.random.normal(kg, (b, out, out, c))
    forward = jax.jit(
        lambda x, w: kernels.depthwise_forward(
            x, w, stride=stride, pads=(lo, lo), out_hw=(out, out)
        )
    )
    backward = jax.jit(
        lambda x, w, g: kernels.depthwise_backward(x, w, g, stride=stride, pads=(lo, lo))
    )
    y = forward(x, kernel)
    dx, dk = backward(x, kernel, g)
    for name, got, want in zip(
        ("y", "dx", "dkernel"), (y, dx, dk), _reference(x, kernel, g, stride), strict=True
    ):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=name)
    # The kernel gradient is summed over fixed batch chunks in a fixed order: bitwise stable.
    dx2, dk2 = backward(x, kernel, g)
    assert jnp.array_equal(dk, dk2) and jnp.array_equal(dx, dx2)


@needs_native
@pytest.mark.parametrize(
    ("b", "hw", "cin", "cout", "k", "stride"),
    [
        (5, 20, 1, 8, 3, 1),  # the Fashion-MNIST stems: Cout 8, 16, 24, 32 in registers
        (3, 9, 1, 24, 3, 2),
        (2, 7, 3, 32, 3, 2),  # RGB
        (3, 8, 2, 7, 5, 2),  # any other Cout: the generic loop
        (2, 2, 1, 16, 5, 2),  # kernel wider than the image: taps fall off both sides
        (2, 3, 2, 64, 7, 3),
    ],
)
def test_conv_kernel_grad_is_xla_s(
    b: int, hw: int, cin: int, cout: int, k: int, stride: int
) -> None:
    """The stem's kernel gradient equals the one JAX derives for `conv_general_dilated`
    (SAME padding), and is the same on every call (chunks summed in a fixed order)."""
    kx, kk, kg = jax.random.split(jax.random.key(hw), 3)
    out, lo, _ = same_pads(hw, k, stride)
    x = jax.random.normal(kx, (b, hw, hw, cin))
    kernel = jax.random.normal(kk, (k, k, cin, cout))
    g = jax.random.normal(kg, (b, out, out, cout))

    def conv(kernel: jax.Array) -> jax.Array:
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), "SAME", dimension_numbers=dims
        )

    y, vjp = jax.vjp(conv, kernel)
    assert y.shape == g.shape
    (want,) = vjp(g)
    grad = jax.jit(lambda x, g: kernels.conv_kernel_grad(x, g, k=k, stride=stride, pads=(lo, lo)))
    got = grad(x, g)
    assert got.shape == kernel.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert jnp.array_equal(got, grad(x, g))


@needs_native
@pytest.mark.parametrize(
    ("b", "hw", "cin", "cout"),
    [
        (16, 28, 16, 32),  # many pixels, few channels: pixel chunks, partial sums
        (8, 4, 512, 512),  # few pixels, many blocks: column blocks split, packed rows
        (40, 1, 300, 40),  # few columns: row blocks split, packed y only
        (3, 5, 11, 37),  # channels off the register blocks: partial blocks and tail columns
        (2, 3, 7, 300),  # packed dz with a tail
        (1, 1, 1, 1),
    ],
)
def test_pointwise_kernel_grad_is_xla_s(b: int, hw: int, cin: int, cout: int) -> None:
    """The pointwise kernel gradient equals the one JAX derives for the 1×1 convolution (a
    dot over the channels), and is the same on every call (chunks summed in a fixed order)."""
    ky, kk, kg = jax.random.split(jax.random.key(cin * cout), 3)
    y = jax.random.normal(ky, (b, hw, hw, cin))
    kernel = jax.random.normal(kk, (1, 1, cin, cout))
    g = jax.random.normal(kg, (b, hw, hw, cout))
    _, vjp = jax.vjp(lambda k: jnp.einsum("bhwi,io->bhwo", y, k[0, 0]), kernel)
    (want,) = vjp(g)
    grad = jax.jit(kernels.pointwise_kernel_grad)
    got = grad(y, g)
    assert got.shape == kernel.shape
    # Sums of b·hw² products: float32 rounding grows with their number.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(b * hw * hw))
    assert jnp.array_equal(got, grad(y, g))


@needs_native
@pytest.mark.parametrize(
    ("b", "hw", "c", "k"), [(128, 2, 64, 10), (1, 2, 1024, 10), (3, 5, 7, 3), (40, 1, 33, 1000)]
)
def test_head_is_mean_pool_then_dense(b: int, hw: int, c: int, k: int) -> None:
    """The native head: XLA's `mean over (h, w) @ kernel + bias` and its gradients (for
    the image, the kernel and the bias), batches split over threads or not."""
    kx, kw, kb, kg = jax.random.split(jax.random.key(c), 4)
    x = jax.random.normal(kx, (b, hw, hw, c))
    kernel, bias = jax.random.normal(kw, (c, k)), jax.random.normal(kb, (k,))
    g = jax.random.normal(kg, (b, k))

    def reference(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        return jnp.dot(jnp.mean(x, axis=(1, 2)), kernel) + bias.reshape(1, -1)

    want, vjp = jax.vjp(reference, x, kernel, bias)
    logits, pooled = jax.jit(kernels.head_forward)(x, kernel, bias)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled, jnp.mean(x, axis=(1, 2)), rtol=1e-6, atol=1e-6)
    grads = jax.jit(lambda p, w, g: kernels.head_backward(p, w, g, x.shape))(pooled, kernel, g)
    # dx sums k products per pixel: float32 rounding grows with k.
    atol = 1e-5 * max(1.0, np.sqrt(k / 10))
    for name, got, ref in zip(("dx", "dkernel", "dbias"), grads, vjp(g), strict=True):
        assert got.shape == ref.shape, name
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=atol, err_msg=name)


def _bn_state(c: int, seed: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A BatchNorm's `(scale, bias, running_mean, running_var)`, away from the defaults."""
    ks, kb, km, kv = jax.random.split(jax.random.key(seed), 4)
    scale, bias = 1.0 + 0.5 * jax.random.normal(ks, (c,)), jax.random.normal(kb, (c,))
    return scale, bias, jax.random.normal(km, (c,)), 0.5 + jax.random.uniform(kv, (c,))


def _flax_eval_batch_norm(
    y: jax.Array, bn: tuple[jax.Array, ...], relu: bool, residual: jax.Array | None = None
) -> jax.Array:
    """`nnx.BatchNorm` in eval mode with the state `bn`, then ReLU, then `+ residual`."""
    from flax import nnx

    layer = nnx.BatchNorm(y.shape[-1], epsilon=1e-5, use_running_average=True, rngs=nnx.Rngs(0))
    layer.scale[...], layer.bias[...], layer.mean[...], layer.var[...] = bn
    out = layer(y)
    out = jnp.maximum(out, 0.0) if relu else out
    return out if residual is None else out + residual


@needs_native
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize(
    ("b", "hw", "c", "k", "stride"),
    # Channel counts that take the 64-, 32-, 16- and 8-wide paths and the scalar tail;
    # batches of one (split over rows), images smaller than the kernel.
    [(1, 11, 100, 3, 1), (2, 7, 17, 5, 2), (1, 6, 8, 3, 2), (3, 5, 200, 3, 1), (1, 2, 13, 5, 1)],
)
def test_depthwise_batch_norm_eval_matches_flax(
    b: int, hw: int, c: int, k: int, stride: int, relu: bool
) -> None:
    """The fused eval forward: conv, then the layer's eval-mode BatchNorm, then ReLU."""
    kx, kk = jax.random.split(jax.random.key(c + hw))
    out, lo, _ = same_pads(hw, k, stride)
    x = jax.random.normal(kx, (b, hw, hw, c))
    kernel = jax.random.normal(kk, (k, k, 1, c))
    bn = _bn_state(c, seed=k)
    got = jax.jit(
        lambda x, w, bn: kernels.depthwise_batch_norm_eval(
            x, w, bn, stride=stride, pads=(lo, lo), out_hw=(out, out), epsilon=1e-5, relu=relu
        )
    )(x, kernel, bn)
    want = _flax_eval_batch_norm(depthwise_grouped(x, kernel, stride), bn, relu)
    assert got.shape == want.shape == (b, out, out, c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    if relu:
        assert float(got.min()) == 0.0 and float(want.min()) < 0.5 * float(want.max())


def test_depthwise_batch_norm_eval_refuses_a_state_of_the_wrong_size() -> None:
    if not kernels.available():
        pytest.skip("native kernels unavailable")
    x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 1, 2))
    bn = (jnp.ones(2), jnp.ones(2), jnp.ones(3), jnp.ones(2))
    with pytest.raises(Exception, match="one value per channel"):
        jax.block_until_ready(
            kernels.depthwise_batch_norm_eval(
                x, w, bn, stride=1, pads=(1, 1), out_hw=(4, 4), epsilon=1e-5, relu=True
            )
        )


def _flax_batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, g: jax.Array, relu: bool
) -> tuple[jax.Array, ...]:
    """`nnx.BatchNorm` in training mode (then ReLU): its output, the batch statistics (in
    float64) and the gradients of `<y, g>` with respect to x, scale and bias."""
    from flax import nnx

    graphdef, state = nnx.split(nnx.BatchNorm(x.shape[-1], epsilon=1e-5, rngs=nnx.Rngs(0)))

    def f(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        bn = nnx.merge(graphdef, state, copy=True)
        bn.scale[...], bn.bias[...] = scale, bias
        y = bn(x)
        return jax.nn.relu(y) if relu else y

    y, vjp = jax.vjp(f, x, scale, bias)
    x64 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return (y, x64.mean(0), x64.var(0), *vjp(g))


@needs_native
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("shape", [(5, 9, 9, 17), (3, 8, 8, 40), (2, 3, 3, 100), (7, 1, 1, 16)])
def test_batch_norm_matches_flax(shape: tuple[int, ...], relu: bool) -> None:
    """Row counts that do not split evenly over the threads or the vector strides; channel
    counts below, above and not a multiple of the stride width."""
    kx, ks, kb, kg = jax.random.split(jax.random.key(sum(shape)), 4)
    c = shape[-1]
    x = 3.0 + 2.0 * jax.random.normal(kx, shape)  # off-centre, so the mean matters
    scale = 1.0 + 0.5 * jax.random.normal(ks, (c,))
    bias = 0.5 * jax.random.normal(kb, (c,))
    g = jax.random.normal(kg, shape)
    running_mean, running_var = 0.1 * scale, 1.0 + 0.5 * bias * bias

    def forward(x, s, b):  # type: ignore[no-untyped-def]
        out = jax.jit(
            lambda *a: kernels.batch_norm_forward(*a, epsilon=1e-5, relu=relu, momentum=0.9)
        )(x, s, b, running_mean, running_var)
        # The running averages, as flax updates them (float32).
        for new, old, stat in zip(out[3:], (running_mean, running_var), out[1:3], strict=True):
            np.testing.assert_allclose(new, 0.9 * old + (1 - 0.9) * stat, rtol=1e-6, atol=1e-7)
        return out[:3]

    backward = jax.jit(
        lambda x, y, s, m, v, g: kernels.batch_norm_backward(
            x, y, s, m, v, g, epsilon=1e-5, relu=relu
        )
    )
    y, mean, var = forward(x, scale, bias)
    dx, dscale, dbias = backward(x, y, scale, mean, var, g)
    want = _flax_batch_norm(x, scale, bias, g, relu)
    names = ("y", "mean", "var", "dx", "dscale", "dbias")
    for name, got, ref in zip(names, (y, mean, var, dx, dscale, dbias), want, strict=True):
        assert got.shape == ref.shape, name
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=name)
    if relu:
        assert float(jnp.min(y)) == 0.0
    # Sums are added per chunk in a fixed order: bitwise stable.
    again = backward(x, y, scale, mean, var, g)
    assert all(jnp.array_equal(a, b) for a, b in zip((dx, dscale, dbias), again, strict=True))


@needs_native
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("shape", [(1, 5, 5, 24), (3, 31, 29, 80), (2, 1, 1, 7)])
def test_batch_norm_eval_matches_flax(shape: tuple[int, ...], relu: bool, residual: bool) -> None:
    """Layers below and above the size that is split over threads (1·5·5·24 floats run on
    the caller, 3·31·29·80 in chunks of rows), and a channel count no vector width divides:
    flax's eval-mode BatchNorm, ReLU and `+ residual`, to float32 rounding."""
    kx, kr = jax.random.split(jax.random.key(sum(shape)))
    x = jax.random.normal(kx, shape)
    bn = _bn_state(shape[-1], seed=len(shape))
    r = jax.random.normal(kr, shape) if residual else None
    got = jax.jit(
        lambda x, bn, r: kernels.batch_norm_eval(x, bn, epsilon=1e-5, relu=relu, residual=r)
    )(x, bn, r)
    want = _flax_eval_batch_norm(x, bn, relu, r)
    assert got.shape == shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if relu and not residual:
        assert float(jnp.min(got)) >= 0.0 and float(jnp.min(x)) < 0.0


@needs_native
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("b", "c"), [(128, 10), (3, 1000)])
def test_softmax_cross_entropy_matches_optax(b: int, c: int, smoothing: float) -> None:
    """Loss and gradient of the mean, with large logits (a naive exp would overflow)."""
    kz, ky = jax.random.split(jax.random.key(b + c))
    logits = 30.0 * jax.random.normal(kz, (b, c))
    labels = jax.random.randint(ky, (b,), 0, c)

    def reference(z):  # type: ignore[no-untyped-def]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, c), smoothing)
        return optax.softmax_cross_entropy(z, targets).mean()

    loss, dlogits = jax.jit(lambda z, y: kernels.softmax_cross_entropy(z, y, smoothing=smoothing))(
        logits, labels
    )
    want_loss, want_grad = jax.value_and_grad(reference)(logits)
    assert loss.shape == () and dlogits.shape == (b, c)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(dlogits, want_grad, rtol=1e-4, atol=1e-7)


@needs_native
def test_softmax_cross_entropy_refuses_a_label_out_of_range() -> None:
    with pytest.raises(Exception, match=r"label 10 of row 1 is not in \[0, 10\)"):
        jax.block_until_ready(
            kernels.softmax_cross_entropy(jnp.zeros((2, 10)), jnp.array([0, 10]))
        )


def test_optimizer_update_arguments_go_together() -> None:
    """Every parameter needs its gradient and decay flag, and each moment is one flat array
    of all the parameters' sizes."""
    args = {"b1": 0.9, "weight_decay": 0.0, "decay": [True]}
    table, count = jnp.zeros((5, 3)), jnp.int32(0)
    with pytest.raises(ValueError, match="differ"):
        kernels.optimizer_update([jnp.zeros(3)], [], [jnp.zeros(3)], table, count, **args)
    p = [jnp.zeros((2, 3))]
    with pytest.raises(ValueError, match=r"shape \(4,\), expected \(6,\)"):
        kernels.optimizer_update(p, p, [jnp.zeros(4)], table, count, **args)
    with pytest.raises(ValueError, match=r"table of shape \(3,\), expected \(steps, 3\)"):
        kernels.optimizer_update(p, p, [jnp.zeros(6)], jnp.zeros(3), count, **args)


@needs_native
def test_take_rows_is_indexing_and_refuses_an_index_out_of_range() -> None:
    """The native minibatch gather copies rows `idx` of images and labels, as `x[idx]`."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 7, 7, 2)).astype(np.float32)
    y = rng.integers(0, 10, 50).astype(np.int32)
    idx = rng.integers(0, 50, 17).astype(np.int32)  # with repeats
    xb, yb = jax.jit(kernels.take_rows)(x, y, idx)
    np.testing.assert_array_equal(xb, x[idx])
    np.testing.assert_array_equal(yb, y[idx])
    with pytest.raises(Exception, match=r"index 50 at position 1 is not in \[0, 50\)"):
        jax.block_until_ready(kernels.take_rows(x, y, np.array([0, 50], np.int32)))
