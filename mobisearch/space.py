"""Search spaces: a grid of candidate architectures plus the recipe to evaluate them.

A search space is declarative data in a TOML file (read with the standard library's
`tomllib`), never code. `load_space` checks it field by field; every error is a
`SpaceError` naming the file, the dotted key and the bad value, e.g.
``search_spaces/x.toml: axes.width[2] = 1.7, expected 0 < width <= 4``.

Schema (tables and keys; anything else is an error):

``[space]``
    ``name`` (required): identifier-like (letters, digits, ``_``, ``-``), e.g.
    ``"fashion_mnist"``. ``description`` (optional): free text.
``[axes]`` (all three required, non-empty lists without repeats)
    ``width``: numbers, ``0 < width <= 4`` (the multiplier α). ``resolution``: integers,
    ``8 <= resolution <= 4096`` (ρ, pixels). ``kernel``: odd integers in ``[1, 15]`` (the
    depthwise kernel size of every block).
``[arch]`` (required): the base architecture, in one of two forms.
    Explicit: the keys of `ArchSpec.from_dict` except ``width``, ``resolution``, ``format``
    and ``display_id`` (the first two are search axes). ``arch_def`` (required, a list of
    stage lists of block strings such as ``"dsa_r2_k3_s2_c128"``), and optionally
    ``name``, ``stem_ch``, ``stem_stride``, ``stem_kernel``, ``num_classes``, ``in_ch``,
    ``rounding``; a key left out takes `ArchSpec`'s default.
    Preset: ``preset = "mobilenet_v1"`` or ``"mobilenet_v1_small"`` (see
    `mobisearch.presets`), optionally with ``num_classes`` and ``in_ch``.
``[data]`` (optional): the keys of `DataConfig`.
``[train]`` (required with ``[data]``, not allowed without it): the keys of `TrainConfig`.
``[latency]`` (optional): the keys of `LatencyConfig`.

A space without ``[data]`` and ``[train]`` is for cost only (MACs, parameters). Integers
are accepted where a number is expected; booleans are not numbers. Every candidate must
resolve: no channel count may round to 0 and no stride-2 layer may get a 1x1 input. The
28x28 grayscale datasets (``fashion_mnist``, ``mnist``) need ``in_ch = 1`` and
``num_classes = 10``.

Overrides such as ``train.steps=200`` (the CLI's ``--set``) are TOML values for one
``table.key``, checked exactly like the file: `apply_overrides`.

Pure module: standard library only.

Examples:
    >>> space = load_space(resolve_space_path("quick"))
    >>> len(space), space.candidates()[0].display_id
    (4, 'quick_w025_r16_k3')
    >>> apply_overrides(space, ["train.steps=5", "axes.width=[0.5]"]).train.steps
    5
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args

from mobisearch import presets
from mobisearch.arch import ArchSpec, BlockSpec

__all__ = [
    "DATASETS",
    "DEFAULT_SPACE",
    "DataConfig",
    "LatencyConfig",
    "SearchSpace",
    "SpaceError",
    "TrainConfig",
    "apply_overrides",
    "available_spaces",
    "load_space",
    "resolve_space_path",
]

Dataset = Literal["fashion_mnist", "mnist", "synthetic"]
Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["warmup_cosine", "constant"]
DATASETS: tuple[str, ...] = get_args(Dataset)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)

# The shipped space `mobisearch search` uses when given none.
DEFAULT_SPACE = "fashion_mnist"

# NOTE: facts about the packaged datasets, repeated here (this module may not import the
# numpy-based `mobisearch.data`) so that a bad split fails when the file is read rather
# than after the first download. `mobisearch.data.load_dataset` checks again; the synthetic
# set is left to it.
_TRAIN_SPLIT_SIZES: dict[str, int] = {"fashion_mnist": 60_000, "mnist": 60_000}
# 28x28 grayscale images in 10 classes: (in_ch, num_classes) the architecture must have.
_DATASET_SHAPES: dict[str, tuple[int, int]] = {"fashion_mnist": (1, 10), "mnist": (1, 10)}
# Seeds stay below 2**32 so that every numpy and JAX seeding API takes them.
_MAX_SEED = 2**32 - 1

_SECTIONS: tuple[str, ...] = ("space", "axes", "arch", "data", "train", "latency")
_SPACE_KEYS: tuple[str, ...] = ("name", "description")
_AXES_KEYS: tuple[str, ...] = ("width", "resolution", "kernel")
_ARCH_KEYS: tuple[str, ...] = (
    "name",
    "arch_def",
    "stem_ch",
    "stem_stride",
    "stem_kernel",
    "num_classes",
    "in_ch",
    "rounding",
)
_PRESET_KEYS: tuple[str, ...] = ("preset", "num_classes", "in_ch")
_PRESETS: dict[str, Callable[..., ArchSpec]] = {
    "mobilenet_v1": presets.mobilenet_v1,
    "mobilenet_v1_small": presets.mobilenet_v1_small,
}
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_NAME_EXPECTED = 'an identifier-like string (letters, digits, "_", "-") such as "fashion_mnist"'
_BLOCK_EXPECTED = 'a block string like "dsa_r2_k3_s2_c128"'
_ARCH_DEF_EXPECTED = (
    'a non-empty list of stage lists of block strings, e.g. [["dsa_c64"], ["dsa_r2_s2_c128"]]'
)
_WIDTH_RANGE = "0 < width <= 4"
_RESOLUTION_RANGE = "8 <= resolution <= 4096"
_KERNEL_RANGE = "1 <= kernel <= 15"
_AXES_EXPECTED = {
    "width": f"a non-empty list of numbers with {_WIDTH_RANGE}, e.g. [0.25, 0.5, 1.0]",
    "resolution": f"a non-empty list of integers with {_RESOLUTION_RANGE}, e.g. [24, 28]",
    "kernel": f"a non-empty list of odd integers with {_KERNEL_RANGE}, e.g. [3, 5]",
}
# SearchSpace field -> the dotted TOML key its errors name.
_SPACE_FIELD_KEYS = {
    "widths": "axes.width",
    "resolutions": "axes.resolution",
    "kernels": "axes.kernel",
}


class SpaceError(ValueError):
    """A search-space file, dict or override is invalid; the message says where and why."""


# --------------------------------------------------------------------------------------
# Formatting and field rules


def _fmt(value: object, limit: int = 100) -> str:
    """`value` as it would be written in TOML (shortened to `limit` characters)."""
    text = _toml_repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _toml_repr(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_repr(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_repr(v)}" for k, v in value.items()) + "}"
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):  # TOML dates and times
        return str(isoformat())
    return repr(value)


def _did_you_mean(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _fail(where: str, key: str, value: object, expected: str) -> NoReturn:
    raise SpaceError(f"{where}: {key} = {_fmt(value)}, expected {expected}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Rule:
    """How one config field is checked: its type and range, and the words for both."""

    kind: Literal["int", "float", "choice"]
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
            text = f"one of {_toml_repr(list(self.choices))}"
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
        super().__init__(f"{owner}.{field} = {_fmt(value)}, expected {expected}")
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
    "steps": _Rule("int", lo=1),
    "batch_size": _Rule("int", lo=1),
    "optimizer": _Rule("choice", choices=OPTIMIZERS),
    "learning_rate": _Rule("float", lo=0, lo_open=True),
    "schedule": _Rule("choice", choices=SCHEDULES),
    "warmup_steps": _Rule("int", lo=0),
    "weight_decay": _Rule("float", lo=0),
    "label_smoothing": _Rule("float", lo=0, hi=1, hi_open=True),
    "seed": _Rule("int", lo=0, hi=_MAX_SEED),
    "eval_batch_size": _Rule("int", lo=1),
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
        steps) or `"constant"`.
      warmup_steps: linear-warmup steps of `"warmup_cosine"`; must be < `steps` there.
      weight_decay: decoupled weight decay (>= 0).
      label_smoothing: in [0, 1).
      seed: seed of the parameter initialisation and the batch order.
      eval_batch_size: images per validation step (memory only; no effect on results).

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

    def __post_init__(self) -> None:
        _check_fields(self, _TRAIN_RULES)
        if self.schedule == "warmup_cosine" and self.warmup_steps >= self.steps:
            raise _FieldError(
                "TrainConfig",
                "warmup_steps",
                self.warmup_steps,
                f"an integer with 0 <= warmup_steps < steps (= {self.steps}) under the "
                '"warmup_cosine" schedule',
            )


_LATENCY_RULES: dict[str, _Rule] = {
    "batch_size": _Rule("int", lo=1),
    "warmup": _Rule("int", lo=0),
    "iters": _Rule("int", lo=1),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LatencyConfig:
    """How a candidate's inference latency is measured (see `mobisearch.latency`).

    Attributes:
      batch_size: images per timed call (1 = on-device, one image at a time).
      warmup: untimed calls first, so that compilation is not measured.
      iters: timed calls; percentiles are taken over them.

    Raises:
      ValueError: naming the field, the bad value and what was expected.
    """

    batch_size: int = 1
    warmup: int = 10
    iters: int = 50

    def __post_init__(self) -> None:
        _check_fields(self, _LATENCY_RULES)


_CONFIGS: dict[str, tuple[type[Any], Mapping[str, _Rule]]] = {
    "data": (DataConfig, _DATA_RULES),
    "train": (TrainConfig, _TRAIN_RULES),
    "latency": (LatencyConfig, _LATENCY_RULES),
}


# --------------------------------------------------------------------------------------
# SearchSpace


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SearchSpace:
    """A grid of candidates (width × resolution × kernel around a base arch) and a recipe.

    Attributes:
      name: identifier-like name of the space (study names start with it).
      path: the file it was read from (used in error messages); may be empty.
      widths: width multipliers α, the first axis of the grid.
      resolutions: input resolutions ρ in pixels, the second axis.
      kernels: depthwise kernel sizes, the third axis.
      base: the architecture every candidate derives from. Its own width and resolution
        are not used (a loaded space has 1.0 and 224, `ArchSpec`'s defaults).
      data: the dataset, or None for a cost-only space.
      train: the short-training recipe; given exactly when `data` is.
      latency: how latency is measured.
      description: free text from the file.

    Lists given for the axes are stored as tuples, and integer widths as floats.

    Raises:
      SpaceError: naming `path`, the dotted TOML key (``axes.width[2]``) and the value.
    """

    name: str
    path: str = ""
    widths: tuple[float, ...]
    resolutions: tuple[int, ...]
    kernels: tuple[int, ...]
    base: ArchSpec
    data: DataConfig | None = None
    train: TrainConfig | None = None
    latency: LatencyConfig = dataclasses.field(default_factory=LatencyConfig)
    description: str = ""

    def __post_init__(self) -> None:
        where = self.path if isinstance(self.path, str) and self.path else "SearchSpace"
        if not isinstance(self.path, str):
            _fail(where, "path", self.path, "a string")
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            _fail(where, "space.name", self.name, _NAME_EXPECTED)
        if not isinstance(self.description, str):
            _fail(where, "space.description", self.description, "a string")
        if not isinstance(self.base, ArchSpec):
            _fail(where, "arch", self.base, "an ArchSpec")
        for field, key in _SPACE_FIELD_KEYS.items():
            values = getattr(self, field)
            if not isinstance(values, list | tuple) or not values:
                _fail(where, key, values, _AXES_EXPECTED[key.split(".")[1]])
            object.__setattr__(self, field, tuple(values))
        self._check_widths(where)
        self._check_ints(where, "resolutions", _RESOLUTION_RANGE, odd=False, lo=8, hi=4096)
        self._check_ints(where, "kernels", _KERNEL_RANGE, odd=True, lo=1, hi=15)
        self._check_recipe(where)
        self._check_candidates(where)

    def _check_widths(self, where: str) -> None:
        widths = []
        for i, w in enumerate(self.widths):
            key = f"axes.width[{i}]"
            if isinstance(w, bool) or not isinstance(w, int | float):
                _fail(where, key, w, f"a number with {_WIDTH_RANGE}")
            if not (math.isfinite(w) and 0 < w <= 4):
                _fail(where, key, w, _WIDTH_RANGE)
            widths.append(float(w))
        object.__setattr__(self, "widths", tuple(widths))
        _check_unique(where, "axes.width", self.widths)

    def _check_ints(
        self, where: str, field: str, text: str, *, odd: bool, lo: int, hi: int
    ) -> None:
        key = _SPACE_FIELD_KEYS[field]
        kind = "an odd integer" if odd else "an integer"
        for i, v in enumerate(getattr(self, field)):
            is_int = isinstance(v, int) and not isinstance(v, bool)
            if not is_int or not lo <= v <= hi or (odd and v % 2 == 0):
                _fail(where, f"{key}[{i}]", v, f"{kind} with {text}")
        _check_unique(where, key, getattr(self, field))

    def _check_recipe(self, where: str) -> None:
        for field, cls in (("data", DataConfig), ("train", TrainConfig)):
            value = getattr(self, field)
            if value is not None and not isinstance(value, cls):
                _fail(where, field, value, f"a {cls.__name__} or None")
        if not isinstance(self.latency, LatencyConfig):
            _fail(where, "latency", self.latency, "a LatencyConfig")
        if self.data is not None and self.train is None:
            raise SpaceError(
                f"{where}: train: missing table; expected [train] (at least steps = ...) "
                "when [data] is present"
            )
        if self.data is None and self.train is not None:
            raise SpaceError(
                f"{where}: data: missing table; expected [data] when [train] is present "
                f"(an empty [data] table means dataset = {_fmt(DataConfig().dataset)})"
            )
        if self.data is None or self.train is None:
            return
        shape = _DATASET_SHAPES.get(self.data.dataset)
        if shape is not None:
            for key, want in zip(("in_ch", "num_classes"), shape, strict=True):
                got = getattr(self.base, key)
                if got != want:
                    _fail(
                        where,
                        f"arch.{key}",
                        got,
                        f"{want} for data.dataset = {_fmt(self.data.dataset)} "
                        "(28x28 grayscale images in 10 classes)",
                    )
        if self.data.train_size is not None and self.train.batch_size > self.data.train_size:
            _fail(
                where,
                "train.batch_size",
                self.train.batch_size,
                f"at most data.train_size = {self.data.train_size}",
            )

    def _check_candidates(self, where: str) -> None:
        # Display ids name trials and plot labels, so two widths must not share one.
        seen: dict[str, int] = {}
        r0, k0 = self.resolutions[0], self.kernels[0]
        for i, w in enumerate(self.widths):
            did = dataclasses.replace(self.base, width=w, resolution=r0).with_kernel(k0).display_id
            if did in seen:
                _fail(
                    where,
                    f"axes.width[{i}]",
                    w,
                    f"widths that differ in the display id (axes.width[{seen[did]}] = "
                    f"{self.widths[seen[did]]} gives {did!r} too: ids round widths to 0.01)",
                )
            seen[did] = i
        # Channels depend on the width only and spatial sizes on the resolution only, so
        # one resolve per axis value checks the whole grid.
        for i, w in enumerate(self.widths):
            try:
                dataclasses.replace(self.base, width=w, resolution=self.resolutions[0]).resolve()
            except ValueError as e:
                _fail(
                    where,
                    f"axes.width[{i}]",
                    w,
                    f"a width at which every layer keeps >= 1 channel ({e})",
                )
        for i, r in enumerate(self.resolutions):
            layers = dataclasses.replace(self.base, width=self.widths[0], resolution=r).resolve()
            bad = next((layer for layer in layers if layer.stride > 1 and layer.in_hw < 2), None)
            if bad is not None:
                total = math.prod(layer.stride for layer in layers)
                _fail(
                    where,
                    f"axes.resolution[{i}]",
                    r,
                    f"a resolution > {total // 2}, so that no stride-2 layer gets a 1x1 input "
                    f"(here {bad.name} does; the network downsamples {total}x in all)",
                )

    def __len__(self) -> int:
        return len(self.widths) * len(self.resolutions) * len(self.kernels)

    def candidates(self) -> tuple[ArchSpec, ...]:
        """Every candidate of the grid, in order width → resolution → kernel.

        Returns:
          `dataclasses.replace(base, width=w, resolution=r).with_kernel(k)` for each
          `w` in `widths`, `r` in `resolutions`, `k` in `kernels` (the last varies fastest).
        """
        return tuple(
            dataclasses.replace(self.base, width=w, resolution=r).with_kernel(k)
            for w, r, k in itertools.product(self.widths, self.resolutions, self.kernels)
        )

    def to_dict(self) -> dict[str, Any]:
        """The TOML-shaped dict of this space; `SearchSpace.from_dict` reads it back.

        The arch is written in explicit form (``arch_def`` and the other keys). Every value
        is a TOML/JSON scalar or list, so the dict can be stored next to results.
        """
        space: dict[str, Any] = {"name": self.name}
        if self.description:
            space["description"] = self.description
        doc: dict[str, Any] = {
            "space": space,
            "axes": {
                "width": list(self.widths),
                "resolution": list(self.resolutions),
                "kernel": list(self.kernels),
            },
            "arch": _arch_table(self.base),
        }
        for key in ("data", "train", "latency"):
            config = getattr(self, key)
            if config is not None:
                # TOML has no null: a None field (train_size) is written by leaving it out.
                doc[key] = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str = "") -> SearchSpace:
        """Check and build a space from its TOML-shaped dict (what `tomllib` returns).

        Args:
          doc: tables `space`, `axes`, `arch` and optionally `data`, `train`, `latency`
            (see the module docstring for their keys).
          source: where `doc` came from, e.g. the file name; stored as `path` and named
            in every error message.

        Returns:
          The checked `SearchSpace`.

        Raises:
          SpaceError: naming `source`, the dotted key and the bad value.
        """
        where = source or "search space"
        if not isinstance(doc, Mapping):
            raise SpaceError(f"{where}: expected a table of tables, got {type(doc).__name__}")
        for key, value in doc.items():
            if key not in _SECTIONS:
                raise SpaceError(
                    f"{where}: {key}: unknown top-level key; expected one of the tables "
                    f"{_toml_repr(list(_SECTIONS))}{_did_you_mean(key, _SECTIONS)}"
                )
            if not isinstance(value, Mapping):
                _fail(where, key, value, f"a table [{key}]")
        space_t = _section(where, doc, "space", _SPACE_KEYS, {"name": _NAME_EXPECTED})
        axes_t = _section(where, doc, "axes", _AXES_KEYS, _AXES_EXPECTED)
        arch_t = doc.get("arch")
        if arch_t is None:
            raise SpaceError(
                f"{where}: arch: missing table; expected [arch] with arch_def = [...] or "
                f"preset = one of {_toml_repr(list(_PRESETS))}"
            )
        base = _build_arch(where, arch_t)
        configs = {key: _build_config(where, key, doc[key]) for key in _CONFIGS if key in doc}
        return cls(
            name=space_t["name"],
            description=space_t.get("description", ""),
            path=source,
            widths=axes_t["width"],
            resolutions=axes_t["resolution"],
            kernels=axes_t["kernel"],
            base=base,
            data=configs.get("data"),
            train=configs.get("train"),
            latency=configs.get("latency", LatencyConfig()),
        )


def _check_unique(where: str, key: str, values: Sequence[object]) -> None:
    first: dict[object, int] = {}
    for i, v in enumerate(values):
        if v in first:
            _fail(where, f"{key}[{i}]", v, f"no repeats (it repeats {key}[{first[v]}])")
        first[v] = i


def _section(
    where: str,
    doc: Mapping[str, Any],
    section: str,
    allowed: Sequence[str],
    required: Mapping[str, str],
) -> Mapping[str, Any]:
    """`doc[section]`, after checking it exists and has only `allowed` keys, all `required`."""
    if section not in doc:
        keys = ", ".join(required) or "its keys"
        raise SpaceError(f"{where}: {section}: missing table; expected [{section}] with {keys}")
    table: Mapping[str, Any] = doc[section]
    _check_keys(where, section, table, allowed, required)
    return table


def _check_keys(
    where: str,
    section: str,
    table: Mapping[str, Any],
    allowed: Sequence[str],
    required: Mapping[str, str],
    hint: str = "",
) -> None:
    for key in table:
        if key not in allowed:
            raise SpaceError(
                f"{where}: {section}.{key}: unknown key; expected one of "
                f"{_toml_repr(list(allowed))}{_did_you_mean(key, allowed)}{hint}"
            )
    for key, expected in required.items():
        if key not in table:
            raise SpaceError(f"{where}: {section}.{key}: missing key; expected {expected}")


def _build_config(where: str, section: str, table: Mapping[str, Any]) -> Any:
    """Build the `DataConfig` / `TrainConfig` / `LatencyConfig` of one table."""
    cls, rules = _CONFIGS[section]
    fields = dataclasses.fields(cls)
    required = {
        f.name: rules[f.name].expected(f.name)
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    _check_keys(where, section, table, [f.name for f in fields], required)
    try:
        return cls(**table)
    except _FieldError as e:
        _fail(where, f"{section}.{e.field}", e.value, e.expected)


def _arch_table(arch: ArchSpec) -> dict[str, Any]:
    """The explicit `[arch]` table of `arch` (its JSON form without width/resolution)."""
    skip = ("format", "display_id", "width", "resolution")
    return {k: v for k, v in arch.to_dict().items() if k not in skip}


def _build_arch(where: str, table: Mapping[str, Any]) -> ArchSpec:
    """Build the base `ArchSpec` of an `[arch]` table, explicit or preset."""
    if "preset" in table:
        preset = table["preset"]
        if not isinstance(preset, str) or preset not in _PRESETS:
            _fail(where, "arch.preset", preset, f"one of {_toml_repr(list(_PRESETS))}")
        hint = f" (not allowed with preset = {_fmt(preset)}; write arch_def out instead)"
        _check_keys(where, "arch", table, _PRESET_KEYS, {}, hint)
        stages = _PRESETS[preset]().stages
        kwargs = {k: v for k, v in table.items() if k != "preset"}
        for key, value in kwargs.items():
            _check_arch_value(where, key, value, stages)
        # Normalised to the explicit form so both forms give the same base.
        table = _arch_table(_PRESETS[preset](**kwargs))
    hint = ""
    if any(k in table for k in ("width", "resolution", "kernel")):
        hint = " (width, resolution and kernel are search axes: set them in [axes])"
    _check_keys(where, "arch", table, _ARCH_KEYS, {"arch_def": _ARCH_DEF_EXPECTED}, hint)
    stages = _parse_arch_def(where, table["arch_def"])
    for key, value in table.items():
        if key != "arch_def":
            _check_arch_value(where, key, value, stages)
    try:
        return ArchSpec.from_dict(table, source=f"{where}: arch")
    except ValueError as e:
        raise SpaceError(str(e)) from None


def _check_arch_value(
    where: str, key: str, value: object, stages: tuple[tuple[BlockSpec, ...], ...]
) -> None:
    """Check one `[arch]` scalar with `ArchSpec`'s own rules, naming the dotted key."""
    kwargs: dict[str, Any] = {key: value}
    try:
        ArchSpec(stages=stages, **kwargs)
    except (ValueError, TypeError) as e:
        raise SpaceError(f"{where}: arch.{key} = {_fmt(value)}: {e}") from None


def _parse_arch_def(where: str, arch_def: object) -> tuple[tuple[BlockSpec, ...], ...]:
    key = "arch.arch_def"
    if not isinstance(arch_def, list | tuple) or not arch_def:
        _fail(where, key, arch_def, _ARCH_DEF_EXPECTED)
    stages = []
    for i, stage in enumerate(arch_def):
        if not isinstance(stage, list | tuple) or not stage:
            _fail(where, f"{key}[{i}]", stage, "a non-empty list of block strings")
        blocks = []
        for j, text in enumerate(stage):
            if not isinstance(text, str):
                _fail(where, f"{key}[{i}][{j}]", text, _BLOCK_EXPECTED)
            try:
                blocks.append(BlockSpec.from_string(text))
            except ValueError as e:
                _fail(where, f"{key}[{i}][{j}]", text, f"{_BLOCK_EXPECTED} ({e})")
        stages.append(tuple(blocks))
    return tuple(stages)


# --------------------------------------------------------------------------------------
# Files, names and overrides


def load_space(path: str | os.PathLike[str]) -> SearchSpace:
    """Read and check a search-space TOML file.

    Args:
      path: the file. A shipped space's name is turned into a path by
        `resolve_space_path`.

    Returns:
      The `SearchSpace`, with `path` set to `path` as given.

    Raises:
      SpaceError: the file is missing or unreadable, is not valid TOML (with the parser's
        line and column), or fails a check (naming the dotted key and the value).

    Examples:
      >>> space = load_space(resolve_space_path("mobilenet_v1_paper"))
      >>> len(space), space.data is None
      (48, True)
    """
    file = os.fspath(path)
    try:
        with open(file, "rb") as fp:
            doc = tomllib.load(fp)
    except FileNotFoundError:
        raise SpaceError(
            f"{file}: no such file (shipped spaces: {', '.join(available_spaces())})"
        ) from None
    except OSError as e:
        raise SpaceError(f"{file}: cannot be read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SpaceError(f"{file}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise SpaceError(f"{file}: not UTF-8 text ({e})") from None
    return SearchSpace.from_dict(doc, source=file)


def _space_dirs() -> tuple[Path, ...]:
    package = Path(__file__).resolve().parent
    # A wheel ships the files inside the package (pyproject's force-include); a source
    # checkout or an editable install reads the repository's folder.
    return (package / "_spaces", package.parent / "search_spaces")


def available_spaces() -> tuple[str, ...]:
    """Names of the shipped search spaces, sorted (e.g. `"fashion_mnist"`, `"quick"`)."""
    names = {p.stem for d in _space_dirs() if d.is_dir() for p in d.glob("*.toml")}
    return tuple(sorted(names))


def resolve_space_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn a search-space argument into a file path.

    Args:
      name_or_path: an existing path (returned as is), or the name of a shipped space
        (`"fashion_mnist"` or `"fashion_mnist.toml"`), looked up in the package's
        `_spaces/` folder (wheel installs) and then in the repository's `search_spaces/`.

    Returns:
      The path of the file.

    Raises:
      SpaceError: nothing exists at the path and no shipped space has that name; the
        message lists the shipped names.

    Examples:
      >>> resolve_space_path(DEFAULT_SPACE).name
      'fashion_mnist.toml'
    """
    text = os.fspath(name_or_path)
    path = Path(text)
    if text and path.exists():
        return path
    available = ", ".join(available_spaces())
    if text and path.parent == Path(".") and _NAME_RE.fullmatch(path.name.removesuffix(".toml")):
        filename = path.name if path.suffix == ".toml" else f"{path.name}.toml"
        for folder in _space_dirs():
            if (folder / filename).is_file():
                return folder / filename
        raise SpaceError(
            f"{text}: no such file and no shipped search space of that name; expected a path "
            f"to a .toml file or one of: {available}"
        )
    raise SpaceError(
        f"{text!r}: no such file; expected a path to a .toml file or one of: {available}"
    )


def _parse_override(text: str) -> tuple[str, str, Any]:
    """`"train.steps=200"` → `("train", "steps", 200)`; the value is read as TOML."""
    if not isinstance(text, str):
        raise SpaceError(f"override {text!r}: expected a string like 'train.steps=200'")
    dotted, sep, raw = text.partition("=")
    dotted, raw = dotted.strip(), raw.strip()
    section, dot, key = dotted.partition(".")
    if not sep or not raw or not dot or not section or not key or "." in key:
        raise SpaceError(
            f"override {text!r}: expected table.key=value, e.g. train.steps=200 or "
            "axes.width=[0.5,1.0]"
        )
    if section not in _SECTIONS:
        raise SpaceError(
            f"override {text!r}: {section}: unknown table; expected one of "
            f"{_toml_repr(list(_SECTIONS))}{_did_you_mean(section, _SECTIONS)}"
        )
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as e:
        # A bare word is taken as a string, so `data.dataset=mnist` needs no shell quoting.
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", raw):
            raise SpaceError(f"override {text!r}: {raw} is not a TOML value ({e})") from None
        value = raw
    return section, key, value


def apply_overrides(space: SearchSpace, overrides: Sequence[str]) -> SearchSpace:
    """Set keys of a space as the CLI's ``--set table.key=value`` does.

    Each value is read as a TOML value (a bare word counts as a string), and the changed
    space is checked exactly like a file. ``arch.preset=...`` replaces the whole base
    arch; other ``arch.*`` keys change one key of it.

    Args:
      space: the space to start from.
      overrides: strings like ``"train.steps=200"``, ``"axes.width=[0.5,1.0]"``,
        ``"data.dataset=mnist"``.

    Returns:
      A new `SearchSpace` (the same `path`).

    Raises:
      SpaceError: naming the override, the dotted key and the bad value.

    Examples:
      >>> space = load_space(resolve_space_path("quick"))
      >>> apply_overrides(space, ["axes.kernel=[3, 5]", "data.validation_size=500"]).kernels
      (3, 5)
      >>> try:
      ...     apply_overrides(space, ["train.steps=0"])
      ... except SpaceError as e:
      ...     print(str(e).split(": ", 2)[2])
      train.steps = 0, expected an integer >= 1
    """
    if isinstance(overrides, str):
        raise TypeError(f"`overrides` (={overrides!r}) must be a list of strings, not a string")
    parsed = [(text, *_parse_override(text)) for text in overrides]
    doc = space.to_dict()
    # A preset replaces the whole [arch] table, so it goes first.
    for _, section, key, value in sorted(parsed, key=lambda p: (p[1], p[2]) != ("arch", "preset")):
        if (section, key) == ("arch", "preset"):
            doc["arch"] = {"preset": value}
        else:
            doc.setdefault(section, {})[key] = value
    try:
        return SearchSpace.from_dict(doc, source=space.path)
    except SpaceError as e:
        message = str(e)
        named = [t for t, s, k, _ in parsed if re.search(rf"\b{re.escape(f'{s}.{k}')}\b", message)]
        culprits = named or [t for t, *_ in parsed]
        label = "override" if len(culprits) == 1 else "overrides"
        raise SpaceError(f"{label} {', '.join(map(repr, culprits))}: {message}") from None
