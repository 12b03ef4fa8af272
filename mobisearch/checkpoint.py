"""Trained model states on disk (flax's msgpack of NNX's pure-dict state), and the model
they rebuild.

A checkpoint holds `{"params": ..., "rest": ...}`: the `nnx.Param`s and the BatchNorm
statistics of `split_model(model)`, keyed by the stable state paths of
`mobisearch.models` (`stem/conv/kernel`, `blocks/<i>/dw/bn/mean`, ...). It does not depend
on the backend the model was trained on.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

from mobisearch.compile import abstract_state
from mobisearch.models import abstract_split
from mobisearch.train import TrainState

if TYPE_CHECKING:
    from mobisearch.arch import ArchSpec
    from mobisearch.models import MobileNet

__all__ = ["load_model", "load_state", "load_train_state", "save_state", "save_train_state"]


def save_state(state: Any, path: str | os.PathLike[str]) -> None:
    """Write a trained `(params, rest)` as msgpack, atomically (temp file, then rename)."""
    params, rest = state
    blob = serialization.msgpack_serialize(
        {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}
    )
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)


def load_state(
    arch: ArchSpec, path: str | os.PathLike[str], *, backend: str | None = None
) -> tuple[Any, Any]:
    """Read a state written by `save_state` into `arch`'s structure (its abstract state
    gives the structure and the shapes; no model is built).

    Raises:
      ValueError: naming the file and the array when a shape does not match `arch`, or
        when the file is not a checkpoint.
    """
    path = pathlib.Path(path)
    try:
        restored = serialization.msgpack_restore(path.read_bytes())
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a mobisearch checkpoint ({e})") from None
    if not isinstance(restored, dict) or set(restored) != {"params", "rest"}:
        raise ValueError(f"{path}: not a mobisearch checkpoint (expected params and rest)")
    abstract = abstract_state(arch, backend)

    def put(where: str) -> Callable[[Any, Any], Any]:
        def replace(var: Any, value: Any) -> Any:
            if var.shape != value.shape:
                raise ValueError(
                    f"{path}: {where} array of shape {value.shape}, expected {var.shape} for "
                    f"{arch.display_id}"
                )
            return var.replace(jnp.asarray(value))

        return replace

    params, rest = jax.tree.map(lambda v: v, abstract)  # fresh States; the cached one stays
    nnx.replace_by_pure_dict(params, restored["params"], put("a parameter"))
    nnx.replace_by_pure_dict(rest, restored["rest"], put("a BatchNorm statistic"))
    return params, rest


def load_model(
    arch: ArchSpec, path: str | os.PathLike[str], *, backend: str | None = None
) -> MobileNet:
    """The trained Flax NNX model of a checkpoint, in eval mode.

    Args:
      arch: the checkpoint's architecture (e.g. `mobisearch.load_best(...)`).
      path: a file written by `save_state` (a search's `checkpoints/<study>/<id>.msgpack`).
      backend: the backend the model's operations run on (default: this machine's).

    Raises:
      ValueError: naming the file and the array when it does not fit `arch`.
    """
    graphdef, _ = abstract_split(arch, backend=backend)
    params, rest = load_state(arch, path, backend=backend)
    model: MobileNet = nnx.merge(graphdef, params, rest)
    model.eval()
    return model


def save_train_state(state: TrainState, path: str | os.PathLike[str]) -> None:
    """Write a whole training run's position (model, optimizer state, step) as msgpack,
    atomically, so another process can train it on (`load_train_state`)."""
    leaves = [np.asarray(x) for x in jax.tree.leaves((state.params, state.rest, state.opt_state))]
    blob = serialization.msgpack_serialize({"step": state.step, "leaves": leaves})
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)


def load_train_state(path: str | os.PathLike[str], like: tuple[Any, Any, Any]) -> TrainState:
    """Read a run written by `save_train_state` into the structure of `like` (`(params,
    rest, opt_state)`, arrays or shapes).

    Raises:
      ValueError: naming the file when it does not hold a run of that structure.
    """
    path = pathlib.Path(path)
    try:
        restored = serialization.msgpack_restore(path.read_bytes())
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a saved training run ({e})") from None
    leaves, treedef = jax.tree.flatten(like)
    saved = restored.get("leaves", []) if isinstance(restored, dict) else []
    if len(saved) != len(leaves) or any(
        np.shape(a) != tuple(b.shape) for a, b in zip(saved, leaves, strict=False)
    ):
        raise ValueError(f"{path}: the saved run does not fit this architecture and optimizer")
    params, rest, opt_state = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in saved])
    return TrainState(params, rest, opt_state, int(restored["step"]))
