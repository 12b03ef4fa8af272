"""Optimizers: the fused native update is optax's AdamW / SGD, an optax transformation
like any other, and its schedule table is the schedule a step computes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mobisearch import compile as compile_
from mobisearch import kernels, optim, train
from tests.test_train import CFG, small_arch

needs_native = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not kernels.available(),
    reason="needs the CPU backend and the native kernels",
)


@pytest.mark.parametrize("backend", ["xla", "native"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_init_optimizer_equals_the_optimizer_s_init(optimizer: str, backend: str) -> None:
    _, params, _ = train.fresh_split(small_arch(), training=True)
    tx = optim.make_optimizer(dataclasses.replace(CFG, optimizer=optimizer), backend=backend)
    got, want = optim.init_optimizer(tx, params), tx.init(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert isinstance(a, jax.Array) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # A state that does not start at zero is refused, not silently zeroed.
    with pytest.raises(ValueError, match="does not start at zero"):
        optim.init_optimizer(optax.adagrad(0.1, initial_accumulator_value=0.1), params)


def _run(tx, params, grads_seq, *, fused_apply: bool):  # type: ignore[no-untyped-def]
    """Parameters after applying `tx` to each gradient of `grads_seq`."""
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):  # type: ignore[no-untyped-def]
        if fused_apply:
            return optim.apply_updates(tx, grads, state, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for grads in grads_seq:
        params, state = step(params, state, grads)
    return params, state


@needs_native
@pytest.mark.parametrize("fused_apply", [True, False], ids=["apply_updates", "update"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_optimizer_is_optax_s(optimizer: str, fused_apply: bool) -> None:
    """The fused transformation gives optax's AdamW / SGD (same schedule, same weight-decay
    mask, same moments), to float32 rounding, over the warm-up and the cosine decay, both
    through `tx.update` + `optax.apply_updates` and through the one-call `apply_updates`."""
    cfg = dataclasses.replace(CFG, optimizer=optimizer, weight_decay=0.05)
    native, reference = (optim.make_optimizer(cfg, backend=b) for b in ("native", "xla"))
    assert isinstance(native, optax.GradientTransformation)
    _, params, _ = train.fresh_split(small_arch(), "native", training=True)
    rng = np.random.default_rng(0)
    grads_seq = [
        jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        for _ in range(cfg.steps)
    ]
    p_n, state_n = _run(native, params, grads_seq, fused_apply=fused_apply)
    p_r, _ = _run(reference, params, grads_seq, fused_apply=False)
    moved = 0.0
    leaves = zip(jax.tree.leaves(p_n), jax.tree.leaves(p_r), jax.tree.leaves(params), strict=True)
    for a, b, p0 in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, float(np.max(np.abs(np.asarray(b) - np.asarray(p0)))))
    assert moved > 1e-3  # the steps did move the parameters
    assert int(state_n.steps) == cfg.steps
    # The schedule is a table of the recipe's steps: one step more is refused.
    with pytest.raises(Exception, match="step 12 is past the recipe.s 12 steps"):
        jax.block_until_ready(native.update(grads_seq[0], state_n, p_n))


@needs_native
def test_fused_optimizer_composes_with_optax_chain() -> None:
    """Clipping before the fused AdamW: the same as clipping before optax's AdamW."""
    cfg = dataclasses.replace(CFG, weight_decay=0.01)
    _, params, _ = train.fresh_split(small_arch(), "native", training=True)
    grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
    results = []
    for backend in ("native", "xla"):
        tx = optax.chain(
            optax.clip_by_global_norm(1.0), optim.make_optimizer(cfg, backend=backend)
        )
        results.append(_run(tx, params, [grads] * 3, fused_apply=True)[0])
    for a, b in zip(*map(jax.tree.leaves, results), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_learning_rates_are_the_schedule_computed_in_a_step() -> None:
    """Rate t is bit for bit what optax's schedule computes inside step t; the fused
    optimizer's table adds Adam's bias corrections of step t."""
    cfg = dataclasses.replace(CFG, steps=30, warmup_steps=5)
    schedule = optim.make_schedule(cfg)
    assert callable(schedule)
    rates = optim.learning_rates(schedule, cfg.steps)
    assert rates.shape == (30,) and rates.dtype == np.float32
    table = optim.coefficient_table(rates, optim.ADAM_B1, optim.ADAM_B2)
    one = jax.jit(lambda t: jnp.stack([schedule(t), 1 - optim.ADAM_B1 ** (t + 1)]))
    for t in (0, 4, 5, 17, 29):
        assert np.array_equal(table[t, :2], np.asarray(one(np.int32(t)), np.float32)), t
    assert rates[0] == 0.0 and rates[5] == np.float32(cfg.learning_rate)


def test_wsd_decays_to_zero_at_the_scored_step() -> None:
    cfg = dataclasses.replace(CFG, steps=20, warmup_steps=4, schedule="wsd", decay_fraction=0.25)
    rates = optim.recipe_rates(cfg)
    peak = np.float32(cfg.learning_rate)
    assert rates[0] == 0 and np.all(rates[4:15] == peak)  # warmup, then stable
    assert np.all(np.diff(rates[15:]) < 0) and rates[-1] == peak / 5  # linear to 0 at step 20


def test_prepare_recipe_computes_the_rates_once() -> None:
    """A search computes the recipe's rates before its first candidate; the candidates'
    train steps reuse them."""
    cfg = dataclasses.replace(CFG, steps=13)
    optim.recipe_rates.cache_clear()
    train.prepare_recipe(cfg, "native")
    assert optim.recipe_rates.cache_info().currsize == 1
    misses = optim.recipe_rates.cache_info().misses
    compile_.compile_train(small_arch(0.5, resolution=12), cfg, "native", 64)
    assert optim.recipe_rates.cache_info().misses == misses


def test_wsd_schedule_by_hand() -> None:
    """Warmup 0 -> peak over 4 steps, the peak until step 10, then linear to 0 at step 14;
    `learning_rates` gives the schedule's values step by step."""
    rates = optim.learning_rates(optim.wsd_schedule(0.8, 4, 10, 14), 14)
    want = [0.0, 0.2, 0.4, 0.6] + [0.8] * 7 + [0.6, 0.4, 0.2]
    np.testing.assert_allclose(rates, want, rtol=1e-6)
    assert np.all(rates[4:11] == np.float32(0.8))  # the stable phase is the peak, exactly
    # Without warmup the first step trains at the peak; a one-step branch decays to 0 at once.
    np.testing.assert_allclose(
        optim.learning_rates(optim.wsd_schedule(1.0, 0, 3, 5), 6), [1, 1, 1, 1, 0.5, 0], atol=1e-7
    )
    np.testing.assert_allclose(
        optim.learning_rates(optim.wsd_schedule(1.0, 0, 4, 5), 5), [1, 1, 1, 1, 1], atol=1e-7
    )


def test_learning_rates_of_a_constant_and_the_recipe() -> None:
    rates = optim.learning_rates(0.25, 5)
    assert rates.dtype == np.float32 and rates.tolist() == [0.25] * 5
    assert not rates.flags.writeable  # shared by every train step of the recipe
    # The "wsd" recipe decays over its last decay_fraction of steps (at least one step).
    cfg = dataclasses.replace(CFG, steps=40, warmup_steps=3, schedule="wsd", decay_fraction=0.3)
    assert optim.decay_steps(40, 0.3) == 12 and optim.decay_steps(3, 0.01) == 1
    want = optim.learning_rates(optim.wsd_schedule(cfg.learning_rate, 3, 28, 40), 40)
    np.testing.assert_array_equal(optim.recipe_rates(cfg), want)
    assert optim.recipe_rates(cfg) is optim.recipe_rates(cfg)  # cached per recipe
    assert not optim.recipe_rates(cfg).flags.writeable
