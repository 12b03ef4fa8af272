"""Multi-fidelity training (`mobisearch.fidelity`): the rungs' steps, the per-rung
warmup-stable-decay schedule, and real training of a tiny network rung by rung (continue,
restart, from memory and from disk), checked against one unsegmented run."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobisearch import optim, train
from mobisearch.config import FidelityConfig, TrainConfig
from mobisearch.data import image_mean_std
from mobisearch.fidelity import RungPlan, RungResult, RungTrainer
from tests.test_train import small_arch

# --- RungPlan ------------------------------------------------------------------------------


def test_plan_steps_by_hand() -> None:
    # 2000 images at batch 64: 31.25 steps per epoch; 0.5, 1, 2 epochs -> 15.625, 31.25,
    # 62.5 -> 16, 31, 62 steps. Decay: 20% of each rung's own steps: 16 -> 3.2, 15 -> 3,
    # 31 -> 6.2.
    cfg = TrainConfig(steps=100, batch_size=64, warmup_steps=2, decay_fraction=0.2, seed=3)
    plan = RungPlan.build(FidelityConfig(rungs=[0.5, 1, 2]), cfg, n_train=2000)
    assert (plan.steps, plan.decay) == ((16, 31, 62), (3, 3, 6))
    assert [plan.stable_end(r) for r in range(3)] == [13, 28, 56]
    # The run's recipe: the last rung's steps, the "wsd" schedule, the rest as given.
    assert plan.cfg == dataclasses.replace(cfg, steps=62, schedule="wsd")


def test_plan_rungs_that_collide_name_the_values() -> None:
    cfg = TrainConfig(steps=100, batch_size=64, warmup_steps=0)
    with pytest.raises(ValueError) as e:
        RungPlan.build(FidelityConfig(rungs=[0.01, 0.02, 1]), cfg, n_train=2000)
    assert str(e.value) == (
        "fidelity.rungs = [0.01, 0.02, 1.0] epochs give steps [1, 1, 31] at batch 64 over "
        "2000 images; expected increasing steps"
    )


def test_plan_warmup_past_the_first_decay_names_the_values() -> None:
    fidelity = FidelityConfig(rungs=[0.5, 1, 2])
    ok = TrainConfig(steps=100, batch_size=64, warmup_steps=12)
    assert RungPlan.build(fidelity, ok, n_train=2000).stable_end(0) == 13
    with pytest.raises(ValueError) as e:
        RungPlan.build(fidelity, dataclasses.replace(ok, warmup_steps=13), n_train=2000)
    assert str(e.value) == (
        "train.warmup_steps = 13, expected fewer than the first rung's stable steps (13 of its 16)"
    )


# --- the per-rung schedule -----------------------------------------------------------------

PLANS = {
    # quick.toml's recipe with rungs at 0.5, 1, 2 epochs.
    "quick": (FidelityConfig(rungs=[0.5, 1, 2]), TrainConfig(steps=20, batch_size=64,
              learning_rate=0.005, warmup_steps=2), 2000),
    # fashion_mnist_stages.toml: 1/3, 1, 3 epochs of 55,000 images at batch 128.
    "stages": (FidelityConfig(rungs=[0.3333, 1, 3]), TrainConfig(steps=1290, batch_size=128,
               learning_rate=0.005, warmup_steps=10, schedule="wsd"), 55_000),
    # No warmup, one-step decay branches, four rungs.
    "edges": (FidelityConfig(rungs=[1, 2, 3, 4], eta=2), TrainConfig(steps=10, batch_size=10,
              learning_rate=0.1, warmup_steps=0, decay_fraction=0.01), 50),
}  # fmt: skip


def check_schedule(plan: RungPlan) -> None:
    """Each rung's rates: the warmup, the stable peak until the branch leaves it at
    S_r - D_r, then a linear decay whose floor is reached exactly at the scored step S_r
    (0 there; its last trained step S_r - 1 has the smallest positive rate); the stable
    rates never decay."""
    cfg = plan.cfg
    peak, warmup = np.float32(cfg.learning_rate), cfg.warmup_steps
    stable = plan.stable_rates()
    assert stable.shape == (cfg.steps,) and stable.dtype == np.float32
    assert np.all(np.diff(stable) >= 0)  # never decays
    assert np.all(stable[warmup:] == peak)
    if warmup:
        assert stable[0] == 0 and np.all(np.diff(stable[: warmup + 1]) > 0)
        np.testing.assert_allclose(stable[:warmup], peak * np.arange(warmup) / warmup, rtol=1e-6)
    for r, (s, d) in enumerate(zip(plan.steps, plan.decay, strict=True)):
        rates = plan.branch_rates(r)
        assert rates.shape == (cfg.steps,)
        leave = plan.stable_end(r)
        assert leave == s - d and warmup < leave
        # The branch is the stable phase, bit for bit, up to where it leaves it.
        np.testing.assert_array_equal(rates[: leave + 1], stable[: leave + 1])
        assert rates[leave] == peak
        # Linear decay over D_r steps: peak * (S_r - t) / D_r at step t.
        branch = rates[leave:s]
        assert np.all(branch > 0) and np.all(np.diff(branch) < 0)
        want = peak * (s - np.arange(leave, s)) / d
        np.testing.assert_allclose(branch, want, rtol=1e-5, atol=1e-6 * peak)
        assert rates[s - 1] == branch.min()  # the floor of the trained steps, at the end
        # At the scored step the rate is 0 (up to XLA's rounding: no step trains there, the
        # next rung goes on from the stable phase).
        schedule = optim.wsd_schedule(cfg.learning_rate, warmup, leave, s)
        assert float(schedule(s)) == 0.0
        assert np.all(np.abs(rates[s:]) <= 1e-6 * peak)
        assert np.all(np.abs(rates[s:]) < rates[s - 1])


@pytest.mark.parametrize("name", list(PLANS))
def test_each_rung_decays_to_its_floor_at_its_scored_step(name: str) -> None:
    fidelity, cfg, n_train = PLANS[name]
    plan = RungPlan.build(fidelity, cfg, n_train=n_train)
    if name == "stages":
        assert (plan.steps, plan.decay) == ((143, 430, 1289), (29, 57, 172))
    if name == "edges":
        assert plan.decay == (1, 1, 1, 1) and plan.steps == (5, 10, 15, 20)
    check_schedule(plan)


@pytest.mark.slow
@settings(deadline=None, max_examples=20)
@given(
    rungs=st.lists(st.integers(1, 40), min_size=1, max_size=4, unique=True).map(sorted),
    batch=st.integers(1, 64),
    warmup=st.integers(0, 8),
    fraction=st.floats(0.01, 0.9),
)
def test_schedules_of_random_plans(
    rungs: list[int], batch: int, warmup: int, fraction: float
) -> None:
    fidelity = FidelityConfig(rungs=[r / 4 for r in rungs])
    cfg = TrainConfig(steps=1000, batch_size=batch, warmup_steps=warmup, decay_fraction=fraction)
    try:
        plan = RungPlan.build(fidelity, cfg, n_train=40 * batch)
    except ValueError as e:  # the warmup does not fit the first rung
        assert "train.warmup_steps" in str(e)
        return
    check_schedule(plan)


# --- RungTrainer on real training ----------------------------------------------------------

# 600 synthetic training images at batch 32 (18.75 steps per epoch); rungs at 0.5, 1 and 2
# epochs: S = 9, 19, 38 steps, decay branches D = 2, 2, 4, stable phase left at 7, 17, 34.
FIDELITY = FidelityConfig(rungs=[0.5, 1, 2])
CFG = TrainConfig(
    steps=100, batch_size=32, learning_rate=0.01, warmup_steps=2, eval_batch_size=128
)
ARCH = small_arch()


def leaves(state: Any) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def assert_same(a: RungResult, b: RungResult) -> None:
    """The same scored weights and score, bit for bit."""
    assert (a.status, a.rung, a.steps) == (b.status, b.rung, b.steps) == ("ok", a.rung, a.steps)
    assert (a.val_accuracy, a.val_loss) == (b.val_accuracy, b.val_loss)
    for x, y in zip(leaves(a.state), leaves(b.state), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def chained(data, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Rungs 0, 1 and 2 of one candidate, each going on from the previous rung's stable
    state (`promotion = "continue"`), kept in memory and on disk."""
    ckpt = tmp_path_factory.mktemp("rungs")
    trainer = RungTrainer(FIDELITY, CFG, data, checkpoint_dir=ckpt)
    assert trainer.plan.steps == (9, 19, 38) and trainer.plan.decay == (2, 2, 4)
    return ckpt, [trainer.train_rung(ARCH, r, seed=0) for r in range(3)]


def test_promotion_continues_from_the_stable_state(chained) -> None:  # type: ignore[no-untyped-def]
    ckpt, rungs = chained
    assert [r.status for r in rungs] == ["ok"] * 3
    assert [r.rung for r in rungs] == [0, 1, 2]
    assert [r.steps for r in rungs] == [9, 19, 38]
    assert [r.resumed_from for r in rungs] == [0, 7, 17]
    assert all(0.0 <= r.val_accuracy <= 1.0 and np.isfinite(r.val_loss) for r in rungs)
    assert all(r.train_s > 0 for r in rungs)
    # Each rung trained on: its weights differ from the previous rung's.
    for a, b in zip(rungs, rungs[1:], strict=False):
        assert any(
            not np.array_equal(x, y) for x, y in zip(leaves(a.state), leaves(b.state), strict=True)
        )
    # One stable state per rung on disk, by display id, seed and rung.
    names = sorted(p.name for p in (ckpt / "stable").iterdir())
    assert names == [f"{ARCH.display_id}.seed0.rung{r}.run" for r in range(3)]


def test_a_new_trainer_continues_from_disk(chained, data) -> None:  # type: ignore[no-untyped-def]
    """Another process (a new trainer on the same folder) goes on from the stable state
    on disk with the same numbers as the trainer that kept it in memory."""
    ckpt, rungs = chained
    for r in (1, 2):
        again = RungTrainer(FIDELITY, CFG, data, checkpoint_dir=ckpt).train_rung(ARCH, r, seed=0)
        assert again.resumed_from == (7, 17)[r - 1]
        assert_same(again, rungs[r])


def test_segments_equal_one_run(chained, data) -> None:  # type: ignore[no-untyped-def]
    """Continuing to rung 2 gives the weights of one run trained on the stable rates
    straight to S_2 - D_2 = 34, then on rung 2's decay branch to 38; training rung 2 from
    scratch (no stable state kept) or with `promotion = "restart"` gives them too."""
    _, rungs = chained
    trainer = RungTrainer(FIDELITY, CFG, data)  # memory only, nothing kept yet
    plan, stats = trainer.plan, image_mean_std(data.x_train)
    state = train.start_training(ARCH, plan.cfg, seed=0)
    common = {"seed": 0, "stats": stats}
    state = train.train_steps(ARCH, plan.cfg, data, state, stop=34, rates=plan.stable_rates(),
                              **common).state  # fmt: skip
    run = train.train_steps(ARCH, plan.cfg, data, state, stop=38, rates=plan.branch_rates(2),
                            **common)  # fmt: skip
    assert run.status == "ok" and run.state.step == 38
    scored = (run.state.params, run.state.rest)
    for x, y in zip(leaves(scored), leaves(rungs[2].state), strict=True):
        np.testing.assert_array_equal(x, y)
    acc, loss = train.evaluate(ARCH, scored, data.x_val, data.y_val, cfg=plan.cfg, stats=stats)
    assert (acc, loss) == (rungs[2].val_accuracy, rungs[2].val_loss)

    scratch = trainer.train_rung(ARCH, 2, seed=0)
    assert scratch.resumed_from == 0
    assert_same(scratch, rungs[2])
    restart = RungTrainer(dataclasses.replace(FIDELITY, promotion="restart"), CFG, data)
    assert restart.train_rung(ARCH, 0, seed=0).resumed_from == 0
    again = restart.train_rung(ARCH, 1, seed=0)
    assert again.resumed_from == 0  # trained from step 0, although rung 0 was kept
    assert_same(again, rungs[1])


def test_seeds_are_kept_apart(chained, data) -> None:  # type: ignore[no-untyped-def]
    """A noise re-run (another seed) neither reads nor overwrites seed 0's stable states."""
    ckpt, rungs = chained
    trainer = RungTrainer(FIDELITY, CFG, data, checkpoint_dir=ckpt)
    other = trainer.train_rung(ARCH, 1, seed=1)
    assert other.resumed_from == 0  # no stable state of seed 1 yet
    assert other.val_loss != rungs[1].val_loss
    assert (ckpt / "stable" / f"{ARCH.display_id}.seed1.rung1.run").exists()
    assert_same(trainer.train_rung(ARCH, 2, seed=0), rungs[2])


def test_train_rung_refuses_a_rung_out_of_range(data) -> None:  # type: ignore[no-untyped-def]
    trainer = RungTrainer(FIDELITY, CFG, data)
    for rung in (-1, 3):
        with pytest.raises(ValueError, match=rf"`rung` \(={rung}\) must be in \[0, 3\)"):
            trainer.train_rung(ARCH, rung, seed=0)
