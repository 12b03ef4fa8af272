"""Names of an architecture: its display id, its block strings and its canonical key.

Display ids come in two styles, picked by `ArchSpec.id_style`:

* ``"uniform"``, timm's preset naming, for networks scaled as a whole (grid spaces):
  ``<name>_w<width×100, 3 digits>_r<resolution>_k<kernel>``, e.g. ``mnv1_w075_r20_k5``;
  the kernel is ``mix`` when the blocks' kernels differ.
* ``"stages"``, for per-stage search spaces:
  ``<name>_r<resolution>_s<stem channels>_c<channels>_k<kernels>_d<depths>``, where each of
  the last three lists one entry per stage of `ArchSpec.stages`, joined by ``-``. A stage's
  entry is one number when all its blocks share it, or one number per block joined by
  ``.``. Channels are the resolved counts (width and rounding applied). Example:
  ``mnv1_r24_s16_c32-64-128.96_k3-5-3.7_d1-2-2`` is a 24x24 input, a 16-channel stem, a
  1-block stage of 32 channels with 3x3 kernels, a 2-block stage of 64 with 5x5, and a
  2-block stage whose blocks have 128 and 96 channels and 3x3 and 7x7 kernels.

The stages style names every choice a per-stage space makes (strides, block kinds and the
classifier come from the space's base architecture), so two candidates of one space have
the same id exactly when they are the same candidate, and `parse_display_id` reads it back
(`mobisearch.space.SearchSpace.arch_from_id` turns it into the `ArchSpec`). The uniform
style cannot tell per-stage candidates apart, which is why the style is a field of the
architecture rather than a property of the space.

`arch_key` is the canonical key of the resolved network: duplicates are recognised by it,
whatever parameters or stage split produced them.

Pure module: standard library only.

Examples:
    >>> from mobisearch.presets import mobilenet_v1_small
    >>> import dataclasses
    >>> arch = dataclasses.replace(mobilenet_v1_small(0.5, 24), id_style="stages")
    >>> arch.display_id
    'mnv1_r24_s16_c32-64-128-256-512_k3-3-3-3-3_d1-2-2-6-2'
    >>> parse_display_id(arch.display_id).depths
    (1, 2, 2, 6, 2)
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from mobisearch.arch import BlockSpec, expand_blocks, merge_blocks, round_channels

if TYPE_CHECKING:
    from mobisearch.arch import ArchSpec

__all__ = ["ParsedId", "arch_key", "block_strings", "display_id", "parse_display_id"]

_UNIFORM_RE = re.compile(
    r"(?P<name>[A-Za-z_]\w*?)_w(?P<w>[0-9]{3,})_r(?P<r>[0-9]+)_k(?P<k>[0-9]+|mix)"
)
_STAGES_RE = re.compile(
    r"(?P<name>[A-Za-z_]\w*?)_r(?P<r>[0-9]+)_s(?P<s>[0-9]+)"
    r"_c(?P<c>[0-9.-]+)_k(?P<k>[0-9.-]+)_d(?P<d>[0-9-]+)"
)
_NUMBER_RE = re.compile(r"[1-9][0-9]*")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ParsedId:
    """The values a display id spells out.

    Attributes:
      style: `"uniform"` or `"stages"`.
      name: the family prefix (`ArchSpec.name`).
      resolution: input size in pixels.
      width: uniform style: the width in hundredths as written (`75` for `w075`); else None.
      kernel: uniform style: the shared kernel, or None for `kmix` (and in stages style).
      stem_ch: stages style: resolved stem channels; else None.
      out_chs: stages style: per stage, the resolved channels of each block; else `()`.
      kernels: stages style: per stage, the kernel of each block; else `()`.
    """

    style: str
    name: str
    resolution: int
    width: int | None = None
    kernel: int | None = None
    stem_ch: int | None = None
    out_chs: tuple[tuple[int, ...], ...] = ()
    kernels: tuple[tuple[int, ...], ...] = ()

    @property
    def depths(self) -> tuple[int, ...]:
        """Blocks per stage (stages style)."""
        return tuple(len(c) for c in self.out_chs)


def _channels(arch: ArchSpec, base: int) -> int:
    # Not `arch.channels`: an id names any architecture, even one that does not resolve.
    return round_channels(base, arch.width, arch.rounding)


def _resolved_stages(arch: ArchSpec) -> tuple[tuple[BlockSpec, ...], ...]:
    """Per stage, one block per entry with the resolved channel count (width 1.0)."""
    return tuple(
        tuple(dataclasses.replace(b, out_ch=arch.channels(b.out_ch)) for b in expand_blocks(s))
        for s in arch.stages
    )


def _resolved_values(arch: ArchSpec) -> list[list[tuple[int, int]]]:
    """Per stage, (channels, kernel) of each block, channels rounded but never rejected."""
    return [[(_channels(arch, b.out_ch), b.kernel) for b in expand_blocks(s)] for s in arch.stages]


def _entry(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else ".".join(map(str, values))


def display_id(arch: ArchSpec) -> str:
    """The display id of `arch` in its `id_style` (see the module docstring)."""
    if arch.id_style == "uniform":
        k = arch.kernel
        # Half-up rounding to hundredths (Python's round() is half-to-even).
        w = int(arch.width * 100 + 0.5)
        return f"{arch.name}_w{w:03d}_r{arch.resolution}_k{k or 'mix'}"
    stages = _resolved_values(arch)
    chs = "-".join(_entry([c for c, _ in s]) for s in stages)
    ks = "-".join(_entry([k for _, k in s]) for s in stages)
    ds = "-".join(str(len(s)) for s in stages)
    stem = _channels(arch, arch.stem_ch)
    return f"{arch.name}_r{arch.resolution}_s{stem}_c{chs}_k{ks}_d{ds}"


def _numbers(text: str, field: str, where: str) -> tuple[int, ...]:
    parts = text.split(".")
    if not all(_NUMBER_RE.fullmatch(p) for p in parts):
        raise ValueError(f"{where}: {field} entry {text!r} must be positive numbers joined by '.'")
    return tuple(int(p) for p in parts)


def parse_display_id(text: str) -> ParsedId:
    """Read the values out of a display id of either style.

    Args:
      text: a display id, e.g. `"mnv1_w075_r20_k5"` or `"mnv1_r24_s16_c32-64_k3-5_d1-2"`.

    Returns:
      The `ParsedId`.

    Raises:
      ValueError: naming `text` and the part that does not fit the grammar.

    Examples:
      >>> parse_display_id("mnv1_w075_r20_k5").width
      75
      >>> parse_display_id("mnv1_r24_s16_c32-64.48_k3-5_d1-2").out_chs
      ((32,), (64, 48))
    """
    where = f"display id {text!r}"
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a string")
    m = _UNIFORM_RE.fullmatch(text)
    if m is not None:
        k = m["k"]
        return ParsedId(
            style="uniform",
            name=m["name"],
            resolution=int(m["r"]),
            width=int(m["w"]),
            kernel=None if k == "mix" else int(k),
        )
    m = _STAGES_RE.fullmatch(text)
    if m is None:
        raise ValueError(
            f"{where}: expected <name>_w<width>_r<resolution>_k<kernel> (e.g. mnv1_w075_r20_k5) "
            "or <name>_r<resolution>_s<stem>_c<channels>_k<kernels>_d<depths> "
            "(e.g. mnv1_r24_s16_c32-64_k3-5_d1-2)"
        )
    chs, ks, ds = (m[g].split("-") for g in ("c", "k", "d"))
    if not len(chs) == len(ks) == len(ds):
        raise ValueError(
            f"{where}: c, k and d list {len(chs)}, {len(ks)} and {len(ds)} stages; "
            "expected one entry per stage in each"
        )
    out_chs, kernels = [], []
    for i, (c, k, d) in enumerate(zip(chs, ks, ds, strict=True)):
        (depth,) = _numbers(d, f"stage {i} depth", where)
        per_stage = []
        for field, entry in (("channels", c), ("kernel", k)):
            values = _numbers(entry, f"stage {i} {field}", where)
            if len(values) == 1:
                values *= depth
            elif len(values) != depth:
                raise ValueError(
                    f"{where}: stage {i} {field} {entry!r} lists {len(values)} blocks; "
                    f"expected one value or {depth} (its depth)"
                )
            per_stage.append(values)
        out_chs.append(per_stage[0])
        kernels.append(per_stage[1])
    return ParsedId(
        style="stages",
        name=m["name"],
        resolution=int(m["r"]),
        stem_ch=int(m["s"]),
        out_chs=tuple(out_chs),
        kernels=tuple(kernels),
    )


def block_strings(arch: ArchSpec) -> tuple[tuple[str, ...], ...]:
    """The network as timm's `arch_def` at width 1.0 (see `ArchSpec.block_strings`)."""
    return tuple(tuple(b.to_string() for b in merge_blocks(s)) for s in _resolved_stages(arch))


def arch_key(arch: ArchSpec) -> str:
    """Canonical key of the resolved network (see `ArchSpec.arch_key`).

    The key lists the input (`<in_ch>x<resolution>`), the stem conv, every block with its
    resolved channels (stages flattened, runs of equal blocks merged) and the classifier:
    everything `ArchSpec.resolve` derives the layers from, and nothing else.

    Examples:
      >>> from mobisearch.presets import tiny
      >>> tiny().arch_key()
      '3x32 conv_k3_s2_c8 dsa_r1_k3_s1_c16 dsa_r1_k3_s2_c32 fc10'
    """
    blocks = merge_blocks(b for s in _resolved_stages(arch) for b in s)
    stem = arch.channels(arch.stem_ch, "stem_ch")
    return " ".join(
        [
            f"{arch.in_ch}x{arch.resolution}",
            f"conv_k{arch.stem_kernel}_s{arch.stem_stride}_c{stem}",
            *(b.to_string() for b in blocks),
            f"fc{arch.num_classes}",
        ]
    )
