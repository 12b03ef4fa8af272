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
    "AUGMENTATIONS",
    "Segment",
    "TrainResult",
    "TrainState",
    "batch_indices",
    "evaluate",
    "fresh_split",
    "full_recipe",
    "prepare_images",
    "prepare_recipe",
    "start_training",
    "train_and_evaluate",
    "train_steps",
    "with_flips",
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
    """Once per search, before the first candidate: compute the recipe's learning rates and
    the optimizer's tables (small programs of their own), so that the first candidate's
    compile does not pay for them."""
    backend = backend or ops.default_backend()
    optim.recipe_rates(cfg)
    optim.make_optimizer(cfg, backend=backend)


def full_recipe(cfg: TrainConfig, *, epochs: int, n_train: int) -> TrainConfig:
    """The full-training recipe of `mobisearch train`: the space's optimizer, peak learning
    rate, batch size, weight decay and label smoothing, for `epochs` passes over `n_train`
    images, with a linear warmup over the first 5% of the steps (at most 500) and a cosine
    decay to 1% of the peak (augmentation is `train_and_evaluate`'s `augment`).

    Examples:
      >>> from mobisearch.config import TrainConfig
      >>> r = full_recipe(TrainConfig(steps=100, schedule="wsd"), epochs=10, n_train=55_000)
      >>> r.steps, r.warmup_steps, r.schedule
      (4296, 214, 'warmup_cosine')
    """
    steps = max(1, epochs * n_train // cfg.batch_size)
    return dataclasses.replace(
        cfg, steps=steps, warmup_steps=min(steps // 20, 500), schedule="warmup_cosine"
    )


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
    forward = compiled.bind(*state)
    correct, loss_sum = 0, 0.0
    for start in range(0, len(x), n):
        xb, yb = x[start : start + n], y[start : start + n]
        if len(xb) < n:
            xb = np.concatenate([xb, np.zeros((n - len(xb), *xb.shape[1:]), xb.dtype)])
        logits = np.asarray(forward(xb), np.float64)[: len(yb)]
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


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Where a training run is: the model's `(params, rest)`, the optimizer's state, and
    the steps taken (the next step's index into the run's batch order and rates)."""

    params: Any
    rest: Any
    opt_state: Any
    step: int


@dataclasses.dataclass(frozen=True)
class Segment:
    """The outcome of `train_steps`: the state reached, the losses of the steps, and
    `status` `"ok"` or `"diverged"` with its `reason`."""

    state: TrainState
    losses: tuple[float, ...]
    status: str = "ok"
    reason: str = ""
    train_s: float = 0.0
    compile_s: float = 0.0


def start_training(
    arch: ArchSpec, cfg: TrainConfig, *, seed: int, backend: str | None = None
) -> TrainState:
    """A fresh run of `arch` with the recipe `cfg`: the initial weights of `seed`, the
    optimizer's zero state, step 0."""
    backend = backend or ops.default_backend()
    _, params, rest = fresh_split(arch, backend, training=True, seed=seed)
    tx = optim.make_optimizer(cfg, backend=backend)
    return TrainState(params, rest, optim.init_optimizer(tx, params), 0)


def _batch_order(seed: int, n: int, batch: int, steps: int) -> np.ndarray:
    return batch_indices(np.random.default_rng(seed), n, batch, steps)


def train_steps(
    arch: ArchSpec,
    cfg: TrainConfig,
    data: Dataset,
    state: TrainState,
    *,
    stop: int,
    rates: np.ndarray | None = None,
    seed: int,
    backend: str | None = None,
    stats: tuple[Any, Any] | None = None,
    augment: str = "none",
) -> Segment:
    """Train from `state.step` up to step `stop` (exclusive) of the run of `seed`.

    The batch order is that of the whole run (`batch_indices` of `seed`, `cfg.steps`
    long), so a run trained in segments takes the same batches as in one go; `rates` is
    the learning rate of each of the run's `cfg.steps` steps (default: the recipe's own
    schedule), so segments can follow different schedules (a decay branch) on one compiled
    step. The state passed in is consumed (its buffers are donated to the step). `augment`
    is one of `AUGMENTATIONS` (`with_shifts`, `with_flips`).

    Raises:
      ValueError: if `stop` is not in `(state.step, cfg.steps]` or `rates` has the wrong
        shape.
    """
    backend = backend or ops.default_backend()
    if not state.step < stop <= cfg.steps:
        raise ValueError(f"`stop` (={stop}) must be in ({state.step}, {cfg.steps}]")
    rates = optim.recipe_rates(cfg) if rates is None else np.asarray(rates, np.float32)
    if rates.shape != (cfg.steps,):
        raise ValueError(f"`rates` of shape {rates.shape}, expected ({cfg.steps},)")
    if stats is None:
        stats = image_mean_std(data.x_train)
    x_train = prepare_images(data.x_train, arch.resolution, stats)
    order = _batch_order(seed, len(x_train), cfg.batch_size, cfg.steps)
    y_train = data.y_train
    if augment not in AUGMENTATIONS:
        raise ValueError(f"`augment` (={augment!r}) must be one of {AUGMENTATIONS}")
    if "shift" in augment:
        x_train, y_train, order = with_shifts(x_train, y_train, order, seed=seed)
    if "flip" in augment:
        x_train, y_train, order = with_flips(x_train, y_train, order, seed=seed)
    train, compile_s = _cached_call(compile_.compile_train, arch, cfg, backend, len(x_train))
    x_dev, y_dev = _on_device(x_train, y_train)
    rates_dev = jax.device_put(rates)
    leaves = tuple(jax.tree.leaves((state.params, state.rest, state.opt_state)))
    t0 = time.perf_counter()
    losses: list[jax.Array] = []
    status, reason = "ok", ""
    with keep_freed_memory():
        for step in range(state.step, stop):
            leaves, loss = train.executable(leaves, x_dev, y_dev, order[step], rates_dev)
            losses.append(loss)
            if (step + 1) % _CHECK_EVERY == 0 or step + 1 == stop:
                last = float(loss)
                if not math.isfinite(last):
                    status, reason = "diverged", f"loss became {last} at step {step + 1}"
                    break
    curve = tuple(float(v) for v in jax.device_get(losses))
    params, rest, opt_state = jax.tree.unflatten(train.treedef, leaves)
    new = TrainState(params, rest, opt_state, state.step + len(curve))
    return Segment(new, curve, status, reason, time.perf_counter() - t0, compile_s)


AUGMENTATIONS = ("none", "flip", "flip+shift")
# Copies of the training split each augmentation holds (the compiled step's input size).
_COPIES = {"none": 1, "flip": 2, "flip+shift": 18}


def with_flips(
    x: np.ndarray, y: np.ndarray, order: np.ndarray, *, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random horizontal flips as a batch order: the images `[n, h, w, c]` and their
    mirrors side by side (`2n` rows), and `order` sending each visit of image `i` to row
    `i` or `n + i` at random (seeded), so that every epoch still sees each image once and
    the compiled step is unchanged.

    Examples:
      >>> x, y = np.arange(4.0).reshape(1, 1, 4, 1), np.zeros(1, np.int32)
      >>> x2, y2, o = with_flips(x, y, np.zeros((8, 1), np.int32), seed=0)
      >>> x2[1, 0, :, 0].tolist(), sorted(set(o.ravel().tolist()))
      ([3.0, 2.0, 1.0, 0.0], [0, 1])
    """
    n = len(x)
    flips = np.random.default_rng([seed, 1]).integers(0, 2, order.shape, dtype=np.int32)
    return np.concatenate([x, x[:, :, ::-1]]), np.concatenate([y, y]), order + n * flips


def with_shifts(
    x: np.ndarray, y: np.ndarray, order: np.ndarray, *, seed: int, pixels: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random translations as a batch order, as `with_flips`: the images `[n, h, w, c]`
    shifted by each of `(dy, dx)` in `{-pixels, 0, pixels}²` (9 copies, `9n` rows, the
    border pixels repeated into the gap), and `order` sending each visit to one copy at
    random (seeded).

    Examples:
      >>> x, y = np.arange(4.0).reshape(1, 1, 4, 1), np.zeros(1, np.int32)
      >>> x2, y2, o = with_shifts(x, y, np.zeros((64, 1), np.int32), seed=0, pixels=1)
      >>> x2.shape, x2[1, 0, :, 0].tolist(), sorted(set(o.ravel().tolist()))
      ((9, 1, 4, 1), [1.0, 2.0, 3.0, 3.0], [0, 1, 2, 3, 4, 5, 6, 7, 8])
    """
    n, h, w = x.shape[:3]
    p = pixels
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
    copies = [
        padded[:, p + dy : p + dy + h, p + dx : p + dx + w]
        for dy in (0, -p, p)
        for dx in (0, p, -p)
    ]
    pick = np.random.default_rng([seed, 2]).integers(0, len(copies), order.shape, np.int32)
    return np.concatenate(copies), np.tile(y, len(copies)), order + n * pick


# The training split on the device, by source array: candidates of one resolution share it.
_ON_DEVICE: dict[str, tuple[np.ndarray, Any, Any]] = {}


def _on_device(x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
    hit = _ON_DEVICE.get("train")
    if hit is not None and hit[0] is x:
        return hit[1], hit[2]
    _ON_DEVICE["train"] = (x, jax.device_put(x), jax.device_put(y.astype(np.int32)))
    return _ON_DEVICE["train"][1], _ON_DEVICE["train"][2]


def train_and_evaluate(
    arch: ArchSpec,
    cfg: TrainConfig,
    data: Dataset,
    *,
    seed: int,
    backend: str | None = None,
    stats: tuple[Any, Any] | None = None,
    augment: str = "none",
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
      augment: `"none"` (searches), `"flip"` (random horizontal flips, `with_flips`) or
        `"flip+shift"` (and random ±2-pixel translations, `with_shifts`).

    Returns:
      A `TrainResult`; `status == "diverged"` when the loss became NaN or infinite.
    """
    backend = backend or ops.default_backend()
    if stats is None:
        stats = image_mean_std(data.x_train)
    x_val = prepare_images(data.x_val, arch.resolution, stats)
    prepare_images(data.x_train, arch.resolution, stats)
    t0 = time.perf_counter()
    eval_batch = min(cfg.eval_batch_size, len(x_val))
    eval_job = compile_.submit_compile(
        _cached_call, compile_.compile_forward, arch, backend, eval_batch
    )
    n_train = len(data.x_train) * _COPIES.get(augment, 1)
    _, compile_train_s = _cached_call(compile_.compile_train, arch, cfg, backend, n_train)
    ev, compile_eval_s = eval_job.result()
    # Wall time of the two compiles together (0.0 when both were cached); it includes any
    # `precompile_forward` queued before the eval forward.
    compile_s = time.perf_counter() - t0 if compile_train_s or compile_eval_s else 0.0

    state = start_training(arch, cfg, seed=seed, backend=backend)
    run = train_steps(
        arch,
        cfg,
        data,
        state,
        stop=cfg.steps,
        seed=seed,
        backend=backend,
        stats=stats,
        augment=augment,
    )
    if run.status != "ok":
        return TrainResult(
            status=run.status,
            reason=run.reason,
            val_accuracy=math.nan,
            val_loss=math.nan,
            loss_curve=run.losses,
            steps=len(run.losses),
            compile_s=compile_s,
            train_s=run.train_s,
            eval_s=0.0,
        )
    t0 = time.perf_counter()
    state_out = (run.state.params, run.state.rest)
    acc, val_loss = _evaluate(ev, eval_batch, state_out, x_val, data.y_val)
    return TrainResult(
        status="ok",
        val_accuracy=acc,
        val_loss=val_loss,
        loss_curve=run.losses,
        steps=len(run.losses),
        compile_s=compile_s,
        train_s=run.train_s,
        eval_s=time.perf_counter() - t0,
        state=state_out,
    )


def batch_indices(rng: np.random.Generator, n: int, batch: int, steps: int) -> np.ndarray:
    """`[steps, batch]` int32 indices: epochs of seeded permutations, concatenated."""
    epochs = -(-steps * batch // n)
    perm = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return perm[: steps * batch].reshape(steps, batch).astype(np.int32)
