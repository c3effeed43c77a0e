"""In-memory training input (keras_resnet.pipeline.data.arrays) and training on the JAX and
PyTorch backends without TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import (
    BACKEND_EXTRAS,
    REPO,
    check_cutout_placement,
    check_only_squares_changed,
    history_rows,
    skip_without_backend,
)
from PIL import Image

from keras_resnet.pipeline.data import arrays, sources
from keras_resnet.pipeline.errors import DataError


def make_folder(root, classes=("a", "b", "c"), per_class=20, size=32, odd_size=None):
    """``root/<class>/<i>.png``: each image filled with a value coding (class, index)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            side = odd_size if (odd_size and i == 0) else size
            pixels = np.full((side, side, 3), c * 64 + i, dtype="uint8")
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "images")


def bundle_of(folder, **kwargs):
    options = dict(data_dir=str(folder), image_size=32, batch_size=8, val_fraction=0.25,
                   seed=0)
    options.update(kwargs)
    return arrays.load_arrays("folder", **options)


def test_split_is_the_tf_data_split(folder):
    """The same files go to validation as in the tf.data pipeline (seed-0 carve)."""
    b = bundle_of(folder)
    assert (b.train_size, b.val_size, b.num_classes) == (45, 15, 3)
    val_split, _, _ = sources.named_split("folder", str(folder), "val", 0.25, 0)
    tf_val = sorted(int(y) for _, y in val_split.elements.as_numpy_iterator())
    assert sorted(b.val_labels.tolist()) == tf_val
    tf_paths = sorted(p.decode() for p, _ in val_split.elements.as_numpy_iterator())
    _, (val_paths, _), _, _ = sources.folder_files(str(folder), 0.25, 0)
    assert sorted(val_paths) == tf_paths


def test_images_decode_to_their_pixels(tmp_path):
    b = bundle_of(make_folder(tmp_path / "i", per_class=8, odd_size=40), val_fraction=0)
    assert b.train_images.shape == (24, 32, 32, 3) and b.train_images.dtype == np.uint8
    assert b.val is None and b.val_size == 0
    # File order: class-major; every image is its constant value (a 40-pixel one resized).
    codes = b.train_images[:, 0, 0, 0].astype(int)
    assert codes.tolist() == [c * 64 + i for c in range(3) for i in range(8)]


def test_epochs_visit_every_image_once_in_a_seeded_order(folder):
    b = bundle_of(folder, augment=False)
    steps = b.steps_per_epoch(8)
    assert steps == 45 // 8
    stream = b.epochs(0)
    assert stream.num_batches is None  # endless: fit draws steps_per_epoch per epoch
    seen = np.concatenate([stream[i][0][:, 16, 16, 0] for i in range(steps)])
    assert len(set(seen.tolist())) == steps * 8  # no image twice in an epoch
    again = bundle_of(folder, augment=False).epochs(0)
    np.testing.assert_array_equal(stream[3][0], again[3][0])
    other_seed = bundle_of(folder, augment=False, seed=1).epochs(0)
    assert not np.array_equal(stream[0][0], other_seed[0][0])
    # Epoch 1 follows epoch 0 in the same stream, in another order.
    assert not np.array_equal(stream[0][0], stream[steps][0])


def test_resumed_stream_continues_the_same_sequence(folder):
    b = bundle_of(folder)
    steps = b.steps_per_epoch(8)
    whole = b.epochs(0)
    resumed = b.epochs(1, skip_batches=2)
    for i in range(steps):
        x, y = resumed[i]
        want_x, want_y = whole[steps + 2 + i]
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)


def test_batches_are_float_pixels_and_one_hot_labels(folder):
    b = bundle_of(folder)
    x, y = b.epochs(0)[0]
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32
    assert y.shape == (8, 3) and y.dtype == np.float32
    np.testing.assert_array_equal(y.sum(axis=1), 1.0)
    assert len(b.first_batches(2)) == 2
    val = b.val
    assert len(val) == 2  # 15 images in batches of 8
    vx, vy = val[1]
    assert vx.shape == (7, 32, 32, 3) and vy.shape == (7, 3)


def test_augmentation_is_a_padded_crop_and_flip():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, (64, 16, 16, 3), dtype=np.uint8)
    out = arrays.augment_small(images, np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    flips, shifts = 0, set()
    for image, got in zip(padded, out, strict=True):
        matches = [(t, left, f) for t in range(5) for left in range(5) for f in (0, 1)
                   if np.array_equal(got, (image[t:t + 16, left:left + 16, :][:, ::-1]
                                           if f else image[t:t + 16, left:left + 16, :]))]
        assert matches, "not a window of the zero-padded image"
        t, left, f = matches[0]
        flips += f
        shifts.add((t, left))
    assert 16 < flips < 48  # about half are mirrored
    assert len(shifts) > 10  # offsets vary per image


def test_cutout_sets_one_clipped_square_per_image_after_the_crop_and_flip(folder):
    images = np.full((256, 32, 32, 3), 7, np.uint8)
    check_cutout_placement(arrays.cutout(images, np.random.default_rng(0), 16), 7, 16)
    # In a stream the crops and flips are those drawn without Cutout; a square changes.
    plain, cut = bundle_of(folder).epochs(1)[0], bundle_of(folder, cutout=8).epochs(1)[0]
    np.testing.assert_array_equal(plain[1], cut[1])
    check_only_squares_changed(plain[0], cut[0], 8)


def test_load_arrays_refuses_what_it_cannot_do(folder):
    with pytest.raises(DataError, match="needs TensorFlow"):
        arrays.load_arrays("cifar10", data_dir=None, image_size=32, batch_size=8)
    with pytest.raises(DataError, match="image_size=96 is over 64"):
        bundle_of(folder, image_size=96)
    with pytest.raises(DataError, match="cache_budget_mb"):
        bundle_of(folder, memory_budget=1000)
    with pytest.raises(DataError, match="fewer than batch_size=64"):
        bundle_of(folder, batch_size=64)


# ------------------------------------------------------------------ JAX and PyTorch runs

# Runs a tool with TensorFlow unimportable, as on a machine with JAX and no TensorFlow.
NO_TF = textwrap.dedent(
    """
    import runpy, sys
    sys.modules["tensorflow"] = None
    sys.path.insert(0, sys.argv[1])
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


# Runs a tool where TensorFlow is installed and reports whether it was loaded: Keras seeds
# TensorFlow wherever it is installed, which would load it (and print its C++ start-up
# lines) in a run that never uses it.
TF_INSTALLED = textwrap.dedent(
    """
    import runpy, sys
    sys.path.insert(0, sys.argv[1])
    sys.argv = sys.argv[2:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        assert not e.code, e.code
    print("tensorflow loaded:", "tensorflow" in sys.modules)
    """
)


# The backends tools/train.py runs on without TensorFlow (each test skips where its backend
# is not installed).
BACKENDS = tuple(BACKEND_EXTRAS)


def train_without_tensorflow(backend, *args, script=NO_TF):
    """tools/train.py on ``backend`` with TensorFlow unimportable (or, with
    ``script=TF_INSTALLED``, importable but not wanted)."""
    skip_without_backend(backend, f"training on the {backend} backend")
    # The CPU, as in CI, whatever the machine has; TensorFlow's C++ lines as a user sees them.
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-c", script, str(REPO / "tools"), str(REPO / "tools/train.py"),
         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_without_tensorflow_then_resume(backend, tmp_path):
    images = make_folder(tmp_path / "images", classes=("a", "b"), per_class=24)
    run = tmp_path / "run"
    flags = ["--depth=8", "--dataset=folder", f"--data_dir={images}", "--batch_size=8",
             "--learning_rate=0.01", "--warmup_epochs=0", "--val_fraction=0.25",
             f"--model_dir={run}", "--verbose=false"]
    first = train_without_tensorflow(backend, *flags, "--epochs=1")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "epoch 1/1" in first.stdout and "done: " in first.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["versions"]["keras_backend"] == backend and "tensorflow" not in config[
        "versions"]
    assert config["strategy_resolved"] == f"OneDevice ({backend})"
    # XLA always on JAX; no torch.compile (Keras' "auto") on PyTorch.
    assert config["jit_compile_resolved"] is (backend == "jax")
    assert config["accelerator"] is None
    assert (config["train_images"], config["val_images"]) == (36, 12)
    assert config["machines"] == [{"accelerator": None, "cpu": config["cpu"],
                                   "cpus": config["cpus"], "keras_backend": backend,
                                   "from_epoch": 1}]
    # As if the first epoch had run on another machine: the resumed run adds this one.
    config["machines"][0]["cpu"] = "another CPU"
    (run / "config.json").write_text(json.dumps(config))
    # Resumed where TensorFlow is installed: it is never loaded, nor are its lines printed.
    second = train_without_tensorflow(backend, *flags, "--epochs=2", script=TF_INSTALLED)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stdout and "epoch 2/2" in second.stdout
    assert "tensorflow loaded: False" in second.stdout
    for words in ("oneDNN", "cuda", "cuInit", "absl::InitializeLog"):
        assert words not in second.stderr, second.stderr[-2000:]
    machines = json.loads((run / "config.json").read_text())["machines"]
    assert [(m["cpu"], m["from_epoch"]) for m in machines] == [
        ("another CPU", 1), (config["cpu"], 2)]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and 0 <= metrics["val_accuracy"] <= 1
    assert (run / "history.csv").read_text().count("\n") == 3  # header + 2 epochs
    # The run folder is the TensorFlow pipeline's: its model loads there and scores.
    import keras

    model = keras.saving.load_model(run / "model.keras", compile=False)
    assert model.output_shape == (None, 2)
    assert (run / "labels.txt").read_text().split() == ["a", "b"]


@pytest.mark.slow  # the weight average is the fast tier's on TensorFlow (test_train.py)
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_average_without_tensorflow_is_scored_saved_and_resumed(backend, tmp_path):
    """On JAX a train or test step frees the arrays it is given: the average swapped in to
    be scored, saved as best.keras and resumed must never share an array with the weights.
    The same on PyTorch."""
    images = make_folder(tmp_path / "images", classes=("a", "b"), per_class=24)
    flags = ["--depth=8", "--dataset=folder", f"--data_dir={images}", "--batch_size=8",
             "--learning_rate=0.01", "--lr_schedule=constant", "--warmup_epochs=0",
             "--val_fraction=0.25", "--ema_decay=0.9", "--ema_bn_batches=2",
             "--verbose=false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run, epochs in ((straight, 2), (resumed, 1), (resumed, 2)):
        result = train_without_tensorflow(backend, *flags, f"--epochs={epochs}",
                                          f"--model_dir={run}")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert f"epoch {epochs}/{epochs}" in result.stdout
        assert "ema_val_top1" in result.stdout
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["weights"] in ("average", "trained") and "ema_val_accuracy" in metrics
    # The average lives in the checkpoint: the resumed run scores as the straight one.
    for key in ("val_accuracy", "ema_val_accuracy"):
        assert [r[key] for r in history_rows(resumed)] == pytest.approx(
            [r[key] for r in history_rows(straight)], abs=1e-6)
    import keras

    for run in (straight, resumed):
        for name in ("model.keras", "best.keras"):
            assert keras.saving.load_model(run / name, compile=False).output_shape == (
                None, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensorflow_only_options_are_one_line_errors_without_tensorflow(backend, tmp_path):
    images = make_folder(tmp_path / "images", classes=("a", "b"), per_class=4)
    for flag, message in (("--strategy=mirrored", "strategy=mirrored needs the TensorFlow "
                                                  "backend"),
                          ("--dataset=cifar10", "dataset=cifar10 needs TensorFlow")):
        args = ["--depth=8", "--dataset=folder", f"--data_dir={images}", flag,
                f"--model_dir={tmp_path / 'run'}"]
        result = train_without_tensorflow(backend, *args)
        err = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and err.startswith("error: ") and message in err, (
            result.stderr[-2000:])


def test_machines_of_a_run_resumed_elsewhere():
    from keras_resnet.pipeline.training import machine

    here = {"accelerator": None, "cpu": "AMD EPYC", "cpus": 2,
            "versions": {"keras_backend": "tensorflow"}}
    assert machine.machines(here, None, None) == [
        {"accelerator": None, "cpu": "AMD EPYC", "cpus": 2, "keras_backend": "tensorflow",
         "from_epoch": 1}]
    # A config.json without the record (older runs) is one machine from epoch 1.
    gpu = {"accelerator": "NVIDIA H200", "cpu": "Xeon", "cpus": 16,
           "versions": {"keras_backend": "jax"}}
    moved = machine.machines(here, gpu, {"epoch": 59, "step": 1})
    assert [(m["accelerator"], m["keras_backend"], m["from_epoch"]) for m in moved] == [
        ("NVIDIA H200", "jax", 1), (None, "tensorflow", 60)]
    # Resuming on the same machine adds nothing.
    again = machine.machines(here, {**here, "machines": moved}, {"epoch": 59})
    assert again == moved
