"""Training runs and evaluation: seeds, divergence, evaluation, images (real JAX, tiny)."""

from __future__ import annotations

import dataclasses

import numpy as np
import optax
import pytest

from mobisearch import train
from mobisearch.arch import ArchSpec, BlockSpec
from mobisearch.data import image_mean_std
from mobisearch.space import TrainConfig


def small_arch(width: float = 0.25, resolution: int = 16) -> ArchSpec:
    return ArchSpec(
        stages=((BlockSpec(out_ch=32),), (BlockSpec(out_ch=64, stride=2),)),
        width=width,
        resolution=resolution,
        stem_ch=16,
        stem_stride=1,
        num_classes=10,
        in_ch=1,
        name="t",
    )


CFG = TrainConfig(steps=12, batch_size=32, learning_rate=0.01, warmup_steps=2, eval_batch_size=128)


def test_same_seed_same_result(data) -> None:  # type: ignore[no-untyped-def]
    a = train.train_and_evaluate(small_arch(), CFG, data, seed=3)
    b = train.train_and_evaluate(small_arch(), CFG, data, seed=3)
    assert a.loss_curve == b.loss_curve
    assert a.val_accuracy == b.val_accuracy


def test_divergence_is_reported(data) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(
        CFG, optimizer="sgd", learning_rate=1e12, schedule="constant", steps=30, warmup_steps=0
    )
    result = train.train_and_evaluate(small_arch(), cfg, data, seed=0)
    assert result.status == "diverged"
    assert "loss became" in result.reason
    assert np.isnan(result.val_accuracy)
    assert result.state is None


def test_evaluate_matches_a_direct_count(data) -> None:  # type: ignore[no-untyped-def]
    """The padded eval batches give exactly the unpadded accuracy, and optax's mean
    cross-entropy of the eval-mode model's logits."""
    import jax.numpy as jnp
    from flax import nnx

    from mobisearch.models import build_model

    arch = small_arch()
    cfg = dataclasses.replace(CFG, eval_batch_size=128)  # 300 = 2 full batches + 44
    result = train.train_and_evaluate(arch, cfg, data, seed=0)
    stats = image_mean_std(data.x_train)
    acc, loss = train.evaluate(arch, result.state, data.x_val, data.y_val, cfg=cfg, stats=stats)
    assert (acc, loss) == (result.val_accuracy, result.val_loss)
    model = build_model(arch, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    trained = nnx.merge(graphdef, *result.state)
    x = train.prepare_images(data.x_val, arch.resolution, stats)
    logits = trained(jnp.asarray(x))
    direct = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == data.y_val))
    assert acc == pytest.approx(direct, abs=1e-9)
    labels = jnp.asarray(data.y_val, jnp.int32)
    want = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    assert loss == pytest.approx(want, rel=1e-5)


def test_prepared_images_are_cached_per_array_and_resolution(data) -> None:  # type: ignore[no-untyped-def]
    from mobisearch.data import normalize_images, resize_images

    stats = image_mean_std(data.x_train)
    a = train.prepare_images(data.x_train, 12, stats)
    np.testing.assert_array_equal(a, normalize_images(resize_images(data.x_train, 12), *stats))
    assert not a.flags.writeable  # shared between candidates: nobody may change it
    assert train.prepare_images(data.x_train, 12, stats) is a
    assert train.prepare_images(data.x_train, 10, stats).shape[1:3] == (10, 10)
    # Same values in a different array, or other stats: not the cached entry.
    assert train.prepare_images(data.x_train.copy(), 12, stats) is not a
    other = (stats[0] + 1, stats[1])
    assert not np.array_equal(train.prepare_images(data.x_train, 12, other), a)


def test_batches_cover_each_epoch() -> None:
    rng = np.random.default_rng(0)
    idx = train.batch_indices(rng, n=10, batch=4, steps=5)
    assert idx.shape == (5, 4)
    flat = idx.reshape(-1)
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation


@pytest.mark.slow
def test_loss_falls_on_synthetic(data) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(CFG, steps=100, learning_rate=0.02, warmup_steps=5)
    result = train.train_and_evaluate(small_arch(0.5), cfg, data, seed=0)
    curve = np.array(result.loss_curve)
    # Typically about 2.3 -> 0.5 mean loss over the first/last 10 steps, 0.95 val accuracy.
    assert curve[-10:].mean() < 0.5 * curve[:10].mean()
    assert result.val_accuracy > 0.5


def test_flips_keep_each_epoch_and_mirror_the_images(data) -> None:  # type: ignore[no-untyped-def]
    """`augment="flip"`: each epoch still visits every image once, about half of the visits
    in its mirror image, and the run trains (deterministically) on real images."""
    x = train.prepare_images(data.x_train, 16, image_mean_std(data.x_train))
    n = len(x)
    order = train.batch_indices(np.random.default_rng(0), n=n, batch=50, steps=2 * n // 50)
    x2, y2, o2 = train.with_flips(x, data.y_train, order, seed=0)
    np.testing.assert_array_equal(x2[n + 7], x[7][:, ::-1])
    np.testing.assert_array_equal(y2[n:], data.y_train)
    np.testing.assert_array_equal(o2 % n, order)  # the same images, epoch by epoch
    assert 0.4 < np.mean(o2 >= n) < 0.6
    a = train.train_and_evaluate(small_arch(), CFG, data, seed=3, augment="flip")
    b = train.train_and_evaluate(small_arch(), CFG, data, seed=3, augment="flip")
    plain = train.train_and_evaluate(small_arch(), CFG, data, seed=3)
    assert a.status == "ok" and a.loss_curve == b.loss_curve
    assert a.loss_curve != plain.loss_curve
    with pytest.raises(ValueError, match="augment"):
        train.train_and_evaluate(small_arch(), CFG, data, seed=3, augment="rotate")


def test_shifts_keep_each_epoch_and_translate_the_images(data) -> None:  # type: ignore[no-untyped-def]
    """`augment="flip+shift"`: every visit goes to one of 9 translated copies (18 with the
    mirrors) of the same image, spread evenly, and the run trains on them."""
    x = train.prepare_images(data.x_train, 16, image_mean_std(data.x_train))
    n = len(x)
    order = train.batch_indices(np.random.default_rng(0), n=n, batch=50, steps=2 * n // 50)
    x9, y9, o9 = train.with_shifts(x, data.y_train, order, seed=0, pixels=2)
    assert x9.shape == (9 * n, *x.shape[1:])
    np.testing.assert_array_equal(x9[:n], x)  # copy 0: unshifted
    np.testing.assert_array_equal(x9[n + 5][:, :-2], x[5][:, 2:])  # copy 1: 2 px left
    np.testing.assert_array_equal(x9[n + 5][:, -2:], x[5][:, -1:].repeat(2, axis=1))
    np.testing.assert_array_equal(y9[4 * n : 5 * n], data.y_train)
    np.testing.assert_array_equal(o9 % n, order)
    counts = np.bincount((o9 // n).ravel(), minlength=9)
    assert counts.min() > 0.7 * counts.mean()
    a = train.train_and_evaluate(small_arch(), CFG, data, seed=3, augment="flip+shift")
    flips = train.train_and_evaluate(small_arch(), CFG, data, seed=3, augment="flip")
    assert a.status == "ok" and a.loss_curve != flips.loss_curve
