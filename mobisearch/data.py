"""Small image-classification datasets held in memory as numpy arrays.

`load_dataset(name)` returns a `Dataset` with train / validation / test splits of uint8 NHWC
images `[n, 28, 28, 1]` and int32 labels. Three datasets are known:

* ``"fashion_mnist"``: Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747), 60,000 train and
  10,000 test images in 10 classes.
* ``"mnist"``: MNIST handwritten digits, same shapes.
* ``"synthetic"``: a small, seeded, learnable stand-in of the same shapes (4,000 train and
  1,000 test images of ten noisy, shifted geometric patterns), built in memory in about
  0.1 s for tests and smoke runs.

Splits. The validation split is carved from the official training set by a seeded
permutation (`split_seed`), so the same seed always gives the same split and validation
and train never overlap. The official test set is returned unchanged and is never used
for the split. `train_size` optionally keeps a seeded subsample of the remaining train
part; smaller subsamples are subsets of larger ones for the same seed.

Where the files are looked for, first match wins (a folder matches when it holds all four
IDX files, each either gzipped, ``train-images-idx3-ubyte.gz``, or not,
``train-images-idx3-ubyte``):

1. the `data_dir` argument (the CLI's ``--data-dir``);
2. the ``MOBISEARCH_DATA_DIR`` environment variable;
3. the user cache folder, ``$XDG_CACHE_HOME/mobisearch/<name>`` or
   ``~/.cache/mobisearch/<name>`` (where downloads go);
4. the system folder: ``/usr/share/datasets/fashion-mnist/`` (Debian's package
   ``dataset-fashion-mnist``) or ``/usr/share/datasets/mnist/``.

For 1 and 2, the folder may hold the files itself or be a parent with a ``<name>/``
subfolder (``fashion-mnist/`` is accepted too). A folder named in 1 or 2 that does not exist,
or that holds some of the four files but not all, is an error rather than silently skipped:
the dataset would otherwise come from another folder without a word.

If none holds the files and `download` is true, they are downloaded into the cache folder
from the official location (or ``MOBISEARCH_DATA_URL``). Each file is written to a
temporary file in the same folder, checked against the published md5 and only then moved
into place, so a failed or interrupted download never leaves a bad file behind.

Validation. Local copies are checked structurally, not by checksum: gzip integrity, the
IDX magic number (2051 for images, 2049 for labels), dimensions against the file size,
matching image and label counts and labels within range. (Debian recompressed its copies,
so their ``.gz`` md5 differ from the published ones although the contents are the same.)
Any problem raises `DataError` naming the file and what is wrong.

Pure module: numpy and the standard library only.

Examples:
    >>> data = load_dataset("synthetic", validation_size=500, split_seed=0)
    >>> len(data.x_train), len(data.x_val), len(data.x_test), data.image_shape
    (3500, 500, 1000, (28, 28, 1))
    >>> data.x_train.dtype, data.y_train.dtype
    (dtype('uint8'), dtype('int32'))
    >>> resize_images(data.x_val[:2], 32).shape
    (2, 32, 32, 1)
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.client
import logging
import math
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "MD5_CHECKSUMS",
    "DataError",
    "Dataset",
    "cache_dir",
    "download_dataset",
    "image_mean_std",
    "load_dataset",
    "locate_dataset",
    "normalize_images",
    "resize_images",
    "resize_matrix",
]

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("fashion_mnist", "mnist", "synthetic")

ENV_DATA_DIR = "MOBISEARCH_DATA_DIR"
ENV_DATA_URL = "MOBISEARCH_DATA_URL"

# The four IDX files, in the order (train images, train labels, test images, test labels).
FILE_STEMS: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Official download locations (the ones the datasets' authors publish).
BASE_URLS: dict[str, str] = {
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}

# Published md5 of the .gz files: Fashion-MNIST from its README, MNIST from torchvision's
# `MNIST.resources`. Only downloads are checked against these (see the module docstring).
MD5_CHECKSUMS: dict[str, dict[str, str]] = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}

# Folders where distributions install the files (Debian: `dataset-fashion-mnist`).
SYSTEM_DIRS: dict[str, Path] = {
    "fashion_mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}

# Subfolder names accepted under a parent folder given by `data_dir` or the env var.
_SUBDIRS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("fashion_mnist", "fashion-mnist"),
    "mnist": ("mnist",),
}

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": tuple(str(d) for d in range(10)),
    "synthetic": (
        "hbar",
        "vbar",
        "diag",
        "antidiag",
        "ring",
        "square",
        "plus",
        "cross",
        "checker",
        "dots",
    ),
}

# Default validation sizes: the usual 55,000 / 5,000 split of the 60,000 training images
# (as in TensorFlow's MNIST tutorial), and 1/8 of the synthetic pool.
_DEFAULT_VALIDATION_SIZE: dict[str, int] = {"fashion_mnist": 5000, "mnist": 5000, "synthetic": 500}

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """A dataset could not be found, downloaded or read; the message says how to fix it."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Dataset:
    """Train / validation / test splits of one image-classification dataset.

    Images are uint8 NHWC `[n, h, w, c]` (`[n, 28, 28, 1]` for the known datasets) and
    labels int32 `[n]` in `[0, num_classes)`. The arrays are read-only; copy one before
    changing it in place.

    Attributes:
      name: the dataset's name, e.g. `"fashion_mnist"`.
      num_classes: number of classes.
      x_train: training images (the official train set minus the validation split).
      y_train: training labels.
      x_val: validation images, carved from the official train set by `split_seed`.
      y_val: validation labels.
      x_test: the official test images, untouched.
      y_test: the official test labels.
      source: the folder the files were read from (None for `"synthetic"`).
      class_names: one display name per class.
      split_seed: the seed of the validation split and the train subsample.
    """

    name: str
    num_classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: Path | None
    class_names: tuple[str, ...] = ()
    split_seed: int = 0

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image, `(h, w, c)`."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        source = None if self.source is None else str(self.source)
        return (
            f"Dataset(name={self.name!r}, train={len(self.x_train)}, val={len(self.x_val)}, "
            f"test={len(self.x_test)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, source={source!r})"
        )


# --------------------------------------------------------------------------------------
# Loading


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    validation_size: int | None = None,
    split_seed: int = 0,
    train_size: int | None = None,
    download: bool = True,
    base_url: str | None = None,
) -> Dataset:
    """Load a dataset and split off a seeded validation set.

    See the module docstring for where the files are looked for and how they are checked.

    Args:
      name: `"fashion_mnist"`, `"mnist"` or `"synthetic"`.
      data_dir: a folder holding the four IDX files, or a parent with a `<name>/` subfolder.
        Looked at first.
      validation_size: images moved from the official train set into the validation split.
        None means 5,000 for the 60,000-image sets and 500 for `"synthetic"`.
      split_seed: seed of the validation permutation and of the `train_size` subsample.
      train_size: keep only this many (seeded) images of the remaining train part; None
        keeps all.
      download: download into the cache folder when no local copy is found.
      base_url: where to download from; default `$MOBISEARCH_DATA_URL`, else the official
        location.

    Returns:
      The `Dataset`.

    Raises:
      ValueError: an unknown `name` or a bad split size.
      DataError: the files cannot be found, downloaded or read (a `ValueError` too).
    """
    if name not in DATASETS:
        raise ValueError(f"`name` (={name!r}) must be one of {', '.join(map(repr, DATASETS))}")
    if validation_size is None:
        validation_size = _DEFAULT_VALIDATION_SIZE[name]
    _check_count("validation_size", validation_size, lo=0)
    _check_count("split_seed", split_seed, lo=0)
    if train_size is not None:
        _check_count("train_size", train_size, lo=1)

    source: Path | None
    if name == "synthetic":
        x_pool, y_pool, x_test, y_test = _synthetic_arrays()
        source = None
    else:
        source = locate_dataset(name, data_dir=data_dir)
        if source is None:
            if not download:
                raise DataError(_not_found_message(name, data_dir, reason="downloading is off"))
            try:
                source = _download(name, None, base_url, None, timeout_s=60.0)
            except _NetworkError as e:
                raise DataError(_not_found_message(name, data_dir, reason=str(e))) from e
        x_pool, y_pool, x_test, y_test = _read_idx_dataset(source, len(CLASS_NAMES[name]))

    n = len(x_pool)
    if validation_size >= n:
        raise ValueError(
            f"`validation_size` (={validation_size}) must be smaller than the {n} training "
            f"images of {name!r}"
        )
    # One permutation serves both: the first `validation_size` indices are the validation
    # split, the next `train_size` the train subsample, so subsamples are nested.
    perm = np.random.default_rng(split_seed).permutation(n)
    val_idx = np.sort(perm[:validation_size])
    rest = perm[validation_size:]
    if train_size is not None:
        if train_size > len(rest):
            raise ValueError(
                f"`train_size` (={train_size}) must be at most the {len(rest)} training images "
                f"left after a validation split of {validation_size}"
            )
        rest = rest[:train_size]
    train_idx = np.sort(rest)

    return Dataset(
        name=name,
        num_classes=len(CLASS_NAMES[name]),
        x_train=_readonly(x_pool[train_idx]),
        y_train=_readonly(y_pool[train_idx]),
        x_val=_readonly(x_pool[val_idx]),
        y_val=_readonly(y_pool[val_idx]),
        x_test=_readonly(x_test),
        y_test=_readonly(y_test),
        source=source,
        class_names=CLASS_NAMES[name],
        split_seed=split_seed,
    )


def cache_dir(name: str) -> Path:
    """mobisearch's user cache folder `<name>` (a dataset, `jax`, `kernels`):
    `$XDG_CACHE_HOME/mobisearch/<name>`.

    Falls back to `~/.cache/mobisearch/<name>` when `XDG_CACHE_HOME` is unset, empty or
    relative (as the XDG spec says). The folder may not exist yet.
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "mobisearch" / name


def locate_dataset(name: str, *, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Find the folder holding a dataset's four IDX files, in the documented order.

    Args:
      name: `"fashion_mnist"` or `"mnist"`.
      data_dir: a folder (or a parent of a `<name>/` folder) to look at first.

    Returns:
      The first folder holding all four files, or None.

    Raises:
      DataError: `data_dir` or `$MOBISEARCH_DATA_DIR` names a folder that does not exist,
        or one that holds some of the four files but not all.
    """
    for folder, origin in _search_dirs(name, data_dir):
        if _find_files(folder) is not None:
            return folder
        if origin in ("data_dir argument", f"${ENV_DATA_DIR}"):
            _check_not_partial(folder, origin)
    return None


def _check_not_partial(folder: Path, origin: str) -> None:
    present = [s for s in FILE_STEMS if (folder / f"{s}.gz").is_file() or (folder / s).is_file()]
    if present:
        missing = [s for s in FILE_STEMS if s not in present]
        raise DataError(
            f"{folder} ({origin}): holds {', '.join(present)} but not {', '.join(missing)}; "
            "expected all four IDX files (.gz or not)"
        )


def _search_dirs(name: str, data_dir: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """Candidate folders in search order, each with where it came from."""
    if name not in SYSTEM_DIRS:
        raise ValueError(f"`name` (={name!r}) must be one of {', '.join(map(repr, BASE_URLS))}")
    out: list[tuple[Path, str]] = []
    env = os.environ.get(ENV_DATA_DIR, "")
    for root, origin in ((data_dir, "data_dir argument"), (env or None, f"${ENV_DATA_DIR}")):
        if root is None:
            continue
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise DataError(f"{folder} ({origin}): no such folder")
        out.append((folder, origin))
        out.extend((folder / sub, origin) for sub in _SUBDIRS[name])
    out.append((cache_dir(name), "cache folder"))
    out.append((SYSTEM_DIRS[name], "system folder"))
    return out


def _find_files(folder: Path) -> list[Path] | None:
    """The four IDX files in `folder` (gzipped preferred), or None unless all are there."""
    found = []
    for stem in FILE_STEMS:
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            return None
    return found


def _read_idx_dataset(
    folder: Path, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and check the four IDX files of `folder`: `(x_train, y_train, x_test, y_test)`."""
    paths = _find_files(folder)
    if paths is None:
        raise DataError(f"{folder}: does not hold all of {', '.join(FILE_STEMS)} (.gz or not)")
    x_train_path, y_train_path, x_test_path, y_test_path = paths
    x_train = _read_idx(x_train_path, _IDX_IMAGES_MAGIC)
    y_train = _read_labels(y_train_path, num_classes, len(x_train), x_train_path)
    x_test = _read_idx(x_test_path, _IDX_IMAGES_MAGIC)
    y_test = _read_labels(y_test_path, num_classes, len(x_test), x_test_path)
    if x_test.shape[1:] != x_train.shape[1:]:
        raise DataError(
            f"{x_test_path}: images are {x_test.shape[1]}x{x_test.shape[2]}, but the training "
            f"images in {x_train_path} are {x_train.shape[1]}x{x_train.shape[2]}"
        )
    return x_train[..., None], y_train, x_test[..., None], y_test


def _read_labels(path: Path, num_classes: int, num_images: int, images_path: Path) -> np.ndarray:
    labels = _read_idx(path, _IDX_LABELS_MAGIC)
    if len(labels) != num_images:
        raise DataError(
            f"{path}: holds {len(labels)} labels, but {images_path} holds {num_images} images"
        )
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise DataError(
            f"{path}: label {int(labels[bad[0]])} at index {int(bad[0])} is out of range; "
            f"expected 0 <= label < {num_classes} ({bad.size} labels out of range)"
        )
    return labels.astype(np.int32)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or not, told apart by content) and check its structure.

    The IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian int32 magic number
    `0x0000TTNN` (TT = 0x08 for unsigned bytes, NN = number of dimensions), NN big-endian
    int32 sizes, then the data in C order.
    """
    kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from e
    elif path.suffix == ".gz":
        raise DataError(f"{path}: not gzip data (the first bytes are {raw[:4].hex()})")
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataError(
            f"{path}: IDX magic number is {got} (0x{got:08x}), expected {magic} "
            f"(0x{magic:08x}, IDX {kind})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header of {header}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(dims)
    if len(raw) - header != size:
        shape = "x".join(map(str, dims))
        raise DataError(
            f"{path}: the header says {shape} = {size} bytes of {kind}, but the file holds "
            f"{len(raw) - header} bytes after the header"
        )
    if magic == _IDX_IMAGES_MAGIC and (dims[1] == 0 or dims[2] == 0):
        raise DataError(f"{path}: images of size {dims[1]}x{dims[2]}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# --------------------------------------------------------------------------------------
# Downloading


def download_dataset(
    name: str,
    *,
    dest_dir: str | os.PathLike[str] | None = None,
    base_url: str | None = None,
    md5: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download a dataset's four `.gz` files, each checked by md5 before it is put in place.

    Every file goes to a temporary file in `dest_dir`, is checked against its md5 and only
    then renamed (`os.replace`) to its final name. Files already in `dest_dir` with the
    right md5 are kept.

    Args:
      name: `"fashion_mnist"` or `"mnist"`.
      dest_dir: where to put the files; default `cache_dir(name)`.
      base_url: the URL the file names are appended to; default `$MOBISEARCH_DATA_URL`,
        else the official location (`BASE_URLS`).
      md5: expected md5 per file name; default `MD5_CHECKSUMS[name]`.
      timeout_s: socket timeout of each request, in seconds.

    Returns:
      The folder holding the files.

    Raises:
      DataError: a network error (the message lists the other ways to provide the files),
        a checksum mismatch (names the file, expected and actual md5) or an unwritable
        folder.
    """
    try:
        return _download(name, dest_dir, base_url, md5, timeout_s)
    except _NetworkError as e:
        raise DataError(_not_found_message(name, None, reason=str(e))) from e


class _NetworkError(Exception):
    """A download failed for a reason outside our control (offline, refused, HTTP error)."""


def _download(
    name: str,
    dest_dir: str | os.PathLike[str] | None,
    base_url: str | None,
    md5: Mapping[str, str] | None,
    timeout_s: float,
) -> Path:
    if name not in BASE_URLS:
        raise ValueError(f"`name` (={name!r}) must be one of {', '.join(map(repr, BASE_URLS))}")
    dest = Path(dest_dir) if dest_dir is not None else cache_dir(name)
    base = base_url or os.environ.get(ENV_DATA_URL) or BASE_URLS[name]
    if not base.endswith("/"):
        base += "/"
    checksums = MD5_CHECKSUMS[name] if md5 is None else md5
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dest}: cannot create the download folder: {e}") from e
    for stem in FILE_STEMS:
        fname = f"{stem}.gz"
        target = dest / fname
        expected = checksums[fname]
        if target.is_file() and _md5_file(target) == expected:
            continue
        url = base + fname
        logger.info("downloading %s to %s", url, target)
        try:
            _download_verified(url, target, expected, timeout_s)
        except urllib.error.HTTPError as e:
            e.close()  # an HTTPError holds the open response; close it, not the GC
            raise _NetworkError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            raise _NetworkError(f"downloading {url} failed: {e.reason}") from e
        except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
            raise _NetworkError(f"downloading {url} failed: {e!r}") from e
    return dest


def _download_verified(url: str, target: Path, expected_md5: str, timeout_s: float) -> None:
    """Stream `url` into a temporary file beside `target`, check its md5, then rename it."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        actual = digest.hexdigest()
        if actual != expected_md5:
            raise DataError(
                f"{target}: checksum mismatch for {url}: expected md5 {expected_md5}, got "
                f"{actual}; the file was not saved"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _not_found_message(name: str, data_dir: str | os.PathLike[str] | None, *, reason: str) -> str:
    """The one error for "no local copy and no download": where we looked, how to fix it."""
    looked = "\n".join(
        f"  - {folder} ({origin})" for folder, origin in _search_dirs(name, data_dir)
    )
    files = ", ".join(f"{stem}.gz" for stem in FILE_STEMS)
    cache = cache_dir(name)
    ways = [
        "pass --data-dir DIR (or `data_dir=DIR`) naming the folder that holds them",
        f"set {ENV_DATA_DIR}=DIR",
        f"copy them into the cache folder {cache}",
    ]
    if name == "fashion_mnist":
        ways.append(
            f"install Debian's package: `apt-get install dataset-fashion-mnist` "
            f"(puts them in {SYSTEM_DIRS[name]})"
        )
    else:
        ways.append(f"put them in the system folder {SYSTEM_DIRS[name]}")
    ways.append(
        f"go online and run again with downloads on: they are fetched from {BASE_URLS[name]} "
        f"(or ${ENV_DATA_URL}) into {cache} and checked by md5"
    )
    steps = "\n".join(f"  {i}. {w}" for i, w in enumerate(ways, 1))
    return (
        f"dataset {name!r} not found locally, and {reason}.\nLooked in:\n{looked}\n"
        f"Provide the four files ({files}; uncompressed also works) in one of these ways:\n"
        f"{steps}"
    )


# --------------------------------------------------------------------------------------
# Synthetic data


@functools.lru_cache(maxsize=2)
def _synthetic_arrays(
    num_train: int = 4000, num_test: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ten geometric 28x28 patterns, randomly shifted, dimmed and noised.

    Classes follow `CLASS_NAMES["synthetic"]`; labels are balanced in each split. A small
    CNN learns it to high accuracy in a few hundred steps, while the shifts (up to 5 pixels)
    and noise keep a linear softmax classifier at about 85% test accuracy, so candidates of
    different capacity rank apart. Built once per process (cached, read-only arrays).
    """
    size, shift = 28, 5
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - (size - 1) / 2
    r = np.hypot(yy, xx)
    protos = np.stack(
        [
            np.abs(yy) < 2.5,  # hbar
            np.abs(xx) < 2.5,  # vbar
            np.abs(yy - xx) < 2.5,  # diag
            np.abs(yy + xx) < 2.5,  # antidiag
            np.abs(r - 8) < 2,  # ring
            (np.abs(yy) < 7) & (np.abs(xx) < 7),  # square
            (np.abs(yy) < 2) & (np.abs(xx) < 9) | (np.abs(xx) < 2) & (np.abs(yy) < 9),  # plus
            ((np.abs(yy - xx) < 2) | (np.abs(yy + xx) < 2)) & (r < 10),  # cross
            ((np.floor(yy / 4) + np.floor(xx / 4)) % 2 == 0) & (r < 10),  # checker
            (np.hypot(yy + 6, xx + 6) < 3.5) | (np.hypot(yy - 6, xx - 6) < 3.5),  # dots
        ]
    ).astype(np.float32)
    padded = np.pad(protos, ((0, 0), (shift, shift), (shift, shift)))
    rng = np.random.default_rng(seed)
    n = num_train + num_test
    labels = np.concatenate([np.arange(num_train) % 10, np.arange(num_test) % 10])
    labels[:num_train] = rng.permutation(labels[:num_train])
    labels[num_train:] = rng.permutation(labels[num_train:])
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
    images = np.empty((n, size, size), np.float32)
    for i in range(n):
        images[i] = padded[labels[i], dy[i] : dy[i] + size, dx[i] : dx[i] + size]
    contrast = rng.uniform(80, 255, size=(n, 1, 1)).astype(np.float32)
    noise = rng.normal(0, 60, size=images.shape).astype(np.float32)
    x = np.clip(images * contrast + noise, 0, 255).round().astype(np.uint8)[..., None]
    y = labels.astype(np.int32)
    x_train, y_train, x_test, y_test = x[:num_train], y[:num_train], x[num_train:], y[num_train:]
    return _readonly(x_train), _readonly(y_train), _readonly(x_test), _readonly(y_test)


# --------------------------------------------------------------------------------------
# Preprocessing


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Bilinear interpolation weights along one axis: float32 `[out_size, in_size]`.

    Half-pixel centres: output pixel `i` samples input coordinate
    `s_i = (i + 0.5) * in_size / out_size - 0.5`, weighted by the triangle kernel
    `max(0, 1 - |s_i - j|)` over input pixels `j`, each row normalised to sum 1 (so samples
    beyond the outer pixel centres repeat the edge). This is exactly
    `jax.image.resize(..., "linear", antialias=False)`, upsampling and downsampling alike;
    without antialiasing, downsampling by more than 2x skips pixels.

    Examples:
        >>> resize_matrix(2, 4)
        array([[1.  , 0.  ],
               [0.75, 0.25],
               [0.25, 0.75],
               [0.  , 1.  ]], dtype=float32)
    """
    _check_count("in_size", in_size, lo=1)
    _check_count("out_size", out_size, lo=1)
    s = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(s[:, None] - np.arange(in_size)[None, :]))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_images(x: np.ndarray, resolution: int) -> np.ndarray:
    """Resize uint8 NHWC images to `resolution` x `resolution`, as float32 in [0, 1].

    Bilinear with half-pixel centres and no antialiasing (see `resize_matrix`), matching
    `jax.image.resize(x / 255, (n, r, r, c), "linear", antialias=False)` to float32
    rounding. The output is `n * r * r * c * 4` bytes: resize in batches at large
    resolutions.

    Args:
      x: uint8 images `[n, h, w, c]`.
      resolution: output height and width in pixels.

    Returns:
      float32 images `[n, resolution, resolution, c]` scaled to [0, 1].

    Examples:
        >>> x = np.array([0, 255], np.uint8).reshape(1, 1, 2, 1)
        >>> resize_images(x, 2)[0, :, :, 0]
        array([[0., 1.],
               [0., 1.]], dtype=float32)
    """
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype != np.uint8:
        shape = getattr(x, "shape", None)
        dtype = getattr(x, "dtype", type(x).__name__)
        raise ValueError(
            f"`x` (shape {shape}, dtype {dtype}) must be uint8 images of shape [n, h, w, c]"
        )
    _check_count("resolution", resolution, lo=1)
    _, h, w, _ = x.shape
    xf = x.astype(np.float32) * np.float32(1 / 255)
    if h == resolution and w == resolution:
        return xf
    wh = resize_matrix(h, resolution)  # [r, h]
    ww = resize_matrix(w, resolution)  # [r, w]
    # [n, h, w, c] -> [n, c, h, w] so both contractions are batched matmuls.
    y = wh @ xf.transpose(0, 3, 1, 2) @ ww.T
    return np.ascontiguousarray(y.transpose(0, 2, 3, 1))


def image_mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of uint8 NHWC images, on the [0, 1] scale.

    Compute them on the training split only, then `normalize_images` every split with them.

    Returns:
      `(mean, std)`, float32 arrays of shape `[c]`.

    Examples:
        >>> x = np.array([0, 255], np.uint8).reshape(2, 1, 1, 1)
        >>> image_mean_std(x)
        (array([0.5], dtype=float32), array([0.5], dtype=float32))
    """
    if x.ndim != 4:
        raise ValueError(f"`x` (shape {x.shape}) must be images of shape [n, h, w, c]")
    if x.dtype != np.uint8:
        raise ValueError(f"`x` (dtype {x.dtype}) must be uint8 images")
    # Exact integer sums of x and x**2 (float64 holds them exactly), in chunks so that no
    # float copy of the whole set is made.
    c = x.shape[-1]
    total, total_sq = np.zeros(c), np.zeros(c)
    for start in range(0, len(x), 4096):
        chunk = x[start : start + 4096].reshape(-1, c).astype(np.float32)
        total += chunk.sum(axis=0, dtype=np.float64)
        total_sq += (chunk * chunk).sum(axis=0, dtype=np.float64)
    count = x.size // c
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return (mean / 255).astype(np.float32), (std / 255).astype(np.float32)


def normalize_images(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """`(x - mean) / std` per channel, for float images in [0, 1] (`resize_images` output).

    Args:
      x: float32 images `[n, h, w, c]`.
      mean: per-channel means `[c]` (from `image_mean_std` of the training split).
      std: per-channel standard deviations `[c]`.

    Returns:
      float32 images of the same shape.
    """
    mean32 = np.asarray(mean, np.float32)
    std32 = np.asarray(std, np.float32)
    if np.any(std32 <= 0):
        raise ValueError(f"`std` (={std32}) must be positive")
    return ((x - mean32) / std32).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------
# Helpers


def _check_count(name: str, value: object, *, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"`{name}` (={value!r}) must be an integer")
    if value < lo:
        raise ValueError(f"`{name}` (={value}) must be >= {lo}")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a
