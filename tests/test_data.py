"""Tests of `mobisearch.data`: real files, a real local HTTP server, no mocks.

Every test runs with the user cache folder, the environment variables and the system folders
pointed at `tmp_path` (the autouse `isolated` fixture), so nothing here reads or writes the
real `~/.cache` or depends on what the machine has installed, except the tests of the real
Debian Fashion-MNIST copy, which skip when `dataset-fashion-mnist` is not installed.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mobisearch import data
from mobisearch.data import (
    FILE_STEMS,
    DataError,
    Dataset,
    cache_dir,
    download_dataset,
    image_mean_std,
    load_dataset,
    locate_dataset,
    normalize_images,
    resize_images,
    resize_matrix,
)

REAL_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_real_fashion = pytest.mark.skipif(
    not all((REAL_FASHION_DIR / f"{s}.gz").is_file() for s in FILE_STEMS),
    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)


# --------------------------------------------------------------------------------------
# Helpers: small IDX files written here


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """The IDX encoding of a uint8 array (magic 0x0803 for 3-D, 0x0801 for 1-D)."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 + a.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in a.shape)
    return header + a.tobytes()


def write_file(path: Path, payload: bytes, *, gz: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes (and so their md5) reproducible.
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


@dataclasses.dataclass
class Files:
    """A small dataset written as the four IDX files."""

    folder: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def path(self, i: int) -> Path:
        found = [p for p in self.folder.iterdir() if p.name.startswith(FILE_STEMS[i])]
        assert len(found) == 1
        return found[0]


def write_dataset(folder: Path, n_train: int = 40, n_test: int = 10, *, gz: bool = True) -> Files:
    """Write the four IDX files. Image i of the train set encodes i in its first two pixels,
    so a split can be traced back to indices; labels are i % 10."""
    rng = np.random.default_rng(n_train)
    x_train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    x_train[:, 0, 0], x_train[:, 0, 1] = np.arange(n_train) // 256, np.arange(n_train) % 256
    y_train = (np.arange(n_train) % 10).astype(np.uint8)
    x_test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    y_test = (np.arange(n_test) % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    for stem, arr in zip(FILE_STEMS, (x_train, y_train, x_test, y_test), strict=True):
        write_file(folder / f"{stem}{suffix}", idx_bytes(arr), gz=gz)
    return Files(folder, x_train, y_train, x_test, y_test)


def train_indices(x: np.ndarray) -> np.ndarray:
    """The original train-set indices of images written by `write_dataset`."""
    return x[:, 0, 0, 0].astype(np.int64) * 256 + x[:, 0, 1, 0]


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the cache, the environment and the system folders at `tmp_path`."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    for var in (data.ENV_DATA_DIR, data.ENV_DATA_URL, "http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    for name in data.SYSTEM_DIRS:
        monkeypatch.setitem(data.SYSTEM_DIRS, name, tmp_path / "system" / name)
    return tmp_path


# --------------------------------------------------------------------------------------
# The real Fashion-MNIST files (Debian's copy)


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    # Explicit data_dir: module-scoped fixtures cannot use the per-test `isolated` fixture.
    return load_dataset("fashion_mnist", data_dir=REAL_FASHION_DIR, download=False)


@needs_real_fashion
def test_real_fashion_mnist_loads(fashion: Dataset) -> None:
    assert fashion.name == "fashion_mnist" and fashion.num_classes == 10
    assert fashion.source == REAL_FASHION_DIR
    assert fashion.x_train.shape == (55_000, 28, 28, 1)
    assert fashion.x_val.shape == (5_000, 28, 28, 1)
    assert fashion.x_test.shape == (10_000, 28, 28, 1)
    for x in (fashion.x_train, fashion.x_val, fashion.x_test):
        assert x.dtype == np.uint8 and not x.flags.writeable
    for y in (fashion.y_train, fashion.y_val, fashion.y_test):
        assert y.dtype == np.int32 and y.min() == 0 and y.max() == 9
    # Fashion-MNIST is exactly balanced: 6,000 per class in train, 1,000 in test.
    pool = np.bincount(np.concatenate([fashion.y_train, fashion.y_val]), minlength=10)
    np.testing.assert_array_equal(pool, 6000)
    np.testing.assert_array_equal(np.bincount(fashion.y_test, minlength=10), 1000)
    assert np.bincount(fashion.y_val, minlength=10).min() > 400  # a random 5,000 is near 500
    assert 60 < fashion.x_train.mean() < 90  # the usual mean pixel, about 72.9
    assert len(fashion.class_names) == 10 and fashion.class_names[9] == "Ankle boot"
    assert "train=55000, val=5000, test=10000" in repr(fashion)


@needs_real_fashion
def test_real_fashion_mnist_split_and_stats(fashion: Dataset) -> None:
    again = load_dataset(
        "fashion_mnist", data_dir=REAL_FASHION_DIR, validation_size=10_000, train_size=1000
    )
    assert (len(again.x_train), len(again.x_val)) == (1000, 10_000)
    np.testing.assert_array_equal(again.x_test, fashion.x_test)  # the test split is untouched
    mean, std = image_mean_std(fashion.x_train)
    assert mean.shape == std.shape == (1,)
    np.testing.assert_allclose(mean, 0.286, atol=0.01)
    np.testing.assert_allclose(std, 0.353, atol=0.01)
    x = fashion.x_val.astype(np.float64) / 255  # the histogram route equals the direct one
    val_mean, val_std = image_mean_std(fashion.x_val)
    np.testing.assert_allclose([val_mean[0], val_std[0]], [x.mean(), x.std()], rtol=1e-6)


@needs_real_fashion
def test_system_folder_is_found_last(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion_mnist", REAL_FASHION_DIR)
    assert locate_dataset("fashion_mnist") == REAL_FASHION_DIR
    write_dataset(cache_dir("fashion_mnist"))
    assert locate_dataset("fashion_mnist") == cache_dir("fashion_mnist")


# --------------------------------------------------------------------------------------
# Splits


def test_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    files = write_dataset(tmp_path / "d", n_train=300)
    a = load_dataset("mnist", data_dir=files.folder, validation_size=50, split_seed=3)
    b = load_dataset("mnist", data_dir=files.folder, validation_size=50, split_seed=3)
    c = load_dataset("mnist", data_dir=files.folder, validation_size=50, split_seed=4)
    train, val = train_indices(a.x_train), train_indices(a.x_val)
    assert len(train) == 250 and len(val) == 50
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(300))
    # Labels travel with their images; the test split is the file's, in order.
    np.testing.assert_array_equal(a.y_train, files.y_train[train])
    np.testing.assert_array_equal(a.x_val[..., 0], files.x_train[val])
    np.testing.assert_array_equal(a.x_test[..., 0], files.x_test)
    np.testing.assert_array_equal(a.y_test, files.y_test)
    # Same seed, same split; another seed, another split.
    np.testing.assert_array_equal(b.x_val, a.x_val)
    np.testing.assert_array_equal(b.x_train, a.x_train)
    assert set(train_indices(c.x_val)) != set(val)
    assert a.split_seed == 3


def test_train_size_subsamples_the_train_part(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "d", n_train=300).folder
    full = load_dataset("mnist", data_dir=folder, validation_size=50)
    small = load_dataset("mnist", data_dir=folder, validation_size=50, train_size=20)
    larger = load_dataset("mnist", data_dir=folder, validation_size=50, train_size=100)
    np.testing.assert_array_equal(small.x_val, full.x_val)  # the subsample never moves val
    small_idx, larger_idx = set(train_indices(small.x_train)), set(train_indices(larger.x_train))
    assert len(small_idx) == 20 and len(larger_idx) == 100
    assert small_idx <= larger_idx <= set(train_indices(full.x_train))
    again = load_dataset("mnist", data_dir=folder, validation_size=50, train_size=20)
    np.testing.assert_array_equal(again.x_train, small.x_train)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"validation_size": 40}, r"`validation_size` \(=40\) must be smaller than the 40"),
        ({"validation_size": -1}, r"`validation_size` \(=-1\) must be >= 0"),
        ({"validation_size": 30, "train_size": 11}, r"`train_size` \(=11\) must be at most"),
        ({"train_size": 0}, r"`train_size` \(=0\) must be >= 1"),
        ({"split_seed": 1.5}, r"`split_seed` \(=1.5\) must be an integer"),
    ],
)
def test_bad_split_arguments(tmp_path: Path, kwargs: dict[str, float], match: str) -> None:
    folder = write_dataset(tmp_path / "d", n_train=40).folder
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist", data_dir=folder, **kwargs)  # type: ignore[arg-type]


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match=r"`name` \(='cifar10'\) must be one of 'fashion_mnist'"):
        load_dataset("cifar10")


# --------------------------------------------------------------------------------------
# Where files are found


@pytest.fixture
def four_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A different-sized copy of fashion_mnist in each place, told apart by its size."""
    places = {
        "data_dir": tmp_path / "arg",
        "env": tmp_path / "env",
        "cache": cache_dir("fashion_mnist"),
        "system": data.SYSTEM_DIRS["fashion_mnist"],
    }
    for i, folder in enumerate(places.values()):
        write_dataset(folder, n_train=20 + 10 * i)
    monkeypatch.setenv(data.ENV_DATA_DIR, str(places["env"]))
    return places


def pool_size(ds: Dataset) -> int:
    return len(ds.x_train) + len(ds.x_val)


def test_search_order(four_copies: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def load(**kw: object) -> Dataset:
        return load_dataset("fashion_mnist", validation_size=5, download=False, **kw)  # type: ignore[arg-type]

    ds = load(data_dir=four_copies["data_dir"])
    assert (ds.source, pool_size(ds)) == (four_copies["data_dir"], 20)
    ds = load()
    assert (ds.source, pool_size(ds)) == (four_copies["env"], 30)
    monkeypatch.delenv(data.ENV_DATA_DIR)
    ds = load()
    assert (ds.source, pool_size(ds)) == (four_copies["cache"], 40)
    for f in four_copies["cache"].iterdir():
        f.unlink()
    ds = load()
    assert (ds.source, pool_size(ds)) == (four_copies["system"], 50)


@pytest.mark.parametrize("named", ["data_dir", "env"])
def test_named_folder_missing_a_file_is_an_error(four_copies: dict[str, Path], named: str) -> None:
    """A --data-dir (or $MOBISEARCH_DATA_DIR) holding only some files names the missing one
    instead of loading the dataset from another folder without a word."""
    (four_copies[named] / "t10k-labels-idx1-ubyte.gz").unlink()
    data_dir = four_copies["data_dir"] if named == "data_dir" else None
    with pytest.raises(DataError, match="but not t10k-labels-idx1-ubyte") as e:
        locate_dataset("fashion_mnist", data_dir=data_dir)
    assert str(four_copies[named]) in str(e.value)


def test_cache_folder_missing_a_file_is_skipped(
    four_copies: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(data.ENV_DATA_DIR)
    (four_copies["cache"] / "t10k-labels-idx1-ubyte.gz").unlink()
    assert locate_dataset("fashion_mnist") == four_copies["system"]


@pytest.mark.parametrize("sub", ["fashion_mnist", "fashion-mnist"])
def test_parent_folder_with_named_subfolder(tmp_path: Path, sub: str) -> None:
    write_dataset(tmp_path / "parent" / sub)
    assert locate_dataset("fashion_mnist", data_dir=tmp_path / "parent") == (
        tmp_path / "parent" / sub
    )


def test_env_var_parent_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dataset(tmp_path / "datasets" / "mnist")
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "datasets"))
    assert load_dataset("mnist", validation_size=5).source == tmp_path / "datasets" / "mnist"


def test_cache_folder_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir("mnist") == tmp_path / "xdg-cache" / "mobisearch" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("mnist") == tmp_path / "home" / ".cache" / "mobisearch" / "mnist"


def test_uncompressed_files_load(tmp_path: Path) -> None:
    files = write_dataset(tmp_path / "raw", gz=False)
    ds = load_dataset("mnist", data_dir=files.folder, validation_size=0)
    np.testing.assert_array_equal(ds.x_train[..., 0], files.x_train)
    np.testing.assert_array_equal(ds.y_test, files.y_test)


@pytest.mark.parametrize("via", ["argument", "env"])
def test_missing_named_folder_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    missing = tmp_path / "no-such-dir"
    kwargs = {}
    if via == "argument":
        kwargs["data_dir"] = missing
    else:
        monkeypatch.setenv(data.ENV_DATA_DIR, str(missing))
    with pytest.raises(DataError, match="no such folder") as e:
        load_dataset("mnist", download=False, **kwargs)  # type: ignore[arg-type]
    assert str(missing) in str(e.value)


# --------------------------------------------------------------------------------------
# Downloading, against a real HTTP server on 127.0.0.1


@dataclasses.dataclass
class Server:
    url: str
    root: Path
    requests: list[str]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "srv"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep the test output clean

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}/", root, requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def served_md5(srv: Server) -> dict[str, str]:
    """Write a small dataset into the server's folder; return the md5 of each .gz file."""
    write_dataset(srv.root, n_train=30)
    return {
        f"{s}.gz": hashlib.md5((srv.root / f"{s}.gz").read_bytes()).hexdigest() for s in FILE_STEMS
    }


def test_download_lands_in_cache_and_loads(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(data.MD5_CHECKSUMS, "mnist", served_md5(server))
    ds = load_dataset("mnist", validation_size=5, base_url=server.url)
    cache = cache_dir("mnist")
    assert ds.source == cache and pool_size(ds) == 30
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s}.gz" for s in FILE_STEMS)
    for s in FILE_STEMS:
        assert (cache / f"{s}.gz").read_bytes() == (server.root / f"{s}.gz").read_bytes()
    assert len(server.requests) == 4
    # The next load finds the cached copy and does not touch the network.
    assert load_dataset("mnist", validation_size=5, base_url=server.url).source == cache
    assert len(server.requests) == 4


def test_download_url_from_env_and_good_files_kept(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    md5 = served_md5(server)
    monkeypatch.setenv(data.ENV_DATA_URL, server.url.rstrip("/"))  # the slash is optional
    dest = tmp_path / "dl"
    write_dataset(dest, n_train=30)  # the same bytes as served: three are kept, one fetched
    (dest / "train-labels-idx1-ubyte.gz").unlink()
    assert download_dataset("mnist", dest_dir=dest, md5=md5) == dest
    assert server.requests == ["/train-labels-idx1-ubyte.gz"]


def test_bad_checksum_raises_and_leaves_no_file(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    md5 = served_md5(server)
    md5["train-labels-idx1-ubyte.gz"] = "0" * 32
    monkeypatch.setitem(data.MD5_CHECKSUMS, "mnist", md5)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", base_url=server.url)
    actual = hashlib.md5((server.root / "train-labels-idx1-ubyte.gz").read_bytes()).hexdigest()
    msg = str(e.value)
    assert "train-labels-idx1-ubyte.gz" in msg and "0" * 32 in msg and actual in msg
    # The verified file before it stays; the bad one and its temp file are gone.
    assert [p.name for p in cache_dir("mnist").iterdir()] == ["train-images-idx3-ubyte.gz"]


def test_http_error_gives_the_options(server: Server) -> None:
    # The server's folder is empty: every file is a 404.
    with pytest.raises(DataError, match="HTTP 404") as e:
        load_dataset("mnist", base_url=server.url)
    assert "MOBISEARCH_DATA_DIR" in str(e.value)
    assert list(cache_dir("mnist").iterdir()) == []


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_offline_without_a_copy_gives_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.ENV_DATA_URL, closed_port_url())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", data_dir=empty)
    msg = str(e.value)
    assert "refused" in msg.lower()
    for needle in (
        str(empty),
        "--data-dir",
        "MOBISEARCH_DATA_DIR",
        str(cache_dir("fashion_mnist")),
        "apt-get install dataset-fashion-mnist",
        "go online",
        "train-images-idx3-ubyte.gz",
    ):
        assert needle in msg, needle
    assert not any(cache_dir("fashion_mnist").iterdir())


def test_download_off_gives_the_options() -> None:
    with pytest.raises(DataError, match="downloading is off") as e:
        load_dataset("mnist", download=False)
    assert "MOBISEARCH_DATA_DIR" in str(e.value) and "go online" in str(e.value)
    assert not cache_dir("mnist").exists()


def test_download_dataset_offline() -> None:
    with pytest.raises(DataError, match="not found locally, and downloading http"):
        download_dataset("mnist", base_url=closed_port_url(), timeout_s=5)


# --------------------------------------------------------------------------------------
# Corrupt files: each names the file and what is wrong


def _truncate_gz(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def _flip_gz(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))


CORRUPTIONS = {
    "truncated gz": (0, _truncate_gz, "corrupt or truncated gzip"),
    "corrupted gz": (0, _flip_gz, "corrupt or truncated gzip"),
    "not gzip": (1, lambda p: p.write_bytes(b"<html>404</html>"), "not gzip data"),
    "empty raw": (1, lambda p: write_file(p, b""), "0 bytes, too short"),
    "images magic": (
        2,
        lambda p: write_file(p, idx_bytes(np.zeros((10, 28, 28)), magic=2049)),
        r"magic number is 2049 \(0x00000801\), expected 2051",
    ),
    "labels magic": (
        3,
        lambda p: write_file(p, idx_bytes(np.zeros(10), magic=2051)),
        r"magic number is 2051 \(0x00000803\), expected 2049",
    ),
    "short data": (
        0,
        lambda p: write_file(p, idx_bytes(np.zeros((40, 28, 28)))[:-28]),
        "the header says 40x28x28 = 31360 bytes of images, but the file holds 31332",
    ),
    "trailing data": (
        1,
        lambda p: write_file(p, idx_bytes(np.zeros(40)) + b"\0"),
        "the header says 40 = 40 bytes of labels, but the file holds 41",
    ),
    "short header": (2, lambda p: write_file(p, b"\0\0\x08\x03\0\0"), "too short for an IDX"),
    "length mismatch": (
        1,
        lambda p: write_file(p, idx_bytes(np.zeros(39))),
        "holds 39 labels, but",
    ),
    "label range": (
        3,
        lambda p: write_file(p, idx_bytes(np.array([0, 1, 2, 3, 4, 5, 6, 7, 12, 9]))),
        "label 12 at index 8 is out of range; expected 0 <= label < 10",
    ),
    "test size": (
        2,
        lambda p: write_file(p, idx_bytes(np.zeros((10, 32, 32)))),
        "images are 32x32, but the training images",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_file_raises(tmp_path: Path, case: str) -> None:
    files = write_dataset(tmp_path / "d", n_train=40, n_test=10)
    index, corrupt, match = CORRUPTIONS[case]
    path = files.path(index)
    corrupt(path)
    with pytest.raises(DataError, match=match) as e:
        load_dataset("fashion_mnist", data_dir=files.folder, validation_size=5)
    assert str(path) in str(e.value)


def test_corrupt_local_copy_is_not_skipped(four_copies: dict[str, Path]) -> None:
    # A broken copy in a higher-priority place is an error, not a reason to use the next one.
    _truncate_gz(four_copies["data_dir"] / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion_mnist", data_dir=four_copies["data_dir"], validation_size=5)


# --------------------------------------------------------------------------------------
# Resizing and normalisation


@pytest.mark.parametrize(
    ("shape", "resolution"),
    [
        ((4, 28, 28, 1), 7),  # 4x down: skips pixels without antialiasing
        ((4, 28, 28, 1), 13),
        ((4, 28, 28, 1), 20),
        ((4, 28, 28, 1), 28),  # identity
        ((4, 28, 28, 1), 32),
        ((4, 28, 28, 1), 45),
        ((2, 28, 28, 1), 224),
        ((3, 17, 23, 3), 16),  # non-square, three channels
        ((3, 17, 23, 3), 40),
    ],
)
def test_resize_matches_jax(shape: tuple[int, ...], resolution: int) -> None:
    import jax
    import jax.numpy as jnp

    x = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    got = resize_images(x, resolution)
    n, _, _, c = shape
    want = jax.image.resize(
        jnp.asarray(x, jnp.float32) / 255,
        (n, resolution, resolution, c),
        "linear",
        antialias=False,
    )
    assert got.dtype == np.float32 and got.shape == (n, resolution, resolution, c)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=0)
    assert 0 <= got.min() and got.max() <= 1


def test_resize_matrix_rows_are_convex() -> None:
    for m, n in [(28, 7), (28, 28), (28, 224), (1, 5), (5, 1)]:
        w = resize_matrix(m, n)
        assert w.shape == (n, m) and (w >= 0).all()
        np.testing.assert_allclose(w.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_array_equal(resize_matrix(28, 28), np.eye(28, dtype=np.float32))


@pytest.mark.parametrize(
    ("x", "resolution", "match"),
    [
        (np.zeros((2, 28, 28, 1), np.float32), 32, r"dtype float32\) must be uint8 images"),
        (np.zeros((28, 28, 1), np.uint8), 32, r"shape \(28, 28, 1\)"),
        (np.zeros((2, 28, 28, 1), np.uint8), 0, r"`resolution` \(=0\) must be >= 1"),
    ],
)
def test_resize_rejects_bad_input(x: np.ndarray, resolution: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resize_images(x, resolution)


def test_normalize_with_training_stats() -> None:
    ds = load_dataset("synthetic")
    mean, std = image_mean_std(ds.x_train)
    z = normalize_images(resize_images(ds.x_train, 28), mean, std)
    assert z.dtype == np.float32 and z.shape == ds.x_train.shape
    np.testing.assert_allclose([z.mean(), z.std()], [0, 1], atol=1e-4)
    with pytest.raises(ValueError, match="`std`"):
        normalize_images(z, mean, np.zeros(1))


# --------------------------------------------------------------------------------------
# Synthetic data and purity


def test_synthetic_is_deterministic_and_balanced() -> None:
    a = load_dataset("synthetic")
    b = load_dataset("synthetic")
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (3500, 500, 1000)
    assert a.source is None and a.num_classes == 10 and a.image_shape == (28, 28, 1)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(np.bincount(a.y_test), 100)
    np.testing.assert_array_equal(np.bincount(np.concatenate([a.y_train, a.y_val])), 400)
    c = load_dataset("synthetic", split_seed=1, validation_size=1000, train_size=200)
    assert (len(c.x_train), len(c.x_val)) == (200, 1000)
    np.testing.assert_array_equal(c.x_test, a.x_test)
    assert not np.array_equal(c.y_val[:500], a.y_val)


def test_synthetic_classes_differ() -> None:
    # Class means are far apart relative to the within-class spread of the means: learnable.
    ds = load_dataset("synthetic")
    x = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float64)
    means = np.stack([x[ds.y_train == k].mean(0) for k in range(10)])
    dists = np.linalg.norm(means[:, None] - means[None], axis=-1)[~np.eye(10, dtype=bool)]
    assert dists.min() > 300


def test_data_module_does_not_import_jax() -> None:
    code = "import sys, mobisearch.data; assert 'jax' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
