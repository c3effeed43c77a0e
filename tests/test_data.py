"""Input pipelines: datasets, splits, determinism, augmentation and bad data."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import check_cutout_placement, check_only_squares_changed

from keras_resnet.pipeline import data
from keras_resnet.pipeline.data import sources, transforms
from keras_resnet.pipeline.errors import DataError


def _write_images(root: Path, classes: dict[str, int], *, size=(40, 48), fmt="jpg", seed=0):
    """Writes ``count`` small random images per class folder."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            encoded = (tf.io.encode_png(pixels) if fmt == "png"
                       else tf.io.encode_jpeg(pixels)).numpy()
            (folder / f"{i:03d}.{fmt}").write_bytes(encoded)
    return root


def _labels(ds):
    return np.concatenate([y.numpy() for _, y in ds])


def _images(ds):
    return np.concatenate([x.numpy() for x, _ in ds])


# --------------------------------------------------------------------------- digits


def test_digits_bundle_shapes_and_pixels():
    bundle = data.load_data("digits", image_size=32, batch_size=64, val_fraction=0.1)
    assert bundle.class_names == tuple(str(d) for d in range(10))
    # 1,797 images, every fifth is test (359), 10% of the rest per class is validation.
    assert bundle.train_size + bundle.val_size == 1797 - 359
    assert 130 <= bundle.val_size <= 150
    x, y = next(iter(bundle.train))
    assert x.shape == (64, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255.0
    assert float(tf.reduce_max(x)) > 200  # raw pixels, not normalised
    # grey digits: the three channels are equal
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    assert len(_labels(bundle.val)) == bundle.val_size
    test = data.eval_data("digits", None, "test", 32, 100)
    assert test.size == 359 and len(_labels(test.dataset)) == 359


def test_validation_is_deterministic_and_train_epochs_are_a_function_of_seed():
    a = data.load_data("digits", image_size=16, batch_size=32, seed=3)
    b = data.load_data("digits", image_size=16, batch_size=32, seed=3)
    np.testing.assert_array_equal(_images(a.val), _images(b.val))
    np.testing.assert_array_equal(_images(a.val), _images(a.val))
    first = [_images(a.epochs(0).take(3)), _images(b.epochs(0).take(3))]
    np.testing.assert_array_equal(*first)  # same seed, same batches, whatever came before
    np.testing.assert_array_equal(_images(a.epochs(1).take(2)),
                                  _images(a.epochs(0).skip(a.steps_per_epoch(32)).take(2)))
    assert not np.array_equal(_images(a.epochs(0).take(1)), _images(a.epochs(1).take(1)))
    # a run resumed mid-epoch starts k batches in, without decoding the k batches before
    steps = a.steps_per_epoch(32)
    np.testing.assert_array_equal(_images(a.epochs(1, skip_batches=5).take(steps)),
                                  _images(a.epochs(1).skip(5).take(steps)))
    other = data.load_data("digits", image_size=16, batch_size=32, seed=4)
    assert not np.array_equal(_images(other.epochs(0).take(1)), first[0][:32])


def test_evaluation_pipelines_run_without_autotuning():
    """Keras deletes the validation iterator at every evaluation, and deleting an autotuned
    tf.data iterator can wait out its model thread's optimization period (up to 60 s; BUILD.md
    "What tools/train.py adds on top of the step"), so evaluation pipelines run without
    autotuning; the training stream keeps it."""
    bundle = data.load_data("digits", image_size=16, batch_size=32)
    assert bundle.val.options().autotune.enabled is False
    test = data.eval_data("digits", None, "test", 16, 32)
    assert test.dataset.options().autotune.enabled is False
    assert bundle.train.options().autotune.enabled is True
    assert bundle.epochs(0).options().autotune.enabled is True
    assert len(_labels(bundle.val)) == bundle.val_size and len(_labels(test.dataset)) == 359
    synthetic = data.load_data("synthetic", image_size=16, batch_size=8)
    assert synthetic.val.options().autotune.enabled is False
    assert synthetic.train.options().autotune.enabled is True
    assert data.eval_data("synthetic", None, "val", 16, 8).dataset.options().autotune.enabled \
        is False


def test_carve_is_stratified_disjoint_and_seeded():
    paths = [f"f{i}" for i in range(300)]
    labels = [i % 3 for i in range(300)]
    (tp, tl), (vp, vl) = sources.carve(paths, labels, 0.2, seed=0)
    assert len(vp) == 60 and np.bincount(vl).tolist() == [20, 20, 20]
    assert not set(tp) & set(vp) and len(tp) + len(vp) == 300
    assert sources.carve(paths, labels, 0.2, seed=0)[1][0] == vp
    assert sources.carve(paths, labels, 0.2, seed=1)[1][0] != vp
    assert sources.carve(paths, labels, 0.0, seed=0)[1][0] == []


def test_augmentation_styles():
    assert data.augmentation_style(32) == "cifar" and data.augmentation_style(64) == "cifar"
    assert data.augmentation_style(65) == "imagenet"
    plain = data.load_data("digits", image_size=32, batch_size=16, augment=False)
    aug = data.load_data("digits", image_size=32, batch_size=16, augment=True)
    x_plain, y_plain = next(iter(plain.epochs(0)))
    x_aug, y_aug = next(iter(aug.epochs(0)))
    np.testing.assert_array_equal(y_plain, y_aug)  # same order; only pixels move
    assert not np.array_equal(x_plain, x_aug)


def test_cutout_sets_one_clipped_square_to_the_fill():
    image = tf.fill([32, 32, 3], 7.0)
    outs = [transforms.cutout(image, tf.constant([5, i], tf.int64), 16).numpy()
            for i in range(200)]
    check_cutout_placement(outs, 7.0, 16)
    again = transforms.cutout(image, tf.constant([5, 3], tf.int64), 16).numpy()
    np.testing.assert_array_equal(outs[3], again)  # a pure function of the seed
    assert transforms.CUTOUT_FILL == (124, 116, 104)  # ImageNet mean, as the model's


def test_cutout_comes_after_the_same_crops_and_flips(tmp_path):
    """With cutout the pipeline draws its crops and flips as without; only a square of each
    image changes, to the fill, in CIFAR-style and ImageNet-style augmentation alike."""
    root = _write_images(tmp_path / "large", {"a": 4, "b": 4}, size=(90, 120))
    for options, size, epochs in ((dict(dataset="digits", image_size=32), 8, (0, 1)),
                                  (dict(dataset="folder", data_dir=str(root),
                                        image_size=72, val_fraction=0), 24, (0,))):
        plain, cut = (data.load_data(**options, batch_size=8, cutout=c) for c in (0, size))
        for epoch in epochs:
            (x_plain, y_plain), (x_cut, y_cut) = (
                (x.numpy(), y.numpy()) for x, y in (next(iter(b.epochs(epoch)))
                                                    for b in (plain, cut)))
            np.testing.assert_array_equal(y_plain, y_cut)
            check_only_squares_changed(x_plain, x_cut, size)
    unaugmented = data.load_data("digits", image_size=32, batch_size=16, augment=False,
                                 cutout=8)
    x = next(iter(unaugmented.epochs(0)))[0].numpy()
    assert not np.all(x == np.asarray(transforms.CUTOUT_FILL, x.dtype), axis=-1).any()


# --------------------------------------------------------------------------- folders


def test_folder_flat_layout_carves_validation(tmp_path):
    root = _write_images(tmp_path / "flat", {"cat": 12, "dog": 8})
    bundle = data.load_data("folder", data_dir=str(root), image_size=32, batch_size=4,
                            val_fraction=0.25)
    assert bundle.class_names == ("cat", "dog")
    assert (bundle.train_size, bundle.val_size) == (15, 5)
    assert sorted(_labels(bundle.val).tolist()) == [0, 0, 0, 1, 1]
    x, _ = next(iter(bundle.train))
    assert x.shape == (4, 32, 32, 3)
    # eval_data("val") with the same seed reproduces the run's validation images
    val = data.eval_data("folder", str(root), "val", 32, 4, val_fraction=0.25)
    np.testing.assert_array_equal(_images(val.dataset), _images(bundle.val))
    with pytest.raises(DataError, match="no test/ folder"):
        data.eval_data("folder", str(root), "test", 32, 4)


def test_folder_split_layout_large_images(tmp_path):
    root = tmp_path / "split"
    _write_images(root / "train", {"a": 6, "b": 6}, size=(90, 120))
    _write_images(root / "val", {"a": 2, "b": 3}, size=(100, 80), fmt="png")
    _write_images(root / "test", {"a": 4}, size=(80, 80))
    bundle = data.load_data("folder", data_dir=str(root), image_size=72, batch_size=4)
    assert (bundle.train_size, bundle.val_size) == (12, 5)
    x, _ = next(iter(bundle.train))  # random resized crop, decoded from JPEG windows
    assert x.shape == (4, 72, 72, 3)
    assert _images(bundle.val).shape == (5, 72, 72, 3)  # resize + centre crop, PNG
    test = data.eval_data("folder", str(root), "test", 72, 4)
    assert test.class_names == ("a", "b") and _labels(test.dataset).tolist() == [0] * 4


def test_folder_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="needs data_dir"):
        data.load_data("folder", data_dir=None, image_size=32, batch_size=4)
    with pytest.raises(DataError, match="does not exist"):
        data.load_data("folder", data_dir=str(tmp_path / "nope"), image_size=32, batch_size=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class sub-folders"):
        data.load_data("folder", data_dir=str(tmp_path / "empty"), image_size=32,
                       batch_size=4)
    root = _write_images(tmp_path / "one_empty", {"a": 4})
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder .*b holds no images"):
        data.load_data("folder", data_dir=str(root), image_size=32, batch_size=4)
    root = _write_images(tmp_path / "few", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="fewer than one batch of 64"):
        data.load_data("folder", data_dir=str(root), image_size=32, batch_size=64)
    with pytest.raises(DataError, match="val_fraction"):
        data.load_data("folder", data_dir=str(root), image_size=32, batch_size=1,
                       val_fraction=1.0)


def _refusal(data_dir, split=None) -> str:
    with pytest.raises(DataError) as refused:
        if split is None:
            data.load_data("folder", data_dir=str(data_dir), image_size=32, batch_size=2)
        else:
            data.eval_data("folder", str(data_dir), split, 32, 2)
    return str(refused.value)


def test_folder_layouts_that_cannot_be_right_are_refused_by_what_was_found(tmp_path):
    cifar = _write_images(tmp_path / "x" / "train", {"cat": 3, "dog": 3})
    # data_dir one level too deep: the images of one class, no class folders
    assert _refusal(cifar / "cat") == (
        f"data_dir {cifar / 'cat'} holds images but no class folders; point data_dir at the "
        f"folder whose subfolders are the classes (here probably {cifar})")
    # images straight in a folder with nothing beside it
    flat = _write_images(tmp_path / "alone", {"flat": 3}) / "flat"
    assert _refusal(flat) == (
        f"data_dir {flat} holds images but no class folders; point data_dir at the folder "
        f"whose subfolders are the classes (or put the images in {flat}/<class>/, one folder "
        "per class)")
    # one class folder
    one = _write_images(tmp_path / "one", {"cat": 3})
    assert _refusal(one) == (
        f"data_dir {one} has only one class folder, cat/, and a classifier needs two or "
        "more; add a folder per class next to it or point data_dir at the folder whose "
        "subfolders are the classes")
    # one wrapper folder around the class folders
    _write_images(tmp_path / "pets" / "images", {"cat": 2, "dog": 2})
    assert _refusal(tmp_path / "pets") == (
        f"data_dir {tmp_path / 'pets'} has one folder, images/, whose subfolders look like "
        f"the classes; point data_dir at {tmp_path / 'pets' / 'images'}")
    # train/ (and an evaluation folder) holding images without class folders
    split = tmp_path / "split"
    _write_images(split, {"train": 3, "test": 2})
    assert _refusal(split) == (f"{split / 'train'} holds images but no class folders; put "
                               f"them in {split / 'train'}/<class>/, one folder per class")
    assert _refusal(split, "test") == (
        f"{split / 'test'} holds images but no class folders; put them in "
        f"{split / 'test'}/<class>/, one folder per class")
    # train/ with one class; an evaluation folder may hold only some of the classes
    _write_images(tmp_path / "some", {"train/cat": 3, "train/dog": 3, "test/cat": 2})
    assert data.eval_data("folder", str(tmp_path / "some"), "test", 32, 2).size == 2
    (tmp_path / "some" / "train" / "dog").rename(tmp_path / "dog")
    assert _refusal(tmp_path / "some") == (
        f"{tmp_path / 'some' / 'train'} has only one class folder, cat/, and a classifier "
        "needs two or more; add a folder per class next to it or point data_dir at the "
        "folder whose subfolders are the classes")
    # an empty class folder, by name
    empty = _write_images(tmp_path / "empty_class", {"cat": 3, "dog": 3})
    (empty / "bird").mkdir()
    assert _refusal(empty) == (
        f"class folder {empty / 'bird'} holds no images (.jpg, .jpeg, .png, .bmp, .gif); add "
        "its images or remove the folder")


def test_a_tiny_class_is_a_warning_line(tmp_path, caplog):
    root = _write_images(tmp_path / "tiny", {"cat": 20, "dog": 20, "emu": 1})
    with caplog.at_level(logging.WARNING, logger="keras_resnet.pipeline.data.sources"):
        bundle = data.load_data("folder", data_dir=str(root), image_size=32, batch_size=4,
                                val_fraction=0.0)
    assert bundle.class_names == ("cat", "dog", "emu") and bundle.train_size == 41
    assert [r.getMessage() for r in caplog.records] == [
        f"class folder(s) emu (1) in {root} hold under 10% of the median class's 20 images; "
        "such a class is barely learned: add images or drop it"]
    caplog.clear()
    balanced = _write_images(tmp_path / "balanced", {"cat": 20, "dog": 2})
    with caplog.at_level(logging.WARNING, logger="keras_resnet.pipeline.data.sources"):
        data.load_data("folder", data_dir=str(balanced), image_size=32, batch_size=4)
    assert not caplog.records  # 2 of a median 11: not under a tenth


def test_unreadable_and_truncated_images_are_skipped_and_counted(tmp_path):
    root = _write_images(tmp_path / "bad", {"a": 6, "b": 6})
    good = (root / "a" / "000.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "b" / "text.png").write_bytes(b"this is not a png file at all")
    # Looks whole (start and end markers) but is corrupt inside: dropped while decoding.
    (root / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8" + b"\x00" * 64 + b"\xff\xd9")
    bundle = data.load_data("folder", data_dir=str(root), image_size=32, batch_size=2,
                            val_fraction=0.0)
    assert len(bundle.skipped) == 3
    assert {os.path.basename(p) for p in bundle.skipped} == {"truncated.jpg", "empty.jpg",
                                                             "text.png"}
    assert bundle.train_size == 13 and bundle.val is None
    assert len(_labels(bundle.train)) == 12  # the epoch runs; the corrupt file is dropped
    for f in (root / "b").iterdir():
        f.write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DataError, match=r"class folder .*b has no readable image"):
        data.load_data("folder", data_dir=str(root), image_size=32, batch_size=2)


def test_real_cifar_folder(cifar_small):
    bundle = data.load_data("folder", data_dir=str(cifar_small), image_size=32,
                            batch_size=100)
    assert bundle.class_names[:3] == ("airplane", "automobile", "bird")
    assert (bundle.train_size, bundle.val_size, bundle.skipped) == (2000, 500, ())
    assert bundle.cached
    val = _images(bundle.val)
    assert val.shape == (500, 32, 32, 3)
    assert 80 < val.mean() < 180  # natural images in 0..255
    assert np.bincount(_labels(bundle.val)).tolist() == [50] * 10


# --------------------------------------------------------------------------- TFDS


@pytest.fixture
def cifar10_metadata(tmp_path):
    """A TFDS data_dir with cifar10's metadata only (records come from mock_data)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0,
                            filename_template=None)
        for name, n in (("train", 40), ("test", 20))]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    return str(tmp_path)


def test_tfds_through_mock_data(cifar10_metadata):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=cifar10_metadata):
        bundle = data.load_data("cifar10", data_dir=cifar10_metadata, image_size=32,
                                batch_size=8, val_fraction=0.25)
        assert len(bundle.class_names) == 10
        assert (bundle.train_size, bundle.val_size) == (30, 10)  # carved from train
        x, y = next(iter(bundle.train))
        assert x.shape == (8, 32, 32, 3) and y.dtype == tf.int32
        test = data.eval_data("cifar10", cifar10_metadata, "test", 32, 8)
        assert test.size == 20
        assert next(iter(test.dataset))[0].shape == (8, 32, 32, 3)
        with pytest.raises(DataError, match="not available"):
            data.eval_data("cifar10", cifar10_metadata, "nosuchsplit", 32, 8)


def test_tfds_missing_data_fails_at_once(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError, match="is not prepared in .*nothing is downloaded"):
        data.load_data("cifar10", data_dir=str(tmp_path), image_size=32, batch_size=8)
    assert time.perf_counter() - start < 20  # never the minutes-long offline download
    with pytest.raises(DataError, match="neither folder, digits, synthetic nor a TFDS"):
        data.load_data("no_such_dataset_xyz", data_dir=str(tmp_path), image_size=32,
                       batch_size=8)


def test_tfds_manual_dataset_says_how_to_prepare_it_and_nothing_else(tmp_path, caplog,
                                                                      capfd):
    """imagenet2012 cannot be downloaded by TFDS: the line names the two archives and the
    manual folder, and no absl warning about the empty data_dir comes before it."""
    absl_level = logging.getLogger("absl").level
    start = time.perf_counter()
    with caplog.at_level(logging.DEBUG), pytest.raises(DataError) as refused:
        data.load_data("imagenet2012", data_dir=str(tmp_path), image_size=224, batch_size=8)
    assert time.perf_counter() - start < 20  # no download attempted
    assert str(refused.value) == (
        f"TFDS dataset 'imagenet2012' is not prepared in {tmp_path}/imagenet2012/5.1.0 and "
        f"TFDS cannot download it; place ILSVRC2012_img_train.tar and "
        f"ILSVRC2012_img_val.tar in {tmp_path}/downloads/manual, then run `tfds build "
        f"imagenet2012 --data_dir={tmp_path}`")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Variant folder" not in capfd.readouterr().err
    assert logging.getLogger("absl").level == absl_level  # warnings elsewhere stay on


def test_synthetic():
    bundle = data.load_data("synthetic", image_size=24, batch_size=5, num_classes=7)
    assert bundle.num_classes == 7
    x, y = next(iter(bundle.train))
    assert x.shape == (5, 24, 24, 3) and int(tf.reduce_max(y)) < 7
    assert bundle.train_size == data.SYNTHETIC_TRAIN_SIZE
    assert data.load_data("synthetic", image_size=96, batch_size=2).num_classes == 1000
