"""Optimizers and learning-rate schedules of a training recipe, as optax transformations.

`make_optimizer(cfg, backend=..., rates=...)` returns an `optax.GradientTransformation`:
optax's own `adamw` (or SGD with Nesterov momentum after decoupled weight decay) on the
`"xla"` backend, and on `"native"` the same update as one C++ call per step (`fused_adamw`,
`fused_sgd`): a transformation like any other (`init`, `update`, composable with
`optax.chain`), whose state keeps each moment as ONE flat array.

A train step takes its learning rates as data, one per step (`learning_rates` of an optax
schedule), so one compiled step serves the decay branches of a warmup-stable-decay
schedule (`wsd_schedule`) as well as the recipe's own schedule.

Weight decay applies to kernels (arrays of rank > 1), not to BatchNorm or biases.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mobisearch import kernels, ops

if TYPE_CHECKING:
    from mobisearch.space import TrainConfig

__all__ = [
    "FusedState",
    "apply_updates",
    "coefficient_table",
    "decay_mask",
    "fused_adamw",
    "fused_sgd",
    "init_optimizer",
    "learning_rates",
    "make_optimizer",
    "make_schedule",
    "recipe_rates",
    "wsd_schedule",
]

# optax.adamw's default decay rates and epsilon, and the SGD momentum of `make_optimizer`.
ADAM_B1, ADAM_B2, ADAM_EPS, SGD_MOMENTUM = 0.9, 0.999, 1e-8, 0.9


def make_schedule(cfg: TrainConfig) -> optax.ScalarOrSchedule:
    """The learning-rate schedule of a training recipe (optax's)."""
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=cfg.learning_rate,
            warmup_steps=min(cfg.warmup_steps, max(cfg.steps - 1, 0)),
            decay_steps=max(cfg.steps, 1),
            end_value=cfg.learning_rate * 0.01,
        )
    if cfg.schedule == "wsd":
        stable = max(cfg.steps - decay_steps(cfg.steps, cfg.decay_fraction), cfg.warmup_steps)
        return wsd_schedule(cfg.learning_rate, cfg.warmup_steps, stable, cfg.steps)
    return cfg.learning_rate


@functools.lru_cache(maxsize=16)
def recipe_rates(cfg: TrainConfig) -> np.ndarray:
    """`[cfg.steps]` float32: the learning rate of each step of the recipe's own schedule
    (cached per recipe: computing them compiles a small program)."""
    return learning_rates(make_schedule(cfg), cfg.steps)


def decay_steps(steps: int, fraction: float) -> int:
    """How many of `steps` a warmup-stable-decay schedule decays over (at least 1)."""
    return max(1, round(steps * fraction))


def wsd_schedule(peak: float, warmup: int, stable_until: int, stop: int) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup from 0 to `peak` over `warmup` steps, `peak`
    until step `stable_until`, then linear decay to 0 at step `stop` (the decay branch of a
    run scored at `stop`).

    Examples:
      >>> f = wsd_schedule(1.0, 2, 6, 10)
      >>> [round(float(f(t)), 2) for t in range(10)]
      [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    decay = optax.linear_schedule(peak, 0.0, max(stop - stable_until, 1))
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), decay], [warmup, stable_until]
    )


def learning_rates(schedule: optax.ScalarOrSchedule, steps: int) -> np.ndarray:
    """`[steps]` float32: the rate of each step `t` under `schedule`, as optax computes it
    inside step `t` (the same values bit for bit). Train steps take their rates as data,
    so one compiled step serves every schedule of the same length."""
    with jax.ensure_compile_time_eval():  # computed now, also when asked for in a trace
        t = jnp.arange(max(steps, 1), dtype=jnp.int32)
        rates = jax.jit(jax.vmap(schedule))(t) if callable(schedule) else t * 0 + schedule
        out = np.asarray(rates, np.float32)
    out.flags.writeable = False
    return out


def decay_mask(params: Any) -> Any:
    """Weight decay applies to kernels (rank > 1), not to BatchNorm scales or biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
    cfg: TrainConfig, *, backend: str = "xla", rates: Any = None
) -> optax.GradientTransformation:
    """The optimizer of a training recipe, for `backend`.

    Args:
      cfg: the recipe (optimizer, weight decay, steps).
      backend: `"native"` gives the fused update where the kernels apply, else optax's.
      rates: the learning rate of each step, `[cfg.steps]` (a host or traced array: a
        compiled train step takes them as an argument); default the recipe's schedule.
    """
    lr: Any = recipe_rates(cfg) if rates is None else rates
    if backend == "native" and ops.native_applies("native", jnp.zeros((), jnp.float32)):
        if cfg.optimizer == "adamw":
            return fused_adamw(lr, steps=cfg.steps, weight_decay=cfg.weight_decay)
        return fused_sgd(lr, steps=cfg.steps, weight_decay=cfg.weight_decay)

    def schedule(count: jax.Array) -> jax.Array:
        return jnp.asarray(lr)[count]

    if cfg.optimizer == "adamw":
        return optax.adamw(
            schedule, ADAM_B1, ADAM_B2, ADAM_EPS, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=SGD_MOMENTUM, nesterov=True),
    )


@functools.lru_cache(maxsize=16)
def _bias_corrections(b1: float, b2: float, steps: int) -> np.ndarray:
    """`[steps, 2]` float32: Adam's bias corrections `1 - b**(t + 1)` of each step `t`, as
    optax computes them inside step `t` (bit for bit)."""

    def row(count: jax.Array) -> jax.Array:
        inc = count + 1
        return jnp.stack([jnp.asarray(1 - b1**inc, jnp.float32), 1 - b2**inc])

    with jax.ensure_compile_time_eval():
        table = jax.jit(jax.vmap(row))(jnp.arange(max(steps, 1), dtype=jnp.int32))
        out = np.asarray(table, np.float32)
    out.flags.writeable = False
    return out


def coefficient_table(rates: Any, b1: float, b2: float) -> Any:
    """`[steps, 3]` float32: row `t` the `[lr, bc1, bc2]` of step `t` (the fused kernel reads
    row `count`): the given per-step rates and Adam's bias corrections. A traced `rates`
    gives a traced table (one small fusion in the step)."""
    bc = _bias_corrections(b1, b2, int(np.shape(rates)[0]))
    if isinstance(rates, jax.core.Tracer):
        return jnp.concatenate([jnp.asarray(rates, jnp.float32)[:, None], bc], axis=1)
    return np.concatenate([np.asarray(rates, np.float32)[:, None], bc], axis=1)


class FusedState(NamedTuple):
    """State of `fused_adamw` / `fused_sgd`: the steps taken (int32), and the moments (`(m, v)` for
    AdamW, `(m,)` for SGD), each ONE flat float32 array: the moments of
    `jax.tree.leaves(params)`, raveled one after the other."""

    steps: jax.Array
    moments: tuple[jax.Array, ...]


class _Fused(NamedTuple):
    """The hyperparameters of a fused optimizer, and its coefficient table."""

    table: Any
    b1: float
    b2: float
    eps: float
    weight_decay: float
    mask: Callable[[Any], Any]
    n_moments: int

    def init(self, params: Any) -> FusedState:
        total = kernels.flat_size(jax.tree.leaves(params))
        zeros = tuple(jnp.zeros((total,), jnp.float32) for _ in range(self.n_moments))
        return FusedState(jnp.zeros((), jnp.int32), zeros)

    def step(
        self, grads: Any, state: FusedState, params: Any, *, apply: bool
    ) -> tuple[Any, FusedState]:
        if params is None:
            raise ValueError("the fused optimizer needs `params` (for its weight decay)")
        leaves, treedef = jax.tree.flatten(params)
        out, moments, count = kernels.optimizer_update(
            leaves,
            jax.tree.leaves(grads),
            state.moments,
            self.table,
            state.steps,
            b1=self.b1,
            b2=self.b2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            decay=[bool(d) for d in jax.tree.leaves(self.mask(params))],
            apply=apply,
        )
        return jax.tree.unflatten(treedef, out), FusedState(count, tuple(moments))

    def update(self, grads: Any, state: FusedState, params: Any = None) -> tuple[Any, Any]:
        return self.step(grads, state, params, apply=False)


def _rates(learning_rate: Any, steps: int) -> Any:
    """Per-step rates of a float, an optax schedule or a `[steps]` array."""
    if callable(learning_rate) or np.ndim(learning_rate) == 0:
        return learning_rates(learning_rate, steps)
    if np.shape(learning_rate) != (steps,):
        raise ValueError(
            f"`learning_rate` of shape {np.shape(learning_rate)}, expected ({steps},)"
        )
    return learning_rate


# NOTE: through optax, XLA:CPU compiles each parameter array's update as kernels of its
# own, most of a MobileNet train step's kernels; the fused update is one native call.
def fused_adamw(
    learning_rate: Any,
    *,
    steps: int,
    b1: float = ADAM_B1,
    b2: float = ADAM_B2,
    eps: float = ADAM_EPS,
    weight_decay: float = 1e-4,
    mask: Callable[[Any], Any] = decay_mask,
) -> optax.GradientTransformation:
    """`optax.adamw(learning_rate, b1, b2, eps, weight_decay=..., mask=mask)` as one native
    call per step (CPU, float32): the same float32 operations in the same order.

    Args:
      learning_rate: a float, an optax schedule, or the rate of each step (`[steps]`).
      steps: how many steps the rates are tabulated for; a later step fails the call with
        an error that says so.
      b1, b2, eps, weight_decay: as optax's `adamw`.
      mask: `params -> pytree of bools`, where weight decay applies.
    """
    table = coefficient_table(_rates(learning_rate, steps), b1, b2)
    fused = _Fused(table, b1, b2, eps, weight_decay, mask, 2)
    return optax.GradientTransformation(fused.init, fused.update)


def fused_sgd(
    learning_rate: Any,
    *,
    steps: int,
    momentum: float = SGD_MOMENTUM,
    weight_decay: float = 1e-4,
    mask: Callable[[Any], Any] = decay_mask,
) -> optax.GradientTransformation:
    """`optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.sgd(learning_rate,
    momentum, nesterov=True))` as one native call per step (CPU, float32)."""
    table = coefficient_table(_rates(learning_rate, steps), momentum, 0.0)
    fused = _Fused(table, momentum, 0.0, 0.0, weight_decay, mask, 1)
    return optax.GradientTransformation(fused.init, fused.update)


def apply_updates(
    tx: optax.GradientTransformation, grads: Any, state: Any, params: Any
) -> tuple[Any, Any]:
    """One optimizer step: `(new_params, new_state)`, i.e. `tx.update` then
    `optax.apply_updates`; for a fused transformation one native call does both."""
    fused = getattr(tx.update, "__self__", None)
    if isinstance(fused, _Fused):
        return fused.step(grads, state, params, apply=True)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def init_optimizer(tx: optax.GradientTransformation, params: Any) -> Any:
    """`tx.init(params)` for optimizers whose state starts at zero, built on the host.

    Eager `tx.init` dispatches one zero-fill per leaf and compiles one per new shape; the
    state is made from `jax.eval_shape(tx.init, params)` with numpy zeros instead.

    Raises:
      ValueError: if `tx`'s state has a leaf that does not start at zero (checked on a
        one-element stand-in of `params`).
    """
    probe = tx.init(jax.tree.map(lambda p: jnp.zeros((1,) * p.ndim, p.dtype), params))
    if any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(probe)):
        raise ValueError("init_optimizer: the optimizer's state does not start at zero")
    shapes = jax.eval_shape(tx.init, params)
    return jax.device_put(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
