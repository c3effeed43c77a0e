"""Device-resident training input (keras_resnet.pipeline.training.device_data): the augmentation's
distribution against the recipe, batches as a pure function of (seed, epoch, batch), the
loop of several steps per call against single steps, and exact resume on the JAX backend.

The augmentation runs on JAX in this process (whatever the Keras backend); training runs
in subprocesses with KERAS_BACKEND=jax.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import (
    REPO,
    check_cutout_placement,
    check_only_squares_changed,
    skip_without_backend,
)
from test_arrays import NO_TF, make_folder

jax = pytest.importorskip("jax", reason="the device input needs jax (pip install -e .[dev])")

from keras_resnet.pipeline.data import arrays  # noqa: E402
from keras_resnet.pipeline.data.transforms import augmentation_style  # noqa: E402
from keras_resnet.pipeline.training import device_data  # noqa: E402


def windows(images, size, pad):
    """Every (top, left, flip) window of each zero-padded image: ``[n, positions, ...]``."""
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out, keys = [], []
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            window = padded[:, top:top + size, left:left + size]
            out += [window, window[:, :, ::-1]]
            keys += [(top, left, 0), (top, left, 1)]
    return np.stack(out, 1), keys


def test_crops_and_flips_follow_the_recipe():
    """Each output is a window of the zero-padded image; offsets are uniform over the
    2 * pad + 1 positions of each axis and half the images are mirrored, as tf.data's
    stateless_random_crop / flip and the NumPy stream draw them."""
    n, size = 1500, 16
    pad = size // 8
    assert augmentation_style(size) == "cifar"
    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, (n, size, size, 3), dtype=np.uint8)
    out = np.asarray(device_data.crop_and_flip(images, jax.random.key(3)))
    assert out.shape == images.shape and out.dtype == np.uint8
    candidates, keys = windows(images, size, pad)
    match = np.all(candidates == out[:, None], axis=(2, 3, 4))
    assert match.any(axis=1).all(), "not a window of the zero-padded image"
    found = np.array([keys[i] for i in match.argmax(axis=1)])
    positions = 2 * pad + 1
    sigma = np.sqrt(n * (1 / positions) * (1 - 1 / positions))
    for axis in (0, 1):
        counts = np.bincount(found[:, axis], minlength=positions)
        assert np.all(np.abs(counts - n / positions) < 5 * sigma), counts
    assert abs(found[:, 2].sum() - n / 2) < 5 * np.sqrt(n / 4)
    # Another key, other draws; the same key, the same draws.
    again = np.asarray(device_data.crop_and_flip(images, jax.random.key(3)))
    other = np.asarray(device_data.crop_and_flip(images, jax.random.key(4)))
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)


def test_cutout_places_one_clipped_square_anywhere():
    images = np.full((256, 32, 32, 3), 7, np.uint8)
    out = np.asarray(device_data.cutout_squares(images, jax.random.key(0), 16))
    check_cutout_placement(out, 7, 16)
    # In augment the crops and flips are those drawn without Cutout.
    rng = np.random.default_rng(1)
    images = rng.integers(1, 120, (64, 32, 32, 3), dtype=np.uint8)
    plain = np.asarray(device_data.augment(images, jax.random.key(5)))
    cut = np.asarray(device_data.augment(images, jax.random.key(5), cutout=8))
    assert plain.dtype == np.float32
    check_only_squares_changed(plain, cut, 8)


@pytest.fixture
def bundle(tmp_path):
    folder = make_folder(tmp_path / "images")
    return device_data.to_device(arrays.load_arrays(
        "folder", data_dir=str(folder), image_size=32, batch_size=8, val_fraction=0.25,
        seed=0))


def test_batches_are_a_pure_function_of_seed_epoch_and_batch(bundle):
    assert bundle.input_kind == "device" and (bundle.train_size, bundle.val_size) == (45, 15)
    steps = bundle.steps_per_epoch(8)
    x, y = bundle.batch(1, 2)
    assert x.shape == (8, 32, 32, 3) and str(x.dtype) == "float32" and y.shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(y).sum(1), 1.0)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(bundle.batch(1, 2)[0]))
    assert not np.array_equal(np.asarray(x), np.asarray(bundle.batch(1, 3)[0]))
    # The images of an epoch: every one once, in the NumPy stream's seeded order.
    order = np.concatenate([bundle.indices(steps + i, 1)[0] for i in range(steps)])
    np.testing.assert_array_equal(order, bundle.arrays.epoch_order(1)[:steps * 8])
    # Labels follow the images.
    picked = bundle.indices(steps + 2, 1)[0]
    np.testing.assert_array_equal(np.asarray(y).argmax(1), bundle.arrays.train_labels[picked])
    assert len(bundle.first_batches(2)) == 2


def test_calls_end_at_checkpoints_and_epoch_ends():
    lengths = []
    done = 0
    while done < 10:
        n = device_data._call_length(done, 10, 3, 4, 32)
        lengths.append(n)
        done += n
    assert lengths == [1, 4, 4, 1]  # steps 3 -> 4, 8, 12 of the epoch, then its end
    assert device_data._call_length(0, 100, 0, 0, 32) == 32
    assert device_data._call_length(96, 100, 0, 0, 32) == 4


# A subprocess on the JAX backend: the same model trained from the same weights with one
# step per call and with calls of three steps (the accelerator loop, here on the CPU).
LOOP_SCRIPT = r"""
import json, os, sys
import jax, keras, numpy as np
from keras_resnet.pipeline.data import arrays  # noqa: E402
from keras_resnet.pipeline.training import callbacks
from keras_resnet.pipeline.training import device_data

folder, out = sys.argv[1], sys.argv[2]
bundle = device_data.to_device(arrays.load_arrays(
    "folder", data_dir=folder, image_size=16, batch_size=4, val_fraction=0.25, seed=0,
    cutout=4))
steps = bundle.steps_per_epoch(4)

keras.utils.set_random_seed(0)
# A small net of the same kinds of layers (BN statistics are non-trainable state).
inputs = keras.Input((16, 16, 3))
x = keras.layers.Rescaling(1 / 255)(inputs)
x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(x)
x = keras.layers.BatchNormalization()(x)
x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
model = keras.Model(inputs, keras.layers.Dense(3)(x))
model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
              loss=keras.losses.CategoricalCrossentropy(from_logits=True),
              metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
model.optimizer.build(model.trainable_variables)
initial = model.get_weights(), [v.numpy() for v in model.optimizer.variables]

def restart(lr=0.01):
    # The same model and optimizer objects, so each step function compiles once.
    model.set_weights(initial[0])
    for variable, value in zip(model.optimizer.variables, initial[1]):
        variable.assign(value)
    model.optimizer.learning_rate.assign(lr)
    return model

class Ends(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends = []
    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(batch)

def weights(model):
    return np.concatenate([np.ravel(w) for w in model.get_weights()])

result = {"steps": steps}
for per_call in (1, 3):
    ends = Ends()
    bundle.epochs(0).fit(restart(), epochs=2, steps_per_epoch=steps, callbacks=[ends],
                         checkpoint_every=2, steps_per_call=per_call,
                         validation_data=bundle.val)
    np.save(os.path.join(out, f"straight_{per_call}.npy"), weights(model))
    result[f"ends_{per_call}"] = ends.ends
    result[f"val_{per_call}"] = model.history.history["val_loss"]
    # Stopped after 3 steps of epoch 1, resumed there, then epoch 2.
    bundle.epochs(0).fit(restart(), epochs=1, steps_per_epoch=3, steps_per_call=per_call)
    bundle.epochs(0, skip_batches=3).fit(model, epochs=1, steps_per_epoch=steps - 3,
                                         first_step=3, steps_per_call=per_call)
    bundle.epochs(1).fit(model, initial_epoch=1, epochs=2, steps_per_epoch=steps,
                         steps_per_call=per_call)
    np.save(os.path.join(out, f"resumed_{per_call}.npy"), weights(model))
    # The NaN guard names the step whose loss was not finite, one step or three a call
    # (an infinite learning rate: the second step's loss is NaN).
    monitor = callbacks.RunMonitor(
        callbacks.RunSettings(run_dir=out, chief=False, batch_size=4, steps_per_epoch=steps,
                              keep=1, total_epochs=2, start_time=0.0,
                              save_model=lambda path: None),
        state={"history": []}, phase=0)
    bundle.epochs(0).fit(restart(float("inf")), epochs=2, steps_per_epoch=steps,
                         callbacks=[monitor], steps_per_call=per_call)
    result[f"bad_{per_call}"] = monitor.bad_step
print("RESULT " + json.dumps(result))
"""


def jax_env():
    return dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=str(REPO))


@pytest.mark.slow  # a CPU run takes one step a call; several are the GPU measurement's
def test_calls_of_several_steps_train_as_single_steps(tmp_path):
    """The while loop an accelerator runs (three steps per call here) gives the weights of
    one step per call, ends calls where checkpoints are due, resumes mid-epoch to the same
    weights, and stops at the very step whose loss is not finite."""
    skip_without_backend("jax", "the device loop")
    folder = make_folder(tmp_path / "images", per_class=8, size=16)
    result = subprocess.run([sys.executable, "-c", LOOP_SCRIPT, str(folder), str(tmp_path)],
                            cwd=REPO, env=jax_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ")[-1])
    steps = out["steps"]  # 18 training images, batches of 4
    assert steps == 4
    assert out["ends_1"] == list(range(steps)) * 2
    assert out["ends_3"] == [1, 3] * 2  # calls end at the checkpoint every 2 steps
    single, loop = (np.load(tmp_path / f"straight_{n}.npy") for n in (1, 3))
    np.testing.assert_allclose(loop, single, rtol=1e-5, atol=1e-5)
    assert out["val_3"] == pytest.approx(out["val_1"], rel=1e-5)
    for n in (1, 3):
        np.testing.assert_array_equal(np.load(tmp_path / f"resumed_{n}.npy"),
                                      np.load(tmp_path / f"straight_{n}.npy"))
    assert out["bad_1"] == out["bad_3"] == [0, 1]


@pytest.mark.slow
def test_tools_train_on_jax_keeps_images_on_the_device_and_resumes_exactly(tmp_path):
    """tools/train.py on JAX (TensorFlow unimportable): the images live on the device,
    and a run stopped by SIGTERM mid-epoch and resumed ends with the weights of a run
    never stopped."""
    skip_without_backend("jax", "training on the jax backend")
    images = make_folder(tmp_path / "images", classes=("a", "b"), per_class=40, size=16)
    flags = ["--depth=8", "--dataset=folder", f"--data_dir={images}", "--batch_size=4",
             "--epochs=2", "--learning_rate=0.01", "--cutout=4", "--val_fraction=0.2",
             "--verbose=false"]

    def train(run):
        return subprocess.Popen(
            [sys.executable, "-c", NO_TF, str(REPO / "tools"), str(REPO / "tools/train.py"),
             *flags, f"--model_dir={run}"], cwd=REPO, env=jax_env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    first = train(straight)
    second = train(stopped)
    state_file = stopped / "checkpoints" / "checkpoint.json"
    deadline = time.time() + 300
    while time.time() < deadline and second.poll() is None:
        if state_file.exists() and json.loads(state_file.read_text())["epoch"] >= 1:
            break
        time.sleep(0.02)
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=300)
    assert second.returncode in (0, 143), err[-3000:]
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    config = json.loads((straight / "config.json").read_text())
    assert config["train_input"] == "device" and config["replicas"] == 1
    resumed = train(stopped)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    import keras

    a, b = (keras.saving.load_model(run / "model.keras", compile=False)
            for run in (straight, stopped))
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(y, x, atol=1e-6, rtol=0)


# Two CPU devices (XLA_FLAGS) in one process: the same run on one device and on both.
DATA_PARALLEL_SCRIPT = r"""
import json, os, sys
import keras, numpy as np
from keras_resnet import pipeline

folder, out = sys.argv[1], sys.argv[2]
common = dict(depth=8, dataset="folder", data_dir=folder, epochs=2, batch_size=8,
              steps_per_epoch=4, learning_rate=0.05, image_size=16, cutout=4,
              val_fraction=0.25, freeze_bn=True, verbose="false")
result = {"devices": keras.distribution.list_devices()}
for name in ("default", "auto"):
    run = os.path.join(out, name)
    metrics = pipeline.train(pipeline.TrainConfig(model_dir=run, strategy=name, **common))
    model = keras.saving.load_model(os.path.join(run, "model.keras"), compile=False)
    np.save(os.path.join(out, name + ".npy"),
            np.concatenate([np.ravel(w) for w in model.get_weights()]))
    config = json.load(open(os.path.join(run, "config.json")))
    result[name] = {key: config[key] for key in (
        "replicas", "per_replica_batch_size", "strategy_resolved", "train_input")}
    result[name].update(loss=metrics["train_loss"], val_loss=metrics["val_loss"])
try:
    pipeline.train(pipeline.TrainConfig(model_dir=os.path.join(out, "odd"),
                                        **{**common, "batch_size": 7}))
except pipeline.UserError as e:
    result["odd_batch_error"] = str(e)
print("RESULT " + json.dumps(result))
"""


def test_every_local_device_trains_data_parallel_and_matches_one_device(tmp_path):
    """With two (CPU) devices, strategy=auto trains on both with Keras' DataParallel,
    config.json records 2 replicas, and the run matches one device (BN frozen: float sums
    in another order, 1e-4 as for MirroredStrategy)."""
    skip_without_backend("jax", "data-parallel training on JAX")
    folder = make_folder(tmp_path / "images", per_class=16, size=16)  # 12 to validate
    env = {**jax_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT, str(folder),
                             str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ")[-1])
    assert out["devices"] == ["cpu:0", "cpu:1"]
    one, both = out["default"], out["auto"]
    assert (one["replicas"], one["strategy_resolved"]) == (1, "OneDevice (jax)")
    assert (both["replicas"], both["per_replica_batch_size"], both["strategy_resolved"]) == (
        2, 4, "DataParallel (jax, 2 devices)")
    assert one["train_input"] == both["train_input"] == "device"
    assert both["loss"] == pytest.approx(one["loss"], abs=1e-4)
    assert both["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "auto.npy"),
                               np.load(tmp_path / "default.npy"), atol=1e-4)
    assert out["odd_batch_error"] == ("batch_size=7 does not divide evenly over 2 replicas; "
                                      "use a multiple of 2")


def test_validation_batches_fill_up_to_a_multiple_of_the_devices(tmp_path):
    """Under data parallelism every batch splits evenly over the devices: the last one is
    filled up with copies weighted 0, so top-1 counts the real images only."""
    images = np.arange(11 * 4 * 4 * 3, dtype=np.uint8).reshape(11, 4, 4, 3)
    labels = np.arange(11) % 3
    plain = arrays.EvalStream(images, labels, 3, 4)
    split = arrays.EvalStream(images, labels, 3, 4, multiple=2)
    assert len(plain) == len(split) == 3
    x, y = plain[2]
    assert x.shape == (3, 4, 4, 3)
    fx, fy, w = split[2]
    assert fx.shape == (4, 4, 4, 3) and fy.shape == (4, 3)
    np.testing.assert_array_equal(fx[:3], x)
    np.testing.assert_array_equal(fx[3], x[0])
    np.testing.assert_array_equal(w, [1, 1, 1, 0])
    np.testing.assert_array_equal(split[0][2], np.ones(4))
