"""Config tables of a search space: the dataset (`DataConfig`), the short-training recipe
(`TrainConfig`) and the latency measurement (`LatencyConfig`), with the rules for each field.

A bad field raises `SpaceError` (a `ValueError`) naming the dataclass, the field, the value
and what was expected; `mobisearch.space` re-raises it naming the file and the dotted key.

Pure module: standard library only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, get_args

from mobisearch._toml import SpaceError, check_keys, fail, fmt, toml_repr

if TYPE_CHECKING:
    from mobisearch.arch import ArchSpec

__all__ = [
    "DATASETS",
    "OPTIMIZERS",
    "SCHEDULES",
    "DataConfig",
    "FidelityConfig",
    "LatencyConfig",
    "SearchConfig",
    "SpaceError",
    "TrainConfig",
    "build_config",
    "check_recipe",
    "dataset_shape",
]

Dataset = Literal["fashion_mnist", "mnist", "synthetic"]
Promotion = Literal["continue", "restart"]
Sampler = Literal["nsga2", "tpe", "random"]
LatencyBackend = Literal["jax", "onnxruntime"]
Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["warmup_cosine", "constant", "wsd"]

DATASETS: tuple[str, ...] = get_args(Dataset)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
PROMOTIONS: tuple[str, ...] = get_args(Promotion)
SAMPLERS: tuple[str, ...] = get_args(Sampler)
LATENCY_BACKENDS: tuple[str, ...] = get_args(LatencyBackend)

# NOTE: facts about the packaged datasets, repeated here (this module may not import the
# numpy-based `mobisearch.data`) so that a bad split fails when the file is read rather
# than after the first download. `mobisearch.data.load_dataset` checks again; the synthetic
# set is left to it.
_TRAIN_SPLIT_SIZES: dict[str, int] = {"fashion_mnist": 60_000, "mnist": 60_000}
# 28x28 grayscale images in 10 classes: (in_ch, num_classes) the architecture must have.
_DATASET_SHAPES: dict[str, tuple[int, int]] = {"fashion_mnist": (1, 10), "mnist": (1, 10)}
# Seeds stay below 2**32 so that every numpy and JAX seeding API takes them.
_MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class _Rule:
    """How one config field is checked: its type and range, and the words for both."""

    kind: Literal["int", "float", "choice", "increasing"]
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    note: str = ""

    def accepts(self, value: object) -> bool:
        if value is None:
            return self.optional
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "increasing":  # a non-empty, strictly increasing list of numbers
            item = dataclasses.replace(self, kind="float")
            return (
                isinstance(value, list | tuple)
                and len(value) > 0
                and all(item.accepts(v) for v in value)
                and all(a < b for a, b in zip(value, value[1:], strict=False))
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def expected(self, name: str) -> str:
        if self.kind == "choice":
            text = f"one of {toml_repr(list(self.choices))}"
        elif self.kind == "increasing":
            each = dataclasses.replace(self, kind="float", note="").expected(name)
            text = f"a non-empty, strictly increasing list, each {each.removeprefix('a ')}"
        else:
            noun = "an integer" if self.kind == "int" else "a number"
            lo_op = "<" if self.lo_open else "<="
            hi_op = "<" if self.hi_open else "<="
            if self.lo is not None and self.hi is not None:
                text = f"{noun} with {self.lo} {lo_op} {name} {hi_op} {self.hi}"
            elif self.lo is not None:
                text = f"{noun} {'>' if self.lo_open else '>='} {self.lo}"
            elif self.hi is not None:
                text = f"{noun} {hi_op} {self.hi}"
            else:
                text = noun
        return f"{text}{self.note}"


class _FieldError(SpaceError):
    """A config field has a bad value; the loader re-raises it naming file and table."""

    def __init__(self, owner: str, field: str, value: object, expected: str) -> None:
        super().__init__(f"{owner}.{field} = {fmt(value)}, expected {expected}")
        self.field = field
        self.value = value
        self.expected = expected


def _check_fields(obj: Any, rules: Mapping[str, _Rule]) -> None:
    """Check every field of the config dataclass `obj`; store numbers as floats."""
    for f in dataclasses.fields(obj):
        rule = rules[f.name]
        value = getattr(obj, f.name)
        if not rule.accepts(value):
            raise _FieldError(type(obj).__name__, f.name, value, rule.expected(f.name))
        if rule.kind == "float":
            object.__setattr__(obj, f.name, float(value))


# --------------------------------------------------------------------------------------
# Config dataclasses

_DATA_RULES: dict[str, _Rule] = {
    "dataset": _Rule("choice", choices=DATASETS),
    "validation_size": _Rule("int", lo=1),
    "split_seed": _Rule("int", lo=0, hi=_MAX_SEED),
    "train_size": _Rule("int", lo=1, optional=True, note=", or no key to train on all the rest"),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DataConfig:
    """Which dataset to train and validate candidates on, and how it is split.

    Attributes:
      dataset: `"fashion_mnist"`, `"mnist"` (28x28 grayscale, 10 classes, 60,000 training
        images) or `"synthetic"` (a small in-memory stand-in for tests).
      validation_size: images held out of the official training split to rank candidates
        (the official test split is never used by a search).
      split_seed: seed of the validation split and of the `train_size` subsample.
      train_size: train on only this many (seeded) images of the rest of the training
        split, for short runs; None uses all of it.

    Raises:
      ValueError: naming the field, the bad value and what was expected.

    Examples:
      >>> DataConfig(validation_size=1000, train_size=2000).dataset
      'fashion_mnist'
      >>> try:
      ...     DataConfig(validation_size=0)
      ... except ValueError as e:
      ...     print(e)
      DataConfig.validation_size = 0, expected an integer >= 1
    """

    dataset: Dataset = "fashion_mnist"
    validation_size: int = 5000
    split_seed: int = 0
    train_size: int | None = None

    def __post_init__(self) -> None:
        _check_fields(self, _DATA_RULES)
        n = _TRAIN_SPLIT_SIZES.get(self.dataset)
        if n is None:
            return
        if self.validation_size >= n:
            raise _FieldError(
                "DataConfig",
                "validation_size",
                self.validation_size,
                f"an integer < {n} (the {self.dataset} training split it is held out of)",
            )
        rest = n - self.validation_size
        if self.train_size is not None and self.train_size > rest:
            raise _FieldError(
                "DataConfig",
                "train_size",
                self.train_size,
                f"an integer <= {rest} ({n} training images minus validation_size = "
                f"{self.validation_size})",
            )


_TRAIN_RULES: dict[str, _Rule] = {
    # The per-step learning rates and batch order are tabulated: 10^7 steps is ~200 GPU-days
    # of a MobileNet at batch 128, far past any search.
    "steps": _Rule("int", lo=1, hi=10_000_000),
    "batch_size": _Rule("int", lo=1),
    "optimizer": _Rule("choice", choices=OPTIMIZERS),
    "learning_rate": _Rule("float", lo=0, lo_open=True),
    "schedule": _Rule("choice", choices=SCHEDULES),
    "warmup_steps": _Rule("int", lo=0),
    "weight_decay": _Rule("float", lo=0),
    "label_smoothing": _Rule("float", lo=0, hi=1, hi_open=True),
    "seed": _Rule("int", lo=0, hi=_MAX_SEED),
    "eval_batch_size": _Rule("int", lo=1),
    "decay_fraction": _Rule("float", lo=0, hi=1, lo_open=True),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """The short-training recipe shared by every candidate of a search.

    Attributes:
      steps: optimizer steps per candidate.
      batch_size: training images per step.
      optimizer: `"adamw"` or `"sgd"` (with momentum).
      learning_rate: peak learning rate (> 0).
      schedule: `"warmup_cosine"` (linear warmup, then cosine decay over the remaining
        steps), `"wsd"` (warmup-stable-decay: linear warmup, the peak rate, then a linear
        decay to 0 over the last `decay_fraction` of the steps; a multi-fidelity search
        branches such a decay off the stable phase at every rung) or `"constant"`.
      warmup_steps: linear-warmup steps; must be < `steps` (except under `"constant"`).
      weight_decay: decoupled weight decay (>= 0).
      label_smoothing: in [0, 1).
      seed: seed of the parameter initialisation and the batch order.
      eval_batch_size: images per validation step (memory only; no effect on results).
      decay_fraction: the share of the steps that the `"wsd"` schedule decays over.

    Raises:
      ValueError: naming the field, the bad value and what was expected.

    Examples:
      >>> TrainConfig(steps=100, learning_rate=1).learning_rate
      1.0
    """

    steps: int
    batch_size: int = 128
    optimizer: Optimizer = "adamw"
    learning_rate: float = 0.01
    schedule: Schedule = "warmup_cosine"
    warmup_steps: int = 0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    seed: int = 0
    eval_batch_size: int = 1000
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        _check_fields(self, _TRAIN_RULES)
        if self.schedule != "constant" and self.warmup_steps >= self.steps:
            raise _FieldError(
                "TrainConfig",
                "warmup_steps",
                self.warmup_steps,
                f"an integer with 0 <= warmup_steps < steps (= {self.steps}) under the "
                f'"{self.schedule}" schedule',
            )


_LATENCY_RULES: dict[str, _Rule] = {
    "batch_size": _Rule("int", lo=1),
    "warmup": _Rule("int", lo=0),
    "iters": _Rule("int", lo=1),
    "backend": _Rule("choice", choices=LATENCY_BACKENDS),
    "threads": _Rule("int", lo=1, optional=True, note=", or no key (onnxruntime: 1)"),
    "sample": _Rule("int", lo=3),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LatencyConfig:
    """How a candidate's inference latency is measured (see `mobisearch.latency`).

    Attributes:
      batch_size: images per timed call (1 = on-device, one image at a time).
      warmup: untimed calls first, so that compilation is not measured.
      iters: timed calls; percentiles are taken over them.
      backend: `"jax"` (the model's own compiled forward on this machine) or
        `"onnxruntime"` (the exported ONNX graph, as it would be deployed).
      threads: onnxruntime's intra-op threads (1 by default: one phone core); must be left
        out for jax, whose thread pool is the process's.
      sample: with a latency budget on a space too large to measure every draw, how many
        seeded candidates are measured before training to fit the latency model.

    Raises:
      ValueError: naming the field, the bad value and what was expected.
    """

    batch_size: int = 1
    warmup: int = 10
    iters: int = 50
    backend: LatencyBackend = "jax"
    threads: int | None = None
    sample: int = 24

    def __post_init__(self) -> None:
        _check_fields(self, _LATENCY_RULES)
        if self.backend == "jax" and self.threads is not None:
            raise _FieldError(
                "LatencyConfig",
                "threads",
                self.threads,
                'no value with backend = "jax" (XLA uses the process\'s thread pool)',
            )


_FIDELITY_RULES: dict[str, _Rule] = {
    "rungs": _Rule("increasing", lo=0, lo_open=True, hi=1000),
    "eta": _Rule("int", lo=2),
    "promotion": _Rule("choice", choices=PROMOTIONS),
    "noise_candidates": _Rule("int", lo=0),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FidelityConfig:
    """Multi-fidelity ranking: successive halving over rungs of training.

    Every candidate is trained to the first rung and scored; at each rung the best `1/eta`
    (by non-dominated sorting of validation accuracy and latency, then crowding distance;
    `mobisearch.pareto.rank_points`) go on to the next.

    Attributes:
      rungs: epochs of training at which candidates are scored, strictly increasing, e.g.
        `[0.33, 1, 3]`; the score at each rung is taken after a decay branch of the
        learning rate (the recipe's `decay_fraction` of the rung's steps).
      eta: the reduction factor: `ceil(n / eta)` of a rung's `n` candidates are promoted.
      promotion: `"continue"` trains a promoted candidate on from its stable-phase
        checkpoint; `"restart"` trains it again from scratch to the next rung.
      noise_candidates: how many first-rung candidates are trained again with another
        seed, to measure the score's seed-to-seed spread.

    Raises:
      ValueError: naming the field, the bad value and what was expected.

    Examples:
      >>> FidelityConfig(rungs=[0.33, 1, 3]).rungs
      (0.33, 1.0, 3.0)
    """

    rungs: tuple[float, ...]
    eta: int = 3
    promotion: Promotion = "continue"
    noise_candidates: int = 3

    def __post_init__(self) -> None:
        _check_fields(self, _FIDELITY_RULES)
        object.__setattr__(self, "rungs", tuple(float(r) for r in self.rungs))


_SEARCH_RULES: dict[str, _Rule] = {
    "sampler": _Rule("choice", choices=SAMPLERS),
    "population": _Rule("int", lo=2),
    "trials": _Rule("int", lo=1),
    "seed": _Rule("int", lo=0, hi=_MAX_SEED),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SearchConfig:
    """How candidates of a space too large to enumerate are drawn (grid spaces are
    searched exhaustively, in order).

    Attributes:
      sampler: optuna's `"nsga2"` (multi-objective genetic search, the default), `"tpe"`
        (multi-objective TPE) or `"random"`.
      population: NSGA-II's population size (candidates per generation).
      trials: candidates trained at the first rung, unless `--trials` says otherwise.
      seed: the sampler's seed.

    Raises:
      ValueError: naming the field, the bad value and what was expected.
    """

    sampler: Sampler = "nsga2"
    population: int = 12
    trials: int = 36
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, _SEARCH_RULES)


_CONFIGS: dict[str, tuple[type[Any], Mapping[str, _Rule]]] = {
    "data": (DataConfig, _DATA_RULES),
    "train": (TrainConfig, _TRAIN_RULES),
    "latency": (LatencyConfig, _LATENCY_RULES),
    "fidelity": (FidelityConfig, _FIDELITY_RULES),
    "search": (SearchConfig, _SEARCH_RULES),
}


def dataset_shape(dataset: str) -> tuple[int, int] | None:
    """`(in_ch, num_classes)` an architecture needs for a packaged dataset, else None."""
    return _DATASET_SHAPES.get(dataset)


def build_config(where: str, section: str, table: Mapping[str, Any]) -> Any:
    """Build the `DataConfig` / `TrainConfig` / `LatencyConfig` of one TOML table.

    Raises:
      SpaceError: naming `where`, the dotted key (``train.steps``) and the bad value.
    """
    cls, rules = _CONFIGS[section]
    fields = dataclasses.fields(cls)
    required = {
        f.name: rules[f.name].expected(f.name)
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    check_keys(where, section, table, [f.name for f in fields], required)
    try:
        return cls(**table)
    except _FieldError as e:
        fail(where, f"{section}.{e.field}", e.value, e.expected)


def check_recipe(
    where: str,
    data: DataConfig | None,
    train: TrainConfig | None,
    latency: LatencyConfig,
    base: ArchSpec,
) -> None:
    """Check that the tables fit together: ``[data]`` and ``[train]`` come as a pair, the
    architecture matches a packaged dataset's images and classes, and a batch fits the
    training subset.

    Raises:
      SpaceError: naming `where`, the dotted key and the value.
    """
    for field, value, cls in (("data", data, DataConfig), ("train", train, TrainConfig)):
        if value is not None and not isinstance(value, cls):
            fail(where, field, value, f"a {cls.__name__} or None")
    if not isinstance(latency, LatencyConfig):
        fail(where, "latency", latency, "a LatencyConfig")
    if data is not None and train is None:
        raise SpaceError(
            f"{where}: train: missing table; expected [train] (at least steps = ...) "
            "when [data] is present"
        )
    if data is None and train is not None:
        raise SpaceError(
            f"{where}: data: missing table; expected [data] when [train] is present "
            f"(an empty [data] table means dataset = {fmt(DataConfig().dataset)})"
        )
    if data is None or train is None:
        return
    shape = dataset_shape(data.dataset)
    if shape is not None:
        for key, want in zip(("in_ch", "num_classes"), shape, strict=True):
            got = getattr(base, key)
            if got != want:
                fail(
                    where,
                    f"arch.{key}",
                    got,
                    f"{want} for data.dataset = {fmt(data.dataset)} "
                    "(28x28 grayscale images in 10 classes)",
                )
    if data.train_size is not None and train.batch_size > data.train_size:
        fail(
            where,
            "train.batch_size",
            train.batch_size,
            f"at most data.train_size = {data.train_size}",
        )
