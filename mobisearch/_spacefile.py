"""The search-space file format: readers of its ``[axes]`` and ``[arch]`` tables, where
the shipped files live, and ``table.key=value`` overrides (`mobisearch.space` builds on it).

Pure module: standard library only.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mobisearch import presets
from mobisearch._toml import SpaceError, check_keys, did_you_mean, fail, fmt, is_int, toml_repr
from mobisearch.arch import ArchSpec, BlockSpec, round_channels
from mobisearch.stages import check_stages, parse_stages

SECTIONS: tuple[str, ...] = (
    "space", "axes", "arch", "data", "train", "latency", "fidelity", "search",
)  # fmt: skip
CONFIG_SECTIONS: tuple[str, ...] = ("data", "train", "latency", "fidelity", "search")
SPACE_KEYS: tuple[str, ...] = ("name", "description")
GRID_KEYS: tuple[str, ...] = ("width", "resolution", "kernel")
STAGE_AXES_KEYS: tuple[str, ...] = ("resolution", "stem_ch", "stem_width", "stages")
ARCH_KEYS: tuple[str, ...] = (
    "name",
    "arch_def",
    "stem_ch",
    "stem_stride",
    "stem_kernel",
    "num_classes",
    "in_ch",
    "rounding",
)
PRESET_KEYS: tuple[str, ...] = ("preset", "num_classes", "in_ch")
PRESETS: dict[str, Callable[..., ArchSpec]] = {
    "mobilenet_v1": presets.mobilenet_v1,
    "mobilenet_v1_small": presets.mobilenet_v1_small,
}
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
NAME_EXPECTED = 'an identifier-like string (letters, digits, "_", "-") such as "fashion_mnist"'
BLOCK_EXPECTED = 'a block string like "dsa_r2_k3_s2_c128"'
ARCH_DEF_EXPECTED = (
    'a non-empty list of stage lists of block strings, e.g. [["dsa_c64"], ["dsa_r2_s2_c128"]]'
)
WIDTH_RANGE = "0 < width <= 4"
RESOLUTION_RANGE = "8 <= resolution <= 4096"
KERNEL_RANGE = "1 <= kernel <= 15"
AXES_EXPECTED = {
    "width": f"a non-empty list of numbers with {WIDTH_RANGE}, e.g. [0.25, 0.5, 1.0]",
    "resolution": f"a non-empty list of integers with {RESOLUTION_RANGE}, e.g. [24, 28]",
    "kernel": f"a non-empty list of odd integers with {KERNEL_RANGE}, e.g. [3, 5]",
}
# SearchSpace field -> the dotted TOML key its errors name.
SPACE_FIELD_KEYS = {
    "widths": "axes.width",
    "resolutions": "axes.resolution",
    "kernels": "axes.kernel",
}


def check_stem_channels(
    where: str, key: str, values: Sequence[Any], stem_chs: Sequence[Any], base: ArchSpec
) -> None:
    """`values` as written under `key` give the stem channel choices `stem_chs`."""
    for i, c in enumerate(stem_chs):
        if not is_int(c) or c < 1:
            expected = (
                "an integer >= 1" if key.endswith("stem_ch") else "a width giving >= 1 channel"
            )
            fail(where, f"{key}[{i}]", values[i], expected)
    seen: dict[int, int] = {}
    for i, c in enumerate(stem_chs):
        got = round_channels(c, 1.0, base.rounding)
        if got in seen:
            first = seen[got]
            fail(
                where,
                f"{key}[{i}]",
                values[i],
                f"no repeats (it gives {got} stem channels, as {key}[{first}] = "
                f"{fmt(values[first])} does under rounding = {fmt(base.rounding)})",
            )
        seen[got] = i


def read_axes(where: str, table: Mapping[str, Any], base: ArchSpec) -> dict[str, Any]:
    """The SearchSpace fields of the `[axes]` table, grid or per-stage."""
    if "stages" not in table:
        hint = ""
        if any(k in table for k in ("stem_ch", "stem_width")):
            hint = " (stem_ch and stem_width need per-stage choices: an [axes.stages] table)"
        required = {k: AXES_EXPECTED[k] for k in GRID_KEYS}
        check_keys(where, "axes", table, GRID_KEYS, required, hint)
        return {
            "widths": table["width"],
            "resolutions": table["resolution"],
            "kernels": table["kernel"],
        }
    hint = ""
    if any(k in table for k in ("width", "kernel")):
        hint = " (with [axes.stages], width and kernel are chosen per stage in [axes.stages])"
    required = {"resolution": AXES_EXPECTED["resolution"]}
    check_keys(where, "axes", table, STAGE_AXES_KEYS, required, hint)
    if "stem_ch" in table and "stem_width" in table:
        raise SpaceError(
            f"{where}: axes.stem_width: not allowed with axes.stem_ch; expected stem channel "
            "counts or stem width multipliers, not both"
        )
    stem: tuple[int, ...] = ()
    for key in ("stem_ch", "stem_width"):
        if key not in table:
            continue
        values = table[key]
        if not isinstance(values, list | tuple) or not values:
            noun = "channel counts" if key == "stem_ch" else "numbers with 0 < width <= 4"
            fail(where, f"axes.{key}", values, f"a non-empty list of {noun}")
        if key == "stem_width":
            for i, w in enumerate(values):
                ok = isinstance(w, int | float) and not isinstance(w, bool)
                if not ok or not (math.isfinite(w) and 0 < w <= 4):
                    fail(where, f"axes.stem_width[{i}]", w, "a number with 0 < width <= 4")
            stem = tuple(round_channels(base.stem_ch, w, base.rounding) for w in values)
        else:
            stem = tuple(values)
        check_stem_channels(where, f"axes.{key}", values, stem, base)
    stages, origin = parse_stages(where, table["stages"], base)
    check_stages(where, base, stages, origin)
    return {"resolutions": table["resolution"], "stem_chs": stem, "stages": stages}


def read_section(
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
    check_keys(where, section, table, allowed, required)
    return table


def arch_table(arch: ArchSpec) -> dict[str, Any]:
    """The explicit `[arch]` table of `arch` (its JSON form without width/resolution)."""
    skip = ("format", "display_id", "width", "resolution")
    return {k: v for k, v in arch.to_dict().items() if k not in skip}


def build_arch(where: str, table: Mapping[str, Any]) -> ArchSpec:
    """Build the base `ArchSpec` of an `[arch]` table, explicit or preset."""
    if "preset" in table:
        preset = table["preset"]
        if not isinstance(preset, str) or preset not in PRESETS:
            fail(where, "arch.preset", preset, f"one of {toml_repr(list(PRESETS))}")
        hint = f" (not allowed with preset = {fmt(preset)}; write arch_def out instead)"
        check_keys(where, "arch", table, PRESET_KEYS, {}, hint)
        stages = PRESETS[preset]().stages
        kwargs = {k: v for k, v in table.items() if k != "preset"}
        for key, value in kwargs.items():
            check_arch_value(where, key, value, stages)
        # Normalised to the explicit form so both forms give the same base.
        table = arch_table(PRESETS[preset](**kwargs))
    hint = ""
    if any(k in table for k in ("width", "resolution", "kernel")):
        hint = " (width, resolution and kernel are search axes: set them in [axes])"
    check_keys(where, "arch", table, ARCH_KEYS, {"arch_def": ARCH_DEF_EXPECTED}, hint)
    stages = parse_arch_def(where, table["arch_def"])
    for key, value in table.items():
        if key != "arch_def":
            check_arch_value(where, key, value, stages)
    try:
        return ArchSpec.from_dict(table, source=f"{where}: arch")
    except ValueError as e:
        raise SpaceError(str(e)) from None


def check_arch_value(
    where: str, key: str, value: object, stages: tuple[tuple[BlockSpec, ...], ...]
) -> None:
    """Check one `[arch]` scalar with `ArchSpec`'s own rules, naming the dotted key."""
    kwargs: dict[str, Any] = {key: value}
    try:
        ArchSpec(stages=stages, **kwargs)
    except (ValueError, TypeError) as e:
        raise SpaceError(f"{where}: arch.{key} = {fmt(value)}: {e}") from None


def parse_arch_def(where: str, arch_def: object) -> tuple[tuple[BlockSpec, ...], ...]:
    key = "arch.arch_def"
    if not isinstance(arch_def, list | tuple) or not arch_def:
        fail(where, key, arch_def, ARCH_DEF_EXPECTED)
    stages = []
    for i, stage in enumerate(arch_def):
        if not isinstance(stage, list | tuple) or not stage:
            fail(where, f"{key}[{i}]", stage, "a non-empty list of block strings")
        blocks = []
        for j, text in enumerate(stage):
            if not isinstance(text, str):
                fail(where, f"{key}[{i}][{j}]", text, BLOCK_EXPECTED)
            try:
                blocks.append(BlockSpec.from_string(text))
            except ValueError as e:
                fail(where, f"{key}[{i}][{j}]", text, f"{BLOCK_EXPECTED} ({e})")
        stages.append(tuple(blocks))
    return tuple(stages)


def space_dirs() -> tuple[Path, ...]:
    package = Path(__file__).resolve().parent
    # A wheel ships the files inside the package (pyproject's force-include); a source
    # checkout or an editable install reads the repository's folder.
    return (package / "_spaces", package.parent / "search_spaces")


def available_spaces() -> tuple[str, ...]:
    """Names of the shipped search spaces, sorted (e.g. `"fashion_mnist"`, `"quick"`)."""
    names = {p.stem for d in space_dirs() if d.is_dir() for p in d.glob("*.toml")}
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
      >>> resolve_space_path("fashion_mnist").name
      'fashion_mnist.toml'
    """
    text = os.fspath(name_or_path)
    path = Path(text)
    if text and path.exists():
        return path
    available = ", ".join(available_spaces())
    if text and path.parent == Path(".") and NAME_RE.fullmatch(path.name.removesuffix(".toml")):
        filename = path.name if path.suffix == ".toml" else f"{path.name}.toml"
        for folder in space_dirs():
            if (folder / filename).is_file():
                return folder / filename
        raise SpaceError(
            f"{text}: no such file and no shipped search space of that name; expected a path "
            f"to a .toml file or one of: {available}"
        )
    raise SpaceError(
        f"{text!r}: no such file; expected a path to a .toml file or one of: {available}"
    )


def parse_override(text: str) -> tuple[str, str, Any]:
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
    if section not in SECTIONS:
        raise SpaceError(
            f"override {text!r}: {section}: unknown table; expected one of "
            f"{toml_repr(list(SECTIONS))}{did_you_mean(section, SECTIONS)}"
        )
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as e:
        # A bare word is taken as a string, so `data.dataset=mnist` needs no shell quoting.
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", raw):
            raise SpaceError(f"override {text!r}: {raw} is not a TOML value ({e})") from None
        value = raw
    return section, key, value
