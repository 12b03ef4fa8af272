"""Ship a trained network: an ONNX file checked in onnxruntime, or the Flax NNX model.

`export_onnx(arch, state, path, stats=..., images=..., labels=...)` writes the trained
network in inference mode (BatchNorm on its running averages, as ONNX
`BatchNormalization`) as an ONNX file made by jax2onnx from the one Flax NNX model
(`mobisearch.models.MobileNet` on the `"xla"` backend, depthwise convolutions as grouped
convolutions: `mobisearch.ops.grouped_depthwise`). The graph holds the preprocessing too,
so it takes images as the dataset stores them:

* input ``images``: uint8 ``[batch, h, w, c]`` NHWC, pixel values 0..255, ``h, w`` the
  size of the images it was exported with (28×28×1 for Fashion-MNIST), ``batch`` dynamic;
  with ``input_dtype="float32"``, float32 in [0, 1] instead;
* inside: scale to [0, 1], bilinear resize to the architecture's resolution
  (`mobisearch.data.resize_images`, as two constant matrix products), normalise with the
  training split's per-channel mean and standard deviation, then the network;
* output ``logits``: float32 ``[batch, num_classes]`` (softmax not applied).

Every export is checked before the file appears at `path` (it is written under a temporary
name and renamed): `onnx.checker` (full check, with shape inference), then onnxruntime's
logits against the JAX model's (the compiled eval-mode forward on this machine's default
backend, on images prepared as in training) on the given real images: the largest absolute
difference must be at most `atol` and both must give the same accuracy; otherwise
`ExportCheckError`.

`load_trained_model(config, checkpoint)` (also `mobisearch.load_model`) returns the trained
Flax NNX model for users who stay in JAX.

jax2onnx, onnx and onnxruntime come with the optional extra ``mobisearch[onnx]``; they are
imported on first use, and `require_onnx` says in one line what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import json
import logging
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mobisearch import ops
from mobisearch.data import resize_matrix

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from mobisearch.arch import ArchSpec
    from mobisearch.models import MobileNet

__all__ = [
    "DEFAULT_ATOL",
    "INPUT_DTYPES",
    "OPSET",
    "ExportCheckError",
    "MissingExtraError",
    "OnnxExport",
    "check_onnx",
    "checkpoint_of",
    "export_onnx",
    "inference_fn",
    "inference_session",
    "load_trained_model",
    "onnx_model",
    "onnx_versions",
    "require_onnx",
]

#: Largest absolute difference allowed between onnxruntime's and JAX's logits.
DEFAULT_ATOL = 1e-4
#: What the exported graph can take: uint8 pixels (0..255) or float32 in [0, 1].
INPUT_DTYPES: tuple[str, ...] = ("uint8", "float32")
#: ONNX opset of the exported graph (jax2onnx's default; onnxruntime >= 1.20 runs it).
OPSET = 23
#: The packages of the ``onnx`` extra, in the order they are checked.
_EXTRA_MODULES = ("onnxruntime", "onnx", "jax2onnx")


class MissingExtraError(ImportError):
    """jax2onnx, onnx or onnxruntime is not installed; the message says how to install it."""


class ExportCheckError(RuntimeError):
    """An exported graph failed its check (onnx.checker, or onnxruntime against JAX)."""


def require_onnx() -> None:
    """Import the ``onnx`` extra's packages, or raise one `MissingExtraError` naming the
    first that is missing and the install command.

    Raises:
      MissingExtraError: onnxruntime, onnx or jax2onnx cannot be imported.
    """
    for name in _EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MissingExtraError(
                f"{name} is not installed ({e}); ONNX export and onnxruntime latency need "
                "the onnx extra: pip install 'mobisearch[onnx]'"
            ) from None


def onnx_versions() -> dict[str, str]:
    """Versions of jax2onnx, onnx and onnxruntime (after `require_onnx`), for records."""
    require_onnx()
    return {name: importlib.metadata.version(name) for name in reversed(_EXTRA_MODULES)}


def _check_input_dtype(input_dtype: object) -> str:
    if not isinstance(input_dtype, str) or input_dtype not in INPUT_DTYPES:
        raise ValueError(f"`input_dtype` (={input_dtype!r}) must be one of {INPUT_DTYPES}")
    return input_dtype


def _check_stats(stats: tuple[Any, Any], in_ch: int) -> tuple[np.ndarray, np.ndarray]:
    mean, std = (np.asarray(s, np.float32).reshape(-1) for s in stats)
    if mean.shape != (in_ch,) or std.shape != (in_ch,):
        raise ValueError(
            f"`stats` must be a per-channel (mean, std) pair of shape ({in_ch},) each, got "
            f"{mean.shape} and {std.shape}"
        )
    if np.any(std <= 0) or not np.all(np.isfinite(mean)) or not np.all(np.isfinite(std)):
        raise ValueError(f"`stats` std (={std}) must be positive and mean (={mean}) finite")
    return mean, std


def _eval_model(arch: ArchSpec, state: Any, backend: str) -> MobileNet:
    """The model of `arch` on `backend` in eval mode, holding `state` ((params, rest) or a
    model of the same architecture)."""
    from mobisearch.models import abstract_split, split_model

    if isinstance(state, nnx.Module):
        _, params, rest = split_model(state)
    else:
        params, rest = state
    graphdef, _ = abstract_split(arch, backend=backend)
    model: MobileNet = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()
    return model


def inference_fn(
    model: MobileNet,
    *,
    resolution: int,
    stats: tuple[Any, Any],
    input_dtype: str = "uint8",
) -> Callable[[jax.Array], jax.Array]:
    """The function the ONNX graph computes: images as stored -> logits.

    `x` uint8 (or float32 in [0, 1]) ``[b, h, w, c]`` is scaled to [0, 1], resized
    bilinearly to `resolution` when ``(h, w)`` differs (the matrices of
    `mobisearch.data.resize_matrix`, applied to rows then columns as `resize_images`
    does), normalised with ``stats = (mean, std)`` and classified by `model` (which should
    be in eval mode).
    """
    _check_input_dtype(input_dtype)
    mean, std = _check_stats(stats, model.in_ch)
    mean4, std4 = (jnp.asarray(v.reshape(1, 1, 1, -1)) for v in (mean, std))

    def fn(x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        if input_dtype == "uint8":
            xf = xf * jnp.float32(1 / 255)
        h, w = x.shape[1], x.shape[2]
        if h != resolution:
            xf = jnp.einsum("rh,bhwc->brwc", jnp.asarray(resize_matrix(h, resolution)), xf)
        if w != resolution:
            xf = jnp.einsum("sw,brwc->brsc", jnp.asarray(resize_matrix(w, resolution)), xf)
        return model((xf - mean4) / std4)

    return fn


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence, while a graph is built, onnx_ir's and jax2onnx's per-value log warnings
    (every constant whose type they leave implicit) and the Flax deprecation that jax2onnx's
    BatchNorm plugin triggers (it reads `Variable.value`)."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "jax2onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="'.value' access is now deprecated", category=DeprecationWarning
            )
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


_PLUGINS_LOADED = False


@contextlib.contextmanager
def _nnx_plugins_only() -> Iterator[None]:
    """Within it, jax2onnx converts with its plugins for JAX primitives and Flax NNX only.

    NOTE: `jax2onnx.to_onnx` otherwise imports every plugin, whose Equinox examples build
    models at import (about 25 s of XLA compiles on 2 cores, against 3 s for these). On
    exit jax2onnx is left to import the rest on its next own call. The hook is jax2onnx
    0.17's (pinned by the extra); on another version to_onnx loads all of them.
    """
    global _PLUGINS_LOADED
    try:
        from jax2onnx.plugins import plugin_system as ps

        hooked = hasattr(ps, "_import_tree") and not ps._already_imported_plugins
    except (ImportError, AttributeError):
        hooked = False
    if not hooked:
        yield
        return
    if not _PLUGINS_LOADED:
        root = pathlib.Path(ps.__file__).parent
        for sub in ("jax", "flax/nnx"):
            ps._import_tree(root / sub, "jax2onnx.plugins." + sub.replace("/", "."))
        _PLUGINS_LOADED = True
    ps._already_imported_plugins = True
    try:
        yield
    finally:
        ps._already_imported_plugins = False


def onnx_model(
    arch: ArchSpec,
    state: Any,
    *,
    stats: tuple[Any, Any],
    image_hw: tuple[int, int] | None = None,
    input_dtype: str = "uint8",
) -> onnx.ModelProto:
    """Build the ONNX graph of a trained network (no accuracy check; see `export_onnx`).

    Args:
      arch: the architecture.
      state: its trained `(params, rest)` (`mobisearch.checkpoint.load_state`), or a
        `MobileNet` of that architecture on any backend.
      stats: the training split's per-channel `(mean, std)` on the [0, 1] scale
        (`mobisearch.data.image_mean_std`), baked into the graph.
      image_hw: the `(h, w)` of the images the graph takes (default: the architecture's
        resolution, no resize); other sizes are resized inside the graph.
      input_dtype: ``"uint8"`` (0..255) or ``"float32"`` (in [0, 1]).

    Returns:
      The `onnx.ModelProto`, input ``images`` ``[batch, h, w, c]``, output ``logits``
      ``[batch, num_classes]``, ``batch`` dynamic. It passes `onnx.checker` (full check).

    Raises:
      MissingExtraError: the onnx extra is not installed.
      ValueError: bad `stats`, `image_hw` or `input_dtype`.
      ExportCheckError: the graph fails `onnx.checker`.
    """
    require_onnx()
    import onnx
    from jax2onnx import to_onnx

    _check_input_dtype(input_dtype)
    r = arch.resolution
    h, w = (r, r) if image_hw is None else image_hw
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (h, w)):
        raise ValueError(f"`image_hw` (={image_hw!r}) must be two positive integers")
    model = _eval_model(arch, state, "xla")
    fn = inference_fn(model, resolution=r, stats=stats, input_dtype=input_dtype)
    spec = jax.ShapeDtypeStruct(("batch", h, w, arch.in_ch), jnp.dtype(input_dtype))
    with _nnx_plugins_only(), _quiet_exporter(), ops.grouped_depthwise():
        proto = to_onnx(
            fn,
            [spec],
            model_name=arch.display_id,
            opset=OPSET,
            input_names=["images"],
            output_names=["logits"],
        )
    # NOTE: jax2onnx 0.17 can leave stale NHWC shape hints on values that its transpose
    # folding moved to NCHW; the hints are optional, so they are recomputed from the graph.
    del proto.graph.value_info[:]
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportCheckError(
            f"{arch.display_id}: the ONNX graph fails onnx.checker: {e}"
        ) from None
    mean, std = _check_stats(stats, arch.in_ch)
    meta = {
        "mobisearch.arch": json.dumps(arch.to_dict(), sort_keys=True),
        "mobisearch.display_id": arch.display_id,
        "mobisearch.input": f"images: {input_dtype} [batch, {h}, {w}, {arch.in_ch}] NHWC, "
        + ("0..255" if input_dtype == "uint8" else "in [0, 1]"),
        "mobisearch.output": f"logits: float32 [batch, {arch.num_classes}]",
        "mobisearch.mean": json.dumps(mean.tolist()),
        "mobisearch.std": json.dumps(std.tolist()),
    } | {f"mobisearch.{k}_version": v for k, v in _versions().items()}
    onnx.helper.set_model_props(proto, meta)
    proto.producer_name = "mobisearch (jax2onnx)"
    return proto


def _versions() -> dict[str, str]:
    from mobisearch import __version__

    return {"mobisearch": __version__, "jax": jax.__version__} | onnx_versions()


def inference_session(model: Any, *, threads: int = 1) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session for an ONNX model, with a fixed thread count.

    Args:
      model: a path, serialized bytes or an `onnx.ModelProto`.
      threads: intra-op threads (1 stands for one phone core); inter-op is sequential.

    Raises:
      MissingExtraError: the onnx extra is not installed.
      ValueError: `threads` is not an integer >= 1.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"`threads` (={threads!r}) must be an integer >= 1")
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    if not isinstance(model, str | bytes | os.PathLike):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OnnxExport:
    """What `export_onnx` wrote and how it was checked.

    Attributes:
      path: the ONNX file.
      size_bytes: its size.
      display_id: the architecture's display id.
      input_shape: ``("batch", h, w, c)``.
      input_dtype: ``"uint8"`` or ``"float32"``.
      num_images: how many real images the check ran on.
      max_abs_diff: largest absolute difference of onnxruntime's logits from JAX's.
      jax_accuracy: accuracy of the JAX model on those images.
      onnx_accuracy: accuracy of the ONNX graph in onnxruntime on them.
      jax_backend: the backend of the JAX reference (``"native"`` or ``"xla"``).
      versions: mobisearch, jax, jax2onnx, onnx and onnxruntime versions.
      export_s: seconds to build the graph; check_s: seconds to check it.
    """

    path: pathlib.Path
    size_bytes: int
    display_id: str
    input_shape: tuple[str | int, ...]
    input_dtype: str
    num_images: int
    max_abs_diff: float
    jax_accuracy: float
    onnx_accuracy: float
    jax_backend: str
    versions: dict[str, str]
    export_s: float
    check_s: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields."""
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["input_shape"] = list(self.input_shape)
        return d

    def summary(self) -> str:
        """The lines `mobisearch export` prints."""
        shape = ", ".join(map(str, self.input_shape))
        return "\n".join(
            [
                f"wrote {self.path} ({self.size_bytes:,} bytes): {self.display_id}, input "
                f"{self.input_dtype} [{shape}] NHWC, output logits",
                f"checked on {self.num_images:,} test images: max |logit difference| "
                f"{self.max_abs_diff:.2e}; test accuracy onnxruntime {self.onnx_accuracy:.4f}, "
                f"JAX ({self.jax_backend}) {self.jax_accuracy:.4f}",
            ]
        )


def _jax_logits(
    arch: ArchSpec,
    state: Any,
    images: np.ndarray,
    stats: tuple[Any, Any],
    backend: str,
    batch_size: int,
) -> np.ndarray:
    """The JAX model's logits on uint8 `images`, prepared as in training and evaluation."""
    from mobisearch.compile import compile_forward
    from mobisearch.models import split_model
    from mobisearch.train import prepare_images

    if isinstance(state, nnx.Module):
        _, params, rest = split_model(state)
    else:
        params, rest = state
    n = min(batch_size, len(images))
    step = compile_forward(arch, backend, n).step
    x = prepare_images(images, arch.resolution, stats)
    out = []
    for start in range(0, len(x), n):
        xb = x[start : start + n]
        if len(xb) < n:  # pad the last batch instead of compiling another program
            xb = np.concatenate([xb, np.zeros((n - len(xb), *xb.shape[1:]), xb.dtype)])
        out.append(np.asarray(step(params, rest, xb))[: min(n, len(x) - start)])
    return np.concatenate(out)


def _onnx_logits(
    session: onnxruntime.InferenceSession, images: np.ndarray, input_dtype: str, batch_size: int
) -> np.ndarray:
    x = images if input_dtype == "uint8" else images.astype(np.float32) * np.float32(1 / 255)
    name = session.get_inputs()[0].name
    return np.concatenate(
        [
            np.asarray(session.run(None, {name: x[s : s + batch_size]})[0])
            for s in range(0, len(x), batch_size)
        ]
    )


def check_onnx(
    session_or_model: Any,
    arch: ArchSpec,
    state: Any,
    *,
    stats: tuple[Any, Any],
    images: np.ndarray,
    labels: np.ndarray,
    input_dtype: str = "uint8",
    atol: float = DEFAULT_ATOL,
    backend: str | None = None,
    batch_size: int = 500,
) -> tuple[float, float, float]:
    """Compare an exported graph in onnxruntime with the JAX model on real images.

    Args:
      session_or_model: an `inference_session`, or anything it takes.
      arch, state: the architecture and its trained `(params, rest)` (or model).
      stats: the `(mean, std)` the graph was exported with.
      images: uint8 ``[n, h, w, c]`` images as the dataset stores them (a test split).
      labels: their integer labels ``[n]``.
      input_dtype: what the graph takes (`INPUT_DTYPES`).
      atol: the largest absolute logit difference allowed.
      backend: the JAX reference's backend (default: this machine's).
      batch_size: images per call on either side.

    Returns:
      ``(max_abs_diff, jax_accuracy, onnx_accuracy)``.

    Raises:
      ExportCheckError: a difference above `atol`, or different accuracies.
      ValueError: bad images or labels.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] != arch.in_ch:
        raise ValueError(
            f"`images` (shape {images.shape}, dtype {images.dtype}) must be uint8 "
            f"[n, h, w, {arch.in_ch}]"
        )
    if len(images) == 0 or labels.shape != (len(images),):
        raise ValueError(
            f"`labels` (shape {labels.shape}) must hold one label per image ({len(images)})"
        )
    if not atol > 0:
        raise ValueError(f"`atol` (={atol!r}) must be positive")
    session = (
        session_or_model
        if hasattr(session_or_model, "get_inputs")
        else inference_session(session_or_model)
    )
    backend = backend or ops.default_backend()
    ref = _jax_logits(arch, state, images, stats, backend, batch_size)
    got = _onnx_logits(session, images, _check_input_dtype(input_dtype), batch_size)
    if got.shape != ref.shape or not np.all(np.isfinite(got)):
        raise ExportCheckError(
            f"{arch.display_id}: onnxruntime gave logits of shape {got.shape} (finite: "
            f"{bool(np.all(np.isfinite(got)))}), JAX {ref.shape}"
        )
    diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
    acc_jax = float(np.mean(np.argmax(ref, axis=1) == labels))
    acc_onnx = float(np.mean(np.argmax(got, axis=1) == labels))
    if not diff <= atol:
        raise ExportCheckError(
            f"{arch.display_id}: onnxruntime's logits differ from JAX's by up to {diff:.3g} "
            f"(allowed {atol:g}) on {len(images)} images"
        )
    if acc_jax != acc_onnx:
        raise ExportCheckError(
            f"{arch.display_id}: accuracy in onnxruntime {acc_onnx:.4f} != JAX {acc_jax:.4f} "
            f"on {len(images)} images"
        )
    return diff, acc_jax, acc_onnx


def export_onnx(
    arch: ArchSpec,
    state: Any,
    path: str | os.PathLike[str],
    *,
    stats: tuple[Any, Any],
    images: np.ndarray,
    labels: np.ndarray,
    input_dtype: str = "uint8",
    atol: float = DEFAULT_ATOL,
    backend: str | None = None,
) -> OnnxExport:
    """Export a trained network to an ONNX file that takes images as the dataset stores
    them, and check it (see the module docstring).

    The file appears at `path` only when the check passes.

    Args:
      arch: the architecture (e.g. `mobisearch.load_best("results/<space>/best.json")`).
      state: its trained `(params, rest)` (`mobisearch.checkpoint.load_state`, or
        `TrainResult.state`), or a `MobileNet` holding them.
      path: the ONNX file to write.
      stats: the training split's `(mean, std)` (`mobisearch.data.image_mean_std`).
      images: real uint8 images ``[n, h, w, c]`` to check on (a test split); their
        ``(h, w)`` is the graph's input size.
      labels: their labels ``[n]``.
      input_dtype: ``"uint8"`` (default) or ``"float32"`` in [0, 1].
      atol: the largest absolute logit difference allowed (default 1e-4).
      backend: the JAX reference's backend (default: this machine's).

    Returns:
      An `OnnxExport`: the file, its size, the check's figures.

    Raises:
      MissingExtraError: the onnx extra is not installed.
      ExportCheckError: the check failed (nothing is written).
      ValueError: bad arguments.
    """
    path = pathlib.Path(path)
    t0 = time.perf_counter()
    h, w = int(np.shape(images)[1]), int(np.shape(images)[2])
    proto = onnx_model(arch, state, stats=stats, image_hw=(h, w), input_dtype=input_dtype)
    export_s = time.perf_counter() - t0
    blob = proto.SerializeToString()
    t0 = time.perf_counter()
    diff, acc_jax, acc_onnx = check_onnx(
        blob,
        arch,
        state,
        stats=stats,
        images=images,
        labels=labels,
        input_dtype=input_dtype,
        atol=atol,
        backend=backend,
    )
    check_s = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
    return OnnxExport(
        path=path,
        size_bytes=len(blob),
        display_id=arch.display_id,
        input_shape=("batch", h, w, arch.in_ch),
        input_dtype=input_dtype,
        num_images=len(images),
        max_abs_diff=diff,
        jax_accuracy=acc_jax,
        onnx_accuracy=acc_onnx,
        jax_backend=backend or ops.default_backend(),
        versions=_versions(),
        export_s=export_s,
        check_s=check_s,
    )


def checkpoint_of(config: str | os.PathLike[str]) -> pathlib.Path | None:
    """The checkpoint a best-config JSON names (``metrics.checkpoint``, written by a
    search), or None."""
    try:
        data = json.loads(pathlib.Path(config).read_text())
    except (OSError, ValueError):
        return None
    metrics = data.get("metrics") if isinstance(data, dict) else None
    ckpt = metrics.get("checkpoint") if isinstance(metrics, dict) else None
    return pathlib.Path(ckpt) if isinstance(ckpt, str) and ckpt else None


def load_trained_model(
    config: ArchSpec | str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    backend: str | None = None,
) -> MobileNet:
    """The trained Flax NNX model of a search's checkpoint, in eval mode, in one call.

    Args:
      config: an `ArchSpec`, or a best-config / architecture JSON file
        (``results/<space>/best.json``).
      checkpoint: the msgpack file (``results/<space>/checkpoints/<study>/<id>.msgpack``);
        default: the one a best-config JSON names.
      backend: the backend its operations run on (default: this machine's).

    Raises:
      ValueError: no checkpoint given or named, or one that does not fit the architecture.
    """
    from mobisearch.arch import ArchSpec
    from mobisearch.checkpoint import load_model
    from mobisearch.results import read_arch_json

    if isinstance(config, ArchSpec):
        arch = config
    else:
        arch = read_arch_json(pathlib.Path(config))
        checkpoint = checkpoint or checkpoint_of(config)
    if checkpoint is None:
        raise ValueError(
            f"no checkpoint for {arch.display_id}: pass one (a search writes them under "
            "results/<space>/checkpoints/<study>/<display id>.msgpack)"
        )
    if not pathlib.Path(checkpoint).is_file():
        raise ValueError(f"{checkpoint}: no such checkpoint file")
    return load_model(arch, checkpoint, backend=backend)
