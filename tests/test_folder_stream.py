"""Folders streamed from disk without TensorFlow (keras_resnet.pipeline.data.folder_stream):
the ImageNet recipe's crops against TensorFlow's, evaluation pixels against tf.data's,
the stream as a pure function of (seed, epoch, position), and tools/train.py on JAX with
224-pixel-style images."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, skip_without_backend
from PIL import Image
from test_arrays import NO_TF
from test_device_data import jax_env

from keras_resnet.pipeline.data import folder_stream


def test_crops_are_drawn_as_tensorflow_draws_them():
    """The same distribution of crop heights, widths and areas as
    tf.image.stateless_sample_distorted_bounding_box with transforms' settings."""
    import tensorflow as tf

    height, width, n = 120, 180, 3000
    rng = np.random.default_rng(0)
    ours = np.array([folder_stream.sample_crop(rng, height, width) for _ in range(n)])
    theirs = []
    for i in range(n):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [height, width, 3], tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            seed=[0, i], min_object_covered=folder_stream.CROP_MIN_COVERED,
            aspect_ratio_range=folder_stream.CROP_ASPECT,
            area_range=folder_stream.CROP_AREA, max_attempts=folder_stream.CROP_ATTEMPTS,
            use_image_if_no_bounding_boxes=True)
        theirs.append([begin[0], begin[1], size[0], size[1]])
    theirs = np.array(theirs)
    for crops in (ours, theirs):
        top, left, h, w = crops.T
        assert np.all(top + h <= height) and np.all(left + w <= width)
        assert np.all(h * w >= folder_stream.CROP_MIN_COVERED * height * width)
    for column, name in ((2, "height"), (3, "width")):
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):
            a, b = np.quantile(ours[:, column], q), np.quantile(theirs[:, column], q)
            assert abs(a - b) <= 0.04 * (height if column == 2 else width), (name, q, a, b)
    area = lambda c: c[:, 2] * c[:, 3] / (height * width)  # noqa: E731
    assert abs(area(ours).mean() - area(theirs).mean()) < 0.02
    whole = lambda c: np.mean((c[:, 2] == height) & (c[:, 3] == width))  # noqa: E731
    assert abs(whole(ours) - whole(theirs)) < 0.02


def gradient_jpeg(path, width=300, height=200):
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 120, height)[:, None, None]
    pixels = np.broadcast_to(np.concatenate([x + 0 * y, y + 0 * x, 255 - x + 0 * y], 2),
                             (height, width, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
    return str(path)


def test_training_images_are_crops_mirrored_half_the_time(tmp_path):
    path = gradient_jpeg(tmp_path / "g.jpg")
    rng = np.random.default_rng(1)
    flips = 0
    for _ in range(200):
        out = folder_stream.train_image(path, rng, 64)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        red = out[..., 0].astype(float)
        flips += red[:, :8].mean() > red[:, -8:].mean()  # red rises left to right
    assert 60 < flips < 140
    np.testing.assert_array_equal(
        folder_stream.train_image(path, np.random.default_rng(5), 64),
        folder_stream.train_image(path, np.random.default_rng(5), 64))


def test_evaluation_pixels_are_tf_datas(tmp_path):
    import tensorflow as tf

    from keras_resnet.pipeline.data import transforms

    path = gradient_jpeg(tmp_path / "g.jpg")
    ours = folder_stream.eval_image(path, 96).astype(int)
    image = transforms.decode_image(tf.io.read_file(path))
    theirs = transforms.eval_transform(image, 96).numpy().astype(int)
    assert ours.shape == theirs.shape == (96, 96, 3)
    # Two decoders and two bilinear resizes: a few levels at most on a smooth image.
    assert np.abs(ours - theirs).max() <= 4 and np.abs(ours - theirs).mean() < 1.0


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 255, (90, 110, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / c / f"{i}.jpg")
    return tmp_path / "images"


def test_stream_is_a_pure_function_of_seed_epoch_and_position(folder):
    bundle = folder_stream.load_folder_stream("folder", data_dir=str(folder), image_size=72,
                                              batch_size=4, val_fraction=0.25, seed=0)
    assert (bundle.train_size, bundle.val_size, bundle.input_kind) == (18, 6, "stream")
    steps = bundle.steps_per_epoch(4)
    whole = bundle.epochs(0)
    x, y = whole[0]
    assert x.shape == (4, 72, 72, 3) and x.dtype == np.uint8 and y.shape == (4, 2)
    resumed = bundle.epochs(1, skip_batches=2)
    for i in range(3):
        np.testing.assert_array_equal(resumed[i][0], whole[steps + 2 + i][0])
        np.testing.assert_array_equal(resumed[i][1], whole[steps + 2 + i][1])
    again = folder_stream.load_folder_stream("folder", data_dir=str(folder), image_size=72,
                                             batch_size=4, val_fraction=0.25, seed=0)
    np.testing.assert_array_equal(again.epochs(0)[1][0], whole[1][0])
    vx, vy = bundle.val[1]
    assert vx.shape == (2, 72, 72, 3) and vy.shape == (2, 2)


def test_tools_train_on_jax_streams_large_images(tmp_path, folder):
    """Above 64 pixels a JAX run streams the folder (TensorFlow unimportable)."""
    skip_without_backend("jax", "training on the jax backend")
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", NO_TF, str(REPO / "tools"), str(REPO / "tools/train.py"),
         "--depth=8", "--dataset=folder", f"--data_dir={folder}", "--image_size=72",
         "--batch_size=4", "--epochs=1", "--steps_per_epoch=2", "--val_fraction=0.25",
         f"--model_dir={run}", "--verbose=false"], cwd=REPO, env=jax_env(),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert (config["train_input"], config["augmentation"]) == ("stream", "imagenet")
    assert (run / "model.keras").is_file()
