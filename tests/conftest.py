"""Shared fixtures. JAX runs on the CPU in tests unless a GPU test asks otherwise."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Searches started by tests (and their subprocesses) keep compiled steps out of ~/.cache.
os.environ["MOBISEARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="mobisearch-test-cache-")

from collections.abc import Iterator

import pytest

from mobisearch.arch import ArchSpec
from mobisearch.presets import tiny


def pytest_configure(config: pytest.Config) -> None:
    import jax

    # Catch silent broadcasting bugs (equinox does the same).
    jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def tiny_arch() -> ArchSpec:
    return tiny()


@pytest.fixture
def key():  # type: ignore[no-untyped-def]
    import jax

    return jax.random.key(0)


@pytest.fixture(scope="session")
def data():  # type: ignore[no-untyped-def]
    """A small synthetic dataset (in memory, seeded) for training tests."""
    from mobisearch.data import load_dataset

    return load_dataset("synthetic", validation_size=300, train_size=600)


@pytest.fixture
def fast_compile(request: pytest.FixtureRequest) -> Iterator[None]:
    """Compile with most XLA optimizations off, as flax's example tests do (about twice as
    fast here); not for `xla`-marked tests, whose flop counts are the optimized program's."""
    import jax

    if request.node.get_closest_marker("xla"):
        yield
        return
    flag = "jax_disable_most_optimizations"
    old = jax.config.read(flag)
    jax.config.update(flag, True)
    try:
        yield
    finally:
        jax.config.update(flag, old)
