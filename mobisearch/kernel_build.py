"""Build, cache and load the native CPU kernels (`csrc/*.cc`) as XLA FFI handlers.

The first call of `available()` compiles the sources with the system C++ compiler against
the FFI headers that ship with jaxlib (`jax.ffi.include_dir()`), caches the shared library,
loads it and registers every handler of `TARGETS` for the `cpu` platform. Nothing is
downloaded.

The library is cached under `$MOBISEARCH_KERNEL_DIR` (default
`$XDG_CACHE_HOME/mobisearch/kernels`, i.e. `~/.cache/mobisearch/kernels`), in a folder named
by a hash of the sources, the compiler command, jaxlib's version and this CPU's model and
flags (it is built with `-march=native`), so a stale or foreign build is never loaded.

Without a C++ compiler (`$CXX`, else `c++`) or with `MOBISEARCH_NATIVE=0`, `available()` is
False and `unavailable_reason()` says why; `mobisearch.ops` then runs the XLA backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax

from mobisearch.data import cache_dir

__all__ = [
    "HEADERS",
    "KERNEL_DIR_ENV_VAR",
    "NATIVE_ENV_VAR",
    "SOURCES",
    "TARGETS",
    "available",
    "library_path",
    "unavailable_reason",
]

_CSRC = pathlib.Path(__file__).parent / "csrc"
#: The C++ sources compiled into the library, and the headers they share.
SOURCES = (
    _CSRC / "depthwise.cc",
    _CSRC / "batchnorm.cc",
    _CSRC / "optimizer.cc",
    _CSRC / "loss.cc",
    _CSRC / "batch.cc",
    _CSRC / "conv.cc",
    _CSRC / "head.cc",
    _CSRC / "pointwise.cc",
)
HEADERS = (_CSRC / "parallel.h", _CSRC / "fold.h")
#: Folder for built libraries (default `~/.cache/mobisearch/kernels`).
KERNEL_DIR_ENV_VAR = "MOBISEARCH_KERNEL_DIR"
#: `MOBISEARCH_NATIVE=0` turns the native kernels off.
NATIVE_ENV_VAR = "MOBISEARCH_NATIVE"

#: FFI target name -> the handler symbol the library exports.
TARGETS: dict[str, str] = {
    "mobisearch_depthwise_fwd": "MobisearchDepthwiseForward",
    "mobisearch_depthwise_fwd_bn": "MobisearchDepthwiseForwardBatchNorm",
    "mobisearch_depthwise_bwd": "MobisearchDepthwiseBackward",
    "mobisearch_batch_norm_fwd": "MobisearchBatchNormForward",
    "mobisearch_batch_norm_bwd": "MobisearchBatchNormBackward",
    "mobisearch_batch_norm_eval": "MobisearchBatchNormEval",
    "mobisearch_batch_norm_eval_add": "MobisearchBatchNormEvalAdd",
    "mobisearch_optimizer_update": "MobisearchOptimizerUpdate",
    "mobisearch_softmax_cross_entropy": "MobisearchSoftmaxCrossEntropy",
    "mobisearch_take_rows": "MobisearchTakeRows",
    "mobisearch_conv_kernel_grad": "MobisearchConvKernelGrad",
    "mobisearch_head_fwd": "MobisearchHeadForward",
    "mobisearch_head_bwd": "MobisearchHeadBackward",
    "mobisearch_pointwise_kernel_grad": "MobisearchPointwiseKernelGrad",
}
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _cpu_id() -> str:
    """This CPU's model name and feature flags (what `-march=native` compiles for)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _cxx() -> str:
    return os.environ.get("CXX", "c++")


def _compile_command(source: pathlib.Path, output: pathlib.Path) -> list[str]:
    """Compile one source to an object file."""
    flags = ["-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-fPIC", "-w"]
    return [_cxx(), *flags, f"-I{jax.ffi.include_dir()}", "-c", str(source), "-o", str(output)]


def library_path() -> pathlib.Path:
    """Where the library for these sources, compiler, jaxlib and CPU is (or will be) cached."""
    folder = pathlib.Path(os.environ.get(KERNEL_DIR_ENV_VAR) or cache_dir("kernels")).expanduser()
    key = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        key.update(path.read_bytes())
    for p in SOURCES:
        key.update(" ".join(_compile_command(pathlib.Path(p.name), pathlib.Path("o"))).encode())
    key.update(importlib.metadata.version("jaxlib").encode())
    key.update(_cpu_id().encode())
    return folder / key.hexdigest()[:16] / "libmobisearch_kernels.so"


def _spawn(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


def _wait(jobs: list[tuple[str, subprocess.Popen[str]]]) -> None:
    """Wait for `(what, process)` compiler jobs; on a failure, stop the others and raise."""
    try:
        for what, job in jobs:
            _, err = job.communicate(timeout=300)
            if job.returncode != 0:
                raise RuntimeError(
                    f"building {what} failed (exit {job.returncode}): {err.strip()[-2000:]}"
                )
    finally:
        for _, job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()


def _build(path: pathlib.Path) -> None:
    """Compile `SOURCES` to `path` atomically (a concurrent builder cannot leave half a file).

    The sources compile side by side, one compiler process each, then link.
    """
    cxx = _cxx()
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, suffix=".tmp") as work:
        objects = [pathlib.Path(work) / f"{src.stem}.o" for src in SOURCES]
        _wait(
            [
                (src.name, _spawn(_compile_command(src, obj)))
                for src, obj in zip(SOURCES, objects, strict=True)
            ]
        )
        lib = pathlib.Path(work) / "lib.so"
        _wait([("the link", _spawn([cxx, "-shared", *map(str, objects), "-o", str(lib)]))])
        os.replace(lib, path)


def _load() -> None:
    if os.environ.get(NATIVE_ENV_VAR, "").strip() == "0":
        raise RuntimeError(f"turned off by {NATIVE_ENV_VAR}=0")
    path = library_path()
    if not path.exists():
        _build(path)
    lib = ctypes.CDLL(str(path))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
        )
    _STATE["lib"] = lib  # keep the library loaded


def available() -> bool:
    """Build (once), load and register the native kernels; True if they can be used."""
    with _LOCK:
        if "ok" not in _STATE:
            try:
                _load()
                _STATE["ok"] = True
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                _STATE["ok"] = False
                _STATE["reason"] = str(e)
        return bool(_STATE["ok"])


def unavailable_reason() -> str:
    """Why `available()` is False ("" if it is True or was not called yet)."""
    return str(_STATE.get("reason", ""))
