"""Search spaces: the candidate architectures around a base network, plus the recipe to
evaluate them.

A search space is declarative data in a TOML file (read with the standard library's
`tomllib`), never code. `load_space` checks it field by field; every error is a
`SpaceError` naming the file, the dotted key and the bad value, e.g.
``search_spaces/x.toml: axes.width[2] = 1.7, expected 0 < width <= 4``.

There are two kinds of space. A **grid** scales the whole base network: one width
multiplier, one resolution and one depthwise kernel per candidate, every combination of
the ``[axes]`` lists. A **per-stage** space chooses widths, kernels and depths for each stage
of the base's ``arch_def`` (optionally for each block), plus the resolution and the stem
width; its size can run to billions, so it is sampled rather than listed.

Schema (tables and keys; anything else is an error):

``[space]``
    ``name`` (required): identifier-like (letters, digits, ``_``, ``-``), e.g.
    ``"fashion_mnist"``. ``description`` (optional): free text.
``[axes]``, grid form (``width``, ``resolution`` and ``kernel`` required; non-empty lists
    without repeats): ``width``: numbers, ``0 < width <= 4`` (the multiplier α).
    ``resolution``: integers, ``8 <= resolution <= 4096`` (ρ, pixels). ``kernel``: odd
    integers in ``[1, 15]`` (the depthwise kernel size of every block).
``[axes]``, per-stage form (when it holds a ``stages`` table): ``resolution`` as above
    (required); ``stem_ch`` (channel counts of the stem conv) or ``stem_width``
    (multipliers of ``arch.stem_ch``), optional, default the base's; and
    ``[axes.stages]`` with the per-stage choices: ``width`` (or ``out_ch``), ``kernel``,
    ``depth`` and ``per_block`` for every stage, replaced key by key for stage ``i`` in
    ``[axes.stages.<i>]`` (``i`` from 0, as ``arch.arch_def[i]``); see `mobisearch.stages`
    for their meaning and defaults. ``width`` and ``kernel`` are then not ``[axes]`` keys.
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

Shipped spaces (``search_spaces/``, found by name with `resolve_space_path`):
``fashion_mnist`` (the default: a 24-candidate grid), ``fashion_mnist_stages`` (per-stage
width, kernel and depth around the same network: 2.6e9 candidates), ``mnist``, ``quick`` (a
2x2 grid for CI) and ``mobilenet_v1_paper`` (cost only).

Candidates, for a search engine: `SearchSpace.size()` counts them exactly;
`SearchSpace.params()` names each choice with its options, in a fixed order, and
`SearchSpace.arch_from_params` builds the candidate of a full assignment (so a sampler such
as optuna's can draw each parameter from a categorical distribution);
`SearchSpace.sample(rng)` draws one uniformly; `SearchSpace.arch_from_id` reads a display id
back. `candidates()` lists a grid (and a per-stage space of at most `MAX_LISTED`
candidates) in a fixed order. Duplicates are recognised by `ArchSpec.arch_key()`.

Overrides such as ``train.steps=200`` (the CLI's ``--set``) are TOML values for one
``table.key``, checked exactly like the file: `apply_overrides`.

Pure module: standard library only.

Examples:
    >>> space = load_space(resolve_space_path("quick"))
    >>> len(space), space.candidates()[0].display_id
    (4, 'quick_w025_r16_k3')
    >>> apply_overrides(space, ["train.steps=5", "axes.width=[0.5]"]).train.steps
    5
    >>> stages = load_space(resolve_space_path("fashion_mnist_stages"))
    >>> stages.is_grid, stages.size() > 10**9
    (False, True)
    >>> import random
    >>> arch = stages.sample(random.Random(0))
    >>> stages.arch_from_id(arch.display_id) == arch
    True
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from mobisearch._spacefile import (
    AXES_EXPECTED,
    CONFIG_SECTIONS,
    KERNEL_RANGE,
    NAME_EXPECTED,
    NAME_RE,
    PRESETS,
    RESOLUTION_RANGE,
    SECTIONS,
    SPACE_FIELD_KEYS,
    SPACE_KEYS,
    WIDTH_RANGE,
    arch_table,
    available_spaces,
    build_arch,
    check_stem_channels,
    parse_override,
    read_axes,
    read_section,
    resolve_space_path,
)
from mobisearch._toml import (
    SpaceError,
    check_unique,
    did_you_mean,
    fail,
    is_int,
    toml_repr,
)
from mobisearch.arch import ArchSpec
from mobisearch.candidates import GridPlan, StagePlan
from mobisearch.config import (
    DATASETS,
    DataConfig,
    FidelityConfig,
    LatencyConfig,
    SearchConfig,
    TrainConfig,
    build_config,
    check_recipe,
)
from mobisearch.stages import StageAxes, check_stages, stages_table

__all__ = [
    "DATASETS",
    "DEFAULT_SPACE",
    "MAX_LISTED",
    "DataConfig",
    "FidelityConfig",
    "LatencyConfig",
    "SearchConfig",
    "SearchSpace",
    "SpaceError",
    "StageAxes",
    "TrainConfig",
    "apply_overrides",
    "available_spaces",
    "load_space",
    "resolve_space_path",
]

# The shipped space `mobisearch search` uses when given none: the per-stage space, whose
# frontier dominates the uniform grid's at the same budget and recipe (results/).
DEFAULT_SPACE = "fashion_mnist_stages"
#: The most candidates `SearchSpace.candidates()` lists; a larger space is sampled.
MAX_LISTED = 1_000_000


# --------------------------------------------------------------------------------------
# SearchSpace


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SearchSpace:
    """The candidates of a search (a grid, or per-stage choices) around a base arch, and
    the recipe to evaluate them.

    Attributes:
      name: identifier-like name of the space (study names start with it).
      path: the file it was read from (used in error messages); may be empty.
      widths: grid: width multipliers α, the first axis. Per-stage: `()`.
      resolutions: input resolutions ρ in pixels (the second grid axis).
      kernels: grid: depthwise kernel sizes, the third axis. Per-stage: `()`.
      stages: per-stage: one `StageAxes` per stage of `base.stages`. Grid: None.
      stem_chs: per-stage: stem channel choices (default: `base.stem_ch` alone). Grid: `()`.
      base: the architecture every candidate derives from. Its own width and resolution
        are not used (a loaded space has 1.0 and 224, `ArchSpec`'s defaults).
      data: the dataset, or None for a cost-only space.
      train: the short-training recipe; given exactly when `data` is.
      latency: how latency is measured.
      fidelity: multi-fidelity ranking (successive halving over rungs), or None to train
        every candidate once with `train`.
      search: how candidates are drawn from a space too large to enumerate.
      description: free text from the file.

    Lists given for the axes are stored as tuples, and integer widths as floats.

    Raises:
      SpaceError: naming `path`, the dotted TOML key (``axes.width[2]``) and the value.
    """

    name: str
    path: str = ""
    widths: tuple[float, ...] = ()
    resolutions: tuple[int, ...]
    kernels: tuple[int, ...] = ()
    stages: tuple[StageAxes, ...] | None = None
    stem_chs: tuple[int, ...] = ()
    base: ArchSpec
    data: DataConfig | None = None
    train: TrainConfig | None = None
    latency: LatencyConfig = dataclasses.field(default_factory=LatencyConfig)
    fidelity: FidelityConfig | None = None
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    description: str = ""
    # The candidate set, built once from the checked fields.
    _plan: GridPlan | StagePlan = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = self.path if isinstance(self.path, str) and self.path else "SearchSpace"
        if not isinstance(self.path, str):
            fail(where, "path", self.path, "a string")
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            fail(where, "space.name", self.name, NAME_EXPECTED)
        if not isinstance(self.description, str):
            fail(where, "space.description", self.description, "a string")
        if not isinstance(self.base, ArchSpec):
            fail(where, "arch", self.base, "an ArchSpec")
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))
        self._check_ints(where, "resolutions", RESOLUTION_RANGE, odd=False, lo=8, hi=4096)
        if self.stages is None:
            if self.stem_chs:
                fail(where, "axes.stem_ch", self.stem_chs, "no stem choices in a grid space")
            self._check_widths(where)
            self._check_ints(where, "kernels", KERNEL_RANGE, odd=True, lo=1, hi=15)
            grid = GridPlan(self.base, self.widths, self.resolutions, self.kernels)
            object.__setattr__(self, "_plan", grid)
        else:
            for field, key in (("widths", "axes.width"), ("kernels", "axes.kernel")):
                if getattr(self, field):
                    expected = f"no {key} with [axes.stages] (set it per stage in [axes.stages])"
                    fail(where, key, getattr(self, field), expected)
            self._check_stem(where)
            check_stages(where, self.base, self.stages)
            plan = StagePlan.build(self.base, self.resolutions, self.stem_chs, self.stages)
            object.__setattr__(self, "_plan", plan)
        check_recipe(where, self.data, self.train, self.latency, self.base)
        self._check_candidates(where)

    def _check_widths(self, where: str) -> None:
        if not isinstance(self.widths, list | tuple) or not self.widths:
            fail(where, "axes.width", self.widths, AXES_EXPECTED["width"])
        widths = []
        for i, w in enumerate(self.widths):
            key = f"axes.width[{i}]"
            if isinstance(w, bool) or not isinstance(w, int | float):
                fail(where, key, w, f"a number with {WIDTH_RANGE}")
            if not (math.isfinite(w) and 0 < w <= 4):
                fail(where, key, w, WIDTH_RANGE)
            widths.append(float(w))
        object.__setattr__(self, "widths", tuple(widths))
        check_unique(where, "axes.width", self.widths)

    def _check_ints(
        self, where: str, field: str, text: str, *, odd: bool, lo: int, hi: int
    ) -> None:
        key = SPACE_FIELD_KEYS[field]
        values = getattr(self, field)
        if not isinstance(values, list | tuple) or not values:
            fail(where, key, values, AXES_EXPECTED[key.split(".")[1]])
        object.__setattr__(self, field, tuple(values))
        kind = "an odd integer" if odd else "an integer"
        for i, v in enumerate(values):
            if not is_int(v) or not lo <= v <= hi or (odd and v % 2 == 0):
                fail(where, f"{key}[{i}]", v, f"{kind} with {text}")
        check_unique(where, key, values)

    def _check_stem(self, where: str) -> None:
        stem = self.stem_chs or (self.base.stem_ch,)
        if not isinstance(stem, list | tuple):
            fail(where, "axes.stem_ch", stem, "a non-empty list of channel counts")
        object.__setattr__(self, "stem_chs", tuple(stem))
        check_stem_channels(where, "axes.stem_ch", self.stem_chs, self.stem_chs, self.base)

    def _check_candidates(self, where: str) -> None:
        if isinstance(self._plan, GridPlan):
            self._plan.check_widths(where)
        # Spatial sizes depend on the resolution and the strides only: one resolve per
        # resolution, of the candidate with the most stride-2 blocks, checks the space.
        for i, r in enumerate(self.resolutions):
            layers = self._plan.probe(r).resolve()
            bad = next((layer for layer in layers if layer.stride > 1 and layer.in_hw < 2), None)
            if bad is not None:
                total = math.prod(layer.stride for layer in layers)
                fail(
                    where,
                    f"axes.resolution[{i}]",
                    r,
                    f"a resolution > {total // 2}, so that no stride-2 layer gets a 1x1 input "
                    f"(here {bad.name} does; the network downsamples {total}x in all)",
                )

    # --- the candidates ----------------------------------------------------------------

    @property
    def is_grid(self) -> bool:
        """True for a grid (width × resolution × kernel), False for a per-stage space."""
        return isinstance(self._plan, GridPlan)

    @property
    def _where(self) -> str:
        return self.path or self.name

    def size(self) -> int:
        """The exact number of candidates (distinct networks); may exceed `sys.maxsize`.

        Examples:
          >>> load_space(resolve_space_path("fashion_mnist")).size()
          24
        """
        return self._plan.size()

    def __len__(self) -> int:
        # NOTE: len() must fit in an index-sized int; size() has no such limit.
        return self.size()

    def candidates(self) -> tuple[ArchSpec, ...]:
        """Every candidate, in a fixed order.

        A grid varies width → resolution → kernel (the last fastest): each candidate is
        `dataclasses.replace(base, width=w, resolution=r).with_kernel(k)`. A per-stage
        space varies resolution → stem → stage 0 → stage 1 → ... (each stage's depth, then
        its channels, then its kernels).

        Raises:
          SpaceError: for a space of more than `MAX_LISTED` candidates (use `sample` or a
            sampler over `params()`).
        """
        n = self.size()
        if n > MAX_LISTED:
            raise SpaceError(
                f"{self._where}: {n:,} candidates, too many to list (at most "
                f"{MAX_LISTED:,}); draw them with sample() or a sampler over params()"
            )
        return tuple(self._plan.candidates())

    def params(self) -> dict[str, tuple[Any, ...]]:
        """The choices of the space, for a sampler: parameter name → its options, in order.

        Only choices with more than one option are listed. A grid has ``width``,
        ``resolution`` and ``kernel``. A per-stage space has ``resolution``, ``stem_ch``,
        then per stage ``s<i>.depth``, ``s<i>.width`` (or ``s<i>.out_ch``) and
        ``s<i>.kernel``, or ``s<i>.b<j>.width`` / ``s<i>.b<j>.kernel`` where the file
        chooses per block (``j`` up to the stage's largest depth; a candidate ignores the
        blocks past its depth). Options are ints, floats or strings, as optuna's
        `CategoricalDistribution` takes them.

        Examples:
          >>> load_space(resolve_space_path("quick")).params()
          {'width': (0.25, 0.5), 'resolution': (16, 20)}
        """
        return self._plan.params()

    def arch_from_params(self, params: Mapping[str, Any]) -> ArchSpec:
        """The candidate of a full assignment of `params()`.

        Args:
          params: a value for every name of `params()` (and nothing else), each one of its
            options.

        Returns:
          The candidate. Assignments that differ only in blocks past a stage's depth give
          the same candidate; any other two give different networks.

        Raises:
          SpaceError: naming the parameter and the value on a missing or unknown name or a
            value that is not an option.

        Examples:
          >>> space = load_space(resolve_space_path("quick"))
          >>> space.arch_from_params({"width": 0.5, "resolution": 16}).display_id
          'quick_w050_r16_k3'
        """
        return self._plan.from_params(self._where, params)

    def params_from_arch(self, arch: ArchSpec) -> dict[str, Any]:
        """The assignment of `params()` that gives `arch` (blocks past a stage's depth take
        their first option); `arch_from_params(params_from_arch(a)) == a`.

        Raises:
          SpaceError: `arch` is not a candidate of this space; the message says why.
        """
        if not isinstance(arch, ArchSpec):
            raise SpaceError(f"{self._where}: {arch!r} is not an ArchSpec")
        return self._plan.params_of(self._where, arch)

    def arch_from_id(self, display_id: str) -> ArchSpec:
        """The candidate whose `display_id` is `display_id` (`a.display_id` round-trips).

        Raises:
          SpaceError: naming the id, if it does not parse or names no candidate of this
            space.

        Examples:
          >>> space = load_space(resolve_space_path("fashion_mnist"))
          >>> space.arch_from_id("mnv1_w075_r20_k5").width
          0.75
        """
        return self._plan.from_id(self._where, display_id)

    def sample(self, rng: random.Random) -> ArchSpec:
        """One candidate drawn uniformly from the space, using only `rng`.

        Examples:
          >>> space = load_space(resolve_space_path("quick"))
          >>> space.sample(random.Random(0)) == space.sample(random.Random(0))
          True
        """
        return self._plan.sample(rng)

    # --- serialization -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The TOML-shaped dict of this space; `SearchSpace.from_dict` reads it back.

        The arch is written in explicit form (``arch_def`` and the other keys), and a
        per-stage space writes every stage's choices in its own ``[axes.stages.<i>]``. Every
        value is a TOML/JSON scalar, list or table, so the dict can be stored next to results.
        """
        space: dict[str, Any] = {"name": self.name}
        if self.description:
            space["description"] = self.description
        if self.stages is None:
            axes: dict[str, Any] = {
                "width": list(self.widths),
                "resolution": list(self.resolutions),
                "kernel": list(self.kernels),
            }
        else:
            axes = {
                "resolution": list(self.resolutions),
                "stem_ch": list(self.stem_chs),
                "stages": stages_table(self.stages),
            }
        doc: dict[str, Any] = {"space": space, "axes": axes, "arch": arch_table(self.base)}
        for key in CONFIG_SECTIONS:
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
            if key not in SECTIONS:
                raise SpaceError(
                    f"{where}: {key}: unknown top-level key; expected one of the tables "
                    f"{toml_repr(list(SECTIONS))}{did_you_mean(key, SECTIONS)}"
                )
            if not isinstance(value, Mapping):
                fail(where, key, value, f"a table [{key}]")
        space_t = read_section(where, doc, "space", SPACE_KEYS, {"name": NAME_EXPECTED})
        if "axes" not in doc:
            raise SpaceError(
                f"{where}: axes: missing table; expected [axes] with width, resolution, kernel "
                "(a grid) or resolution and [axes.stages] (per-stage choices)"
            )
        axes_t = doc["axes"]
        arch_t = doc.get("arch")
        if arch_t is None:
            raise SpaceError(
                f"{where}: arch: missing table; expected [arch] with arch_def = [...] or "
                f"preset = one of {toml_repr(list(PRESETS))}"
            )
        base = build_arch(where, arch_t)
        axes = read_axes(where, axes_t, base)
        configs = {k: build_config(where, k, doc[k]) for k in CONFIG_SECTIONS if k in doc}
        return cls(
            name=space_t["name"],
            description=space_t.get("description", ""),
            path=source,
            base=base,
            data=configs.get("data"),
            train=configs.get("train"),
            latency=configs.get("latency", LatencyConfig()),
            fidelity=configs.get("fidelity"),
            search=configs.get("search", SearchConfig()),
            **axes,
        )


# --------------------------------------------------------------------------------------
# Files and overrides


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
      train.steps = 0, expected an integer with 1 <= steps <= 10000000
    """
    if isinstance(overrides, str):
        raise TypeError(f"`overrides` (={overrides!r}) must be a list of strings, not a string")
    parsed = [(text, *parse_override(text)) for text in overrides]
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
