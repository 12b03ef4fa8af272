"""Tests for `mobisearch.kernels`: build and cache, fallback without a compiler, numerics.

The numerics of `depthwise_conv(impl="native")` against XLA's grouped convolution, over many
shapes, are in tests/test_models.py (`test_depthwise_variants_match_grouped*`); here are
the kernels' own calls at sizes where the batch is split over threads.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobisearch import kernels
from mobisearch.models import depthwise_conv, same_pads

needs_native = pytest.mark.skipif(
    not kernels.available(), reason=f"native kernels unavailable: {kernels.unavailable_reason()}"
)

_PROBE = (
    "from mobisearch import kernels, models;"
    "ok = kernels.available();"
    "print(ok, models.default_depthwise_impl('cpu'), kernels.library_path(), sep='|');"
    "print(kernels.unavailable_reason())"
)


def _probe(tmp_path: pathlib.Path, **env: str) -> tuple[bool, str, pathlib.Path, str]:
    """`available()`, the CPU default impl, the library path and the reason, in a new process
    whose kernel cache is `tmp_path`."""
    full_env = {**os.environ, kernels.KERNEL_DIR_ENV_VAR: str(tmp_path), **env}
    full_env.pop("MOBISEARCH_DEPTHWISE", None)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=full_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    first, reason = done.stdout.splitlines()[0], "\n".join(done.stdout.splitlines()[1:])
    ok, impl, path = first.split("|")
    return ok == "True", impl, pathlib.Path(path), reason


@needs_native
def test_builds_once_into_the_kernel_dir_and_reuses_the_build(tmp_path: pathlib.Path) -> None:
    ok, impl, path, _ = _probe(tmp_path)
    assert ok and impl == "native"
    assert path.is_file() and tmp_path in path.parents
    built = path.stat().st_mtime_ns
    # A second process loads the cached build: no compiler on PATH, nothing is rebuilt.
    (tmp_path / "empty").mkdir()
    ok, impl, again, _ = _probe(tmp_path, PATH=str(tmp_path / "empty"))
    assert ok and impl == "native" and again == path
    assert path.stat().st_mtime_ns == built
    assert not list(path.parent.glob("*.tmp"))


def test_without_a_compiler_falls_back_to_shift(tmp_path: pathlib.Path) -> None:
    ok, impl, path, reason = _probe(tmp_path, CXX="/nonexistent/c++")
    assert not ok and impl == "shift" and not path.exists()
    assert "/nonexistent/c++" in reason


def test_turned_off_by_the_environment(tmp_path: pathlib.Path) -> None:
    ok, impl, _, reason = _probe(tmp_path, **{kernels.NATIVE_ENV_VAR: "0"})
    assert not ok and impl == "shift"
    assert f"{kernels.NATIVE_ENV_VAR}=0" in reason


def test_library_path_changes_with_the_source(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV_VAR, str(tmp_path))
    before = kernels.library_path()
    edited = tmp_path / "depthwise.cc"
    edited.write_text(kernels.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(kernels, "SOURCE", edited)
    assert kernels.library_path() != before
    assert kernels.library_path().parent.parent == before.parent.parent == tmp_path


def _reference(
    x: jax.Array, kernel: jax.Array, g: jax.Array, stride: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    y, vjp = jax.vjp(lambda x, k: depthwise_conv(x, k, stride=stride, impl="grouped"), x, kernel)
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
