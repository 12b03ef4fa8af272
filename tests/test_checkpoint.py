"""Checkpoints: a trained state round-trips, a mismatched one is refused by name."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from mobisearch import compile as compile_
from mobisearch import train
from mobisearch.checkpoint import load_model, load_state, save_state
from mobisearch.data import image_mean_std
from tests.test_train import CFG, small_arch


def test_checkpoint_round_trip(tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    arch = small_arch()
    result = train.train_and_evaluate(arch, CFG, data, seed=0)
    save_state(result.state, tmp_path / "c.msgpack")
    restored = load_state(arch, tmp_path / "c.msgpack")
    stats = image_mean_std(data.x_train)
    a = train.evaluate(arch, result.state, data.x_test, data.y_test, cfg=CFG, stats=stats)
    b = train.evaluate(arch, restored, data.x_test, data.y_test, cfg=CFG, stats=stats)
    assert a == b
    # Restored into the cached abstract structure, which stays abstract for the next load.
    leaves = jax.tree.leaves(compile_.abstract_state(arch))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
    wider = dataclasses.replace(arch, width=arch.width * 2)
    with pytest.raises(ValueError, match=r"c\.msgpack: a parameter array of shape .* expected"):
        load_state(wider, tmp_path / "c.msgpack")


def test_load_model_is_the_trained_model_in_eval_mode(tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    """One call gives the trained Flax NNX model back: in eval mode, with the trained
    state, on either backend (a checkpoint does not depend on the backend)."""
    import jax.numpy as jnp
    import numpy as np

    arch = small_arch()
    result = train.train_and_evaluate(arch, CFG, data, seed=0, backend="native")
    save_state(result.state, tmp_path / "c.msgpack")
    stats = image_mean_std(data.x_train)
    x = jnp.asarray(train.prepare_images(data.x_val[:16], arch.resolution, stats))
    want = compile_.compiled_forward(arch, "native", batch=16).step(*result.state, x)
    for backend in ("native", "xla"):
        model = load_model(arch, tmp_path / "c.msgpack", backend=backend)
        assert model.backend == backend and model.stem.bn.use_running_average
        np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)


def test_load_state_refuses_a_file_that_is_not_a_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "x.msgpack"
    bad.write_text("{}")
    with pytest.raises(ValueError, match=r"x\.msgpack: not a mobisearch checkpoint"):
        load_state(small_arch(), bad)
