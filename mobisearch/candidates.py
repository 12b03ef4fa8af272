"""The candidate sets of search spaces, behind one interface: a grid (`GridPlan`) or
per-stage choices (`StagePlan`).

Each plan gives its exact size, the choices a sampler draws (`params`: parameter name to
options, in a fixed order), the candidate of a full assignment (`from_params`) and the
assignment of a candidate (`params_of`), the candidate of a display id (`from_id`), a
uniform draw (`sample`) and every candidate in a fixed order (`candidates`). A
`mobisearch.space.SearchSpace` builds one from its checked fields and delegates to it.

Pure module: standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mobisearch._toml import SpaceError, fail, fmt, toml_repr
from mobisearch.arch import ArchSpec, BlockSpec, expand_blocks, merge_blocks, round_channels
from mobisearch.ids import parse_display_id

if TYPE_CHECKING:
    from mobisearch.stages import StageAxes

__all__ = ["GridPlan", "StageOptions", "StagePlan", "check_param_keys", "resolve_stage"]

# A stage configuration: (depth, channel choice of each block, kernel choice of each block).
Config = tuple[int, tuple[int, ...], tuple[int, ...]]


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class StageOptions:
    """One stage's choices resolved against its base blocks: the block at each position up
    to the largest depth and its channel count for each choice (compared by identity, so
    that caches keyed by it stay cheap)."""

    index: int
    templates: tuple[BlockSpec, ...]  # block at each position up to the largest depth
    channel_axis: str  # "width" or "out_ch"
    channel_values: tuple[Any, ...]  # the choices as the file gives them
    channels: tuple[tuple[int, ...], ...]  # [position][choice] resolved channel counts
    kernels: tuple[int, ...] | None
    depths: tuple[int, ...]
    per_block_channels: bool
    per_block_kernel: bool
    weights: tuple[int, ...]  # configurations at each depth of `depths`

    @property
    def n_channels(self) -> int:
        return len(self.channel_values)

    @property
    def n_kernels(self) -> int:
        return 1 if self.kernels is None else len(self.kernels)

    def configs(self) -> Iterator[Config]:
        """Every (depth, channel choice per block, kernel choice per block), in order."""
        for d in self.depths:
            c_rep = d if self.per_block_channels else 1
            k_rep = d if self.per_block_kernel else 1
            for cs in itertools.product(range(self.n_channels), repeat=c_rep):
                for ks in itertools.product(range(self.n_kernels), repeat=k_rep):
                    yield d, cs * (d // c_rep), ks * (d // k_rep)

    def sample(self, rng: random.Random) -> Config:
        """A configuration drawn uniformly from `configs()`."""
        # A depth is drawn in proportion to its configurations, so every one is equally likely.
        r, i = rng.randrange(sum(self.weights)), 0
        while r >= self.weights[i]:
            r -= self.weights[i]
            i += 1
        d = self.depths[i]
        c_rep = d if self.per_block_channels else 1
        k_rep = d if self.per_block_kernel else 1
        cs = tuple(rng.randrange(self.n_channels) for _ in range(c_rep))
        ks = tuple(rng.randrange(self.n_kernels) for _ in range(k_rep))
        return d, cs * (d // c_rep), ks * (d // k_rep)


@functools.lru_cache(maxsize=1 << 14)
def _stage_blocks(
    stage: StageOptions, depth: int, cs: tuple[int, ...], ks: tuple[int, ...]
) -> tuple[BlockSpec, ...]:
    """The block groups of one stage configuration (runs merged, so equal configs match)."""
    blocks = []
    for j in range(depth):
        t = stage.templates[j]
        kernel = t.kernel if stage.kernels is None else stage.kernels[ks[j]]
        blocks.append(dataclasses.replace(t, out_ch=stage.channels[j][cs[j]], kernel=kernel))
    return merge_blocks(blocks)


def _templates(stage: tuple[BlockSpec, ...], depth: int) -> tuple[BlockSpec, ...]:
    blocks = expand_blocks(stage)
    extra = dataclasses.replace(blocks[-1], stride=1)
    return tuple(blocks[j] if j < len(blocks) else extra for j in range(depth))


def resolve_stage(base: ArchSpec, i: int, axes: StageAxes) -> StageOptions:
    """The options of stage `i` of `base` under `axes` (not checked: see `check_stages`)."""
    templates = _templates(base.stages[i], max(axes.depths))
    if axes.out_chs is not None:
        values: tuple[Any, ...] = axes.out_chs
        chans = [[round_channels(c, 1.0, base.rounding) for c in values] for _ in templates]
    else:
        values = axes.widths or (1.0,)
        chans = [[round_channels(t.out_ch, w, base.rounding) for w in values] for t in templates]
    n_c, n_k = len(values), 1 if axes.kernels is None else len(axes.kernels)
    per_block_channels = axes.channel_axis in axes.per_block
    per_block_kernel = "kernel" in axes.per_block
    weights = tuple(
        n_c ** (d if per_block_channels else 1) * n_k ** (d if per_block_kernel else 1)
        for d in axes.depths
    )
    return StageOptions(
        index=i,
        templates=templates,
        channel_axis=axes.channel_axis,
        channel_values=values,
        channels=tuple(tuple(c) for c in chans),
        kernels=axes.kernels,
        depths=axes.depths,
        per_block_channels=per_block_channels,
        per_block_kernel=per_block_kernel,
        weights=weights,
    )


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class GridPlan:
    """A grid: every width × resolution × kernel around `base` (the kernel varies fastest).

    Candidates are `dataclasses.replace(base, width=w, resolution=r).with_kernel(k)`,
    named in the uniform id style (`mnv1_w075_r20_k5`).
    """

    base: ArchSpec
    widths: tuple[float, ...]
    resolutions: tuple[int, ...]
    kernels: tuple[int, ...]

    def arch(self, width: float, resolution: int, kernel: int) -> ArchSpec:
        return dataclasses.replace(self.base, width=width, resolution=resolution).with_kernel(
            kernel
        )

    def size(self) -> int:
        return len(self.widths) * len(self.resolutions) * len(self.kernels)

    def params(self) -> dict[str, tuple[Any, ...]]:
        axes = {"width": self.widths, "resolution": self.resolutions, "kernel": self.kernels}
        return {name: values for name, values in axes.items() if len(values) > 1}

    def from_params(self, where: str, params: Mapping[str, Any]) -> ArchSpec:
        choices = self.params()
        check_param_keys(where, params, choices)

        def pick(name: str, options: tuple[Any, ...]) -> Any:
            value = params.get(name, options[0])
            if isinstance(value, bool) or value not in options:
                raise SpaceError(
                    f"{where}: params[{name!r}] = {fmt(value)}, expected one of "
                    f"{toml_repr(list(options))}"
                )
            return options[options.index(value)]

        return self.arch(
            pick("width", self.widths),
            pick("resolution", self.resolutions),
            pick("kernel", self.kernels),
        )

    def params_of(self, where: str, arch: ArchSpec) -> dict[str, Any]:
        if arch not in set(self.candidates()):
            raise SpaceError(
                f"{where}: {arch.display_id} is not a candidate of this grid (widths "
                f"{list(self.widths)}, resolutions {list(self.resolutions)}, kernels "
                f"{list(self.kernels)} around its base)"
            )
        return {name: getattr(arch, name) for name in self.params()}

    def from_id(self, where: str, display_id: str) -> ArchSpec:
        parsed = _parse_id(where, display_id, "uniform", self)
        w = next((x for x in self.widths if int(x * 100 + 0.5) == parsed.width), None)
        problems = []
        if w is None:
            problems.append(f"no width of axes.width gives w{parsed.width:03d}")
        if parsed.resolution not in self.resolutions:
            problems.append(f"resolution {parsed.resolution} is not in axes.resolution")
        if parsed.kernel not in self.kernels:
            problems.append(f"kernel {parsed.kernel or 'mix'} is not in axes.kernel")
        if problems:
            raise SpaceError(f"{where}: display id {display_id!r}: {'; '.join(problems)}")
        assert w is not None and parsed.kernel is not None
        return _same_id(where, display_id, self.arch(w, parsed.resolution, parsed.kernel))

    def sample(self, rng: random.Random) -> ArchSpec:
        return self.arch(
            rng.choice(self.widths), rng.choice(self.resolutions), rng.choice(self.kernels)
        )

    def candidates(self) -> Iterator[ArchSpec]:
        for w, r, k in itertools.product(self.widths, self.resolutions, self.kernels):
            yield self.arch(w, r, k)

    def check_widths(self, where: str) -> None:
        """Every width resolves, and no two widths share a display id (ids round widths to
        0.01); errors name ``axes.width[i]``."""
        # Display ids name trials and plot labels, so two widths must not share one.
        seen: dict[str, int] = {}
        r0, k0 = self.resolutions[0], self.kernels[0]
        for i, w in enumerate(self.widths):
            did = self.arch(w, r0, k0).display_id
            if did in seen:
                fail(
                    where,
                    f"axes.width[{i}]",
                    w,
                    f"widths that differ in the display id (axes.width[{seen[did]}] = "
                    f"{self.widths[seen[did]]} gives {did!r} too: ids round widths to 0.01)",
                )
            seen[did] = i
        # Channels depend on the width only, so one resolve per width checks the grid.
        for i, w in enumerate(self.widths):
            try:
                self.arch(w, self.resolutions[0], self.kernels[0]).resolve()
            except ValueError as e:
                fail(
                    where,
                    f"axes.width[{i}]",
                    w,
                    f"a width at which every layer keeps >= 1 channel ({e})",
                )

    def probe(self, resolution: int) -> ArchSpec:
        """A candidate at `resolution` (every candidate has the same strides)."""
        return self.arch(self.widths[0], resolution, self.kernels[0])


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class StagePlan:
    """Per-stage choices around `base` (see `mobisearch.stages` for their meaning).

    Candidates are `ArchSpec`s of width 1.0 whose stages hold the chosen blocks with their
    resolved channel counts, named in the stages id style. They are listed resolution →
    stem → stage 0 → stage 1 → ... (each stage's depth, then channels, then kernels).
    """

    base: ArchSpec
    resolutions: tuple[int, ...]
    stem_chs: tuple[int, ...]
    stages: tuple[StageOptions, ...]

    @classmethod
    def build(
        cls,
        base: ArchSpec,
        resolutions: tuple[int, ...],
        stem_chs: tuple[int, ...],
        stages: tuple[StageAxes, ...],
    ) -> StagePlan:
        resolved = tuple(resolve_stage(base, i, s) for i, s in enumerate(stages))
        return cls(base=base, resolutions=resolutions, stem_chs=stem_chs, stages=resolved)

    def size(self) -> int:
        n = len(self.resolutions) * len(self.stem_chs)
        return n * math.prod(sum(s.weights) for s in self.stages)

    def params(self) -> dict[str, tuple[Any, ...]]:
        out: dict[str, tuple[Any, ...]] = {}
        for name, values in (("resolution", self.resolutions), ("stem_ch", self.stem_chs)):
            if len(values) > 1:
                out[name] = values
        for s in self.stages:
            p = f"s{s.index}"
            if len(s.depths) > 1:
                out[f"{p}.depth"] = s.depths
            blocks = range(max(s.depths))
            if s.n_channels > 1:
                if s.per_block_channels:
                    out |= {f"{p}.b{j}.{s.channel_axis}": s.channel_values for j in blocks}
                else:
                    out[f"{p}.{s.channel_axis}"] = s.channel_values
            if s.kernels is not None and len(s.kernels) > 1:
                if s.per_block_kernel:
                    out |= {f"{p}.b{j}.kernel": s.kernels for j in blocks}
                else:
                    out[f"{p}.kernel"] = s.kernels
        return out

    def arch(
        self,
        resolution: int,
        stem_ch: int,
        configs: Sequence[Config],
    ) -> ArchSpec:
        """The candidate with these values and per-stage (depth, channel, kernel) indices."""
        stages = tuple(_stage_blocks(s, *c) for s, c in zip(self.stages, configs, strict=True))
        return dataclasses.replace(
            self.base,
            stages=stages,
            width=1.0,
            resolution=resolution,
            stem_ch=stem_ch,
            id_style="stages",
        )

    def from_params(self, where: str, params: Mapping[str, Any]) -> ArchSpec:
        choices = self.params()
        check_param_keys(where, params, choices)
        index = {name: {v: k for k, v in enumerate(values)} for name, values in choices.items()}

        def pick(name: str, default: int = 0) -> int:
            if name not in choices:
                return default
            value = params[name]
            k = index[name].get(value) if isinstance(value, int | float | str) else None
            if k is None or isinstance(value, bool):
                raise SpaceError(
                    f"{where}: params[{name!r}] = {fmt(value)}, expected one of "
                    f"{toml_repr(list(choices[name]))}"
                )
            return k

        configs = []
        for s in self.stages:
            p = f"s{s.index}"
            d = s.depths[pick(f"{p}.depth")]
            if s.per_block_channels:
                cs = tuple(pick(f"{p}.b{j}.{s.channel_axis}") for j in range(d))
            else:
                cs = (pick(f"{p}.{s.channel_axis}"),) * d
            if s.per_block_kernel:
                ks = tuple(pick(f"{p}.b{j}.kernel") for j in range(d))
            else:
                ks = (pick(f"{p}.kernel"),) * d
            configs.append((d, cs, ks))
        resolution = self.resolutions[pick("resolution")]
        return self.arch(resolution, self.stem_chs[pick("stem_ch")], configs)

    def _values_to_params(
        self,
        resolution: int,
        stem_ch: int,
        blocks: Sequence[Sequence[tuple[int, int]]],
    ) -> dict[str, Any] | str:
        """Params for a candidate given by its values: per stage, (channels, kernel) of each
        block. Returns a reason (str) instead when no candidate has these values."""
        out: dict[str, Any] = {}
        if resolution not in self.resolutions:
            return f"resolution {resolution} is not one of {list(self.resolutions)}"
        stem = [round_channels(c, 1.0, self.base.rounding) for c in self.stem_chs]
        if stem_ch not in stem:
            return f"stem channels {stem_ch} are not one of {stem}"
        choices = self.params()
        out["resolution"] = resolution
        out["stem_ch"] = self.stem_chs[stem.index(stem_ch)]
        if len(blocks) != len(self.stages):
            return f"it has {len(blocks)} stages, expected {len(self.stages)}"
        for s, stage in zip(self.stages, blocks, strict=True):
            p, d = f"s{s.index}", len(stage)
            if d not in s.depths:
                return f"stage {s.index} has {d} blocks, expected one of {list(s.depths)}"
            out[f"{p}.depth"] = d
            cs, ks = [], []
            for j, (c, k) in enumerate(stage):
                kernels = (s.templates[j].kernel,) if s.kernels is None else s.kernels
                if k not in kernels:
                    return (
                        f"stage {s.index} block {j} has kernel {k}, expected one of "
                        f"{list(kernels)}"
                    )
                ks.append(kernels.index(k))
                if s.per_block_channels:
                    if c not in s.channels[j]:
                        return (
                            f"stage {s.index} block {j} has {c} channels, expected one of "
                            f"{list(s.channels[j])}"
                        )
                    cs.append(s.channels[j].index(c))
            if not s.per_block_channels:
                # Checked distinct over the blocks every depth keeps, so at most one matches.
                chans = [c for c, _ in stage]
                match = [
                    n for n in range(s.n_channels) if [s.channels[j][n] for j in range(d)] == chans
                ]
                if not match:
                    return (
                        f"stage {s.index} has channels {chans}, which no "
                        f"{s.channel_axis} choice gives"
                    )
                cs = [match[0]] * d
            if not s.per_block_kernel and len(set(ks)) > 1:
                mixed = sorted({k for _, k in stage})
                return f"stage {s.index} mixes kernels {mixed}; this space chooses one per stage"
            for axis, idx, per_block, values in (
                (s.channel_axis, cs, s.per_block_channels, s.channel_values),
                ("kernel", ks, s.per_block_kernel, s.kernels or ()),
            ):
                if per_block:
                    for j in range(max(s.depths)):
                        out[f"{p}.b{j}.{axis}"] = values[idx[j] if j < d else 0]
                elif values:
                    out[f"{p}.{axis}"] = values[idx[0]]
        return {k: v for k, v in out.items() if k in choices}

    def sample(self, rng: random.Random) -> ArchSpec:
        resolution = rng.choice(self.resolutions)
        stem_ch = rng.choice(self.stem_chs)
        return self.arch(resolution, stem_ch, [s.sample(rng) for s in self.stages])

    def candidates(self) -> Iterator[ArchSpec]:
        """Resolution, then stem, then each stage's configuration (the last varies fastest)."""
        per_stage = [list(s.configs()) for s in self.stages]
        for r, stem in itertools.product(self.resolutions, self.stem_chs):
            for configs in itertools.product(*per_stage):
                yield self.arch(r, stem, configs)

    def probe(self, resolution: int) -> ArchSpec:
        """The candidate at `resolution` with every stage at its largest depth: the most
        stride-2 blocks (a shorter stage may drop some)."""
        configs = [
            (max(s.depths), (0,) * max(s.depths), (0,) * max(s.depths)) for s in self.stages
        ]
        return self.arch(resolution, self.stem_chs[0], configs)

    def params_of(self, where: str, arch: ArchSpec) -> dict[str, Any]:
        def channels(base: int) -> int:
            return round_channels(base, arch.width, arch.rounding)

        blocks = [[(channels(b.out_ch), b.kernel) for b in expand_blocks(s)] for s in arch.stages]
        params = self._checked_params(
            where, arch.display_id, arch.resolution, channels(arch.stem_ch), blocks
        )
        got = self.from_params(where, params)
        if got != arch:
            raise SpaceError(
                f"{where}: {arch.display_id} is not a candidate of this space: its "
                f"{_first_difference(got, arch)} differs from the space's (the candidate with "
                f"its choices is {got.display_id})"
            )
        return params

    def from_id(self, where: str, display_id: str) -> ArchSpec:
        parsed = _parse_id(where, display_id, "stages", self)
        blocks = [
            list(zip(c, k, strict=True))
            for c, k in zip(parsed.out_chs, parsed.kernels, strict=True)
        ]
        params = self._checked_params(
            where, repr(display_id), parsed.resolution, parsed.stem_ch, blocks
        )
        return _same_id(where, display_id, self.from_params(where, params))

    def _checked_params(
        self,
        where: str,
        label: str,
        resolution: int,
        stem_ch: int,
        blocks: Sequence[Sequence[tuple[int, int]]],
    ) -> dict[str, Any]:
        params = self._values_to_params(resolution, stem_ch, blocks)
        if isinstance(params, str):
            raise SpaceError(f"{where}: {label} is not a candidate of this space: {params}")
        return params


def _parse_id(where: str, display_id: str, style: str, plan: GridPlan | StagePlan) -> Any:
    """The parsed id, if it is of `style` and names `plan.base`; else a SpaceError."""
    try:
        parsed = parse_display_id(display_id)
    except ValueError as e:
        raise SpaceError(f"{where}: {e}") from None
    if parsed.style != style or parsed.name != plan.base.name:
        kind = "grid" if style == "uniform" else "per-stage"
        example = next(iter(plan.candidates())).display_id
        raise SpaceError(
            f"{where}: display id {display_id!r} does not name a candidate of this {kind} "
            f"space; expected an id like {example!r}"
        )
    return parsed


def _same_id(where: str, display_id: str, arch: ArchSpec) -> ArchSpec:
    # An id read back must be spelt as the candidate spells it, so ids stay unique strings.
    if arch.display_id != display_id:
        raise SpaceError(
            f"{where}: display id {display_id!r} is not written as this space writes it; "
            f"expected {arch.display_id!r}"
        )
    return arch


def _first_difference(a: ArchSpec, b: ArchSpec) -> str:
    for f in dataclasses.fields(ArchSpec):
        if getattr(a, f.name) != getattr(b, f.name):
            return f.name
    return "architecture"


def check_param_keys(
    where: str, params: Mapping[str, Any], choices: Mapping[str, tuple[Any, ...]]
) -> None:
    if not isinstance(params, Mapping):
        raise SpaceError(f"{where}: params = {params!r}, expected a mapping of name to value")
    for name in params:
        if name not in choices:
            raise SpaceError(
                f"{where}: params[{name!r}]: unknown parameter; expected the keys of "
                f"params(): {toml_repr(list(choices))}"
            )
    for name in choices:
        if name not in params:
            raise SpaceError(
                f"{where}: params[{name!r}]: missing; expected one of "
                f"{toml_repr(list(choices[name]))}"
            )
