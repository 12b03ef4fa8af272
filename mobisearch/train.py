"""Training runs of one candidate, and its evaluation: `train_and_evaluate`, `evaluate`.

The recipe (`mobisearch.space.TrainConfig`) is identical for every candidate of a search, so
their results are comparable. The loop is NNX's functional one: the model is split once into
its static graph and array state, and the compiled train step (`mobisearch.compile`) merges
them inside; the training set lives on the device and each step receives only its batch
indices. A loss that turns NaN or infinite ends the run as `status="diverged"`.

Images are resized to the candidate's resolution (`mobisearch.data.resize_images`) and
normalised with the training split's per-channel mean and standard deviation.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from mobisearch import compile as compile_
from mobisearch import ops, optim
from mobisearch.data import image_mean_std, normalize_images, resize_images
from mobisearch.models import build_model, split_model
from mobisearch.runtime import keep_freed_memory

if TYPE_CHECKING:
    from mobisearch.arch import ArchSpec
    from mobisearch.data import Dataset
    from mobisearch.space import TrainConfig

__all__ = [
    "TrainResult",
    "batch_indices",
    "evaluate",
    "fresh_split",
    "prepare_images",
    "prepare_recipe",
    "train_and_evaluate",
]

# How often (in steps) the host reads the loss back to check for divergence: reading it
# every step would force a device sync per step.
_CHECK_EVERY = 25


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    """Outcome of one training run.

    Attributes:
      status: `"ok"` or `"diverged"` (a NaN or infinite loss).
      reason: why it failed, or `""`.
      val_accuracy: top-1 accuracy on the validation split (NaN if diverged).
      val_loss: mean cross-entropy on the validation split.
      loss_curve: training loss per step (up to the failure).
      steps: optimizer steps taken.
      compile_s: wall seconds compiling the train step and the validation forward pass,
        which compile side by side (0 when both were compiled before).
      train_s: seconds of training, compile excluded.
      eval_s: seconds of validation.
      state: the trained `(params, rest)` (`split_model`'s states), for latency, test
        evaluation and checkpoints; None if diverged.
    """

    status: str
    reason: str = ""
    val_accuracy: float
    val_loss: float
    loss_curve: tuple[float, ...]
    steps: int
    compile_s: float
    train_s: float
    eval_s: float
    state: Any = dataclasses.field(default=None, repr=False, compare=False)


def prepare_recipe(cfg: TrainConfig, backend: str | None = None) -> None:
    """Once per search, before the first candidate: build the recipe's optimizer (for the
    native backend its coefficient table, a small program of its own), so that the first
    candidate's compile does not pay for it."""
    optim.make_optimizer(cfg, backend=backend or ops.default_backend())


def fresh_split(
    arch: ArchSpec, backend: str | None = None, *, training: bool, seed: int = 0
) -> tuple[Any, Any, Any]:
    """`(graphdef, params, rest)` of a freshly built model in train or eval mode (`params`
    and `rest` have the same structure either way)."""
    model = build_model(arch, rngs=nnx.Rngs(seed), backend=backend)
    if training:
        model.train()
    else:
        model.eval()
    return split_model(model)


# Prepared splits of the current search, by (source array, resolution, stats): candidates
# share a few resolutions, and resizing 55,000 images takes about a second each time. The
# source array is kept with its entry, so its id() cannot be reused while cached.
_PREPARED: collections.OrderedDict[tuple[int, int, bytes], tuple[np.ndarray, np.ndarray]] = (
    collections.OrderedDict()
)
_PREPARED_MAX = 8


def prepare_images(x: np.ndarray, resolution: int, stats: tuple[Any, Any]) -> np.ndarray:
    """Resize uint8 NHWC images to `resolution` and normalise with the training split's
    per-channel `(mean, std)` (`mobisearch.data.image_mean_std`): float32 `[n, r, r, c]`.

    The result is read-only and cached for the same array, resolution and stats (the last
    few), so the candidates of a search resize each split once per resolution.
    """
    key = (id(x), resolution, np.asarray(stats, np.float64).tobytes())
    hit = _PREPARED.get(key)
    if hit is not None and hit[0] is x:
        _PREPARED.move_to_end(key)
        return hit[1]
    out = normalize_images(resize_images(x, resolution), *stats)
    out.flags.writeable = False
    _PREPARED[key] = (x, out)
    while len(_PREPARED) > _PREPARED_MAX:
        _PREPARED.popitem(last=False)
    return out


def evaluate(
    arch: ArchSpec,
    state: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    cfg: TrainConfig,
    backend: str | None = None,
    stats: tuple[Any, Any],
) -> tuple[float, float]:
    """Accuracy and mean loss of a trained `(params, rest)` on uint8 images `x` (any split),
    by the model in eval mode.

    Returns:
      `(accuracy, loss)`.
    """
    backend = backend or ops.default_backend()
    n = min(cfg.eval_batch_size, len(x))
    compiled = compile_.compile_forward(arch, backend, n)
    return _evaluate(compiled, n, state, prepare_images(x, arch.resolution, stats), y)


def _evaluate(
    compiled: compile_.CompiledForward, n: int, state: Any, x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `state` on prepared images `x`, by the compiled
    forward at batch `n`; the last batch is padded to `n` instead of compiling another."""
    params, rest = state
    correct, loss_sum = 0, 0.0
    for start in range(0, len(x), n):
        xb, yb = x[start : start + n], y[start : start + n]
        if len(xb) < n:
            xb = np.concatenate([xb, np.zeros((n - len(xb), *xb.shape[1:]), xb.dtype)])
        logits = np.asarray(compiled.step(params, rest, xb), np.float64)[: len(yb)]
        top = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        correct += int(np.sum(np.argmax(logits, axis=1) == yb))
        loss_sum += float(np.sum(log_z - logits[np.arange(len(yb)), yb]))
    return correct / len(x), loss_sum / len(x)


def _cached_call(fn: Any, *args: Any) -> tuple[Any, float]:
    """Call an lru-cached compile function; return its value and the compile seconds spent
    now (0.0 when it came from the cache)."""
    before = fn.cache_info().misses
    value = fn(*args)
    return value, value.compile_s if fn.cache_info().misses > before else 0.0


def train_and_evaluate(
    arch: ArchSpec,
    cfg: TrainConfig,
    data: Dataset,
    *,
    seed: int,
    backend: str | None = None,
    stats: tuple[Any, Any] | None = None,
) -> TrainResult:
    """Train `arch` with the recipe `cfg` and measure its validation accuracy.

    Args:
      arch: the candidate; its `resolution` sets the image size.
      cfg: the training recipe (steps, batch size, optimizer, schedule, ...).
      data: the dataset; only its train and validation splits are used.
      seed: initialisation and batch-order seed (no global RNG).
      backend: `"xla"` or `"native"` (default `mobisearch.ops.default_backend()`).
      stats: the training split's `image_mean_std`, if the caller has it (a search
        computes it once for all candidates); computed here otherwise.

    Returns:
      A `TrainResult`; `status == "diverged"` when the loss became NaN or infinite.
    """
    backend = backend or ops.default_backend()
    if stats is None:
        stats = image_mean_std(data.x_train)
    x_train = prepare_images(data.x_train, arch.resolution, stats)
    x_val = prepare_images(data.x_val, arch.resolution, stats)
    t0 = time.perf_counter()
    eval_batch = min(cfg.eval_batch_size, len(x_val))
    eval_job = compile_.submit_compile(
        _cached_call, compile_.compile_forward, arch, backend, eval_batch
    )
    train, compile_train_s = _cached_call(compile_.compile_train, arch, cfg, backend, len(x_train))
    ev, compile_eval_s = eval_job.result()
    # Wall time of the two compiles together (0.0 when both were cached); it includes any
    # `precompile_forward` queued before the eval forward.
    compile_s = time.perf_counter() - t0 if compile_train_s or compile_eval_s else 0.0

    _, params, rest = fresh_split(arch, backend, training=True, seed=seed)
    opt_state = optim.init_optimizer(train.tx, params)
    rng = np.random.default_rng(seed)
    x_dev = jax.device_put(x_train)
    y_dev = jax.device_put(data.y_train.astype(np.int32))
    order = batch_indices(rng, len(x_train), cfg.batch_size, cfg.steps)

    t0 = time.perf_counter()
    losses: list[jax.Array] = []
    status, reason = "ok", ""
    with keep_freed_memory():
        for step in range(cfg.steps):
            params, rest, opt_state, loss = train.step(
                params, rest, opt_state, x_dev, y_dev, order[step]
            )
            losses.append(loss)
            if (step + 1) % _CHECK_EVERY == 0 or step + 1 == cfg.steps:
                last = float(loss)
                if not math.isfinite(last):
                    status, reason = "diverged", f"loss became {last} at step {step + 1}"
                    break
    curve = tuple(float(v) for v in jax.device_get(losses))
    train_s = time.perf_counter() - t0
    if status != "ok":
        return TrainResult(
            status=status,
            reason=reason,
            val_accuracy=math.nan,
            val_loss=math.nan,
            loss_curve=curve,
            steps=len(curve),
            compile_s=compile_s,
            train_s=train_s,
            eval_s=0.0,
        )
    t0 = time.perf_counter()
    acc, val_loss = _evaluate(ev, eval_batch, (params, rest), x_val, data.y_val)
    return TrainResult(
        status="ok",
        val_accuracy=acc,
        val_loss=val_loss,
        loss_curve=curve,
        steps=len(curve),
        compile_s=compile_s,
        train_s=train_s,
        eval_s=time.perf_counter() - t0,
        state=(params, rest),
    )


def batch_indices(rng: np.random.Generator, n: int, batch: int, steps: int) -> np.ndarray:
    """`[steps, batch]` int32 indices: epochs of seeded permutations, concatenated."""
    epochs = -(-steps * batch // n)
    perm = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return perm[: steps * batch].reshape(steps, batch).astype(np.int32)
