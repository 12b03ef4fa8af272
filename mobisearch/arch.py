"""Architecture description: one block, one whole network, and its resolved layer list.

This is the single source of truth for channel counts and spatial sizes. The cost model
(`mobisearch.cost`) and the Flax model (`mobisearch.models`) both read `ArchSpec.resolve()`
and never re-derive a channel count of their own.

Conventions, stated once:

* Channels: `round_channels(base, width, policy)`. The `"keras"` policy is `int(c * width)`,
  as in the MobileNet paper (arXiv 1704.04861) and `keras.applications.MobileNet`; `"div8"`
  is timm's `make_divisible(c * width, 8, round_limit=0.9)`.
* Spatial: SAME padding, `out = ceil(in / stride)`.
* Layout: NHWC everywhere.

Pure module: standard library only.

Examples:
    >>> b = BlockSpec.from_string("dsa_r2_k3_s2_c128")
    >>> b
    BlockSpec(kind='dsa', out_ch=128, stride=2, kernel=3, repeats=2)
    >>> b.to_string()
    'dsa_r2_k3_s2_c128'
    >>> round_channels(32, 0.75)
    24
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

BlockKind = Literal["dsa", "ds"]
Rounding = Literal["keras", "div8"]
LayerOp = Literal["conv", "dw", "pw", "pool", "fc"]
IdStyle = Literal["uniform", "stages"]

BLOCK_KINDS: tuple[str, ...] = ("dsa", "ds")
ROUNDINGS: tuple[str, ...] = ("keras", "div8")
ID_STYLES: tuple[str, ...] = ("uniform", "stages")
# Version of the JSON form written by `ArchSpec.to_dict`.
FORMAT_VERSION = 1


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """Return `value` if it is an int in [lo, hi], else raise ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` (={value!r}) must be an integer")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"`{name}` (={value!r}) must be {bound}")
    return value


def _check_kernel(name: str, value: object) -> int:
    kernel = _check_int(name, value, 1, 15)
    if kernel % 2 == 0:
        raise ValueError(f"`{name}` (={kernel}) must be odd (SAME padding needs a centre tap)")
    return kernel


def _check_stride(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in (1, 2):
        raise ValueError(f"`{name}` (={value!r}) must be 1 or 2")
    return value


def round_channels(base: int, width: float, policy: Rounding = "keras") -> int:
    """Apply the width multiplier to a base channel count.

    Args:
      base: channels of the width-1.0 network.
      width: the width multiplier α (> 0).
      policy: `"keras"` is `int(base * width)`, as the MobileNet paper and Keras use;
        `"div8"` is timm's `make_divisible(base * width, 8, round_limit=0.9)`: the nearest
        multiple of 8, never below 8 and never more than 10% below `base * width`.

    Returns:
      The channel count (may be 0 under `"keras"`; `ArchSpec.resolve` rejects that).

    Examples:
      >>> round_channels(1024, 0.25), round_channels(1024, 0.25, "div8")
      (256, 256)
      >>> round_channels(32, 0.35), round_channels(32, 0.35, "div8")
      (11, 16)
    """
    if policy == "keras":
        return int(base * width)
    if policy == "div8":
        v = base * width
        new_v = max(8, int(v + 4) // 8 * 8)
        if new_v < 0.9 * v:
            new_v += 8
        return new_v
    raise ValueError(f"`rounding` (={policy!r}) must be one of {ROUNDINGS}")


def same_out(size: int, stride: int) -> int:
    """Output size of a SAME-padded convolution: `ceil(size / stride)`."""
    return -(-size // stride)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlockSpec:
    """One group of depthwise-separable blocks, in timm's block-string terms.

    Attributes:
      kind: `"dsa"`: depthwise → BN → ReLU → pointwise → BN → ReLU, no skip (MobileNet v1).
        `"ds"`: as dsa but no activation after the pointwise conv, and a residual add when
        stride is 1 and the channel count is unchanged (timm's `DepthwiseSeparableConv`).
      out_ch: output channels at width 1.0 (before the width multiplier).
      stride: stride of the first block of the group (1 or 2); repeats use stride 1.
      kernel: depthwise kernel size (odd).
      repeats: how many blocks the group stands for.
    """

    kind: BlockKind = "dsa"
    out_ch: int
    stride: int = 1
    kernel: int = 3
    repeats: int = 1

    def __post_init__(self) -> None:
        if self.kind not in BLOCK_KINDS:
            raise ValueError(f"`kind` (={self.kind!r}) must be one of {BLOCK_KINDS}")
        _check_int("out_ch", self.out_ch, 1)
        _check_stride("stride", self.stride)
        _check_kernel("kernel", self.kernel)
        _check_int("repeats", self.repeats, 1)

    @classmethod
    def from_string(cls, text: str) -> BlockSpec:
        """Parse a block string in (a subset of) timm's grammar.

        The string is underscore-separated: the block kind first, then options in any
        order, each a letter followed by an integer:

        * kind: `dsa` (depthwise-separable, activation after pointwise: MobileNet v1) or
          `ds` (no activation after pointwise, skip when possible), as in timm;
        * `r<n>`: repeats (default 1);
        * `k<n>`: depthwise kernel size (default 3);
        * `s<n>`: stride of the first repeat (default 1);
        * `c<n>`: output channels at width 1.0 (required).

        Examples:
          >>> BlockSpec.from_string("dsa_c64")
          BlockSpec(kind='dsa', out_ch=64, stride=1, kernel=3, repeats=1)

        Raises:
          ValueError: naming the string and the part that is wrong.
        """
        if not isinstance(text, str) or not text:
            raise ValueError(f"block string (={text!r}) must be a non-empty string")
        kind, *opts = text.split("_")
        if kind not in BLOCK_KINDS:
            raise ValueError(f"block string {text!r}: kind {kind!r} must be one of {BLOCK_KINDS}")
        fields = {"r": "repeats", "k": "kernel", "s": "stride", "c": "out_ch"}
        values: dict[str, int] = {}
        for opt in opts:
            key, num = opt[:1], opt[1:]
            if key not in fields or not (num.isascii() and num.isdigit()):
                raise ValueError(
                    f"block string {text!r}: option {opt!r} must be one of "
                    "r<repeats>, k<kernel>, s<stride>, c<channels>"
                )
            if fields[key] in values:
                raise ValueError(f"block string {text!r}: option {key!r} given twice")
            values[fields[key]] = int(num)
        if "out_ch" not in values:
            raise ValueError(f"block string {text!r}: the channel option c<n> is required")
        try:
            return cls(kind=kind, **values)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"block string {text!r}: {e}") from None

    def to_string(self) -> str:
        """The canonical block string; `from_string(b.to_string()) == b`."""
        return f"{self.kind}_r{self.repeats}_k{self.kernel}_s{self.stride}_c{self.out_ch}"


def expand_blocks(blocks: Iterable[BlockSpec]) -> tuple[BlockSpec, ...]:
    """One `BlockSpec` per block: repeats written out, the stride on the first of each group.

    Examples:
      >>> [b.to_string() for b in expand_blocks([BlockSpec.from_string("dsa_r2_s2_c8")])]
      ['dsa_r1_k3_s2_c8', 'dsa_r1_k3_s1_c8']
    """
    out = []
    for group in blocks:
        first = dataclasses.replace(group, repeats=1)
        out.append(first)
        if group.repeats > 1:
            rest = first if group.stride == 1 else dataclasses.replace(first, stride=1)
            out.extend([rest] * (group.repeats - 1))
    return tuple(out)


def merge_blocks(blocks: Iterable[BlockSpec]) -> tuple[BlockSpec, ...]:
    """The shortest list of groups for the same blocks: a stride-1 block equal to the group
    before it (but for the stride of that group's first block) joins it as a repeat.

    `expand_blocks(merge_blocks(x)) == expand_blocks(x)`, and two lists of blocks with the
    same expansion merge to the same groups.

    Examples:
      >>> text = ["dsa_s2_c8", "dsa_c8", "dsa_k5_c8"]
      >>> [b.to_string() for b in merge_blocks(BlockSpec.from_string(t) for t in text)]
      ['dsa_r2_k3_s2_c8', 'dsa_r1_k5_s1_c8']
    """
    out: list[BlockSpec] = []
    for b in expand_blocks(blocks):
        last = out[-1] if out else None
        if (
            last is not None
            and b.stride == 1
            and (b.kind, b.out_ch, b.kernel) == (last.kind, last.out_ch, last.kernel)
        ):
            out[-1] = dataclasses.replace(last, repeats=last.repeats + 1)
        else:
            out.append(b)
    return tuple(out)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayerSpec:
    """One concrete layer of a resolved architecture (NHWC, SAME padding).

    Attributes:
      name: stable path, e.g. `"stem"`, `"blocks/3/dw"`, `"blocks/3/pw"`, `"pool"`, `"head"`.
      op: `"conv"` (standard conv), `"dw"` (depthwise), `"pw"` (1×1 pointwise), `"pool"`
        (global average pool), `"fc"` (fully connected classifier).
      in_ch, out_ch: channels in and out.
      kernel, stride: square kernel size and stride.
      in_hw, out_hw: square spatial size in and out.
      groups: convolution groups (`in_ch` for depthwise, 1 otherwise).
      block: index of the depthwise-separable block this layer belongs to, or -1.
      act: whether a ReLU follows (after BatchNorm) in the model.
      residual: whether the block input is added to this layer's output (`ds` blocks).
    """

    name: str
    op: LayerOp
    in_ch: int
    out_ch: int
    kernel: int = 1
    stride: int = 1
    in_hw: int
    out_hw: int
    groups: int = 1
    block: int = -1
    act: bool = True
    residual: bool = False


# NOTE: candidates of a search space share most of their block groups, and building
# LayerSpecs dominates the cost of `resolve` (a fit report resolves thousands), so the layers
# of a group are built once per (group, channels in, channels out, size in, first index).
@functools.lru_cache(maxsize=1 << 14)
def _group_layers(
    group: BlockSpec, c: int, c_out: int, hw: int, first: int
) -> tuple[tuple[LayerSpec, ...], int]:
    """The dw and pw layers of one block group and the spatial size after it."""
    layers = []
    for r in range(group.repeats):
        i = first + r
        stride = group.stride if r == 0 else 1
        out = same_out(hw, stride)
        layers.append(
            LayerSpec(
                name=f"blocks/{i}/dw",
                op="dw",
                in_ch=c,
                out_ch=c,
                kernel=group.kernel,
                stride=stride,
                in_hw=hw,
                out_hw=out,
                groups=c,
                block=i,
            )
        )
        layers.append(
            LayerSpec(
                name=f"blocks/{i}/pw",
                op="pw",
                in_ch=c,
                out_ch=c_out,
                in_hw=out,
                out_hw=out,
                block=i,
                act=group.kind == "dsa",
                residual=group.kind == "ds" and stride == 1 and c == c_out,
            )
        )
        hw, c = out, c_out
    return tuple(layers), hw


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ArchSpec:
    """A whole MobileNet-style network: stem conv → depthwise-separable stages → GAP → FC.

    Attributes:
      stages: block groups per stage (timm's `arch_def`), at width 1.0.
      width: the width multiplier α (0 < α <= 4), applied to every channel count.
      resolution: input height = width in pixels (ρ).
      stem_ch: stem conv output channels at width 1.0.
      stem_stride: stem conv stride (2 in the paper; 1 for 28×28 / 32×32 inputs).
      stem_kernel: stem conv kernel size.
      num_classes: classifier outputs.
      in_ch: input image channels (3 for RGB, 1 for grayscale).
      rounding: channel rounding policy, see `round_channels`.
      name: family prefix of the display id (`"mnv1"`).
      id_style: how `display_id` names it: `"uniform"` (one width and one kernel for the
        whole network, `mnv1_w075_r20_k5`) or `"stages"` (channels, kernels and depths per
        stage, for per-stage search spaces); see `mobisearch.ids`. It names the network
        and does not change it: `arch_key()` ignores it.
    """

    stages: tuple[tuple[BlockSpec, ...], ...]
    width: float = 1.0
    resolution: int = 224
    stem_ch: int = 32
    stem_stride: int = 2
    stem_kernel: int = 3
    num_classes: int = 1000
    in_ch: int = 3
    rounding: Rounding = "keras"
    name: str = "mnv1"
    id_style: IdStyle = "uniform"

    def __post_init__(self) -> None:
        if not isinstance(self.stages, tuple) or not all(
            isinstance(s, tuple) and s and all(isinstance(b, BlockSpec) for b in s)
            for s in self.stages
        ):
            raise ValueError(
                f"`stages` (={self.stages!r}) must be a tuple of non-empty tuples of BlockSpec"
            )
        if not self.stages:
            raise ValueError("`stages` (=()) must hold at least one stage")
        if isinstance(self.width, bool) or not isinstance(self.width, int | float):
            raise ValueError(f"`width` (={self.width!r}) must be a number")
        if not (0 < self.width <= 4) or not math.isfinite(self.width):
            raise ValueError(f"`width` (={self.width!r}) must satisfy 0 < width <= 4")
        _check_int("resolution", self.resolution, 1, 4096)
        _check_int("stem_ch", self.stem_ch, 1)
        _check_stride("stem_stride", self.stem_stride)
        _check_kernel("stem_kernel", self.stem_kernel)
        _check_int("num_classes", self.num_classes, 1)
        _check_int("in_ch", self.in_ch, 1)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"`rounding` (={self.rounding!r}) must be one of {ROUNDINGS}")
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"`name` (={self.name!r}) must be a short identifier like 'mnv1'")
        if self.id_style not in ID_STYLES:
            raise ValueError(f"`id_style` (={self.id_style!r}) must be one of {ID_STYLES}")

    # --- derived views -------------------------------------------------------------------

    @property
    def blocks(self) -> tuple[BlockSpec, ...]:
        """All block groups, stages flattened."""
        return tuple(b for stage in self.stages for b in stage)

    @property
    def kernel(self) -> int | None:
        """The depthwise kernel size shared by every block, or None if they differ."""
        kernels = {b.kernel for b in self.blocks}
        return kernels.pop() if len(kernels) == 1 else None

    def with_kernel(self, kernel: int) -> ArchSpec:
        """A copy whose every depthwise conv uses `kernel` (the kernel-size search axis)."""
        _check_kernel("kernel", kernel)
        stages = tuple(
            tuple(dataclasses.replace(b, kernel=kernel) for b in stage) for stage in self.stages
        )
        return dataclasses.replace(self, stages=stages)

    @property
    def display_id(self) -> str:
        """Short id, unique within a search space; the grammar is in `mobisearch.ids`.

        `"uniform"` style, in timm's preset naming: `mnv1_w075_r160_k5` (`_075` = width
        0.75, `kmix` when the kernels differ). `"stages"` style: resolution, stem channels,
        then channels, kernels and depths per stage, e.g. `mnv1_r24_s16_c32-64-128_k3-5-3_d1-2-2`.

        Examples:
          >>> from mobisearch.presets import mobilenet_v1
          >>> mobilenet_v1(width=0.5, resolution=24, kernel=5).display_id
          'mnv1_w050_r24_k5'
        """
        from mobisearch import ids  # ids builds on this module

        return ids.display_id(self)

    def block_strings(self) -> tuple[tuple[str, ...], ...]:
        """The network as timm's `arch_def` at width 1.0: per stage, block strings with the
        resolved channel counts (width and rounding applied), runs of equal blocks merged.

        Examples:
          >>> from mobisearch.presets import mobilenet_v1
          >>> mobilenet_v1(0.5).block_strings()[3]
          ('dsa_r6_k3_s2_c256',)
        """
        from mobisearch import ids  # ids builds on this module

        return ids.block_strings(self)

    def arch_key(self) -> str:
        """A canonical key of the resolved network: two architectures have the same key
        exactly when `resolve()` gives them the same layers (names, widths, stage splits and
        id styles that change nothing are ignored). See `mobisearch.ids.arch_key`.
        """
        from mobisearch import ids  # ids builds on this module

        return ids.arch_key(self)

    def channels(self, base: int, field: str = "out_ch") -> int:
        """Apply the width multiplier and rounding policy; reject a result of 0."""
        c = round_channels(base, self.width, self.rounding)
        if c < 1:
            raise ValueError(
                f"`{field}` (={base}) at width {self.width} rounds to {c} channels; "
                "use a larger width or base channel count"
            )
        return c

    def resolve(self) -> tuple[LayerSpec, ...]:
        """Resolve to the concrete per-layer list that the cost model and the model read.

        Returns:
          Layers in forward order: `stem`, then `blocks/<i>/dw` and `blocks/<i>/pw` for
          each block (repeats expanded), then `pool` and `head`.

        Raises:
          ValueError: if a channel count rounds to 0.
        """
        hw = self.resolution
        c_in = self.in_ch
        c = self.channels(self.stem_ch, "stem_ch")
        out = same_out(hw, self.stem_stride)
        layers = [
            LayerSpec(
                name="stem",
                op="conv",
                in_ch=c_in,
                out_ch=c,
                kernel=self.stem_kernel,
                stride=self.stem_stride,
                in_hw=hw,
                out_hw=out,
            )
        ]
        hw = out
        i = 0
        for group in self.blocks:
            c_out = self.channels(group.out_ch)
            group_layers, hw = _group_layers(group, c, c_out, hw, i)
            layers.extend(group_layers)
            c = c_out
            i += group.repeats
        layers.append(
            LayerSpec(
                name="pool",
                op="pool",
                in_ch=c,
                out_ch=c,
                kernel=hw,
                in_hw=hw,
                out_hw=1,
                groups=c,
                act=False,
            )
        )
        layers.append(
            LayerSpec(
                name="head",
                op="fc",
                in_ch=c,
                out_ch=self.num_classes,
                in_hw=1,
                out_hw=1,
                act=False,
            )
        )
        return tuple(layers)

    # --- serialization -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `ArchSpec.from_dict(a.to_dict()) == a`.

        `id_style` is written only when it is not `"uniform"`, so a uniform record keeps
        exactly the keys every reader of format 1 knows.
        """
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "display_id": self.display_id,
            "width": self.width,
            "resolution": self.resolution,
            "stem_ch": self.stem_ch,
            "stem_stride": self.stem_stride,
            "stem_kernel": self.stem_kernel,
            "num_classes": self.num_classes,
            "in_ch": self.in_ch,
            "rounding": self.rounding,
            "arch_def": [[b.to_string() for b in stage] for stage in self.stages],
        } | ({"id_style": self.id_style} if self.id_style != "uniform" else {})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "architecture") -> ArchSpec:
        """Read the dict written by `to_dict` (e.g. from an exported best-config JSON).

        Args:
          d: the mapping.
          source: what to call it in error messages (e.g. a file name).

        Raises:
          ValueError: naming `source`, the key and the value on an unknown key, a missing
            key, a wrong type or an invalid value.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"stages"}
        known |= {"arch_def", "format", "display_id"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown key {unknown[0]!r}; expected one of {sorted(known)}"
            )
        fmt = d.get("format", FORMAT_VERSION)
        if isinstance(fmt, bool) or fmt != FORMAT_VERSION:
            raise ValueError(f"{source}: format = {d['format']!r}, expected {FORMAT_VERSION}")
        if "arch_def" not in d:
            raise ValueError(
                f"{source}: missing key 'arch_def' (a list of stage lists of block strings)"
            )
        arch_def = d["arch_def"]
        if not isinstance(arch_def, Sequence) or isinstance(arch_def, str):
            raise ValueError(f"{source}: arch_def = {arch_def!r}, expected a list of lists")
        stages = []
        for i, stage in enumerate(arch_def):
            if not isinstance(stage, Sequence) or isinstance(stage, str) or not stage:
                raise ValueError(
                    f"{source}: arch_def[{i}] = {stage!r}, "
                    "expected a non-empty list of block strings"
                )
            try:
                stages.append(tuple(BlockSpec.from_string(s) for s in stage))
            except ValueError as e:
                raise ValueError(f"{source}: arch_def[{i}]: {e}") from None
        kwargs = {k: v for k, v in d.items() if k not in ("arch_def", "format", "display_id")}
        try:
            arch = cls(stages=tuple(stages), **kwargs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None
        if "display_id" in d and d["display_id"] != arch.display_id:
            raise ValueError(
                f"{source}: display_id = {d['display_id']!r} does not match the architecture "
                f"({arch.display_id!r})"
            )
        return arch
