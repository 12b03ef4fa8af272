"""ONNX export (`mobisearch.export`): a small network trained on real Fashion-MNIST files,
exported and checked in onnxruntime; `mobisearch export` / `train --export`; the one-call
`mobisearch.load_model`; and what a missing onnxruntime gives."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mobisearch
from mobisearch import ops
from mobisearch.arch import ArchSpec
from mobisearch.checkpoint import save_state
from mobisearch.cli import main
from mobisearch.data import image_mean_std
from mobisearch.space import load_space, resolve_space_path

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(
    not FASHION.exists() and not os.environ.get("CI"),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)


def _have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# The extra's packages; .ci/run installs them (pip install -e '.[dev,onnx]').
needs_onnx = pytest.mark.skipif(
    not all(_have(m) for m in ("onnxruntime", "onnx", "jax2onnx")),
    reason="the onnx extra is not installed (pip install -e '.[onnx]')",
)

# onnxruntime made unimportable, as on a machine without the extra.
NO_ORT = "import sys; sys.modules['onnxruntime'] = None; "


@dataclasses.dataclass
class Trained:
    arch: Any
    state: Any
    data: Any
    stats: tuple[np.ndarray, np.ndarray]
    val_accuracy: float


@pytest.fixture(scope="module")
def trained() -> Trained:
    """The `quick` space's smallest candidate (16x16 input: the graph resizes 28x28 images),
    trained 40 steps on 600 real Fashion-MNIST images."""
    if not FASHION.exists() and not os.environ.get("CI"):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    from mobisearch.data import load_dataset
    from mobisearch.train import train_and_evaluate

    space = load_space(resolve_space_path("quick"))
    arch = min(space.candidates(), key=lambda a: (a.resolution, a.width))
    assert space.train is not None
    cfg = dataclasses.replace(space.train, steps=40, eval_batch_size=200)
    data = load_dataset("fashion_mnist", validation_size=200, train_size=600)
    stats = image_mean_std(data.x_train)
    result = train_and_evaluate(arch, cfg, data, seed=0, stats=stats)
    assert result.status == "ok", result.reason
    return Trained(arch, result.state, data, stats, result.val_accuracy)


# --- the switch export uses in ops -----------------------------------------------------------


def test_grouped_depthwise_switch_traces_one_grouped_conv() -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 7, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)

    def jaxpr() -> str:  # a fresh function each time: JAX caches traces by function
        return str(
            jax.make_jaxpr(lambda x, k: ops.depthwise_conv(x, k, stride=2, backend="xla"))(x, k)
        )

    plain = jaxpr()
    with ops.grouped_depthwise():
        grouped = jaxpr()
        y_grouped = ops.depthwise_conv(x, k, stride=2, backend="xla")
    assert "conv_general_dilated" in grouped and "feature_group_count=4" in grouped
    if jax.default_backend() == "cpu":
        assert "conv_general_dilated" not in plain  # shift-and-add outside the context
    assert jaxpr() == plain  # reset on exit
    want = ops.depthwise_conv(x, k, stride=2, backend="xla")
    np.testing.assert_allclose(y_grouped, want, rtol=1e-5, atol=1e-5)


# --- export and its check on a trained network ---------------------------------------------


@needs_fashion
@needs_onnx
def test_export_matches_jax_on_real_test_images(trained: Trained, tmp_path: pathlib.Path) -> None:
    import onnx

    from mobisearch.export import export_onnx, inference_session

    images, labels = trained.data.x_test[:500], trained.data.y_test[:500]
    path = tmp_path / "model.onnx"
    result = export_onnx(
        trained.arch, trained.state, path, stats=trained.stats, images=images, labels=labels
    )
    assert result.path == path and path.stat().st_size == result.size_bytes > 0
    assert not list(tmp_path.glob(".*.tmp"))
    assert result.max_abs_diff <= 1e-4
    assert result.onnx_accuracy == result.jax_accuracy > 0.3  # trained: chance is 0.1
    assert result.num_images == 500 and result.input_shape == ("batch", 28, 28, 1)
    summary = result.summary()
    assert str(path) in summary and f"{result.size_bytes:,} bytes" in summary
    assert f"{result.onnx_accuracy:.4f}" in summary and "max |logit difference|" in summary

    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and out.name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 28, 28, 1]
    assert {n.op_type for n in model.graph.node} >= {"Conv", "BatchNormalization", "MatMul"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    groups = [a.i for n in convs for a in n.attribute if a.name == "group"]
    assert len(groups) == len(trained.arch.resolve()) // 2 - 1  # one per depthwise layer
    meta = {p.key: p.value for p in model.metadata_props}
    assert ArchSpec.from_dict(json.loads(meta["mobisearch.arch"])) == trained.arch
    assert meta["mobisearch.display_id"] == trained.arch.display_id
    assert json.loads(meta["mobisearch.mean"]) == pytest.approx(trained.stats[0].tolist())

    # The batch dimension is dynamic: one image and seven give the same per-image logits.
    session = inference_session(path)
    seven = session.run(None, {"images": images[:7]})[0]
    one = session.run(None, {"images": images[3:4]})[0]
    assert seven.shape == (7, 10) and one.shape == (1, 10)
    np.testing.assert_allclose(one[0], seven[3], rtol=1e-5, atol=1e-5)


@needs_fashion
@needs_onnx
def test_float_input_and_a_wrong_normalization_is_caught(trained: Trained) -> None:
    from mobisearch.export import ExportCheckError, check_onnx, onnx_model

    images, labels = trained.data.x_test[:200], trained.data.y_test[:200]
    hw = images.shape[1:3]
    proto = onnx_model(
        trained.arch, trained.state, stats=trained.stats, image_hw=hw, input_dtype="float32"
    )
    diff, acc_jax, acc_onnx = check_onnx(
        proto,
        trained.arch,
        trained.state,
        stats=trained.stats,
        images=images,
        labels=labels,
        input_dtype="float32",
    )
    assert diff <= 1e-4 and acc_jax == acc_onnx

    mean, std = trained.stats
    wrong = onnx_model(trained.arch, trained.state, stats=(mean + 0.2, std), image_hw=hw)
    with pytest.raises(
        ExportCheckError, match=r"differ from JAX's by up to .* \(allowed 0.0001\)"
    ):
        check_onnx(
            wrong, trained.arch, trained.state, stats=trained.stats, images=images, labels=labels
        )


@needs_fashion
@needs_onnx
def test_a_failed_check_writes_no_file(
    trained: Trained, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mobisearch import export

    def fail(*args: Any, **kwargs: Any) -> None:
        raise export.ExportCheckError("simulated")

    monkeypatch.setattr(export, "check_onnx", fail)
    path = tmp_path / "model.onnx"
    with pytest.raises(export.ExportCheckError, match="simulated"):
        export.export_onnx(
            trained.arch,
            trained.state,
            path,
            stats=trained.stats,
            images=trained.data.x_test[:10],
            labels=trained.data.y_test[:10],
        )
    assert list(tmp_path.iterdir()) == []


@needs_onnx
def test_bad_export_arguments(tiny_arch: Any) -> None:
    from flax import nnx

    from mobisearch.export import inference_session, onnx_model
    from mobisearch.models import build_model

    model = build_model(tiny_arch, rngs=nnx.Rngs(0))
    stats = (np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="`input_dtype` .* must be one of"):
        onnx_model(tiny_arch, model, stats=stats, input_dtype="int8")
    with pytest.raises(ValueError, match=r"`stats` must be a per-channel"):
        onnx_model(tiny_arch, model, stats=(np.zeros(1), np.ones(1)))
    with pytest.raises(ValueError, match="`image_hw`"):
        onnx_model(tiny_arch, model, stats=stats, image_hw=(0, 32))
    with pytest.raises(ValueError, match=r"`threads` \(=0\) must be an integer >= 1"):
        inference_session(b"", threads=0)


@needs_onnx
def test_export_leaves_jax2onnx_its_other_plugins(tiny_arch: Any) -> None:
    from flax import nnx
    from jax2onnx.plugins import plugin_system

    from mobisearch.export import onnx_model
    from mobisearch.models import build_model

    before = plugin_system._already_imported_plugins  # False unless all were imported
    model = build_model(tiny_arch, rngs=nnx.Rngs(0))
    proto = onnx_model(tiny_arch, model, stats=(np.zeros(3), np.ones(3)))
    assert proto.graph.input[0].name == "images"
    # A user's own to_onnx call afterwards still imports every plugin (Equinox, Linen).
    assert plugin_system._already_imported_plugins is before


# --- the trained model in one call -----------------------------------------------------------


@needs_fashion
def test_load_model_in_one_call(trained: Trained, tmp_path: pathlib.Path) -> None:
    ckpt = tmp_path / "checkpoints" / f"{trained.arch.display_id}.msgpack"
    save_state(trained.state, ckpt)
    config = tmp_path / "best.json"
    metrics = {"display_id": trained.arch.display_id, "checkpoint": str(ckpt)}
    config.write_text(json.dumps({"arch": trained.arch.to_dict(), "metrics": metrics}))

    from flax import nnx

    model = mobisearch.load_model(config)  # the checkpoint comes from the config
    same = mobisearch.load_model(trained.arch, ckpt)
    assert model.stem.bn.use_running_average  # eval mode
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 1)), jnp.float32)
    forward = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(forward(model, x), forward(same, x))
    assert np.argmax(forward(model, x), axis=1).shape == (2,)

    bare = tmp_path / "arch.json"
    bare.write_text(json.dumps(trained.arch.to_dict()))
    with pytest.raises(ValueError, match="no checkpoint for quick_w025_r16_k3"):
        mobisearch.load_model(bare)
    with pytest.raises(ValueError, match="no such checkpoint file"):
        mobisearch.load_model(bare, tmp_path / "missing.msgpack")


# --- the command line ----------------------------------------------------------------------


@needs_fashion
@needs_onnx
def test_cli_export_prints_file_size_difference_and_accuracies(
    trained: Trained, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "w.msgpack"
    save_state(trained.state, ckpt)
    config = tmp_path / "best.json"
    config.write_text(json.dumps({"arch": trained.arch.to_dict(), "metrics": {}}))
    out = tmp_path / "model.onnx"
    argv = ["export", "--config", str(config), "--checkpoint", str(ckpt), "--space", "quick"]
    assert main([*argv, "--format", "onnx", "-o", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["path"] == str(out) and record["size_bytes"] == out.stat().st_size
    assert record["num_images"] == 10_000  # the whole test split
    assert record["max_abs_diff"] <= 1e-4
    assert record["onnx_accuracy"] == record["jax_accuracy"] > 0.3


def _one_line_exit_2(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )


CLI = "import sys; from mobisearch.cli import main; sys.exit(main(sys.argv[1:]))"


def test_cli_without_onnxruntime_is_one_line_and_exit_2(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mobisearch.presets import tiny

    config = tmp_path / "arch.json"
    config.write_text(json.dumps(tiny().to_dict()))
    ckpt = tmp_path / "w.msgpack"
    ckpt.write_bytes(b"")
    # A fresh process whose onnxruntime cannot be imported, as without the extra.
    proc = _run(
        NO_ORT + CLI, "export", "--config", str(config), "--checkpoint", str(ckpt), "-o", "x.onnx"
    )
    _one_line_exit_2(proc, "mobisearch export: error: onnxruntime is not installed", "[onnx]")
    # train --export finds out before it trains.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["train", "--config", str(config), "--export", "x.onnx"]) == 2
    out, err = capsys.readouterr()
    assert "training" not in out
    assert err.count("\n") == 1 and "mobisearch train: error: onnxruntime is not installed" in err


def test_cli_export_bad_values(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mobisearch.presets import tiny

    config = tmp_path / "arch.json"
    config.write_text(json.dumps(tiny().to_dict()))
    assert main(["export", "--config", str(config), "-o", "x.onnx"]) == 2
    err = capsys.readouterr().err
    want = f"{config}: names no checkpoint; pass --checkpoint FILE"
    assert err == f"mobisearch export: error: {want}\n"
    argv = ["export", "--config", str(config), "--checkpoint", "w", "-o", "x.onnx"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--format", "tflite"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'tflite'" in err
    assert main([*argv, "--space", "quick"]) == 2  # no such checkpoint file
    assert capsys.readouterr().err.count("\n") == 1
