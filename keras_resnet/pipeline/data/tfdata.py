"""tf.data input pipelines over the sources of :mod:`keras_resnet.pipeline.data.sources`.

Every pipeline yields batches of ``(images, labels)``: float32 images holding raw 0..255 RGB
pixels (models built with ``include_preprocessing=True`` normalise inside the graph, so an
exported model takes exactly these pixels) and int32 labels in ``class_names`` order.

Datasets (the ``dataset`` argument): any prepared TFDS image-classification name,
``folder``, ``digits`` (see :mod:`~keras_resnet.pipeline.data.sources`) and ``synthetic``
(random pixels and labels, for throughput benchmarks). Training batches are shuffled and
augmented (:mod:`~keras_resnet.pipeline.data.transforms`) as a pure function of ``seed``;
evaluation batches are deterministic.

Example:
    >>> bundle = load_data("folder", data_dir="/data/flowers", image_size=224,
    ...                    batch_size=64)
    >>> model.fit(bundle.train, validation_data=bundle.val)
    >>> test = eval_data("folder", "/data/flowers", "test", 224, 64)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from keras_resnet.pipeline.data import sources, transforms
from keras_resnet.pipeline.data.splits import DEFAULT_CACHE_BUDGET_MB, Split
from keras_resnet.pipeline.data.transforms import augmentation_style
from keras_resnet.pipeline.errors import DataError

__all__ = ["DataBundle", "EvalData", "load_data", "eval_data", "augmentation_style",
           "synthetic_classes", "take", "DEFAULT_CACHE_BUDGET"]

AUTOTUNE = tf.data.AUTOTUNE
# Decoded training data (and its shuffle buffer) is kept in memory up to this many bytes.
DEFAULT_CACHE_BUDGET = DEFAULT_CACHE_BUDGET_MB * 2**20
# Shuffle buffer when the data is streamed (file lists are shuffled whole, so this only
# mixes TFDS records, which TFDS already stores shuffled).
STREAM_SHUFFLE_BUFFER = 10_000
SYNTHETIC_TRAIN_SIZE = 10_000
SYNTHETIC_VAL_SIZE = 1_000
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


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

    def epochs(self, start_epoch: int = 0, skip_batches: int = 0) -> tf.data.Dataset:
        """An endless training stream whose epoch k is a pure function of (seed, k).

        Unlike iterating ``train`` again, the sequence does not depend on how many
        iterators were made before, so runs on one device and on several replicas see the
        same batches, and a run resumed at ``start_epoch`` continues the same sequence.
        ``skip_batches`` starts ``skip_batches`` batches into ``start_epoch`` (a run resumed
        mid-epoch): the skipped images are never decoded or augmented.
        """
        if self.epoch_fn is None:
            return self.train.repeat().skip(skip_batches)
        first = tf.data.Dataset.range(start_epoch, start_epoch + 1).flat_map(
            lambda epoch: self.epoch_fn(epoch, skip_batches))
        rest = tf.data.Dataset.range(start_epoch + 1, 2**62).flat_map(self.epoch_fn)
        return _finish(first.concatenate(rest))

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches in one pass over ``train``."""
        return self.train_size // batch_size

    def first_batches(self, count: int) -> tf.data.Dataset:
        """The first ``count`` batches of :meth:`epochs` (the same every time)."""
        return self.epochs(0).take(count)


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




def load_data(dataset: str, *, data_dir: str | None = None, image_size: int,
              batch_size: int, val_fraction: float = 0.1, seed: int = 0,
              augment: bool = True, cutout: int = 0,
              cache_budget: int = DEFAULT_CACHE_BUDGET,
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
        cutout: side of the square Cutout erases from each augmented training image
            (:func:`~keras_resnet.pipeline.data.transforms.cutout`); 0 for none.
        cache_budget: bytes of decoded training images that may be kept in memory.
        num_classes: classes of "synthetic" data (default 10 up to 64 pixels, else 1000).

    Returns:
        A DataBundle.

    Raises:
        DataError: unknown dataset, missing or empty data, unprepared TFDS data, bad sizes.

    Example:
        >>> bundle = load_data("digits", image_size=32, batch_size=64)
        >>> bundle.class_names[:3], bundle.train_size, bundle.val_size
        (('0', '1', '2'), 1150, 287)
    """
    _check_sizes(image_size, batch_size)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be at least 0 and below 1")
    if dataset == "synthetic":
        common = dict(image_size=image_size, batch_size=batch_size, seed=seed,
                      num_classes=num_classes)
        train_ds, names = synthetic(SYNTHETIC_TRAIN_SIZE, offset=0, **common)
        val_ds, _ = synthetic(SYNTHETIC_VAL_SIZE, offset=2, autotune=False, **common)
        return DataBundle(train=train_ds, val=val_ds, class_names=names,
                          train_size=whole_batches(SYNTHETIC_TRAIN_SIZE, batch_size),
                          val_size=whole_batches(SYNTHETIC_VAL_SIZE, batch_size),
                          cached=True)
    train, val, class_names, skipped = sources.training_splits(dataset, data_dir,
                                                               val_fraction, seed)
    if train.size < batch_size:
        raise DataError(
            f"the training split of {dataset} has {train.size} images, fewer than one batch "
            f"of {batch_size}; lower batch_size"
        )
    epoch_fn, cached = _train_pipeline(train, image_size=image_size, batch_size=batch_size,
                                       seed=seed, augment=augment, cutout=cutout,
                                       cache_budget=cache_budget)
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
              num_classes: int | None = None,
              class_names: tuple[str, ...] | None = None) -> EvalData:
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
        class_names: the label order of a folder dataset (e.g. the model's labels.txt);
            default: its train/ folder, else the split's own class folders.

    Returns:
        An EvalData.

    Raises:
        DataError: as :func:`load_data`, or a split the dataset does not have.

    Example:
        >>> test = eval_data("digits", None, "test", 32, 128)
        >>> model.evaluate(test.dataset)
    """
    _check_sizes(image_size, batch_size)
    key = _SPLIT_ALIASES.get(split, split)
    if dataset == "synthetic":
        ds, names = synthetic(SYNTHETIC_VAL_SIZE, image_size=image_size,
                               batch_size=batch_size, seed=seed, num_classes=num_classes,
                               offset=0 if key == "train" else 2, autotune=False)
        return EvalData(dataset=ds, class_names=names,
                        size=whole_batches(SYNTHETIC_VAL_SIZE, batch_size))
    chosen, class_names, skipped = sources.named_split(dataset, data_dir, key, val_fraction,
                                                       seed, class_names)
    if chosen is None or not chosen.size:
        raise DataError(f"the {split!r} split of {dataset} is empty")
    ds = _eval_pipeline(chosen, image_size=image_size, batch_size=batch_size,
                        cache_budget=cache_budget)
    return EvalData(dataset=ds, class_names=tuple(class_names), size=chosen.size,
                    skipped=tuple(skipped))


def take(dataset, num_samples: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The first ``num_samples`` images (float32) and labels of a batched dataset.

    Batches may be ``(images, labels)`` or images alone (labels are then None). Fewer
    images come back when the dataset is shorter; an empty dataset gives empty arrays.
    """
    images, labels, count = [], [], 0
    for batch in dataset:
        x, y = batch if isinstance(batch, tuple | list) else (batch, None)
        images.append(np.asarray(x, dtype="float32")[: num_samples - count])
        if y is not None:
            labels.append(np.asarray(y)[: num_samples - count])
        count += len(images[-1])
        if count >= num_samples:
            break
    if not count:
        return np.zeros((0,), "float32"), np.zeros((0,), "int32")
    return np.concatenate(images), np.concatenate(labels) if labels else None


def _check_sizes(image_size, batch_size):
    if not isinstance(image_size, int) or image_size < 8:
        raise DataError(f"image_size={image_size!r} must be an integer of at least 8")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size={batch_size!r} must be a positive integer")


# ---- synthetic


def synthetic_classes(image_size: int, num_classes: int | None = None) -> int:
    return num_classes or (10 if image_size <= transforms.SMALL_IMAGE_MAX else 1000)


def whole_batches(n, batch_size):
    return max(1, n // batch_size) * batch_size


def synthetic(size, *, image_size, batch_size, seed, num_classes, offset, autotune=True):
    """One random batch repeated: a benchmark then measures the model, not data generation.

    ``autotune=False`` for evaluation sets (see :func:`_options`)."""
    classes = synthetic_classes(image_size, num_classes)
    images = tf.random.stateless_uniform([batch_size, image_size, image_size, 3],
                                         seed=[seed, offset], maxval=255.0)
    labels = tf.random.stateless_uniform([batch_size], seed=[seed, offset + 1],
                                         maxval=classes, dtype=tf.int32)
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat(max(1, size // batch_size))
    return _finish(ds, autotune=autotune), tuple(f"class_{i}" for i in range(classes))


def _options(deterministic=True, autotune=True):
    options = tf.data.Options()
    options.deterministic = deterministic
    # Autotuning runs a model thread per iterator; deleting the iterator waits for it
    # (up to tf.data's 60 s optimization period), and Keras deletes the validation
    # iterator at every evaluation. Evaluation pipelines run without it.
    options.autotune.enabled = autotune
    # Every worker of a multi-worker run reads the same file list; shard by element.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return options


def _load(elements, files):
    """Maps elements to decoded uint8 images, skipping files that fail to decode."""
    if not files:
        return elements.map(lambda x, y: (transforms.to_rgb(x), y), num_parallel_calls=AUTOTUNE)
    ds = elements.map(lambda p, y: (transforms.decode_image(tf.io.read_file(p)), y),
                            num_parallel_calls=AUTOTUNE)
    # Files passed an up-front check; a file corrupt inside is dropped, never fatal.
    return ds.ignore_errors(log_warning=True)


def _is_small(split: Split, image_size: int) -> bool:
    return split.small_style if split.small_style is not None else (
        image_size <= transforms.SMALL_IMAGE_MAX)


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


def _train_pipeline(split: Split, *, image_size, batch_size, seed, augment, cutout,
                    cache_budget):
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
                lambda x, y: (transforms.resize_uint8(x, image_size), y),
                num_parallel_calls=AUTOTUNE)

        def transform(x, y, s):
            if augment:
                return transforms.augment_small(x, s, image_size, split.flip), y
            return tf.cast(x, tf.float32), y
    elif split.files:
        def read(elements):
            return elements.map(lambda p, y: (tf.io.read_file(p), y),
                                num_parallel_calls=AUTOTUNE)

        def transform(contents, y, s):
            if not augment:
                image = transforms.decode_image(contents)
                return tf.cast(transforms.eval_transform(image, image_size), tf.float32), y
            return tf.cond(
                tf.io.is_jpeg(contents),
                lambda: transforms.random_resized_crop(None, s, image_size, split.flip,
                                                       contents=contents),
                lambda: transforms.random_resized_crop(transforms.decode_image(contents), s,
                                                       image_size, split.flip)), y
    else:
        def read(elements):
            return _load(elements, split.files)

        def transform(x, y, s):
            if not augment:
                return tf.cast(transforms.eval_transform(x, image_size), tf.float32), y
            return transforms.random_resized_crop(x, s, image_size, split.flip), y

    def with_cutout(x, y, s):
        x, y = transform(x, y, s)
        # Folding a constant into the element's seed leaves the other draws as they are.
        return transforms.cutout(x, tf.random.experimental.stateless_fold_in(s, 1),
                                 cutout), y

    per_element = with_cutout if augment and cutout else transform

    base = None
    if cached:
        base = read(split.elements).cache()

    def epoch_fn(epoch, skip_batches=0):
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
        # One stateless seed per element: (epoch seed, index in the epoch). Skipping after
        # the numbering keeps every later element's seed.
        ds = ds.enumerate().skip(tf.cast(skip_batches, tf.int64) * batch_size).map(
            lambda i, xy: per_element(xy[0], xy[1], tf.stack([epoch_seed, i])),
            num_parallel_calls=AUTOTUNE)
        if split.files and not small:
            ds = ds.ignore_errors(log_warning=True)  # decoding happens in ``transform``
        return ds.batch(batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE)

    return epoch_fn, cached


def _finish(ds, autotune=True):
    return ds.prefetch(AUTOTUNE).with_options(_options(autotune=autotune))


def _eval_pipeline(split: Split, *, image_size, batch_size, cache_budget):
    small = _is_small(split, image_size)
    ds = _load(split.elements, split.files)
    if small:
        ds = ds.map(lambda x, y: (transforms.resize_uint8(x, image_size), y),
                    num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda x, y: (transforms.eval_transform(x, image_size), y),
                    num_parallel_calls=AUTOTUNE)
    if split.size * image_size * image_size * 3 <= cache_budget:
        ds = ds.cache()
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=AUTOTUNE)
    return _finish(ds.batch(batch_size, num_parallel_calls=AUTOTUNE), autotune=False)
