"""Per-stage search spaces: choices for each stage of a base architecture, and their candidates.

A space file turns per-stage with an ``[axes.stages]`` table (the schema is in
`mobisearch.space`). Its keys are the choices every stage of ``arch.arch_def`` gets; a
sub-table ``[axes.stages.<i>]`` (``i`` counts from 0, as ``arch.arch_def[i]``) replaces
some of them for stage ``i``:

* ``width``: multipliers of the stage's base channels (each block's ``c<n>``, rounded with
  ``arch.rounding``), or ``out_ch``: channel counts that every block of the stage gets.
  Default: ``width = [1.0]``, the base channels.
* ``kernel``: depthwise kernel sizes (odd). Default: the base blocks' kernels.
* ``depth``: block counts, an integer ``n`` for ``1..n`` or a list. Default: the base
  stage's block count. A stage of depth ``d`` keeps the first ``d`` blocks of the base
  stage (repeats written out); blocks past the base's last are copies of it with stride 1.
* ``per_block``: the axes chosen for each block rather than once for the stage, a list of
  ``"kernel"`` and ``"width"`` (or ``"out_ch"``). Default: ``[]``.

A candidate is an `ArchSpec` of width 1.0 whose stages hold the chosen blocks with their
resolved channel counts, and whose `id_style` is ``"stages"`` (see `mobisearch.ids`);
`mobisearch.candidates.StagePlan` lists, counts and samples them.

For samplers, `SearchSpace.params` names each choice with more than one option:
``resolution``, ``stem_ch``, then per stage ``s<i>.depth``, ``s<i>.width`` (or ``s<i>.out_ch``)
and ``s<i>.kernel``, or ``s<i>.b<j>.width`` / ``s<i>.b<j>.kernel`` for per-block axes
(``j`` up to the largest depth; blocks past a candidate's depth are ignored). Two different
assignments of the choices that matter give different networks (`check_stages` rejects the
spaces where they would not), so the space's size counts networks.

Pure module: standard library only.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mobisearch._toml import SpaceError, check_unique, fail, fmt, is_int, toml_repr
from mobisearch.arch import ArchSpec, expand_blocks
from mobisearch.candidates import StageOptions, resolve_stage

__all__ = ["MAX_DEPTH", "StageAxes", "check_stages", "parse_stages", "stages_table"]

#: The most blocks a stage may have (a bound on the per-block parameters a sampler sees).
MAX_DEPTH = 16
_MAX_CHANNELS = 1 << 16
_CHOICE_KEYS: tuple[str, ...] = ("width", "out_ch", "kernel", "depth", "per_block")
_PER_BLOCK_AXES: tuple[str, ...] = ("width", "out_ch", "kernel")

# (stage index, field) -> dotted TOML key of the table the value was read from.
Origin = Callable[[int, str], str]


def _default_origin(i: int, field: str) -> str:
    return f"axes.stages.{i}"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StageAxes:
    """The choices for one stage of the base architecture's `arch_def`.

    Attributes:
      widths: multipliers of the base channels of each block; None when `out_chs` is given.
        Default (neither given): `(1.0,)`, the base channels.
      out_chs: channel counts every block of the stage gets, instead of `widths`.
      kernels: depthwise kernel sizes; None keeps each base block's kernel.
      depths: block counts.
      per_block: axes chosen per block: `"width"` (or `"out_ch"`) and/or `"kernel"`.

    Lists are stored as tuples and integer widths as floats; values are checked against
    the base by `check_stages` (called by `SearchSpace`).
    """

    widths: tuple[float, ...] | None = None
    out_chs: tuple[int, ...] | None = None
    kernels: tuple[int, ...] | None = None
    depths: tuple[int, ...]
    per_block: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in ("widths", "out_chs", "kernels", "depths", "per_block"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        if self.widths is None and self.out_chs is None:
            object.__setattr__(self, "widths", (1.0,))  # the base channels
        if isinstance(self.widths, tuple):
            object.__setattr__(
                self,
                "widths",
                tuple(float(w) if is_int(w) else w for w in self.widths),
            )

    @property
    def channel_axis(self) -> str:
        """`"out_ch"` when channel counts are given, else `"width"`."""
        return "out_ch" if self.out_chs is not None else "width"


def stages_table(stages: Sequence[StageAxes]) -> dict[str, Any]:
    """The ``[axes.stages]`` table of `stages`: one sub-table per stage, every key written."""
    table: dict[str, Any] = {}
    for i, s in enumerate(stages):
        t: dict[str, Any] = {}
        if s.out_chs is not None:
            t["out_ch"] = list(s.out_chs)
        else:
            t["width"] = list(s.widths or ())
        if s.kernels is not None:
            t["kernel"] = list(s.kernels)
        t["depth"] = list(s.depths)
        if s.per_block:
            t["per_block"] = list(s.per_block)
        table[str(i)] = t
    return table


# --------------------------------------------------------------------------------------
# Reading [axes.stages]


def _check_list(where: str, key: str, value: object, expected: str) -> list[Any]:
    if not isinstance(value, list | tuple) or not value:
        fail(where, key, value, f"a non-empty list of {expected}")
    return list(value)


def _read_choices(where: str, prefix: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """Check the value of each choice key of one table; normalise `depth = n` to 1..n."""
    out: dict[str, Any] = {}
    if "width" in table and "out_ch" in table:
        raise SpaceError(
            f"{where}: {prefix}.out_ch: not allowed with {prefix}.width in the same table; "
            "expected width multipliers or channel counts, not both"
        )
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key == "width":
            values = _check_list(where, dotted, value, "numbers with 0 < width <= 4")
            for j, w in enumerate(values):
                ok = isinstance(w, int | float) and not isinstance(w, bool)
                if not ok or not (math.isfinite(w) and 0 < w <= 4):
                    fail(where, f"{dotted}[{j}]", w, "a number with 0 < width <= 4")
            out[key] = tuple(float(w) for w in values)
        elif key == "out_ch":
            values = _check_list(where, dotted, value, "channel counts")
            for j, c in enumerate(values):
                if not is_int(c) or not 1 <= c <= _MAX_CHANNELS:
                    fail(
                        where,
                        f"{dotted}[{j}]",
                        c,
                        f"an integer with 1 <= out_ch <= {_MAX_CHANNELS}",
                    )
            out[key] = tuple(values)
        elif key == "kernel":
            values = _check_list(where, dotted, value, "odd kernel sizes")
            for j, k in enumerate(values):
                if not is_int(k) or not 1 <= k <= 15 or k % 2 == 0:
                    fail(where, f"{dotted}[{j}]", k, "an odd integer with 1 <= kernel <= 15")
            out[key] = tuple(values)
        elif key == "depth":
            if is_int(value):
                if not 1 <= value <= MAX_DEPTH:
                    fail(
                        where,
                        dotted,
                        value,
                        f"an integer with 1 <= depth <= {MAX_DEPTH} (the choices 1..depth) or "
                        "a list of depths",
                    )
                out[key] = tuple(range(1, value + 1))
                continue
            values = _check_list(where, dotted, value, f"integers with 1 <= depth <= {MAX_DEPTH}")
            for j, d in enumerate(values):
                if not is_int(d) or not 1 <= d <= MAX_DEPTH:
                    fail(where, f"{dotted}[{j}]", d, f"an integer with 1 <= depth <= {MAX_DEPTH}")
            out[key] = tuple(values)
        elif key == "per_block":
            if not isinstance(value, list | tuple):
                fail(where, dotted, value, f"a list of {toml_repr(list(_PER_BLOCK_AXES))}")
            for j, a in enumerate(value):
                if a not in _PER_BLOCK_AXES:
                    fail(where, f"{dotted}[{j}]", a, f"one of {toml_repr(list(_PER_BLOCK_AXES))}")
            out[key] = tuple(value)
        else:
            continue  # a stage's sub-table, read by parse_stages
        check_unique(where, dotted, list(out[key]))
    return out


def parse_stages(
    where: str, table: object, base: ArchSpec
) -> tuple[tuple[StageAxes, ...], Origin]:
    """Read the ``[axes.stages]`` table for the stages of `base`.

    Returns:
      One `StageAxes` per stage of `base.stages`, and a function naming the dotted TOML
      key each (stage, field) was read from, for `check_stages`' messages.

    Raises:
      SpaceError: naming `where`, the dotted key and the value: an unknown key, a stage
        that does not exist, or a value of the wrong type or out of range.
    """
    n = len(base.stages)
    if not isinstance(table, Mapping):
        fail(where, "axes.stages", table, "a table [axes.stages] of per-stage choices")
    stage_range = f"a stage number 0 to {n - 1} (arch.arch_def has {n} stages)"
    defaults = _read_choices(where, "axes.stages", table)
    overrides: dict[int, dict[str, Any]] = {}
    for key, value in table.items():
        if key in _CHOICE_KEYS:
            continue
        if not (key.isascii() and key.isdigit()):
            raise SpaceError(
                f"{where}: axes.stages.{key}: unknown key; expected one of "
                f"{toml_repr(list(_CHOICE_KEYS))} or {stage_range}"
            )
        i = int(key)
        if i >= n or key != str(i):
            raise SpaceError(f"{where}: axes.stages.{key}: no such stage; expected {stage_range}")
        if not isinstance(value, Mapping):
            fail(where, f"axes.stages.{key}", value, f"a table [axes.stages.{key}]")
        for k in value:
            if k not in _CHOICE_KEYS:
                raise SpaceError(
                    f"{where}: axes.stages.{key}.{k}: unknown key; expected one of "
                    f"{toml_repr(list(_CHOICE_KEYS))}"
                )
        overrides[i] = _read_choices(where, f"axes.stages.{key}", value)

    origins: dict[tuple[int, str], str] = {}
    stages = []
    for i, stage in enumerate(base.stages):
        own = overrides.get(i, {})
        merged = dict(defaults)
        if "width" in own or "out_ch" in own:  # a stage's own channel axis replaces the default
            merged.pop("width", None)
            merged.pop("out_ch", None)
        merged.update(own)
        for field in ("width", "out_ch", "kernel", "depth", "per_block"):
            origins[(i, field)] = f"axes.stages.{i}" if field in own else "axes.stages"
        stages.append(
            StageAxes(
                widths=merged.get("width"),
                out_chs=merged.get("out_ch"),
                kernels=merged.get("kernel"),
                depths=merged.get("depth", (len(expand_blocks(stage)),)),
                per_block=merged.get("per_block", ()),
            )
        )
    return tuple(stages), lambda i, field: origins[(i, field)]


# --------------------------------------------------------------------------------------
# The candidates of a per-stage space


def check_stages(
    where: str, base: ArchSpec, stages: Sequence[StageAxes], origin: Origin = _default_origin
) -> None:
    """Check per-stage choices against `base`; every message names the dotted key.

    Checks: one `StageAxes` per stage; every value in range (as `parse_stages` does); no
    channel count rounding to 0; distinct choices giving distinct channel counts; per-block
    axes that the stage has; and no two depth splits giving the same network (a stage
    starting with a stride-1 block can only vary in depth next to a neighbour whose blocks
    it cannot look like).

    Raises:
      SpaceError: naming `where`, the dotted key (``axes.stages.3.width[0]``) and the value.
    """
    if not isinstance(stages, tuple) or not all(isinstance(s, StageAxes) for s in stages):
        fail(where, "axes.stages", stages, "a tuple of StageAxes, one per stage")
    if len(stages) != len(base.stages):
        fail(
            where,
            "axes.stages",
            stages,
            f"{len(base.stages)} stages (one per stage of arch.arch_def)",
        )
    for i, s in enumerate(stages):
        if (s.widths is None) == (s.out_chs is None):
            fail(where, f"axes.stages.{i}", stages[i], "exactly one of width and out_ch")
        table = {"depth": list(s.depths), "per_block": list(s.per_block)}
        table |= {"out_ch": list(s.out_chs)} if s.out_chs is not None else {}
        table |= {"width": list(s.widths)} if s.widths is not None else {}
        table |= {"kernel": list(s.kernels)} if s.kernels is not None else {}
        for key, value in table.items():
            _read_choices(where, origin(i, key), {key: value})
        axis = s.channel_axis
        for j, a in enumerate(s.per_block):
            if a in ("width", "out_ch") and a != axis:
                key = f"{origin(i, 'per_block')}.per_block[{j}]"
                fail(where, key, a, f'"{axis}" (stage {i} chooses {axis}) or "kernel"')
            if a == "kernel" and s.kernels is None:
                key = f"{origin(i, 'per_block')}.per_block[{j}]"
                fail(where, key, a, f"a kernel list for stage {i} to choose from")
        _check_channels(where, base, i, s, origin)
    resolved = [resolve_stage(base, i, s) for i, s in enumerate(stages)]
    for prev, cur in itertools.pairwise(resolved):
        _check_boundary(where, prev, cur, origin)


def _check_channels(where: str, base: ArchSpec, i: int, s: StageAxes, origin: Origin) -> None:
    axis = s.channel_axis
    key = f"{origin(i, axis)}.{axis}"
    stage = resolve_stage(base, i, s)
    values = stage.channel_values
    for c, value in enumerate(values):
        for j, t in enumerate(stage.templates):
            if stage.channels[j][c] < 1:
                fail(
                    where,
                    f"{key}[{c}]",
                    value,
                    f"a {axis} at which every block of stage {i} keeps >= 1 channel "
                    f"({t.out_ch} x {value} rounds to 0 under rounding = {fmt(base.rounding)})",
                )
    # Two choices giving the same channels would count one network twice. A per-block choice
    # must differ at every block; a per-stage one over the blocks every depth keeps.
    if stage.per_block_channels:
        groups = [[j] for j in range(len(stage.templates))]
    else:
        groups = [list(range(min(s.depths)))]
    for positions in groups:
        seen: dict[tuple[int, ...], int] = {}
        for c, value in enumerate(values):
            got = tuple(stage.channels[j][c] for j in positions)
            if got in seen:
                first = seen[got]
                fail(
                    where,
                    f"{key}[{c}]",
                    value,
                    f"a {axis} giving stage {i} other channel counts than {key}[{first}] = "
                    f"{fmt(values[first])} (both give {got[0]} channels at block {positions[0]} "
                    f"under rounding = {fmt(base.rounding)})",
                )
            seen[got] = c


def _check_boundary(where: str, prev: StageOptions, cur: StageOptions, origin: Origin) -> None:
    first = cur.templates[0]
    if first.stride != 1 or (len(prev.depths) == 1 and len(cur.depths) == 1):
        return
    kinds = {t.kind for t in prev.templates}
    chans = {c for row in prev.channels for c in row} & set(cur.channels[0])
    kernels_prev = set(prev.kernels or (t.kernel for t in prev.templates))
    kernels_cur = set(cur.kernels or (first.kernel,))
    if first.kind not in kinds or not chans or not kernels_prev & kernels_cur:
        return
    varies = cur if len(cur.depths) > 1 else prev
    fail(
        where,
        f"{origin(varies.index, 'depth')}.depth",
        list(varies.depths),
        f"a single depth: arch.arch_def[{cur.index}] starts with a stride-1 block that can "
        f"have the channels ({min(chans)}) and kernel of stage {prev.index}'s blocks, so two "
        "depth splits of stages "
        f"{prev.index} and {cur.index} would give the same network",
    )
