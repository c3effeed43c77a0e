"""The fused BatchNormalization is the stock layer, numerically, and never reaches a file.

Tolerances: one float32 layer agrees with the stock layer to float32 round-off, checked as
``atol = 1e-5 x the largest magnitude`` of each compared tensor (the measured worst case is
about 3e-7 relative); bfloat16 agrees to bfloat16 round-off, ``2e-2`` relative (bfloat16
has 8 significant bits, 2^-8 = 0.4%, and the two layers round at different points). Whole
networks: see test_whole_network_training_steps_match_stock.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import python_subprocess, saved_layers

import keras_resnet
from keras_resnet import blocks
from keras_resnet.pipeline.run import config
from keras_resnet.pipeline.training import fused_batch_norm, network, optimization

FUSED = fused_batch_norm.BatchNormalization


def close(a, b, rel=1e-5):
    a, b = np.asarray(a, "float32"), np.asarray(b, "float32")
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * max(np.abs(b).max(), 1e-3))


def _pair(shape, *, dtype=None, **kw):
    rng = np.random.default_rng(0)
    layers = [keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype=dtype, **kw),
              FUSED(momentum=0.9, epsilon=1e-5, dtype=dtype, **kw)]
    gamma = rng.normal(1.0, 0.2, shape[-1]).astype("float32")
    beta = rng.normal(0.0, 0.2, shape[-1]).astype("float32")
    for layer in layers:
        layer.build(shape)
        if layer.scale:
            layer.gamma.assign(gamma)
        if layer.center:
            layer.beta.assign(beta)
    return layers


def _step(layer, x, upstream, training=True):
    """Output, input gradient, parameter gradients and the moving statistics after."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, "float32") * upstream)
    grads = tape.gradient(loss, [x, *layer.trainable_variables])
    return [y, *grads, layer.moving_mean, layer.moving_variance]


@pytest.mark.parametrize("kw", [{}, {"center": False}, {"scale": False}])
def test_training_step_and_inference_match_the_stock_layer_float32(kw):
    shape = (8, 5, 5, 16)
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    upstream = rng.normal(size=shape).astype("float32")
    stock, fused = _pair(shape, **kw)
    for _ in range(3):  # the moving statistics follow the same momentum, step after step
        for a, b in zip(_step(fused, x, upstream), _step(stock, x, upstream), strict=True):
            close(a, b)
    close(fused(x, training=False), stock(x, training=False))
    # biased variance, as Keras: the population variance over N*H*W, not N*H*W - 1
    batch_var = x.reshape(-1, 16).var(axis=0)
    expected = 0.9**3 * 1.0 + (1 - 0.9**3) * batch_var
    close(fused.moving_variance, expected)


def test_bfloat16_matches_the_stock_layer_to_bfloat16_round_off():
    shape = (16, 8, 8, 32)
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 2.0, shape).astype("bfloat16")
    upstream = rng.normal(size=shape).astype("float32")
    stock, fused = _pair(shape, dtype="mixed_bfloat16")
    out_f, out_s = _step(fused, x, upstream), _step(stock, x, upstream)
    assert out_f[0].dtype == out_s[0].dtype == tf.bfloat16
    for a, b in zip(out_f, out_s, strict=True):
        close(a, b, rel=2e-2)
    assert fused.moving_mean.dtype == "float32"  # statistics stay float32


def test_frozen_layer_normalises_with_moving_statistics_as_stock():
    shape = (8, 4, 4, 8)
    x = np.random.default_rng(3).normal(5.0, 2.0, shape).astype("float32")
    upstream = np.ones(shape, "float32")
    stock, fused = _pair(shape)
    for layer in (stock, fused):
        layer.moving_mean.assign(np.full(8, 4.0, "float32"))
        layer.moving_variance.assign(np.full(8, 3.0, "float32"))
        layer.trainable = False
    for a, b in zip(_step(fused, x, upstream), _step(stock, x, upstream), strict=True):
        close(a, b)
    close(fused.moving_mean, np.full(8, 4.0))  # untouched


def test_falls_back_to_the_stock_computation_where_the_kernel_does_not_apply():
    x = np.random.default_rng(4).normal(size=(6, 10)).astype("float32")  # 2-D
    stock, fused = _pair((6, 10))
    close(fused(x, training=True), stock(x, training=True))
    renorm = FUSED(renorm=True)
    assert not renorm._fusable(tf.zeros((2, 3, 3, 4)), True, None)
    assert not FUSED(synchronized=True)._fusable(tf.zeros((2, 3, 3, 4)), True, None)
    assert FUSED()._fusable(tf.zeros((2, 3, 3, 4)), True, None)


VARIANTS = [
    dict(depth=8),
    dict(variant="wrn_16_8", width_factor=1),  # pre-activation basic blocks
    dict(depth=8, se_ratio=0.25, residual_scale=0.5, stochastic_depth=0.2,
         zero_init_residual=True),
    dict(variant="preact_resnet164", depths=(1, 1, 1)),  # pre-activation bottleneck
]


def _build(spec, fused):
    keras.utils.set_random_seed(0)
    if not fused:
        return keras_resnet.resnet(**spec, classes=10, input_shape=(16, 16, 3),
                                   include_preprocessing=True, classifier_activation=None)
    with fused_batch_norm.fused_layers():
        return _build(spec, False)


@pytest.mark.parametrize("spec", VARIANTS, ids=lambda s: "-".join(f"{k}" for k in s))
@pytest.mark.parametrize("freeze_bn", [False, True], ids=["bn", "frozen_bn"])
def test_whole_network_training_steps_match_stock(spec, freeze_bn):
    """SGD steps of a network built with the fused layer follow the stock network's.

    The first step's loss and moving statistics (forward quantities) agree to float32
    round-off. Gradients may not: a ReLU whose input lies within round-off of zero can fall
    on the other side of the kink in one network, which changes that unit's gradient wholly
    (measured: a pre-activation net's gradient then differs by 3e-3 in norm, with oneDNN
    kernels off the two agree to 1e-6). So after three steps the losses are compared to
    1e-3 and the whole update (all weights' change from the start, as one vector) to 1e-2
    in norm.
    """
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 16, 16, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 10, 16), 10)
    models = [_build(spec, fused) for fused in (False, True)]
    assert any(isinstance(layer, FUSED) for layer in models[1].layers)
    assert not any(isinstance(layer, FUSED) for layer in models[0].layers)
    models[1].set_weights(models[0].get_weights())
    start = np.concatenate([w.ravel() for w in models[0].get_weights()])
    losses, after_one = [], []
    for model in models:
        for layer in model.layers:
            if freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        # A small rate: each step moves the weights by a few percent, as in real training
        # (a tiny net at 0.05 with momentum rewrites them, and amplifies any difference).
        model.compile(keras.optimizers.SGD(0.01),
                      keras.losses.CategoricalCrossentropy(from_logits=True))
        losses.append([model.train_on_batch(x, y)])
        after_one.append([w.numpy() for w in model.non_trainable_weights])
        losses[-1] += [model.train_on_batch(x, y) for _ in range(2)]
    np.testing.assert_allclose(losses[1][0], losses[0][0], rtol=1e-5)
    for a, b in zip(after_one[1], after_one[0], strict=True):  # moving statistics
        close(a, b)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)
    fused, stock = (np.concatenate([w.ravel() for w in m.get_weights()]) - start
                    for m in models)
    assert np.linalg.norm(fused - stock) <= 1e-2 * np.linalg.norm(stock)


def test_checkpoints_are_interchangeable_with_the_stock_model(tmp_path):
    """Keras keys .weights.h5 entries by class name and order: the same for both."""
    spec = dict(depth=8)
    stock, fused = _build(spec, False), _build(spec, True)
    fused.set_weights([w + 1.0 for w in stock.get_weights()])
    fused.save_weights(tmp_path / "fused.weights.h5")
    stock.save_weights(tmp_path / "stock.weights.h5")

    def keys(path):
        import h5py

        out = []
        with h5py.File(path) as f:
            f.visit(out.append)
        return out

    assert keys(tmp_path / "fused.weights.h5") == keys(tmp_path / "stock.weights.h5")
    stock.load_weights(tmp_path / "fused.weights.h5")
    for a, b in zip(stock.get_weights(), fused.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_norm_layer_context_only_takes_subclasses():
    with pytest.raises(TypeError, match="not a BatchNormalization subclass"):
        with blocks.batch_norm_layer(keras.layers.Dense):
            pass
    import tf_keras

    with fused_batch_norm.fused_layers(), blocks.layer_library(tf_keras):
        twin = keras_resnet.resnet(depth=8)  # a tf_keras twin keeps tf_keras' own layer
    assert all(type(layer).__module__.startswith("tf_keras") for layer in twin.layers)


def test_save_model_writes_stock_float32_with_the_trained_state(tmp_path):
    """A bfloat16 model with fused layers, trained and compiled, saves as the stock float32
    model: same weights, trainable flags and optimizer state; no custom objects."""
    resolved = config.resolve(config.TrainConfig(depth=8, dataset="synthetic", epochs=1))
    model = network.build_training_model(resolved, 10, policy="mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    twin = network.build_stock_model(resolved, 10)
    for m in (model, twin):
        m.get_layer("conv1_bn").trainable = False
        optimization.prepare_for_training(m, resolved, 10, steps_per_epoch=4)
    twin.optimizer.build(twin.trainable_variables)
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(8) % 10, 10)
    model.train_on_batch(x, y)
    network.save_model(model, twin, tmp_path / "model.keras")

    classes, policies = saved_layers(tmp_path / "model.keras")
    assert ("BatchNormalization", "keras.layers") in classes
    assert not any("keras_resnet" in module for _, module in classes)
    assert all("bfloat16" not in p for p in policies)
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert loaded.dtype_policy.name == "float32"
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not loaded.get_layer("conv1_bn").trainable
    assert int(loaded.optimizer.iterations.numpy()) == 1
    momentums = [v for v in loaded.optimizer.variables if "momentum" in v.path]
    assert momentums and any(np.abs(v.numpy()).max() > 0 for v in momentums)


TWO_REPLICAS = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
import keras_resnet
from keras_resnet.pipeline.training import fused_batch_norm

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (32, 16, 16, 3)).astype("float32")
y = keras.utils.to_categorical(rng.integers(0, 10, 32), 10)
weights = {}
for fused in (False, True):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        if fused:
            with fused_batch_norm.fused_layers():
                model = keras_resnet.resnet(depth=8, classes=10, input_shape=(16, 16, 3))
        else:
            model = keras_resnet.resnet(depth=8, classes=10, input_shape=(16, 16, 3))
        model.compile(keras.optimizers.SGD(0.01), "categorical_crossentropy")
    start = [w.tolist() for w in model.get_weights()]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat(3)
    model.fit(ds, epochs=1, verbose=0, shuffle=False)
    weights[fused] = {"start": start, "end": [w.tolist() for w in model.get_weights()],
                      "moving": [w.numpy().tolist() for w in model.non_trainable_weights
                                 if "moving" in w.path]}
print("RESULT " + json.dumps(weights))
"""


@pytest.mark.slow  # fast tier: the fused layer on one device, two replicas of the stock one
def test_two_replica_mirrored_training_matches_stock():
    """Under MirroredStrategy (2 logical CPUs) each replica normalises its half batch and
    the moving statistics are averaged over replicas, with the fused layer as with the
    stock one."""
    out = python_subprocess(TWO_REPLICAS)
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    fused, stock = result["true"], result["false"]
    for a, b in zip(fused["start"], stock["start"], strict=True):
        np.testing.assert_array_equal(a, b)
    # as test_whole_network_training_steps_match_stock: the update agrees to 1e-2 in norm
    update_f, update_s = (np.concatenate([np.ravel(np.subtract(e, s)) for e, s in zip(
        r["end"], r["start"], strict=True)]) for r in (fused, stock))
    assert np.linalg.norm(update_f - update_s) <= 1e-2 * np.linalg.norm(update_s)
    for a, b in zip(fused["moving"], stock["moving"], strict=True):
        close(a, b, rel=1e-3)
