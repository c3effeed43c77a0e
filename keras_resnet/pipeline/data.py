"""tf.data input pipelines: TFDS datasets, image folders, scikit-learn digits, synthetic.

Every pipeline yields batches of ``(images, labels)``: float32 images holding raw 0..255 RGB
pixels (models built with ``include_preprocessing=True`` normalise inside the graph, so an
exported model takes exactly these pixels) and int32 labels in ``class_names`` order.

Datasets (the ``dataset`` argument):

* any TFDS image-classification name (``cifar10``, ``cifar100``, ``imagenette``,
  ``imagenet2012``, ...): read from an already prepared ``data_dir``; nothing is ever
  downloaded. The ``validation`` split is used when the dataset has one, otherwise the
  last ``val_fraction`` of ``train`` is carved off.
* ``folder``: ``data_dir/<class>/*.jpg``, or ``data_dir/{train,val,test}/<class>/*.jpg``.
  With no ``val/`` folder, ``val_fraction`` of every class of ``train`` is carved off
  (stratified, a fixed function of ``seed``). Images stream from disk.
* ``digits``: scikit-learn's bundled 1,797 8x8 handwritten digits, upscaled to the image
  size as 3-channel 0..255 pixels. Every fifth image is the fixed ``test`` split; validation
  is carved from the rest like ``folder``.
* ``synthetic``: random pixels and labels, for throughput benchmarks.

Augmentation follows the image size: up to 64 pixels, CIFAR-style (pad by size/8, random
crop, horizontal flip; He et al. 2015 §4.2); above, ImageNet-style (random resized crop with
8%-100% area and 3/4-4/3 aspect ratio, flip; evaluation resizes the shorter side to
size/0.875 and takes the central crop). Digits are never flipped. Random ops are stateless
and seeded per element, so a pipeline is a pure function of ``seed``.

Example:
    >>> bundle = load_data("folder", data_dir="/data/flowers", image_size=224,
    ...                    batch_size=64)
    >>> model.fit(bundle.train, validation_data=bundle.val)
    >>> test = eval_data("folder", "/data/flowers", "test", 224, 64)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
BUILTIN_DATASETS = ("folder", "digits", "synthetic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Images up to this side get CIFAR-style augmentation; larger ones ImageNet-style.
SMALL_IMAGE_MAX = 64
# Evaluation of large images: resize the shorter side to size / CROP_FRACTION, centre crop.
CROP_FRACTION = 0.875
# Decoded training data (and its shuffle buffer) is kept in memory up to this many bytes.
DEFAULT_CACHE_BUDGET = 2 * 1024**3
# Shuffle buffer when the data is streamed (file lists are shuffled whole, so this only
# mixes TFDS records, which TFDS already stores shuffled).
STREAM_SHUFFLE_BUFFER = 10_000
SYNTHETIC_TRAIN_SIZE = 10_000
SYNTHETIC_VAL_SIZE = 1_000
DIGITS_TEST_EVERY = 5
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


class UserError(ValueError):
    """A problem with what was asked for (a flag, a path, the data), said in one sentence.

    Command-line tools catch it and print ``error: <message>`` instead of a stack trace.
    """


@dataclasses.dataclass(frozen=True)
class DataBundle:
    """Training and validation input of one dataset.

    Attributes:
        train: batched, shuffled, augmented (unless ``augment=False``) dataset of
            ``(float32 [batch, size, size, 3] raw 0..255 pixels, int32 [batch] labels)``;
            incomplete last batches are dropped so every step has the full global batch.
            One pass is one epoch.
        val: batched, deterministic, un-augmented dataset of the same structure (the last
            batch may be smaller), or None when ``val_fraction=0`` leaves no validation.
        class_names: class names in label order.
        train_size: images in one epoch of ``train`` (before dropping the last batch).
        val_size: images in ``val``.
        skipped: files left out because they are empty, truncated or not images.
        cached: whether the decoded training images are kept in memory.
    """

    train: tf.data.Dataset
    val: tf.data.Dataset | None
    class_names: tuple[str, ...]
    train_size: int
    val_size: int
    skipped: tuple[str, ...] = ()
    cached: bool = False
    epoch_fn: Callable[[Any], tf.data.Dataset] | None = dataclasses.field(
        default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def epochs(self, start_epoch: int = 0) -> tf.data.Dataset:
        """An endless training stream whose epoch k is a pure function of (seed, k).

        Unlike iterating ``train`` again, the sequence does not depend on how many
        iterators were made before, so runs on one device and on several replicas see the
        same batches, and a run resumed at ``start_epoch`` continues the same sequence.
        """
        if self.epoch_fn is None:
            return self.train.repeat()
        epochs = tf.data.Dataset.range(start_epoch, 2**62)
        return _finish(epochs.flat_map(self.epoch_fn))

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches in one pass over ``train``."""
        return self.train_size // batch_size


@dataclasses.dataclass(frozen=True)
class EvalData:
    """One split prepared for evaluation (deterministic, un-augmented).

    Attributes:
        dataset: batched ``(float32 raw-pixel images, int32 labels)``.
        class_names: class names in label order.
        size: images in the split.
        skipped: files left out because they are empty, truncated or not images.
    """

    dataset: tf.data.Dataset
    class_names: tuple[str, ...]
    size: int
    skipped: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass
class _Split:
    """Unbatched elements ``(x, label)`` of one split before preprocessing.

    ``x`` is a file path (``files=True``) or a decoded uint8 image of any size.
    """

    elements: tf.data.Dataset
    size: int
    files: bool
    flip: bool = True
    # Datasets of tiny images (digits) keep CIFAR-style augmentation at any size.
    small_style: bool | None = None
    encoded_bytes: int = 0  # total file size, for the cache budget of large images


def augmentation_style(image_size: int) -> str:
    """"cifar" (pad + random crop + flip) up to 64 pixels, "imagenet" above."""
    return "cifar" if image_size <= SMALL_IMAGE_MAX else "imagenet"


def load_data(dataset: str, *, data_dir: str | None = None, image_size: int,
              batch_size: int, val_fraction: float = 0.1, seed: int = 0,
              augment: bool = True, cache_budget: int = DEFAULT_CACHE_BUDGET,
              num_classes: int | None = None) -> DataBundle:
    """Builds the training and validation pipelines of a dataset.

    Args:
        dataset: a TFDS name, "folder", "digits" or "synthetic" (see the module docstring).
        data_dir: TFDS data directory (default TFDS' own), or the root of a "folder"
            dataset. Unused by "digits" and "synthetic".
        image_size: side of the square images the pipelines emit.
        batch_size: global batch size.
        val_fraction: fraction of ``train`` carved off as validation when the dataset has
            no validation split of its own; 0 for none.
        seed: seeds the carving, the shuffling and the augmentation.
        augment: random crops and flips on ``train``; False gives the evaluation transform.
        cache_budget: bytes of decoded training images that may be kept in memory.
        num_classes: classes of "synthetic" data (default 10 up to 64 pixels, else 1000).

    Returns:
        A DataBundle.

    Raises:
        UserError: unknown dataset, missing or empty data, unprepared TFDS data, bad sizes.

    Example:
        >>> bundle = load_data("digits", image_size=32, batch_size=64)
        >>> bundle.class_names[:3], bundle.train_size, bundle.val_size
        (('0', '1', '2'), 1150, 287)
    """
    _check_sizes(image_size, batch_size)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be at least 0 and below 1")
    if dataset == "synthetic":
        common = dict(image_size=image_size, batch_size=batch_size, seed=seed,
                      num_classes=num_classes)
        train_ds, names = _synthetic(SYNTHETIC_TRAIN_SIZE, offset=0, **common)
        val_ds, _ = _synthetic(SYNTHETIC_VAL_SIZE, offset=2, **common)
        return DataBundle(train=train_ds, val=val_ds, class_names=names,
                          train_size=_whole_batches(SYNTHETIC_TRAIN_SIZE, batch_size),
                          val_size=_whole_batches(SYNTHETIC_VAL_SIZE, batch_size),
                          cached=True)
    train, val, class_names, skipped = _splits(dataset, data_dir, val_fraction, seed,
                                               image_size, num_classes)
    if train.size < batch_size:
        raise UserError(
            f"the training split of {dataset} has {train.size} images, fewer than one batch "
            f"of {batch_size}; lower --batch_size"
        )
    epoch_fn, cached = _train_pipeline(train, image_size=image_size, batch_size=batch_size,
                                       seed=seed, augment=augment, cache_budget=cache_budget)
    # Each iteration of ``train`` is one epoch with a fresh random epoch key.
    train_ds = _finish(tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
                       .take(1).flat_map(epoch_fn))
    val_ds = None
    if val is not None and val.size:
        val_ds = _eval_pipeline(val, image_size=image_size, batch_size=batch_size,
                                cache_budget=cache_budget)
    return DataBundle(train=train_ds, val=val_ds, class_names=tuple(class_names),
                      train_size=train.size, val_size=val.size if val_ds else 0,
                      skipped=tuple(skipped), cached=cached, epoch_fn=epoch_fn)


def eval_data(dataset: str, data_dir: str | None = None, split: str = "test",
              image_size: int = 224, batch_size: int = 64, *, val_fraction: float = 0.1,
              seed: int = 0, cache_budget: int = DEFAULT_CACHE_BUDGET,
              num_classes: int | None = None) -> EvalData:
    """Builds the deterministic evaluation pipeline of one split.

    ``split="val"`` with the ``val_fraction`` and ``seed`` of a training run (its
    ``config.json``) gives exactly that run's validation images; ``"train"`` gives the
    run's training images without augmentation.

    Args:
        dataset: a TFDS name, "folder", "digits" or "synthetic".
        data_dir: as for :func:`load_data`.
        split: "train", "val" (or "validation"), "test", or any TFDS split string
            such as "test[:1000]".
        image_size: side of the square images.
        batch_size: batch size (the last batch may be smaller).
        val_fraction: as for :func:`load_data`.
        seed: as for :func:`load_data`.
        cache_budget: bytes of decoded images that may be kept in memory.
        num_classes: classes of "synthetic" data.

    Returns:
        An EvalData.

    Raises:
        UserError: as :func:`load_data`, or a split the dataset does not have.

    Example:
        >>> test = eval_data("digits", None, "test", 32, 128)
        >>> model.evaluate(test.dataset)
    """
    _check_sizes(image_size, batch_size)
    key = _SPLIT_ALIASES.get(split, split)
    if dataset == "synthetic":
        ds, names = _synthetic(SYNTHETIC_VAL_SIZE, image_size=image_size,
                               batch_size=batch_size, seed=seed, num_classes=num_classes,
                               offset=0 if key == "train" else 2)
        return EvalData(dataset=ds, class_names=names,
                        size=_whole_batches(SYNTHETIC_VAL_SIZE, batch_size))
    chosen, class_names, skipped = _one_split(dataset, data_dir, key, val_fraction, seed,
                                              image_size, num_classes)
    if chosen is None or not chosen.size:
        raise UserError(f"the {split!r} split of {dataset} is empty")
    ds = _eval_pipeline(chosen, image_size=image_size, batch_size=batch_size,
                        cache_budget=cache_budget)
    return EvalData(dataset=ds, class_names=tuple(class_names), size=chosen.size,
                    skipped=tuple(skipped))


def _check_sizes(image_size, batch_size):
    if not isinstance(image_size, int) or image_size < 8:
        raise UserError(f"image_size={image_size!r} must be an integer of at least 8")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size={batch_size!r} must be a positive integer")


# --------------------------------------------------------------------------- sources


def _splits(dataset, data_dir, val_fraction, seed, image_size, num_classes):
    """Returns (train _Split, val _Split or None, class_names, skipped)."""
    if dataset == "folder":
        return _folder_splits(data_dir, val_fraction, seed)
    if dataset == "digits":
        return _digits_splits(val_fraction, seed)
    return _tfds_splits(dataset, data_dir, val_fraction, seed)


def _one_split(dataset, data_dir, split, val_fraction, seed, image_size, num_classes):
    """Returns (_Split, class_names, skipped) of one named split."""
    if dataset == "folder":
        return _folder_eval_split(data_dir, split, val_fraction, seed)
    if dataset == "digits":
        if split == "test":
            x, y, names = _digits_arrays(test=True)
            return _digits_split(x, y), names, ()
        train, val, names, _ = _digits_splits(val_fraction, seed)
        return _pick(dataset, split, {"train": train, "val": val}), names, ()
    return _tfds_eval_split(dataset, data_dir, split, val_fraction)


def _pick(dataset, split, available):
    if split not in available:
        raise UserError(
            f"split={split!r} is not available for {dataset}; choose one of "
            f"{', '.join(available)}"
        )
    return available[split]


# ---- image folders


def _folder_root(data_dir) -> str:
    if not data_dir:
        raise UserError("--dataset=folder needs --data_dir, the folder holding one "
                        "sub-folder per class")
    root = os.path.expanduser(os.fspath(data_dir))
    if not os.path.isdir(root):
        raise UserError(f"data_dir {root} does not exist or is not a folder")
    return root


def _split_dirs(root) -> dict[str, str] | None:
    """{"train": path, "val": path, "test": path} for a split layout, None for flat."""
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        return None
    dirs = {"train": train}
    for split, names in (("val", ("val", "validation")), ("test", ("test",))):
        for name in names:
            if os.path.isdir(os.path.join(root, name)):
                dirs[split] = os.path.join(root, name)
                break
    return dirs


def _folder_splits(data_dir, val_fraction, seed):
    root = _folder_root(data_dir)
    dirs = _split_dirs(root)
    train_root = dirs["train"] if dirs else root
    paths, labels, class_names, skipped = list_image_folder(train_root)
    if dirs and "val" in dirs:
        vpaths, vlabels, _, vskipped = list_image_folder(dirs["val"], class_names=class_names)
        skipped += vskipped
    else:
        (paths, labels), (vpaths, vlabels) = carve(paths, labels, val_fraction, seed)
    val = _files_split(vpaths, vlabels) if vpaths else None
    _warn_skipped(skipped)
    return _files_split(paths, labels), val, class_names, skipped


def _folder_eval_split(data_dir, split, val_fraction, seed):
    root = _folder_root(data_dir)
    dirs = _split_dirs(root) or {}
    train_root = dirs.get("train", root)
    if split == "test":
        if "test" not in dirs:
            raise UserError(f"data_dir {root} has no test/ folder next to train/, so there "
                            "is no test split; use --split=val")
        _, _, class_names, _ = list_image_folder(train_root, check_images=False)
        paths, labels, _, skipped = list_image_folder(dirs["test"], class_names=class_names)
    elif split == "val" and "val" in dirs:
        _, _, class_names, _ = list_image_folder(train_root, check_images=False)
        paths, labels, _, skipped = list_image_folder(dirs["val"], class_names=class_names)
    elif split in ("train", "val"):
        paths, labels, class_names, skipped = list_image_folder(train_root)
        if "val" not in dirs:
            train, val = carve(paths, labels, val_fraction, seed)
            paths, labels = train if split == "train" else val
    else:
        raise UserError(f"split={split!r} is not valid for a folder dataset; choose one of "
                        "train, val, test")
    _warn_skipped(skipped)
    return _files_split(paths, labels), class_names, skipped


def list_image_folder(root: str, *, class_names: Sequence[str] | None = None,
                      check_images: bool = True):
    """Lists ``root/<class>/**/<image>`` files.

    Args:
        root: folder with one sub-folder per class.
        class_names: the label order to use (e.g. the training split's); a sub-folder not
            in it is an error. Default: the sorted sub-folder names.
        check_images: cheaply check every file (non-empty, a known image signature, and
            for JPEG/PNG/GIF the end-of-image marker present) so truncated or mislabelled
            files are skipped up front instead of failing inside tf.data.

    Returns:
        (paths, labels, class_names, skipped): sorted paths, int labels, the class names
        and the skipped files.

    Raises:
        UserError: no class folders, an unknown class, or a class with no usable image.
    """
    found = sorted(e.name for e in os.scandir(root)
                   if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise UserError(
            f"{root} has no class sub-folders; expected {root}/<class>/<image>.jpg (or "
            "train/, val/, test/ folders that each hold class folders)"
        )
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise UserError(f"{root} has class folders {unknown} that the training split "
                            "does not have")
    class_names = list(class_names)
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue  # a validation/test folder may lack a class
        files = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if not files:
            raise UserError(
                f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += files
        labels += [label] * len(files)
    skipped = []
    if check_images:
        ok = _check_files(paths)
        skipped = [p for p, good in zip(paths, ok, strict=True) if not good]
        paths = [p for p, good in zip(paths, ok, strict=True) if good]
        labels = [lab for lab, good in zip(labels, ok, strict=True) if good]
        have = set(labels)
        for label, name in enumerate(class_names):
            if label not in have and os.path.isdir(os.path.join(root, name)):
                raise UserError(f"class folder {os.path.join(root, name)} has no readable "
                                "image (all are empty, truncated or not images)")
    return paths, labels, class_names, skipped


def _image_file_ok(path: str) -> bool:
    """Whether a file looks like a whole image: known signature and end marker."""
    try:
        size = os.path.getsize(path)
        if size < 16:
            return False
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 4096))
            tail = f.read()
    except OSError:
        return False
    if head.startswith(b"\xff\xd8"):
        # Entropy-coded JPEG data escapes 0xFF, so FFD9 only appears as end-of-image;
        # allow trailing padding after it.
        return b"\xff\xd9" in tail
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" in tail[-64:]
    if head.startswith((b"GIF87a", b"GIF89a")):
        return b"\x3b" in tail[-16:]
    if head.startswith(b"BM"):
        return int.from_bytes(head[2:6], "little") <= size
    return False


def _check_files(paths: list[str]) -> list[bool]:
    # Checks are I/O bound (two small reads per file), so threads overlap the waits.
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(_image_file_ok, paths, chunksize=256))


def _warn_skipped(skipped):
    if skipped:
        log.warning("skipped %d unreadable, empty or truncated image file(s), e.g. %s",
                    len(skipped), skipped[0])


def carve(paths: Sequence, labels: Sequence[int], val_fraction: float, seed: int):
    """Splits off ``val_fraction`` of every class, as a fixed function of ``seed``.

    Returns:
        ((train_paths, train_labels), (val_paths, val_labels)), each in input order.
    """
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels_arr), dtype=bool)
    for label in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == label)
        n_val = min(round(len(idx) * val_fraction), len(idx) - 1)
        if n_val > 0:
            is_val[rng.permutation(idx)[:n_val]] = True

    def take(mask):
        return [paths[i] for i in np.flatnonzero(mask)], labels_arr[mask].tolist()

    return take(~is_val), take(is_val)


def _files_split(paths, labels) -> _Split:
    encoded = sum(os.path.getsize(p) for p in paths) if len(paths) <= 200_000 else 0
    elements = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))
    return _Split(elements, len(paths), files=True, encoded_bytes=encoded)


# ---- digits


def _digits_arrays(*, test: bool):
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    index = np.arange(len(digits.target))
    keep = (index % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1) == test
    # 0..16 ink levels to 0..255 grey, repeated over RGB.
    images = np.round(digits.images[keep] * (255.0 / 16.0)).astype("uint8")[..., None]
    images = np.repeat(images, 3, axis=-1)
    return images, digits.target[keep].astype("int32"), [str(d) for d in range(10)]


def _digits_split(images, labels) -> _Split:
    elements = tf.data.Dataset.from_tensor_slices((images, labels))
    return _Split(elements, len(labels), files=False, flip=False, small_style=True)


def _digits_splits(val_fraction, seed):
    images, labels, names = _digits_arrays(test=False)
    (tr, tr_y), (va, va_y) = carve(np.arange(len(labels)), labels, val_fraction, seed)
    train = _digits_split(images[tr], np.asarray(tr_y, "int32"))
    val = _digits_split(images[va], np.asarray(va_y, "int32")) if va else None
    return train, val, names, []


# ---- synthetic


def synthetic_classes(image_size: int, num_classes: int | None = None) -> int:
    return num_classes or (10 if image_size <= SMALL_IMAGE_MAX else 1000)


def _whole_batches(n, batch_size):
    return max(1, n // batch_size) * batch_size


def _synthetic(size, *, image_size, batch_size, seed, num_classes, offset):
    """One random batch repeated: a benchmark then measures the model, not data generation."""
    classes = synthetic_classes(image_size, num_classes)
    images = tf.random.stateless_uniform([batch_size, image_size, image_size, 3],
                                         seed=[seed, offset], maxval=255.0)
    labels = tf.random.stateless_uniform([batch_size], seed=[seed, offset + 1],
                                         maxval=classes, dtype=tf.int32)
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat(max(1, size // batch_size))
    return ds.prefetch(AUTOTUNE).with_options(_options()), tuple(
        f"class_{i}" for i in range(classes))


# ---- TFDS


def _tfds_builder(name, data_dir):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - part of the training extras
        raise UserError(f"dataset {name!r} needs tensorflow-datasets ({e}); install "
                        "keras_resnet[train]") from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise UserError(
            f"dataset {name!r} is neither {', '.join(BUILTIN_DATASETS)} nor a TFDS dataset "
            "name (e.g. cifar10, cifar100, imagenette, imagenet2012)"
        ) from e
    # Offline, download_and_prepare hangs for minutes before failing, so never call it:
    # the data must already be prepared in data_dir.
    if not builder.is_prepared():
        raise UserError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir} (nothing is "
            f"downloaded here); run `tfds build {name} --data_dir=DIR` where it can be "
            "downloaded and pass that DIR as --data_dir"
        )
    return builder


def _tfds_keys(builder):
    import tensorflow_datasets as tfds

    features = builder.info.features
    keys = builder.info.supervised_keys
    if keys and len(keys) == 2 and isinstance(keys[0], str) and isinstance(keys[1], str):
        image_key, label_key = keys
    else:
        image_key = next((k for k, f in features.items()
                          if isinstance(f, tfds.features.Image)), None)
        label_key = next((k for k, f in features.items()
                          if isinstance(f, tfds.features.ClassLabel)), None)
    if (image_key not in features or label_key not in features
            or not isinstance(features[image_key], tfds.features.Image)
            or not isinstance(features[label_key], tfds.features.ClassLabel)):
        raise UserError(f"TFDS dataset {builder.name!r} is not an image-classification "
                        "dataset (it has no image feature with a class label)")
    return image_key, label_key, list(features[label_key].names)


def _tfds_split(builder, split, *, shuffle, seed=0) -> _Split:
    import tensorflow_datasets as tfds

    image_key, label_key, _ = _tfds_keys(builder)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle,
                            read_config=tfds.ReadConfig(shuffle_seed=seed))
    ds = ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)),
                num_parallel_calls=AUTOTUNE)
    return _Split(ds, builder.info.splits[split].num_examples, files=False)


def _tfds_val_name(builder):
    return next((s for s in ("validation", "val") if s in builder.info.splits), None)


def _tfds_carve(builder, val_fraction):
    n = builder.info.splits["train"].num_examples
    n_val = round(n * val_fraction)
    # TFDS stores records shuffled, so the tail of train is a random sample.
    return f"train[:{n - n_val}]", (f"train[{n - n_val}:]" if n_val else None)


def _tfds_splits(name, data_dir, val_fraction, seed):
    builder = _tfds_builder(name, data_dir)
    _, _, class_names = _tfds_keys(builder)
    if "train" not in builder.info.splits:
        raise UserError(f"TFDS dataset {name!r} has no train split (it has "
                        f"{', '.join(builder.info.splits)})")
    val_name = _tfds_val_name(builder)
    train_name = "train"
    if val_name is None:
        train_name, val_name = _tfds_carve(builder, val_fraction)
    train = _tfds_split(builder, train_name, shuffle=True, seed=seed)
    val = _tfds_split(builder, val_name, shuffle=False) if val_name else None
    return train, val, class_names, []


def _tfds_eval_split(name, data_dir, split, val_fraction):
    builder = _tfds_builder(name, data_dir)
    _, _, class_names = _tfds_keys(builder)
    if split in ("train", "val") and _tfds_val_name(builder) is None:
        train_name, val_name = _tfds_carve(builder, val_fraction)
        split = train_name if split == "train" else val_name
        if split is None:
            raise UserError(f"val_fraction=0 leaves {name} without a validation split")
    elif split == "val":
        split = _tfds_val_name(builder)
    try:
        chosen = _tfds_split(builder, split, shuffle=False)
    except (KeyError, ValueError) as e:
        raise UserError(f"split={split!r} is not available for {name}; it has "
                        f"{', '.join(builder.info.splits)}") from e
    return chosen, class_names, []


# --------------------------------------------------------------------------- transforms


def _to_rgb(image):
    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    return image


def decode_image(contents):
    """Decodes JPEG/PNG/BMP/GIF bytes to a uint8 [height, width, 3] image."""
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _resize_uint8(image, size):
    """Resizes to size x size (antialiased), keeping uint8; a no-op at the right size."""
    shape = tf.shape(image)

    def resize():
        resized = tf.image.resize(image, [size, size], antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    return tf.ensure_shape(tf.cond(same, lambda: image, resize), [size, size, 3])


def eval_transform(image, image_size: int):
    """The evaluation transform of one uint8 image: the exact pixels models are scored on.

    Up to 64 pixels the image is resized to the square size; above, the shorter side is
    resized to ``image_size / 0.875`` and the central square cropped. Returns uint8.
    """
    image = _to_rgb(image)
    if image_size <= SMALL_IMAGE_MAX:
        return _resize_uint8(image, image_size)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (image_size / CROP_FRACTION) / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
    resized = tf.image.resize(image, new, antialias=True)
    top = (new[0] - image_size) // 2
    left = (new[1] - image_size) // 2
    crop = resized[top:top + image_size, left:left + image_size]
    crop = tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8)
    return tf.ensure_shape(crop, [image_size, image_size, 3])


def _augment_small(image, seed, image_size, flip):
    """CIFAR-style: zero-pad by size/8, random crop back, random horizontal flip."""
    pad = max(1, image_size // 8)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    x = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    x = tf.image.stateless_random_crop(x, [image_size, image_size, 3], seed=seeds[0])
    if flip:
        x = tf.image.stateless_random_flip_left_right(x, seed=seeds[1])
    return tf.cast(x, tf.float32)


def _random_resized_crop(image, seed, image_size, flip, *, contents=None):
    """Inception-style crop (8%-100% of the area, aspect 3/4-4/3), resize, flip.

    With ``contents`` (JPEG bytes) only the crop window is decoded.
    """
    seeds = tf.random.experimental.stateless_split(seed, 2)
    shape = tf.image.extract_jpeg_shape(contents) if image is None else tf.shape(image)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seeds[0],
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    if image is None:
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        crop = tf.image.decode_and_crop_jpeg(contents, window, channels=3)
    else:
        crop = tf.slice(image, begin, size)
    x = tf.image.resize(crop, [image_size, image_size])
    x = tf.clip_by_value(x, 0.0, 255.0)
    if flip:
        x = tf.image.stateless_random_flip_left_right(x, seed=seeds[1])
    return tf.ensure_shape(x, [image_size, image_size, 3])


def _options(deterministic=True):
    options = tf.data.Options()
    options.deterministic = deterministic
    # Every worker of a multi-worker run reads the same file list; shard by element.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return options


def _load(elements, files):
    """Maps elements to decoded uint8 images, skipping files that fail to decode."""
    if not files:
        return elements.map(lambda x, y: (_to_rgb(x), y), num_parallel_calls=AUTOTUNE)
    ds = elements.map(lambda p, y: (decode_image(tf.io.read_file(p)), y),
                            num_parallel_calls=AUTOTUNE)
    # Files passed an up-front check; a file corrupt inside is dropped, never fatal.
    return ds.ignore_errors(log_warning=True)


def _is_small(split: _Split, image_size: int) -> bool:
    return split.small_style if split.small_style is not None else (
        image_size <= SMALL_IMAGE_MAX)


def _permute(ds, size, epoch_seed):
    """A full, stateless shuffle: the order depends only on ``epoch_seed``.

    (Dataset.shuffle draws from a stateful generator, so its order would depend on how
    many iterators were made before.) The batch of all elements is a copy of the cache,
    which the cache budget allows for.
    """
    def permute(x, y):
        # The count can be below ``size`` when undecodable files were dropped.
        keys = tf.random.stateless_uniform(tf.shape(y)[:1], seed=tf.stack([epoch_seed, 0]))
        order = tf.argsort(keys)
        return tf.gather(x, order), tf.gather(y, order)

    return ds.batch(size).map(permute).unbatch()


def _epoch_seed(seed, epoch):
    return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


def _train_pipeline(split: _Split, *, image_size, batch_size, seed, augment, cache_budget):
    """Returns (epoch -> batched dataset of that epoch, whether data is cached).

    An epoch's order and augmentation are a pure function of (seed, epoch), so a run
    sees the same data however many iterators are made (tf.distribute makes an extra
    one) and a resumed run continues the original sequence.
    """
    small = _is_small(split, image_size)
    if small:
        # Decoded small images are compact: cache them (the budget covers the cache and
        # the in-memory shuffle buffer over it).
        cached = 2 * split.size * image_size * image_size * 3 <= cache_budget
    else:
        # Large images: at most the encoded bytes are cached; decoding (only the random
        # crop window, for JPEG) happens every epoch.
        cached = bool(split.files and 0 < 2 * split.encoded_bytes <= cache_budget)

    if small:
        def read(elements):
            return _load(elements, split.files).map(
                lambda x, y: (_resize_uint8(x, image_size), y), num_parallel_calls=AUTOTUNE)

        def transform(x, y, s):
            if augment:
                return _augment_small(x, s, image_size, split.flip), y
            return tf.cast(x, tf.float32), y
    elif split.files:
        def read(elements):
            return elements.map(lambda p, y: (tf.io.read_file(p), y),
                                num_parallel_calls=AUTOTUNE)

        def transform(contents, y, s):
            if not augment:
                return tf.cast(eval_transform(decode_image(contents), image_size),
                               tf.float32), y
            return tf.cond(
                tf.io.is_jpeg(contents),
                lambda: _random_resized_crop(None, s, image_size, split.flip,
                                             contents=contents),
                lambda: _random_resized_crop(decode_image(contents), s, image_size,
                                             split.flip)), y
    else:
        def read(elements):
            return _load(elements, split.files)

        def transform(x, y, s):
            if not augment:
                return tf.cast(eval_transform(x, image_size), tf.float32), y
            return _random_resized_crop(x, s, image_size, split.flip), y

    base = None
    if cached:
        base = read(split.elements).cache()

    def epoch_fn(epoch):
        epoch_seed = _epoch_seed(seed, epoch)
        if cached:
            ds = _permute(base, split.size, epoch_seed)
        elif split.files:
            # Permuting a file list is free: the whole list, every epoch.
            ds = read(_permute(split.elements, split.size, epoch_seed))
        else:
            # Streamed records (TFDS stores them shuffled): a window shuffle suffices.
            ds = read(split.elements).shuffle(min(split.size, STREAM_SHUFFLE_BUFFER),
                                              seed=seed)
        # One stateless seed per element: (epoch seed, index in the epoch).
        ds = ds.enumerate().map(
            lambda i, xy: transform(xy[0], xy[1], tf.stack([epoch_seed, i])),
            num_parallel_calls=AUTOTUNE)
        if split.files and not small:
            ds = ds.ignore_errors(log_warning=True)  # decoding happens in ``transform``
        return ds.batch(batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE)

    return epoch_fn, cached


def _finish(ds):
    return ds.prefetch(AUTOTUNE).with_options(_options())


def _eval_pipeline(split: _Split, *, image_size, batch_size, cache_budget):
    small = _is_small(split, image_size)
    ds = _load(split.elements, split.files)
    if small:
        ds = ds.map(lambda x, y: (_resize_uint8(x, image_size), y), num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda x, y: (eval_transform(x, image_size), y),
                    num_parallel_calls=AUTOTUNE)
    if split.size * image_size * image_size * 3 <= cache_budget:
        ds = ds.cache()
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=AUTOTUNE)
    return _finish(ds.batch(batch_size, num_parallel_calls=AUTOTUNE))
