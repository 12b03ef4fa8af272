"""Per-stage search spaces (`mobisearch.stages` through `mobisearch.space`): parsing, size,
candidates, sampler parameters, display-id round trips and every bad value."""

from __future__ import annotations

import collections
import dataclasses
import functools
import random
import tomllib
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mobisearch.arch import ArchSpec, BlockSpec
from mobisearch.cost import count_cost
from mobisearch.space import (
    MAX_LISTED,
    SearchSpace,
    SpaceError,
    StageAxes,
    apply_overrides,
    load_space,
    resolve_space_path,
)
from mobisearch.stages import MAX_DEPTH

PROPERTY = settings(max_examples=40, deadline=None)

# A small per-stage space; the error cases below edit one line of it.
VALID = """\
[space]
name = "t"

[axes]
resolution = [16, 20]
stem_ch = [8, 16]

[axes.stages]
width = [0.5, 1.0]
kernel = [3, 5]

[axes.stages.1]
depth = 2
per_block = ["kernel"]

[arch]
stem_ch = 16
stem_stride = 1
num_classes = 10
in_ch = 1
arch_def = [["dsa_c32"], ["dsa_s2_c64"], ["dsa_r2_s2_c128"]]
"""
# resolution x stem x stage 0 (1 block: 2 widths x 2 kernels) x stage 1 (1 block: 2 x 2, or
# 2 blocks: 2 widths x 2 x 2 kernels) x stage 2 (2 blocks: 2 x 2).
VALID_SIZE = 2 * 2 * 4 * (4 + 8) * 4


def write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edit(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new, 1)


@functools.cache
def valid_space() -> SearchSpace:
    return SearchSpace.from_dict(tomllib.loads(VALID), source="valid.toml")


@pytest.fixture
def space() -> SearchSpace:
    return valid_space()


# --- reading the file ------------------------------------------------------------------


def test_parsed_choices(space: SearchSpace) -> None:
    assert not space.is_grid
    assert space.widths == () and space.kernels == ()
    assert space.resolutions == (16, 20) and space.stem_chs == (8, 16)
    assert space.stages is not None
    s0, s1, s2 = space.stages
    assert s0 == StageAxes(widths=(0.5, 1.0), kernels=(3, 5), depths=(1,))
    assert s1 == StageAxes(widths=(0.5, 1.0), kernels=(3, 5), depths=(1, 2), per_block=("kernel",))
    # `dsa_r2_s2_c128` is two blocks: the base depth.
    assert s2.depths == (2,)
    assert space.size() == len(space) == VALID_SIZE


def test_stage_table_replaces_the_defaults_key_by_key(tmp_path: Path) -> None:
    text = edit("depth = 2\n", "depth = [1, 3]\nout_ch = [40, 24]\nkernel = [7]\n")
    stages = load_space(write(tmp_path, text)).stages
    assert stages is not None
    assert stages[1] == StageAxes(
        widths=None, out_chs=(40, 24), kernels=(7,), depths=(1, 3), per_block=("kernel",)
    )
    assert stages[0].widths == (0.5, 1.0) and stages[0].out_chs is None


def test_stem_width_gives_channels(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, edit("stem_ch = [8, 16]", "stem_width = [0.5, 1, 2]")))
    assert space.stem_chs == (8, 16, 32)


def test_defaults_are_the_base(tmp_path: Path) -> None:
    start, end = VALID.index("[axes.stages]"), VALID.index("[arch]")
    text = VALID[:start] + "[axes.stages]\n\n" + VALID[end:]
    space = load_space(write(tmp_path, text.replace("stem_ch = [8, 16]\n", "")))
    assert space.size() == 2 and space.params() == {"resolution": (16, 20)}
    arch = space.arch_from_params({"resolution": 20})
    base = dataclasses.replace(space.base, resolution=20)
    assert arch.arch_key() == base.arch_key()
    assert count_cost(arch).macs == count_cost(base).macs


def test_round_trip_through_the_dict(space: SearchSpace) -> None:
    again = SearchSpace.from_dict(space.to_dict(), source=space.path)
    assert again == space and again.candidates() == space.candidates()


def test_overrides_keep_the_stages(space: SearchSpace) -> None:
    new = apply_overrides(space, ["axes.resolution=[24]", "axes.stem_ch=[12]"])
    assert new.stages == space.stages and new.size() == VALID_SIZE // 4


def test_direct_construction(space: SearchSpace) -> None:
    assert space.stages is not None
    built = SearchSpace(
        name="t",
        resolutions=[16, 20],
        stem_chs=[8, 16],
        stages=list(space.stages),
        base=space.base,
        path=space.path,
    )
    assert built == space
    stages = (StageAxes(depths=(1,)), StageAxes(depths=(0,)), StageAxes(depths=(2,)))
    with pytest.raises(SpaceError, match=r"^SearchSpace: axes\.stages\.1\.depth\[0\] = 0, "):
        SearchSpace(name="t", resolutions=(16,), stages=stages, base=space.base)
    with pytest.raises(SpaceError, match=r"axes\.stages = .*expected 3 stages"):
        SearchSpace(name="t", resolutions=(16,), stages=stages[:2], base=space.base)


# --- candidates ------------------------------------------------------------------------


def test_candidates_are_distinct_networks(space: SearchSpace) -> None:
    cands = space.candidates()
    assert len(cands) == VALID_SIZE
    assert len({a.arch_key() for a in cands}) == VALID_SIZE
    assert len({a.display_id for a in cands}) == VALID_SIZE
    assert all(a.id_style == "stages" and a.width == 1.0 for a in cands)


def test_candidate_order(space: SearchSpace) -> None:
    first, second, last = space.candidates()[0], space.candidates()[1], space.candidates()[-1]
    assert first.display_id == "mnv1_r16_s8_c16-32-64_k3-3-3_d1-1-2"
    assert second.display_id == "mnv1_r16_s8_c16-32-64_k3-3-5_d1-1-2"  # the last stage first
    assert last.display_id == "mnv1_r20_s16_c32-64-128_k5-5-5_d1-2-2"


def test_depth_keeps_the_first_blocks_and_extends_with_stride_1(tmp_path: Path) -> None:
    text = edit("depth = 2\n", "depth = 3\n").replace(
        "[arch]", "[axes.stages.2]\ndepth = 2\n\n[arch]"
    )
    space = load_space(write(tmp_path, text))
    arch = space.arch_from_id("mnv1_r16_s8_c16-32-64_k3-5.3.5-3_d1-3-2")
    assert arch.stages[1] == (
        BlockSpec(out_ch=32, stride=2, kernel=5),
        BlockSpec(out_ch=32, kernel=3),
        BlockSpec(out_ch=32, kernel=5),
    )
    assert arch.stages[2] == (BlockSpec(out_ch=64, stride=2, kernel=3, repeats=2),)
    one = space.arch_from_id("mnv1_r16_s8_c16-32-64_k3-5-3_d1-1-1")
    assert one.stages[2] == (BlockSpec(out_ch=64, stride=2, kernel=3),)


def test_candidates_refuse_huge_spaces() -> None:
    space = load_space(resolve_space_path("fashion_mnist_stages"))
    assert space.size() > MAX_LISTED
    with pytest.raises(SpaceError, match=r"2,624,400,000 candidates, too many to list"):
        space.candidates()


def test_len_of_a_space_beyond_an_index(tmp_path: Path) -> None:
    choices = "width = [0.25, 0.5, 0.75, 1.0]\nkernel = [3, 5, 7]\n"
    text = edit("depth = 2\n", f"depth = {MAX_DEPTH}\n{choices}")
    text = text.replace('per_block = ["kernel"]', 'per_block = ["kernel", "width"]')
    space = load_space(write(tmp_path, text))
    # 4 widths x 3 kernels per block, up to 16 blocks: more than fits a Python index.
    assert space.size() == 2 * 2 * 4 * sum(12**d for d in range(1, 17)) * 4 > 2**63
    with pytest.raises(OverflowError):
        len(space)
    arch = space.sample(random.Random(0))
    assert space.arch_from_id(arch.display_id) == arch


# --- sampler parameters ----------------------------------------------------------------


def test_params(space: SearchSpace) -> None:
    assert space.params() == {
        "resolution": (16, 20),
        "stem_ch": (8, 16),
        "s0.width": (0.5, 1.0),
        "s0.kernel": (3, 5),
        "s1.depth": (1, 2),
        "s1.width": (0.5, 1.0),
        "s1.b0.kernel": (3, 5),
        "s1.b1.kernel": (3, 5),
        "s2.width": (0.5, 1.0),
        "s2.kernel": (3, 5),
    }


def test_blocks_past_the_depth_are_ignored(space: SearchSpace) -> None:
    params = {name: choices[0] for name, choices in space.params().items()}
    assert params["s1.depth"] == 1
    a = space.arch_from_params(params)
    b = space.arch_from_params(params | {"s1.b1.kernel": 5})
    assert a == b
    deeper = space.arch_from_params(params | {"s1.depth": 2, "s1.b1.kernel": 5})
    assert deeper.display_id == "mnv1_r16_s8_c16-32-64_k3-3.5-3_d1-2-2"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"s0.kernel": 7}, "params['s0.kernel'] = 7, expected one of [3, 5]"),
        ({"s9.depth": 1}, "params['s9.depth']: unknown parameter"),
        ({"resolution": True}, "params['resolution'] = true"),
        ({"s1.depth": [1]}, "params['s1.depth'] = [1]"),
    ],
)
def test_bad_params(space: SearchSpace, change: dict[str, object], needle: str) -> None:
    params = {name: choices[0] for name, choices in space.params().items()} | change
    with pytest.raises(SpaceError) as info:
        space.arch_from_params(params)
    assert needle in str(info.value) and str(info.value).startswith(space.path)


def test_missing_param(space: SearchSpace) -> None:
    params = {name: choices[0] for name, choices in space.params().items()}
    del params["stem_ch"]
    with pytest.raises(
        SpaceError, match=r"params\['stem_ch'\]: missing; expected one of \[8, 16\]"
    ):
        space.arch_from_params(params)


@PROPERTY
@given(data=st.data())
def test_params_round_trip(data: st.DataObject) -> None:
    space = valid_space()
    params = {name: data.draw(st.sampled_from(c)) for name, c in space.params().items()}
    arch = space.arch_from_params(params)
    back = space.params_from_arch(arch)
    assert space.arch_from_params(back) == arch
    # Only the blocks a candidate has can differ.
    depth = params["s1.depth"]
    active = {k: v for k, v in params.items() if not k.startswith(f"s1.b{depth}")}
    assert {k: v for k, v in back.items() if k in active} == active


def test_params_from_arch_rejects_outsiders(space: SearchSpace) -> None:
    arch = space.sample(random.Random(0))
    with pytest.raises(SpaceError, match="is not a candidate of this space: resolution 24"):
        space.params_from_arch(dataclasses.replace(arch, resolution=24))
    wide = dataclasses.replace(arch, width=2.0)
    with pytest.raises(SpaceError, match="is not a candidate of this space: stem channels 32"):
        space.params_from_arch(wide)
    with pytest.raises(SpaceError, match="stage 0 has channels \\[64\\], which no width"):
        space.params_from_arch(dataclasses.replace(wide, stem_ch=8))
    with pytest.raises(SpaceError, match="is not a candidate of this space: its num_classes"):
        space.params_from_arch(dataclasses.replace(arch, num_classes=3))


# --- sampling and ids ------------------------------------------------------------------


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1))
def test_sample_and_id_round_trip(seed: int) -> None:
    space = valid_space()
    arch = space.sample(random.Random(seed))
    assert arch == space.sample(random.Random(seed))
    assert space.arch_from_id(arch.display_id) == arch
    assert space.arch_from_id(arch.display_id).display_id == arch.display_id
    assert arch in set(space.candidates())


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1))
def test_shipped_space_id_round_trip(seed: int) -> None:
    space = load_space(resolve_space_path("fashion_mnist_stages"))
    arch = space.sample(random.Random(seed))
    assert space.arch_from_id(arch.display_id) == arch
    assert space.arch_from_params(space.params_from_arch(arch)) == arch
    assert ArchSpec.from_dict(arch.to_dict()) == arch


def test_sample_is_uniform(space: SearchSpace) -> None:
    # Stage 1 has 4 configurations at depth 1 and 8 at depth 2: a uniform draw over the
    # candidates takes depth 2 two times in three (a draw per parameter would take half).
    rng = random.Random(0)
    n = 6000
    draws = [space.sample(rng) for _ in range(n)]
    depths = collections.Counter(sum(b.repeats for b in a.stages[1]) for a in draws)
    assert abs(depths[2] / n - 2 / 3) < 0.03, depths
    # 6000 draws of 768 candidates: each expected 7.8 times, so nearly all are seen.
    assert len(set(draws)) > 0.99 * VALID_SIZE


def test_id_errors(space: SearchSpace) -> None:
    with pytest.raises(SpaceError, match="does not name a candidate of this per-stage space"):
        space.arch_from_id("mnv1_w050_r16_k3")
    with pytest.raises(SpaceError, match="expected <name>_w<width>"):
        space.arch_from_id("mnv1_r16")
    with pytest.raises(SpaceError, match="stage 1 has 3 blocks, expected one of \\[1, 2\\]"):
        space.arch_from_id("mnv1_r16_s8_c16-32-64_k3-3-3_d1-3-2")
    with pytest.raises(SpaceError, match=r"stage 0 has channels \[24\], which no width choice"):
        space.arch_from_id("mnv1_r16_s8_c24-32-64_k3-3-3_d1-1-2")
    with pytest.raises(SpaceError, match="stem channels 12"):
        space.arch_from_id("mnv1_r16_s12_c16-32-64_k3-3-3_d1-1-2")
    with pytest.raises(SpaceError, match="is not written as this space writes it"):
        space.arch_from_id("mnv1_r16_s8_c16-32-64.64_k3-3-3_d1-1-2")
    with pytest.raises(SpaceError, match="does not name a candidate"):
        space.arch_from_id("other_r16_s8_c16-32-64_k3-3-3_d1-1-2")


def test_grid_api() -> None:
    grid = load_space(resolve_space_path("fashion_mnist"))
    assert grid.is_grid and grid.size() == 24
    assert grid.params() == {
        "width": (0.25, 0.5, 0.75, 1.0),
        "resolution": (20, 24, 28),
        "kernel": (3, 5),
    }
    for arch in grid.candidates():
        assert grid.arch_from_id(arch.display_id) == arch
        assert grid.arch_from_params(grid.params_from_arch(arch)) == arch
    rng = random.Random(0)
    assert {grid.sample(rng) for _ in range(500)} == set(grid.candidates())
    with pytest.raises(SpaceError, match="no width of axes.width gives w060"):
        grid.arch_from_id("mnv1_w060_r20_k3")
    with pytest.raises(SpaceError, match="kernel 7 is not in axes.kernel"):
        grid.arch_from_id("mnv1_w050_r20_k7")
    with pytest.raises(SpaceError, match="not a candidate of this grid"):
        grid.params_from_arch(dataclasses.replace(grid.candidates()[0], resolution=16))
    with pytest.raises(SpaceError, match=r"params\['width'\] = 0.3"):
        grid.arch_from_params({"width": 0.3, "resolution": 20, "kernel": 3})


# --- random spaces: the size counts distinct networks ----------------------------------

base_groups = st.builds(
    BlockSpec,
    out_ch=st.sampled_from((8, 16, 24)),  # few counts, so stages often look alike
    stride=st.sampled_from((1, 2)),
    kernel=st.sampled_from((1, 3)),
    repeats=st.integers(1, 2),
)
stage_axes = st.builds(
    StageAxes,
    widths=st.one_of(
        st.none(),
        st.lists(st.sampled_from((0.5, 1.0, 1.5)), min_size=1, max_size=2, unique=True).map(tuple),
    ),
    kernels=st.one_of(
        st.none(),
        st.lists(st.sampled_from((3, 5)), min_size=1, max_size=2, unique=True).map(tuple),
    ),
    depths=st.lists(st.integers(1, 3), min_size=1, max_size=2, unique=True).map(tuple),
    per_block=st.lists(st.sampled_from(("width", "kernel")), max_size=2, unique=True).map(tuple),
)


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(
        st.lists(base_groups, min_size=1, max_size=2).map(tuple), min_size=1, max_size=3
    ),
    axes=st.lists(stage_axes, min_size=3, max_size=3),
)
def test_size_counts_distinct_networks(
    groups: list[tuple[BlockSpec, ...]], axes: list[StageAxes]
) -> None:
    base = ArchSpec(stages=tuple(groups), stem_ch=8, stem_stride=1, num_classes=3, in_ch=1)
    stages = []
    for s in axes[: len(groups)]:
        per_block = tuple(a for a in s.per_block if a != "kernel" or s.kernels is not None)
        stages.append(dataclasses.replace(s, widths=s.widths or (1.0,), per_block=per_block))
    try:
        space = SearchSpace(name="h", resolutions=(32,), stages=tuple(stages), base=base)
    except SpaceError:
        assume(False)  # a space the checks refuse (e.g. two depth splits alike)
        raise
    assume(space.size() <= 3000)
    cands = space.candidates()
    assert len(cands) == space.size()
    assert len({a.arch_key() for a in cands}) == space.size()
    assert len({a.display_id for a in cands}) == space.size()
    for arch in cands[:: max(1, len(cands) // 20)]:
        assert space.arch_from_id(arch.display_id) == arch


def test_ambiguous_depth_split_is_refused(tmp_path: Path) -> None:
    # Stage 1 starts with stride 1 and can look like stage 0's blocks, so stage 0 at depth 2
    # plus stage 1 at depth 1 would equal depth 1 plus depth 2.
    text = edit('[["dsa_c32"], ["dsa_s2_c64"], ["dsa_r2_s2_c128"]]', '[["dsa_c32"], ["dsa_c32"]]')
    text = text.replace('per_block = ["kernel"]', "")
    message = load_error(tmp_path, text)
    assert "axes.stages.1.depth = [1, 2], expected a single depth" in message
    assert "arch.arch_def[1] starts with a stride-1 block" in message
    # Channels the two stages cannot share make the split visible.
    text = text.replace("depth = 2\n", "depth = 2\nout_ch = [24]\n")
    assert load_space(write(tmp_path, text)).size() == 2 * 2 * 4 * (2 + 2)


# --- bad values ------------------------------------------------------------------------


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


ERROR_CASES = [
    # kernels
    ("kernel = [3, 5]", "kernel = [3, 4]", ["axes.stages.kernel[1] = 4, expected an odd integer"]),
    ("depth = 2\n", "depth = 2\nkernel = [2]\n", ["axes.stages.1.kernel[0] = 2", "odd"]),
    ("kernel = [3, 5]", "kernel = [3, 17]", ["axes.stages.kernel[1] = 17", "1 <= kernel <= 15"]),
    ("kernel = [3, 5]", "kernel = [3, 3]", ["axes.stages.kernel[1] = 3", "repeats"]),
    ("kernel = [3, 5]", "kernel = []", ["axes.stages.kernel = [], expected a non-empty list"]),
    # depths
    ("depth = 2\n", "depth = 0\n", ["axes.stages.1.depth = 0, expected an integer with 1 <="]),
    ("depth = 2\n", "depth = [0, 1]\n", ["axes.stages.1.depth[0] = 0", "1 <= depth <= 16"]),
    ("depth = 2\n", "depth = 17\n", ["axes.stages.1.depth = 17", "depth <= 16"]),
    ("depth = 2\n", "depth = [2, 17]\n", ["axes.stages.1.depth[1] = 17", "depth <= 16"]),
    ("depth = 2\n", "depth = 2.0\n", ["axes.stages.1.depth = 2.0"]),
    ("depth = 2\n", 'depth = "2"\n', ['axes.stages.1.depth = "2"']),
    # stages that do not exist, unknown keys
    ("[axes.stages.1]", "[axes.stages.3]", ["axes.stages.3: no such stage", "0 to 2", "3 stages"]),
    ("[axes.stages.1]", "[axes.stages.01]", ["axes.stages.01: no such stage"]),
    ("[axes.stages.1]", "[axes.stages.last]", ["axes.stages.last: unknown key", '"depth"']),
    ("kernel = [3, 5]", "kernel = [3, 5]\nkernels = [3]", ["axes.stages.kernels: unknown key"]),
    ("depth = 2\n", "depht = 2\n", ["axes.stages.1.depht: unknown key"]),
    (
        "resolution = [16, 20]",
        "resolution = [16, 20]\nwidth = [1.0]",
        ["axes.width: unknown key", "per stage"],
    ),
    ("resolution = [16, 20]", "resolution = [16, 20]\nkernel = [3]", ["axes.kernel: unknown key"]),
    ("resolution = [16, 20]\n", "", ["axes.resolution: missing key"]),
    ("[axes.stages.1]\n", "[axes.stages.1]\nx = 1\n", ["axes.stages.1.x: unknown key"]),
    # widths and channels
    (
        "width = [0.5, 1.0]",
        "width = [0.01, 1.0]",
        ["axes.stages.width[0] = 0.01", ">= 1 channel", "32 x 0.01 rounds to 0"],
    ),
    ("width = [0.5, 1.0]", "width = [0.5, 5.0]", ["axes.stages.width[1] = 5.0", "0 < width <= 4"]),
    (
        "width = [0.5, 1.0]",
        "width = [0.5, 0.51]",
        ["axes.stages.width[1] = 0.51", "both give 16 channels"],
    ),
    ("width = [0.5, 1.0]", 'width = ["a"]', ['axes.stages.width[0] = "a"']),
    ("depth = 2\n", "depth = 2\nout_ch = [0]\n", ["axes.stages.1.out_ch[0] = 0", "1 <= out_ch"]),
    (
        "depth = 2\n",
        "depth = 2\nout_ch = [8]\nwidth = [1.0]\n",
        ["axes.stages.1.out_ch: not allowed with axes.stages.1.width"],
    ),
    # per_block
    ('per_block = ["kernel"]', 'per_block = ["depth"]', ['axes.stages.1.per_block[0] = "depth"']),
    (
        'per_block = ["kernel"]',
        'per_block = ["out_ch"]',
        ['axes.stages.1.per_block[0] = "out_ch"', "chooses width"],
    ),
    ('per_block = ["kernel"]', 'per_block = "kernel"', ['axes.stages.1.per_block = "kernel"']),
    ("kernel = [3, 5]\n", "", ['axes.stages.1.per_block[0] = "kernel"', "a kernel list"]),
    # stem
    ("stem_ch = [8, 16]", "stem_ch = [8, 0]", ["axes.stem_ch[1] = 0, expected an integer >= 1"]),
    ("stem_ch = [8, 16]", "stem_ch = [8, 8]", ["axes.stem_ch[1] = 8", "no repeats"]),
    (
        "stem_ch = [8, 16]",
        "stem_width = [0.5, 0.51]",
        ["axes.stem_width[1] = 0.51", "8 stem channels"],
    ),
    ("stem_ch = [8, 16]", "stem_width = [0.01]", ["axes.stem_width[0] = 0.01"]),
    (
        "stem_ch = [8, 16]",
        "stem_ch = [8]\nstem_width = [1.0]",
        ["axes.stem_width: not allowed with axes.stem_ch"],
    ),
]


@pytest.mark.parametrize(("old", "new", "needles"), ERROR_CASES)
def test_error_names_file_key_and_value(
    tmp_path: Path, old: str, new: str, needles: list[str]
) -> None:
    message = load_error(tmp_path, edit(old, new))
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_resolution_too_small_for_the_strides(tmp_path: Path) -> None:
    # A stride-2 stem and three stride-2 stages: 8 -> 4 -> 2 -> 1, and the last stage's
    # stride-2 block would get a 1x1 input.
    text = edit('[["dsa_c32"], ["dsa_s2_c64"], ["dsa_r2_s2_c128"]]', STRIDED).replace(
        "stem_stride = 1", "stem_stride = 2"
    )
    assert load_space(write(tmp_path, text)).resolutions == (16, 20)
    message = load_error(tmp_path, text.replace("[16, 20]", "[16, 8]"))
    assert "axes.resolution[1] = 8, expected a resolution > 8" in message
    assert "1x1 input" in message and "16x" in message


STRIDED = '[["dsa_s2_c32"], ["dsa_s2_c64"], ["dsa_r2_s2_c128"]]'


def test_resolution_check_uses_the_deepest_candidate(tmp_path: Path) -> None:
    # Stage 2 at depth 1 drops its second stride-2 block; the check counts it anyway.
    arch_def = '[["dsa_s2_c32"], ["dsa_s2_c64"], ["dsa_s2_c128", "dsa_s2_c128"]]'
    text = edit('[["dsa_c32"], ["dsa_s2_c64"], ["dsa_r2_s2_c128"]]', arch_def)
    text = text.replace("stem_stride = 1", "stem_stride = 2")
    text = text.replace("[arch]", "[axes.stages.2]\ndepth = [1, 2]\n\n[arch]")
    message = load_error(tmp_path, text)
    assert "axes.resolution[0] = 16, expected a resolution > 16" in message
    assert "blocks/4/dw" in message


def test_grid_rejects_stem_choices(tmp_path: Path) -> None:
    grid = load_space(resolve_space_path("quick")).to_dict()
    grid["axes"]["stem_ch"] = [8]
    with pytest.raises(SpaceError, match=r"axes\.stem_ch: unknown key.*need per-stage choices"):
        SearchSpace.from_dict(grid, source="g.toml")
