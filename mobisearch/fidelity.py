"""Multi-fidelity training of one candidate: the rungs of one warmup-stable-decay run.

A candidate's run follows one schedule: linear warmup, then the peak learning rate (the
*stable* phase). It is scored at rung `r` (after `S_r` steps) on a *decay branch*: from
its stable-phase state at step `S_r - D_r` the rate decays linearly to 0 over `D_r` steps
(`D_r` the recipe's `decay_fraction` of the rung's own steps), and the validation accuracy
is taken at step `S_r`. A candidate promoted to rung `r + 1` goes on from its stable-phase
state at `S_r - D_r` (`promotion = "continue"`), or trains again from step 0
(`"restart"`); either way its score at every rung is taken with the rate decayed, as the
score of a full training run is.

`RungPlan` holds the steps; `RungTrainer` trains a candidate to a rung, keeping each
candidate's stable-phase state in memory and on disk (so a promotion in another process on
the same disk, or after a restart, goes on from it; without it, it trains from step 0).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from mobisearch import compile as compile_
from mobisearch import ops, optim
from mobisearch.checkpoint import load_train_state, save_train_state
from mobisearch.data import image_mean_std
from mobisearch.train import (
    TrainState,
    _evaluate,
    prepare_images,
    start_training,
    train_steps,
)

if TYPE_CHECKING:
    from mobisearch.arch import ArchSpec
    from mobisearch.config import FidelityConfig, TrainConfig
    from mobisearch.data import Dataset

__all__ = ["RungPlan", "RungResult", "RungTrainer"]


@dataclasses.dataclass(frozen=True)
class RungPlan:
    """The steps of a multi-fidelity run.

    Attributes:
      steps: `S_r`, the step at which rung `r` is scored.
      decay: `D_r`, the length of rung `r`'s decay branch.
      cfg: the run's recipe: the space's `[train]` with `steps = S_last` and the `"wsd"`
        schedule (so the compiled train step takes rates of that length).

    Examples:
      >>> from mobisearch.config import FidelityConfig, TrainConfig
      >>> train = TrainConfig(steps=100, warmup_steps=5, decay_fraction=0.2)
      >>> plan = RungPlan.build(FidelityConfig(rungs=[1/3, 1, 3]), train, n_train=3840)
      >>> plan.steps, plan.decay, plan.stable_end(0)
      ((10, 30, 90), (2, 4, 12), 8)
    """

    steps: tuple[int, ...]
    decay: tuple[int, ...]
    cfg: TrainConfig

    @classmethod
    def build(cls, fidelity: FidelityConfig, train: TrainConfig, *, n_train: int) -> RungPlan:
        """The rungs of `fidelity` (epochs) in steps of `train.batch_size` over `n_train`
        training images.

        Raises:
          ValueError: if two rungs fall on the same step, or the warmup does not end
            before the first rung's decay.
        """
        per_epoch = n_train / train.batch_size
        steps = tuple(max(1, round(r * per_epoch)) for r in fidelity.rungs)
        if any(a >= b for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(
                f"fidelity.rungs = {list(fidelity.rungs)} epochs give steps {list(steps)} at "
                f"batch {train.batch_size} over {n_train} images; expected increasing steps"
            )
        starts = (0, *steps[:-1])
        decay = tuple(
            optim.decay_steps(s - s0, train.decay_fraction)
            for s, s0 in zip(steps, starts, strict=True)
        )
        if train.warmup_steps >= steps[0] - decay[0]:
            raise ValueError(
                f"train.warmup_steps = {train.warmup_steps}, expected fewer than the first "
                f"rung's stable steps ({steps[0] - decay[0]} of its {steps[0]})"
            )
        cfg = dataclasses.replace(train, steps=steps[-1], schedule="wsd")
        return cls(steps, decay, cfg)

    def stable_end(self, rung: int) -> int:
        """`S_r - D_r`: where rung `rung`'s decay branch leaves the stable phase."""
        return self.steps[rung] - self.decay[rung]

    def stable_rates(self) -> np.ndarray:
        """The stable phase's rates: warmup, then the peak, for every step of the run."""
        cfg = self.cfg
        schedule = optim.wsd_schedule(cfg.learning_rate, cfg.warmup_steps, cfg.steps, cfg.steps)
        return optim.learning_rates(schedule, cfg.steps)

    def branch_rates(self, rung: int) -> np.ndarray:
        """Rung `rung`'s rates: the stable phase, then the linear decay to 0 at `S_r`."""
        cfg = self.cfg
        schedule = optim.wsd_schedule(
            cfg.learning_rate, cfg.warmup_steps, self.stable_end(rung), self.steps[rung]
        )
        return optim.learning_rates(schedule, cfg.steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RungResult:
    """A candidate scored at a rung.

    Attributes:
      status: `"ok"` or `"diverged"`; reason: why it failed.
      rung, steps: the rung and its step count `S_r`.
      val_accuracy, val_loss: the score after the decay branch.
      train_s: seconds of training for this rung (its new stable steps and its branch).
      compile_s: seconds compiling (0 when the programs were compiled before).
      resumed_from: the step the stable phase went on from (0: from scratch).
      state: the scored `(params, rest)`, for latency, test accuracy and checkpoints.
    """

    status: str
    reason: str = ""
    rung: int
    steps: int
    val_accuracy: float = math.nan
    val_loss: float = math.nan
    train_s: float = 0.0
    compile_s: float = 0.0
    resumed_from: int = 0
    state: Any = dataclasses.field(default=None, repr=False, compare=False)


class RungTrainer:
    """Train candidates of one search rung by rung (see the module docstring).

    Args:
      fidelity: the rungs, `eta` and the promotion mode.
      train: the space's recipe (its `steps` and `schedule` are replaced by the rungs').
      data: the dataset (train and validation splits).
      backend: `"xla"` or `"native"` (default: this machine's).
      checkpoint_dir: where stable-phase states are kept between rungs (None: memory only).
      stats: the training split's `image_mean_std` (computed if not given).
    """

    def __init__(
        self,
        fidelity: FidelityConfig,
        train: TrainConfig,
        data: Dataset,
        *,
        backend: str | None = None,
        checkpoint_dir: str | pathlib.Path | None = None,
        stats: tuple[Any, Any] | None = None,
    ) -> None:
        self.fidelity = fidelity
        self.data = data
        self.backend = ops.check_backend(backend or ops.default_backend())
        self.plan = RungPlan.build(fidelity, train, n_train=len(data.x_train))
        self.checkpoint_dir = pathlib.Path(checkpoint_dir) if checkpoint_dir else None
        self.stats = stats if stats is not None else image_mean_std(data.x_train)
        self._stable: dict[tuple[str, int, int], TrainState] = {}  # host copies

    @property
    def cfg(self) -> TrainConfig:
        return self.plan.cfg

    def _path(self, arch: ArchSpec, seed: int, rung: int) -> pathlib.Path | None:
        if self.checkpoint_dir is None:
            return None
        return self.checkpoint_dir / "stable" / f"{arch.display_id}.seed{seed}.rung{rung}.run"

    def _keep(self, arch: ArchSpec, seed: int, rung: int, state: TrainState) -> None:
        """Keep a host copy of the stable-phase state that rung `rung` branched from."""
        params, rest, opt_state = jax.device_get((state.params, state.rest, state.opt_state))
        host = TrainState(params, rest, opt_state, state.step)
        self._stable[(arch.arch_key(), seed, rung)] = host
        path = self._path(arch, seed, rung)
        if path is not None:
            save_train_state(host, path)

    def _stable_state(self, arch: ArchSpec, seed: int, rung: int) -> TrainState | None:
        """The stable-phase state rung `rung` branched from, in memory or on disk."""
        host = self._stable.get((arch.arch_key(), seed, rung))
        if host is not None:
            params, rest, opt_state = jax.device_put((host.params, host.rest, host.opt_state))
            return TrainState(params, rest, opt_state, host.step)
        path = self._path(arch, seed, rung)
        if path is None or not path.exists():
            return None
        params, rest = compile_.abstract_state(arch, self.backend)
        tx = optim.make_optimizer(self.cfg, backend=self.backend)
        return load_train_state(path, (params, rest, jax.eval_shape(tx.init, params)))

    def train_rung(self, arch: ArchSpec, rung: int, *, seed: int) -> RungResult:
        """Train `arch` (run `seed`) up to rung `rung` and score it there.

        Rung 0 trains from scratch. A later rung goes on from the previous rung's stable
        state under `promotion = "continue"` where that state is found (memory or disk),
        and otherwise trains from scratch.
        """
        plan, cfg = self.plan, self.cfg
        if not 0 <= rung < len(plan.steps):
            raise ValueError(f"`rung` (={rung}) must be in [0, {len(plan.steps)})")
        state = None
        if rung > 0 and self.fidelity.promotion == "continue":
            state = self._stable_state(arch, seed, rung - 1)
        if state is None:
            state = start_training(arch, cfg, seed=seed, backend=self.backend)
        resumed_from, train_s, compile_s = state.step, 0.0, 0.0
        common: dict[str, Any] = {"seed": seed, "backend": self.backend, "stats": self.stats}
        stable_end = plan.stable_end(rung)
        if state.step < stable_end:
            run = train_steps(
                arch, cfg, self.data, state, stop=stable_end, rates=plan.stable_rates(), **common
            )
            train_s, compile_s = run.train_s, run.compile_s
            if run.status != "ok":
                return RungResult(
                    status=run.status, reason=run.reason, rung=rung, steps=plan.steps[rung],
                    train_s=train_s, compile_s=compile_s, resumed_from=resumed_from,
                )  # fmt: skip
            state = run.state
        self._keep(arch, seed, rung, state)
        branch = train_steps(
            arch, cfg, self.data, state, stop=plan.steps[rung],
            rates=plan.branch_rates(rung), **common,
        )  # fmt: skip
        train_s += branch.train_s
        compile_s += branch.compile_s
        if branch.status != "ok":
            return RungResult(
                status=branch.status, reason=branch.reason, rung=rung, steps=plan.steps[rung],
                train_s=train_s, compile_s=compile_s, resumed_from=resumed_from,
            )  # fmt: skip
        t0 = time.perf_counter()
        x_val = prepare_images(self.data.x_val, arch.resolution, self.stats)
        n = min(cfg.eval_batch_size, len(x_val))
        forward, compiled_s = _timed_forward(arch, self.backend, n)
        scored = (branch.state.params, branch.state.rest)
        acc, loss = _evaluate(forward, n, scored, x_val, self.data.y_val)
        return RungResult(
            status="ok",
            rung=rung,
            steps=plan.steps[rung],
            val_accuracy=acc,
            val_loss=loss,
            train_s=train_s + (time.perf_counter() - t0 - compiled_s),
            compile_s=compile_s + compiled_s,
            resumed_from=resumed_from,
            state=scored,
        )


def _timed_forward(arch: ArchSpec, backend: str, batch: int) -> tuple[Any, float]:
    """The compiled eval forward, and the seconds spent compiling it now (0 if cached)."""
    before = compile_.compile_forward.cache_info().misses
    forward = compile_.compile_forward(arch, backend, batch)
    fresh = compile_.compile_forward.cache_info().misses > before
    return forward, forward.compile_s if fresh else 0.0
