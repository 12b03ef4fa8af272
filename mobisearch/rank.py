"""The real evaluator of a search: short training, measured latency, a saved checkpoint.

`Ranker(space, data, ...)` is the `evaluate` callable that `mobisearch.search.run_search`
takes: for one architecture it trains with the space's recipe (`mobisearch.train`), measures
the latency of the trained model in eval mode on this machine (`mobisearch.latency`), saves
the trained state (`mobisearch.checkpoint`) so the frontier can later be evaluated on the
test split without retraining, and returns the metrics to store.
"""

from __future__ import annotations

import math
import pathlib
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from mobisearch import ops
from mobisearch.arch import ArchSpec
from mobisearch.checkpoint import load_state, save_state
from mobisearch.compile import compiled_forward, precompile_forward
from mobisearch.data import image_mean_std
from mobisearch.fidelity import RungTrainer
from mobisearch.latency import (
    latency_backend_record,
    latency_runner,
    measure_latency,
)
from mobisearch.train import evaluate, prepare_recipe, train_and_evaluate

if TYPE_CHECKING:
    from mobisearch.data import Dataset
    from mobisearch.halving import Job
    from mobisearch.space import SearchSpace


def model_latency(
    arch: ArchSpec,
    state: Any,
    *,
    batch_size: int,
    warmup: int,
    iters: int,
    backend: str | None = None,
) -> dict[str, Any]:
    """Median and spread of one eval-mode forward pass of a trained `(params, rest)`, in ms."""
    forward = compiled_forward(arch, backend, batch=batch_size).bind(*state)
    x = jnp.zeros((batch_size, arch.resolution, arch.resolution, arch.in_ch), jnp.float32)
    lat = measure_latency(forward, x, warmup=warmup, iters=iters, batch_size=batch_size)
    return _latency_fields(lat, batch_size)


def _latency_fields(lat: Any, batch_size: int) -> dict[str, Any]:
    """A `mobisearch.latency.Latency` as the metrics a trial stores."""
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


class Ranker:
    """Evaluate candidates of a space on real data; callable as `ranker(arch) -> metrics`.

    Args:
      space: the search space (its `train` recipe and `latency` settings are used).
      data: the dataset (train/validation for ranking; test only in `test_accuracy`).
      checkpoint_dir: where trained states are saved, one file per display id.
      latency_batch: batch size for the latency measurement (default: the space's).
      backend: `"xla"` or `"native"` (default `mobisearch.ops.default_backend()`).
    """

    def __init__(
        self,
        space: SearchSpace,
        data: Dataset,
        *,
        checkpoint_dir: str | pathlib.Path,
        latency_batch: int | None = None,
        backend: str | None = None,
    ) -> None:
        if space.train is None:
            raise ValueError(f"{space.path}: has no [train] section; it can only be costed")
        self.space = space
        self.train_cfg = space.train
        self.data = data
        self.checkpoint_dir = pathlib.Path(checkpoint_dir)
        self.latency_batch = latency_batch or space.latency.batch_size
        self.backend = ops.check_backend(backend or ops.default_backend())
        self.stats = image_mean_std(data.x_train)
        lat = space.latency
        # Where latency is measured; fails here (onnxruntime missing) rather than per trial.
        self.latency_record = latency_backend_record(lat.backend, lat.threads, self.latency_batch)
        self.rungs: RungTrainer | None = None
        if space.fidelity is not None:
            self.rungs = RungTrainer(
                space.fidelity,
                space.train,
                data,
                backend=self.backend,
                checkpoint_dir=self.checkpoint_dir,
                stats=self.stats,
            )
            self.train_cfg = self.rungs.cfg
        prepare_recipe(self.train_cfg, self.backend)  # shared by every candidate

    def checkpoint_path(self, arch: ArchSpec) -> pathlib.Path:
        return self.checkpoint_dir / f"{arch.display_id}.msgpack"

    def __call__(self, arch: ArchSpec) -> dict[str, Any]:
        cfg = self.train_cfg
        # Compiles in the background while train_and_evaluate prepares the images and
        # compiles its train step; it waits for it before training.
        precompile_forward(arch, self.backend, batch=self.latency_batch)
        result = train_and_evaluate(
            arch, cfg, self.data, seed=cfg.seed, backend=self.backend, stats=self.stats
        )
        metrics = self._metrics(result, seed=cfg.seed)
        metrics["eval_s"] = result.eval_s
        metrics["final_loss"] = result.loss_curve[-1] if result.loss_curve else math.nan
        if result.status != "ok":
            return metrics
        metrics |= self._latency(arch, result.state)
        save_state(result.state, self.checkpoint_path(arch))
        return metrics

    def _metrics(self, result: Any, *, seed: int) -> dict[str, Any]:
        """What every trial stores of a training run (`TrainResult` or `RungResult`)."""
        metrics: dict[str, Any] = {
            "status": result.status,
            "reason": result.reason,
            "seed": seed,
            "steps": result.steps,
            "compile_s": result.compile_s,
            "train_s": result.train_s,
            "backend": self.backend,
            "device": self.latency_record["device"],
        }
        if result.status == "ok":
            metrics["val_accuracy"] = result.val_accuracy
            metrics["val_loss"] = result.val_loss
        return metrics

    def _latency(self, arch: ArchSpec, state: Any) -> dict[str, Any]:
        """The latency record of a trained candidate on the space's latency backend: the
        JAX forward of the trained model, or the exported ONNX graph in onnxruntime."""
        lat, record = self.space.latency, self.latency_record
        backend_fields = {
            "latency_backend": record["latency_backend"],
            "latency_backend_version": record["latency_backend_version"],
            "latency_threads": record["threads"],
        }
        if lat.backend == "jax":
            metrics = model_latency(
                arch,
                state,
                batch_size=self.latency_batch,
                warmup=lat.warmup,
                iters=lat.iters,
                backend=self.backend,
            )
            return (
                metrics
                | backend_fields
                | {"inference_backend": ops.inference_backend(self.backend)}
            )
        run = latency_runner(
            arch, backend="onnxruntime", threads=record["threads"], batch_size=self.latency_batch
        )
        m = measure_latency(run, warmup=lat.warmup, iters=lat.iters, batch_size=self.latency_batch)
        return _latency_fields(m, self.latency_batch) | backend_fields

    def run_job(self, job: Job) -> dict[str, Any]:
        """Evaluate one job of a sampled or multi-fidelity search
        (`mobisearch.halving.run_halving`): train the candidate to its rung (with its
        seed), score it, measure its latency unless a lower rung did, and save the scored
        state (but not a noise re-run's)."""
        if self.rungs is None:
            return self(job.arch)
        if job.latency is None:
            precompile_forward(job.arch, self.backend, batch=self.latency_batch)
        result = self.rungs.train_rung(job.arch, job.rung, seed=job.seed)
        metrics = self._metrics(result, seed=job.seed)
        metrics["rung"], metrics["resumed_from"] = job.rung, result.resumed_from
        if result.status != "ok":
            return metrics
        metrics |= dict(job.latency) if job.latency else self._latency(job.arch, result.state)
        if job.role == "rung":
            save_state(result.state, self.checkpoint_path(job.arch))
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
        state = load_state(arch, path, backend=self.backend)
        acc, _ = evaluate(
            arch,
            state,
            self.data.x_test,
            self.data.y_test,
            cfg=self.train_cfg,
            backend=self.backend,
            stats=self.stats,
        )
        return acc
