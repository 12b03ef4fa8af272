"""The real evaluator of a search: short training, measured latency, a saved checkpoint.

`Ranker(space, data, ...)` is the `evaluate` callable that `mobisearch.search.run_search`
takes: for one architecture it trains with the space's recipe (`mobisearch.train`), measures
the latency of the trained model on this machine (`mobisearch.latency`), saves the trained
state (flax's msgpack serialization of NNX's pure-dict state) so the frontier can later be
evaluated on the test split without retraining, and returns the metrics to store.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx, serialization

from mobisearch.arch import ArchSpec
from mobisearch.data import image_mean_std
from mobisearch.latency import device_fingerprint, measure_latency
from mobisearch.models import default_depthwise_impl, inference_state
from mobisearch.train import (
    abstract_state,
    compiled_forward,
    evaluate,
    precompile_forward,
    prepare_recipe,
    train_and_evaluate,
)

if TYPE_CHECKING:
    from mobisearch.data import Dataset
    from mobisearch.space import SearchSpace


def model_latency(
    arch: ArchSpec,
    state: Any,
    *,
    batch_size: int,
    warmup: int,
    iters: int,
    depthwise: str | None = None,
) -> dict[str, Any]:
    """Median and spread of one eval-mode forward pass of a trained model, in ms."""
    forward = compiled_forward(arch, depthwise, batch=batch_size)
    inference = inference_state(arch.resolve(), *state)
    x = jnp.zeros((batch_size, arch.resolution, arch.resolution, arch.in_ch), jnp.float32)
    lat = measure_latency(forward, inference, x, warmup=warmup, iters=iters, batch_size=batch_size)
    return {
        "latency_ms": lat.p50_ms,
        "latency_p10_ms": lat.p10_ms,
        "latency_p90_ms": lat.p90_ms,
        "latency_min_ms": lat.min_ms,
        "latency_max_ms": lat.max_ms,
        "latency_std_ms": lat.std_ms,
        "latency_iters": lat.iters,
        "latency_batch": batch_size,
    }


def save_state(state: Any, path: pathlib.Path) -> None:
    """Write a `(params, rest)` NNX state as msgpack (atomically: temp file, then rename)."""
    params, rest = state
    blob = serialization.msgpack_serialize(
        {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)


def load_state(arch: ArchSpec, path: pathlib.Path, *, depthwise: str | None = None) -> Any:
    """Read a state written by `save_state` into `arch`'s structure (without building the
    model: its abstract state gives the structure and the shapes).

    Raises:
      ValueError: naming the file and the array when a shape does not match `arch`.
    """
    restored = serialization.msgpack_restore(path.read_bytes())
    abstract = abstract_state(arch, depthwise or default_depthwise_impl())

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


class Ranker:
    """Evaluate candidates of a space on real data; callable as `ranker(arch) -> metrics`.

    Args:
      space: the search space (its `train` recipe and `latency` settings are used).
      data: the dataset (train/validation for ranking; test only in `test_accuracy`).
      checkpoint_dir: where trained states are saved, one file per display id.
      latency_batch: batch size for the latency measurement (default: the space's).
      depthwise: depthwise-conv implementation (default: the backend's fastest).
    """

    def __init__(
        self,
        space: SearchSpace,
        data: Dataset,
        *,
        checkpoint_dir: str | pathlib.Path,
        latency_batch: int | None = None,
        depthwise: str | None = None,
    ) -> None:
        if space.train is None:
            raise ValueError(f"{space.path}: has no [train] section; it can only be costed")
        self.space = space
        self.train_cfg = space.train
        self.data = data
        self.checkpoint_dir = pathlib.Path(checkpoint_dir)
        self.latency_batch = latency_batch or space.latency.batch_size
        self.depthwise = depthwise or default_depthwise_impl()
        self.stats = image_mean_std(data.x_train)
        prepare_recipe(self.train_cfg, self.depthwise)  # shared by every candidate

    def checkpoint_path(self, arch: ArchSpec) -> pathlib.Path:
        return self.checkpoint_dir / f"{arch.display_id}.msgpack"

    def __call__(self, arch: ArchSpec) -> dict[str, Any]:
        cfg = self.train_cfg
        # Compiles in the background while train_and_evaluate prepares the images and
        # compiles its train step; it waits for it before training.
        precompile_forward(arch, self.depthwise, batch=self.latency_batch)
        result = train_and_evaluate(
            arch, cfg, self.data, seed=cfg.seed, depthwise=self.depthwise, stats=self.stats
        )
        metrics: dict[str, Any] = {
            "status": result.status,
            "reason": result.reason,
            "seed": cfg.seed,
            "steps": result.steps,
            "compile_s": result.compile_s,
            "train_s": result.train_s,
            "eval_s": result.eval_s,
            "final_loss": result.loss_curve[-1] if result.loss_curve else math.nan,
            "depthwise": self.depthwise,
            "device": device_fingerprint(self.latency_batch),
        }
        if result.status != "ok":
            return metrics
        metrics["val_accuracy"] = result.val_accuracy
        metrics["val_loss"] = result.val_loss
        lat = self.space.latency
        metrics |= model_latency(
            arch,
            result.state,
            batch_size=self.latency_batch,
            warmup=lat.warmup,
            iters=lat.iters,
            depthwise=self.depthwise,
        )
        save_state(result.state, self.checkpoint_path(arch))
        return metrics

    def test_accuracy(self, arch: ArchSpec) -> float:
        """Accuracy of the saved trained state on the test split (for frontier members).

        Raises:
          FileNotFoundError: naming the checkpoint when it is missing (e.g. the trial ran
            on another machine).
        """
        path = self.checkpoint_path(arch)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint of {arch.display_id} on this machine")
        state = load_state(arch, path, depthwise=self.depthwise)
        acc, _ = evaluate(
            arch,
            state,
            self.data.x_test,
            self.data.y_test,
            cfg=self.train_cfg,
            depthwise=self.depthwise,
            stats=self.stats,
        )
        return acc
