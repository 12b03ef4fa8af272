"""Tests for `mobisearch.space`: shipped files, the grid, every error message, overrides."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from mobisearch.arch import ArchSpec
from mobisearch.presets import mobilenet_v1, mobilenet_v1_small
from mobisearch.space import (
    DEFAULT_SPACE,
    DataConfig,
    LatencyConfig,
    SearchSpace,
    SpaceError,
    TrainConfig,
    apply_overrides,
    available_spaces,
    load_space,
    resolve_space_path,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_COUNTS = {
    "mobilenet_v1_paper": 48,
    "fashion_mnist": 24,
    "mnist": 8,
    "quick": 4,
    "fashion_mnist_stages": 4 * 4 * (2 * 15) * (3 * 15) * (3 * 15) * (6 * 15) * (2 * 15),
}

# A small valid space; the error cases below edit one line of it.
VALID = """\
[space]
name = "t"

[axes]
width = [0.25, 0.5]
resolution = [16, 20]
kernel = [3, 5]

[arch]
stem_ch = 16
stem_stride = 1
num_classes = 10
in_ch = 1
arch_def = [["dsa_c32"], ["dsa_s2_c64"], ["dsa_s2_c128"]]

[data]
dataset = "fashion_mnist"
validation_size = 1000
train_size = 2000

[train]
steps = 20
batch_size = 64
warmup_steps = 2
"""


def write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edit(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new, 1)


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


# --- shipped files ---------------------------------------------------------------------


def test_shipped_names() -> None:
    assert set(SHIPPED_COUNTS) <= set(available_spaces())
    assert DEFAULT_SPACE in available_spaces()


@pytest.mark.parametrize("name", sorted(SHIPPED_COUNTS))
def test_shipped_file_loads(name: str) -> None:
    path = resolve_space_path(name)
    assert path == REPO / "search_spaces" / f"{name}.toml"
    space = load_space(path)
    assert space.path == str(path)
    assert space.name == name
    assert len(space) == space.size() == SHIPPED_COUNTS[name]
    if space.is_grid:
        cands = space.candidates()
        assert len(cands) == space.size()
        assert len(set(cands)) == len(cands)
        assert len({a.display_id for a in cands}) == len(cands)
    # Round trip through the TOML-shaped dict (what a study stores next to its results).
    assert SearchSpace.from_dict(space.to_dict(), source=space.path) == space


@pytest.mark.parametrize("name", sorted(SHIPPED_COUNTS))
def test_shipped_file_header(name: str) -> None:
    header = resolve_space_path(name).read_text().split("\n[", 1)[0]
    assert header.startswith("# ")
    assert "mobisearch " in header and "--space search_spaces/" in header
    assert "Wall time:" in header and "Purpose:" in header


def test_paper_grid() -> None:
    space = load_space(resolve_space_path("mobilenet_v1_paper"))
    assert space.widths == (0.25, 0.5, 0.75, 1.0)
    assert space.resolutions == (128, 160, 192, 224)
    assert space.kernels == (3, 5, 7)
    assert space.data is None and space.train is None
    assert mobilenet_v1(0.75, 160, 5) in space.candidates()
    assert space.candidates()[-1] == mobilenet_v1(1.0, 224, 7)


def test_fashion_mnist_is_the_small_preset() -> None:
    space = load_space(resolve_space_path("fashion_mnist"))
    assert set(space.candidates()) == {
        mobilenet_v1_small(w, r, k)
        for w in (0.25, 0.5, 0.75, 1.0)
        for r in (20, 24, 28)
        for k in (3, 5)
    }
    assert space.data == DataConfig(dataset="fashion_mnist", validation_size=5000)
    assert space.train == TrainConfig(
        steps=100, batch_size=128, learning_rate=0.005, warmup_steps=10, weight_decay=1e-4
    )
    assert space.latency == LatencyConfig(batch_size=1)


def test_quick_space() -> None:
    space = load_space(resolve_space_path("quick"))
    assert space.data is not None and space.train is not None
    assert (space.data.validation_size, space.data.train_size) == (1000, 2000)
    assert (space.train.steps, space.train.batch_size) == (20, 64)


# --- the grid --------------------------------------------------------------------------


def test_grid_order(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, VALID))
    assert [a.display_id for a in space.candidates()] == [
        "mnv1_w025_r16_k3",
        "mnv1_w025_r16_k5",
        "mnv1_w025_r20_k3",
        "mnv1_w025_r20_k5",
        "mnv1_w050_r16_k3",
        "mnv1_w050_r16_k5",
        "mnv1_w050_r20_k3",
        "mnv1_w050_r20_k5",
    ]
    first = space.candidates()[0]
    assert first == dataclasses.replace(space.base, width=0.25, resolution=16).with_kernel(3)


def test_int_width_is_stored_as_float(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, edit("width = [0.25, 0.5]", "width = [1, 0.5]")))
    assert space.widths == (1.0, 0.5) and all(type(w) is float for w in space.widths)


def test_preset_and_explicit_give_the_same_base(tmp_path: Path) -> None:
    explicit = load_space(resolve_space_path("fashion_mnist"))
    start, end = VALID.index("[arch]"), VALID.index("[data]")
    text = VALID[:start] + '[arch]\npreset = "mobilenet_v1_small"\n\n' + VALID[end:]
    text = text.replace("[16, 20]", "[20, 24, 28]").replace(
        "[0.25, 0.5]", "[0.25, 0.5, 0.75, 1.0]"
    )
    preset = load_space(write(tmp_path, text))
    assert preset.base == explicit.base
    assert set(preset.candidates()) == set(explicit.candidates())


def test_dataclasses_are_frozen_and_hashable() -> None:
    space = load_space(resolve_space_path("quick"))
    hash(space)
    with pytest.raises(dataclasses.FrozenInstanceError):
        space.name = "other"  # type: ignore[misc]
    assert TrainConfig(steps=10, learning_rate=1).learning_rate == 1.0


def test_direct_construction_errors() -> None:
    with pytest.raises(ValueError, match=r"DataConfig\.validation_size = -1, expected"):
        DataConfig(validation_size=-1)
    with pytest.raises(ValueError, match=r"TrainConfig\.steps = true, expected an integer"):
        TrainConfig(steps=True)
    with pytest.raises(ValueError, match=r"LatencyConfig\.iters = 0, expected an integer >= 1"):
        LatencyConfig(iters=0)
    with pytest.raises(SpaceError, match=r"^SearchSpace: axes\.kernel\[0\] = 4, expected"):
        SearchSpace(name="s", widths=(1.0,), resolutions=(32,), kernels=(4,), base=mobilenet_v1())
    space = SearchSpace(
        name="s", widths=[0.5, 1], resolutions=[32], kernels=[3], base=mobilenet_v1()
    )
    assert space.widths == (0.5, 1.0) and len(space) == 2


# --- error messages --------------------------------------------------------------------

# (old line, new line, substrings the message must contain besides the file name)
ERROR_CASES = [
    # unknown tables and keys
    ("[space]", "[extra]\nx = 1\n\n[space]", ["extra: unknown top-level key", '"space"']),
    ('name = "t"', 'name = "t"\nnmae = "u"', ["space.nmae: unknown key", '"name"']),
    ("steps = 20", "stepz = 20", ["train.stepz: unknown key", '"steps"', 'did you mean "steps"']),
    ("validation_size = 1000", "val_size = 1", ["data.val_size: unknown key"]),
    ("kernel = [3, 5]", "kernel = [3, 5]\nkernels = [3]", ["axes.kernels: unknown key"]),
    ("stem_ch = 16", "stem_ch = 16\nwidth = 1.0", ["arch.width: unknown key", "[axes]"]),
    ("[space]", "space = 3\n[x]", ["space = 3, expected a table [space]"]),
    # missing tables and keys
    ('[space]\nname = "t"\n', "", ["space: missing table"]),
    ('name = "t"', 'description = "d"', ["space.name: missing key"]),
    ("kernel = [3, 5]", "", ["axes.kernel: missing key", "odd integers"]),
    ("steps = 20", "", ["train.steps: missing key", "an integer with 1 <= steps <= 10000000"]),
    ("arch_def = [", "stages = [", ["arch.stages: unknown key"]),
    # space.name
    ('name = "t"', 'name = "my space"', ['space.name = "my space"', "identifier"]),
    ('name = "t"', "name = 3", ["space.name = 3"]),
    # axes
    (
        "width = [0.25, 0.5]",
        "width = [0.25, 0.5, 4.5]",
        ["axes.width[2] = 4.5, expected 0 < width <= 4"],
    ),
    ("width = [0.25, 0.5]", "width = [0.0]", ["axes.width[0] = 0.0, expected 0 < width <= 4"]),
    ("width = [0.25, 0.5]", 'width = ["a"]', ['axes.width[0] = "a", expected a number']),
    ("width = [0.25, 0.5]", "width = [true]", ["axes.width[0] = true, expected a number"]),
    ("width = [0.25, 0.5]", "width = [nan]", ["axes.width[0] = nan"]),
    ("width = [0.25, 0.5]", "width = []", ["axes.width = [], expected a non-empty list"]),
    ("width = [0.25, 0.5]", "width = 0.5", ["axes.width = 0.5, expected a non-empty list"]),
    (
        "width = [0.25, 0.5]",
        "width = [0.5, 0.25, 0.5]",
        ["axes.width[2] = 0.5", "repeats axes.width[0]"],
    ),
    ("width = [0.25, 0.5]", "width = [0.333, 0.334]", ["axes.width[1] = 0.334", "mnv1_w033"]),
    ("width = [0.25, 0.5]", "width = [0.01]", ["axes.width[0] = 0.01", "rounds to 0"]),
    ("resolution = [16, 20]", "resolution = [7]", ["axes.resolution[0] = 7", "8 <= resolution"]),
    ("resolution = [16, 20]", "resolution = [16, 5000]", ["axes.resolution[1] = 5000"]),
    ("resolution = [16, 20]", "resolution = [24.0]", ["axes.resolution[0] = 24.0", "an integer"]),
    ("resolution = [16, 20]", "resolution = [16, 16]", ["axes.resolution[1] = 16", "repeats"]),
    ("kernel = [3, 5]", "kernel = [3, 4]", ["axes.kernel[1] = 4", "an odd integer"]),
    ("kernel = [3, 5]", "kernel = [17]", ["axes.kernel[0] = 17", "1 <= kernel <= 15"]),
    ("kernel = [3, 5]", 'kernel = ["3"]', ['axes.kernel[0] = "3"']),
    # arch
    ("arch_def = [", "arch_def = 3\nx = [", ["arch.x: unknown key"]),
    (
        'arch_def = [["dsa_c32"], ["dsa_s2_c64"], ["dsa_s2_c128"]]',
        'arch_def = "dsa_c32"',
        ['arch.arch_def = "dsa_c32", expected a non-empty list'],
    ),
    (
        'arch_def = [["dsa_c32"], ["dsa_s2_c64"], ["dsa_s2_c128"]]',
        'arch_def = [["dsa_c32"], []]',
        ["arch.arch_def[1] = [], expected a non-empty list"],
    ),
    (
        'arch_def = [["dsa_c32"], ["dsa_s2_c64"], ["dsa_s2_c128"]]',
        'arch_def = [["dsa_c32", "dsa_s3_c64"]]',
        ['arch.arch_def[0][1] = "dsa_s3_c64"', "block string", "must be 1 or 2"],
    ),
    (
        'arch_def = [["dsa_c32"], ["dsa_s2_c64"], ["dsa_s2_c128"]]',
        'arch_def = [["dsa_c32", 7]]',
        ["arch.arch_def[0][1] = 7, expected a block string"],
    ),
    ("stem_stride = 1", "stem_stride = 3", ["arch.stem_stride = 3", "1 or 2"]),
    ("stem_ch = 16", "stem_ch = true", ["arch.stem_ch = true", "integer"]),
    ("stem_ch = 16", 'stem_ch = 16\nrounding = "floor"', ['arch.rounding = "floor"', "keras"]),
    ("stem_ch = 16", 'stem_ch = 16\nname = "mn v1"', ['arch.name = "mn v1"']),
    ("in_ch = 1", "in_ch = 3", ["arch.in_ch = 3, expected 1", 'data.dataset = "fashion_mnist"']),
    ("num_classes = 10", "num_classes = 1000", ["arch.num_classes = 1000, expected 10"]),
    # data
    ('dataset = "fashion_mnist"', 'dataset = "cifar10"', ['data.dataset = "cifar10"', '"mnist"']),
    ("validation_size = 1000", "validation_size = 0", ["data.validation_size = 0", ">= 1"]),
    ("validation_size = 1000", "validation_size = 60000", ["data.validation_size = 60000"]),
    ("validation_size = 1000", "validation_size = 1000.0", ["data.validation_size = 1000.0"]),
    ("train_size = 2000", "train_size = 0", ["data.train_size = 0"]),
    ("train_size = 2000", "train_size = 59001", ["data.train_size = 59001", "<= 59000"]),
    ("train_size = 2000", "train_size = 2000\nsplit_seed = -1", ["data.split_seed = -1"]),
    # train
    ("steps = 20", "steps = true", ["train.steps = true, expected an integer with 1 <= steps"]),
    ("steps = 20", "steps = 0", ["train.steps = 0, expected an integer with 1 <= steps <= 1"]),
    ("steps = 20", "steps = 20.0", ["train.steps = 20.0"]),
    (
        "batch_size = 64",
        "batch_size = 64\nlearning_rate = 0",
        ["train.learning_rate = 0, expected a number > 0"],
    ),
    ("batch_size = 64", 'batch_size = 64\nlearning_rate = "0.1"', ['train.learning_rate = "0.1"']),
    ("batch_size = 64", "batch_size = 64\nlearning_rate = inf", ["train.learning_rate = inf"]),
    (
        "batch_size = 64",
        'batch_size = 64\noptimizer = "adam"',
        ['train.optimizer = "adam"', '"adamw"'],
    ),
    ("batch_size = 64", 'batch_size = 64\nschedule = "cosine"', ['train.schedule = "cosine"']),
    ("warmup_steps = 2", "warmup_steps = 20", ["train.warmup_steps = 20", "< steps (= 20)"]),
    ("batch_size = 64", "batch_size = 64\nlabel_smoothing = 1.0", ["train.label_smoothing = 1.0"]),
    ("batch_size = 64", "batch_size = 64\nweight_decay = -1e-4", ["train.weight_decay = -0.0001"]),
    (
        "batch_size = 64",
        "batch_size = 4000",
        ["train.batch_size = 4000", "data.train_size = 2000"],
    ),
    # data and train go together
    ("[train]\nsteps = 20\nbatch_size = 64\nwarmup_steps = 2\n", "", ["train: missing table"]),
    (
        '[data]\ndataset = "fashion_mnist"\nvalidation_size = 1000\ntrain_size = 2000\n',
        "",
        ["data: missing table"],
    ),
]


@pytest.mark.parametrize(("old", "new", "needles"), ERROR_CASES)
def test_error_names_file_key_and_value(
    tmp_path: Path, old: str, new: str, needles: list[str]
) -> None:
    message = load_error(tmp_path, edit(old, new))
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_resolution_collapse(tmp_path: Path) -> None:
    # Four stride-2 blocks after a stride-1 stem: 8 -> 4 -> 2 -> 1, then a stride-2 block
    # would get a 1x1 input.
    text = edit(
        '[["dsa_c32"], ["dsa_s2_c64"], ["dsa_s2_c128"]]',
        '[["dsa_s2_c32"] ' + ', ["dsa_s2_c64"]' * 3 + "]",
    )
    assert load_space(write(tmp_path, text)).resolutions == (16, 20)
    message = load_error(tmp_path, text.replace("[16, 20]", "[16, 8, 20]"))
    assert "axes.resolution[1] = 8, expected a resolution > 8" in message
    assert "1x1 input" in message and "blocks/3/dw" in message and "16x" in message


def test_exact_message_of_the_style_guide(tmp_path: Path) -> None:
    message = load_error(tmp_path, edit("width = [0.25, 0.5]", "width = [0.25, 0.5, 4.5]"))
    assert message == f"{tmp_path / 'x.toml'}: axes.width[2] = 4.5, expected 0 < width <= 4"


def test_preset_errors(tmp_path: Path) -> None:
    start, end = VALID.index("[arch]"), VALID.index("[data]")

    def with_arch(arch: str) -> str:
        return VALID[:start] + arch + "\n" + VALID[end:]

    message = load_error(tmp_path, with_arch('[arch]\npreset = "resnet50"'))
    assert 'arch.preset = "resnet50", expected one of ["mobilenet_v1"' in message
    message = load_error(tmp_path, with_arch('[arch]\npreset = "mobilenet_v1_small"\nstem_ch = 8'))
    assert "arch.stem_ch: unknown key" in message and "not allowed with preset" in message
    message = load_error(tmp_path, with_arch('[arch]\npreset = "mobilenet_v1_small"\nin_ch = 0'))
    assert "arch.in_ch = 0" in message
    # mobilenet_v1 defaults to 3 channels and 1000 classes: wrong for Fashion-MNIST.
    message = load_error(tmp_path, with_arch('[arch]\npreset = "mobilenet_v1"'))
    assert "arch.in_ch = 3" in message
    message = load_error(tmp_path, with_arch("[arch]\nstem_ch = 16"))
    assert "arch.arch_def: missing key" in message
    message = load_error(tmp_path, VALID[:start] + VALID[end:])
    assert "arch: missing table" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(SpaceError, match=r"nope\.toml: no such file.*fashion_mnist"):
        load_space(path)
    with pytest.raises(SpaceError, match=r"cannot be read"):
        load_space(tmp_path)


def test_invalid_toml(tmp_path: Path) -> None:
    message = load_error(tmp_path, VALID.replace("steps = 20", "steps = = 20"))
    assert "invalid TOML" in message and "line 22" in message
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe[space]")
    with pytest.raises(SpaceError, match=r"bin\.toml: (not UTF-8|invalid TOML)"):
        load_space(path)


def test_cost_only_space_without_data(tmp_path: Path) -> None:
    text = VALID[: VALID.index("[data]")]
    space = load_space(write(tmp_path, text))
    assert space.data is None and space.train is None
    assert space.latency == LatencyConfig()


def test_synthetic_data_allows_any_arch(tmp_path: Path) -> None:
    text = edit('dataset = "fashion_mnist"', 'dataset = "synthetic"').replace(
        "in_ch = 1", "in_ch = 3"
    )
    space = load_space(write(tmp_path, text))
    assert space.data is not None and space.data.dataset == "synthetic"


# --- overrides -------------------------------------------------------------------------


def test_overrides() -> None:
    space = load_space(resolve_space_path("fashion_mnist"))
    new = apply_overrides(
        space, ["train.steps=200", "axes.width=[0.5,1.0]", "data.validation_size=1000"]
    )
    assert new.train is not None and new.data is not None and space.train is not None
    assert new.train.steps == 200
    assert new.widths == (0.5, 1.0) and len(new) == 12
    assert new.data.validation_size == 1000
    assert new.path == space.path and new.base == space.base
    assert dataclasses.replace(new.train, steps=space.train.steps) == space.train
    assert apply_overrides(space, []) == space


def test_override_types() -> None:
    space = load_space(resolve_space_path("quick"))
    new = apply_overrides(
        space,
        [
            "data.dataset=mnist",  # a bare word is a string
            'train.optimizer="sgd"',
            "train.learning_rate=1",  # int where a float is expected
            "train.label_smoothing = 0.1",
            "arch.rounding=div8",
            "latency.iters=3",
            'space.description="x"',
        ],
    )
    assert new.data is not None and new.train is not None
    assert new.data.dataset == "mnist"
    assert new.train.optimizer == "sgd" and new.train.learning_rate == 1.0
    assert new.train.label_smoothing == 0.1
    assert new.base.rounding == "div8" and new.latency.iters == 3 and new.description == "x"


def test_override_preset() -> None:
    space = load_space(resolve_space_path("quick"))
    new = apply_overrides(space, ["arch.num_classes=10", "arch.preset=mobilenet_v1_small"])
    assert new.base == dataclasses.replace(mobilenet_v1_small(), resolution=224)


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("train.steps=0", ["override 'train.steps=0'", "train.steps = 0, expected"]),
        ("train.steps=true", ["train.steps = true"]),
        ("train.stepz=1", ["override 'train.stepz=1'", "train.stepz: unknown key"]),
        ("axes.width=[0.5,4.5]", ["axes.width[1] = 4.5, expected 0 < width <= 4"]),
        ("axes.width=0.5", ["axes.width = 0.5, expected a non-empty list"]),
        ("data.dataset=cifar", ['data.dataset = "cifar"']),
        ("arch.in_ch=3", ["arch.in_ch = 3, expected 1"]),
        ("arch.width=0.5", ["arch.width: unknown key"]),
        ("arch.preset=resnet", ['arch.preset = "resnet"']),
        ("train.steps", ["override 'train.steps'", "expected table.key=value"]),
        ("steps=3", ["override 'steps=3'", "expected table.key=value"]),
        ("train.steps.x=3", ["expected table.key=value"]),
        ("tarin.steps=3", ["tarin: unknown table", 'did you mean "train"']),
        ("train.steps=[1,", ["override 'train.steps=[1,'", "not a TOML value"]),
        ("train.steps=", ["expected table.key=value"]),
    ],
)
def test_override_errors(override: str, needles: list[str]) -> None:
    space = load_space(resolve_space_path("quick"))
    with pytest.raises(SpaceError) as info:
        apply_overrides(space, [override])
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_override_error_names_the_culprit() -> None:
    space = load_space(resolve_space_path("fashion_mnist"))
    # Lowering steps below the warmup is caught, and the message says what to change.
    assert space.train is not None
    warmup = space.train.warmup_steps
    with pytest.raises(SpaceError) as info:
        apply_overrides(space, ["axes.kernel=[3]", f"train.steps={warmup}"])
    assert f"train.warmup_steps = {warmup}" in str(info.value)
    assert "'axes.kernel=[3]'" in str(info.value)
    assert f"'train.steps={warmup}'" in str(info.value)
    with pytest.raises(SpaceError, match=r"^override 'train.steps=0': "):
        apply_overrides(space, ["axes.kernel=[3]", "train.steps=0"])
    # Both together are fine.
    new = apply_overrides(space, [f"train.steps={warmup}", "train.warmup_steps=2"])
    assert new.train is not None and new.train.steps == warmup


def test_override_cost_only_space_needs_train() -> None:
    space = load_space(resolve_space_path("mobilenet_v1_paper"))
    with pytest.raises(SpaceError, match=r"data: missing table"):
        apply_overrides(space, ["train.steps=10"])
    with pytest.raises(TypeError, match="list of strings"):
        apply_overrides(space, "train.steps=10")  # type: ignore[arg-type]


# --- resolve_space_path ----------------------------------------------------------------


def test_resolve_space_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_space_path("quick") == REPO / "search_spaces" / "quick.toml"
    assert resolve_space_path("quick.toml") == REPO / "search_spaces" / "quick.toml"
    own = write(tmp_path, VALID, "quick.toml")
    assert resolve_space_path(own) == own
    assert resolve_space_path(str(own)) == own
    # A file in the working directory wins over a shipped space of the same name.
    monkeypatch.chdir(tmp_path)
    assert resolve_space_path("quick.toml") == Path("quick.toml")
    assert load_space(resolve_space_path("quick.toml")).name == "t"


@pytest.mark.parametrize("arg", ["fashion_mnsit", "nope/x.toml", ""])
def test_resolve_space_path_missing(arg: str) -> None:
    shipped = "fashion_mnist, fashion_mnist_stages, mnist, mobilenet_v1_paper, quick"
    with pytest.raises(SpaceError, match=shipped):
        resolve_space_path(arg)


def test_configs_are_re_exported() -> None:
    from mobisearch import config, space

    assert space.TrainConfig is config.TrainConfig and space.DataConfig is config.DataConfig
    assert space.LatencyConfig is config.LatencyConfig and space.SpaceError is config.SpaceError
    assert {"DataConfig", "TrainConfig", "LatencyConfig", "SpaceError"} <= set(space.__all__)


def test_arch_is_arch_spec() -> None:
    assert isinstance(load_space(resolve_space_path("quick")).base, ArchSpec)


# --- purity ----------------------------------------------------------------------------


def test_import_is_pure() -> None:
    code = (
        "import sys, mobisearch.space, mobisearch.stages, mobisearch.candidates, mobisearch.ids; "
        "bad = sorted(m for m in ('jax', 'flax', 'optax', 'optuna') if m in sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
