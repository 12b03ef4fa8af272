"""Optimizers and learning-rate schedules of a training recipe, as optax transformations.

`make_optimizer(cfg, backend=...)` returns an `optax.GradientTransformation`: optax's own
`adamw` (or SGD with Nesterov momentum after decoupled weight decay) on the `"xla"`
backend, and on `"native"` the same update as one C++ call per step (`fused_adamw`,
`fused_sgd`): a transformation like any other (`init`, `update`, composable with
`optax.chain`), whose state keeps each moment as ONE flat array. Its step-dependent scalars
(the schedule's learning rate and Adam's bias corrections) come from a table computed once
per recipe with optax's schedule.

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
    "make_optimizer",
    "make_schedule",
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
    return cfg.learning_rate


def decay_mask(params: Any) -> Any:
    """Weight decay applies to kernels (rank > 1), not to BatchNorm scales or biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


@functools.lru_cache(maxsize=16)
def make_optimizer(cfg: TrainConfig, *, backend: str = "xla") -> optax.GradientTransformation:
    """The optimizer and learning-rate schedule of a training recipe, for `backend`.

    Cached per recipe and backend, so the fused optimizer's coefficient table is computed
    once (a small program of its own).
    """
    lr = make_schedule(cfg)
    if backend == "native" and ops.native_applies("native", jnp.zeros((), jnp.float32)):
        if cfg.optimizer == "adamw":
            return fused_adamw(lr, steps=cfg.steps, weight_decay=cfg.weight_decay)
        return fused_sgd(lr, steps=cfg.steps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return optax.adamw(
            lr, ADAM_B1, ADAM_B2, ADAM_EPS, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.sgd(lr, momentum=SGD_MOMENTUM, nesterov=True),
    )


def coefficient_table(
    learning_rate: optax.ScalarOrSchedule, steps: int, b1: float, b2: float
) -> np.ndarray:
    """`[steps, 3]` float32: row `t` the `[lr, bc1, bc2]` of step `t`, i.e. the schedule's
    learning rate and Adam's bias corrections `1 - b**(t + 1)`, computed by JAX as optax
    computes them inside a step (the same values bit for bit)."""

    def row(count: jax.Array) -> jax.Array:
        inc = count + 1
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        return jnp.stack(
            [
                jnp.asarray(lr, jnp.float32),
                jnp.asarray(1 - b1**inc, jnp.float32),
                jnp.asarray(1 - b2**inc, jnp.float32),
            ]
        )

    with jax.ensure_compile_time_eval():  # computed now, also when asked for in a trace
        table = jax.jit(jax.vmap(row))(jnp.arange(max(steps, 1), dtype=jnp.int32))
        out = np.asarray(table, np.float32)
    out.flags.writeable = False
    return out


class FusedState(NamedTuple):
    """State of `fused_adamw` / `fused_sgd`: the steps taken (int32), and the moments (`(m, v)` for
    AdamW, `(m,)` for SGD), each ONE flat float32 array: the moments of
    `jax.tree.leaves(params)`, raveled one after the other."""

    steps: jax.Array
    moments: tuple[jax.Array, ...]


class _Fused(NamedTuple):
    """The hyperparameters of a fused optimizer, and its coefficient table."""

    table: np.ndarray
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


# NOTE: through optax, XLA:CPU compiles each parameter array's update as kernels of its
# own, most of a MobileNet train step's kernels; the fused update is one native call.
def fused_adamw(
    learning_rate: optax.ScalarOrSchedule,
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
      learning_rate: a float or an optax schedule.
      steps: how many steps the schedule is tabulated for; a later step fails the call
        with an error that says so.
      b1, b2, eps, weight_decay: as optax's `adamw`.
      mask: `params -> pytree of bools`, where weight decay applies.
    """
    table = coefficient_table(learning_rate, steps, b1, b2)
    fused = _Fused(table, b1, b2, eps, weight_decay, mask, 2)
    return optax.GradientTransformation(fused.init, fused.update)


def fused_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    steps: int,
    momentum: float = SGD_MOMENTUM,
    weight_decay: float = 1e-4,
    mask: Callable[[Any], Any] = decay_mask,
) -> optax.GradientTransformation:
    """`optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.sgd(learning_rate,
    momentum, nesterov=True))` as one native call per step (CPU, float32)."""
    table = coefficient_table(learning_rate, steps, momentum, 0.0)
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
