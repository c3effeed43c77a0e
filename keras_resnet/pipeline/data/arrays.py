"""Training input held in memory as NumPy arrays: the data of runs on the JAX or PyTorch
Keras backend, where TensorFlow (tf.data) is absent.

A folder dataset is listed and carved exactly as :mod:`keras_resnet.pipeline.data.sources` does
for tf.data (the same files, the same seed-``seed`` validation split), decoded once with
Pillow into uint8 arrays, and fed to ``fit`` by :class:`keras.utils.PyDataset` streams:

* training: an endless stream whose epoch k visits every image once in an order that is a
  pure function of (seed, k), in full batches (the last incomplete one is dropped), with
  CIFAR-style augmentation (zero-pad by size/8, random crop back, random horizontal flip;
  He et al. 2015 §4.2), then Cutout where asked (DeVries & Taylor 2017), drawn per batch
  from (seed, k, batch). The same recipe as the
  tf.data pipeline; the random draws differ, so the two do not see identical batches.
* validation: the carved images in file order, un-augmented, the last batch smaller.

Labels come one-hot (float32), as the loss expects; images as float32 raw 0..255 pixels
(normalisation is inside the model).

Example:
    >>> bundle = load_arrays("folder", data_dir="cifar10/train", image_size=32,
    ...                      batch_size=64, val_fraction=0.1, seed=0)
    >>> images, labels = bundle.epochs(0)[0]          # (64, 32, 32, 3), (64, 10)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import keras
import numpy as np

from keras_resnet.pipeline.data import sources
from keras_resnet.pipeline.data.transforms import CUTOUT_FILL, SMALL_IMAGE_MAX
from keras_resnet.pipeline.errors import DataError

# Datasets an array run can read (TFDS and the tf.data-backed sources need TensorFlow).
ARRAY_DATASETS = ("folder",)


class TrainingSet:
    """What every bundle of training images derives from its ``class_names`` and
    ``train_labels``."""

    class_names: tuple[str, ...]
    train_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_size(self) -> int:
        return len(self.train_labels)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches in one pass over the training images."""
        return self.train_size // batch_size


@dataclasses.dataclass(frozen=True)
class ArrayBundle(TrainingSet):
    """Training and validation images of one dataset, decoded into memory.

    The interface is :class:`keras_resnet.pipeline.data.DataBundle`'s (``epochs``,
    ``val``, ``steps_per_epoch``, ``first_batches``, sizes and class names), with streams
    of ``(float32 images, float32 one-hot labels)``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray | None
    val_labels: np.ndarray | None
    class_names: tuple[str, ...]
    batch_size: int
    seed: int
    augment: bool = True
    cutout: int = 0
    skipped: tuple[str, ...] = ()
    cached: bool = True
    # Devices a data-parallel run splits each batch over: the last validation batch is
    # filled up to a multiple of them (weighted 0).
    eval_multiple: int = 1

    @property
    def val_size(self) -> int:
        return 0 if self.val_labels is None else len(self.val_labels)

    def epochs(self, start_epoch: int = 0, skip_batches: int = 0) -> TrainStream:
        """The endless training stream from ``skip_batches`` batches into ``start_epoch``."""
        return TrainStream(self, start_epoch, skip_batches)

    @property
    def val(self) -> EvalStream | None:
        if self.val_labels is None or not len(self.val_labels):
            return None
        return EvalStream(self.val_images, self.val_labels, self.num_classes,
                          self.batch_size, multiple=self.eval_multiple)

    def first_batches(self, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The first ``count`` batches of epoch 0 (the same every time)."""
        stream = self.epochs(0)
        return [stream[i] for i in range(count)]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the training images."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.train_size)

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None):
        """Batch ``index`` of epoch ``epoch``, augmented unless ``augment=False`` (with
        Cutout where ``cutout`` is set)."""
        if order is None:
            order = self.epoch_order(epoch)
        picked = order[index * self.batch_size:(index + 1) * self.batch_size]
        images = self.train_images[picked]
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, index, 1])
            images = augment_small(images, rng)
            if self.cutout:
                images = cutout(images, rng, self.cutout)
        return images.astype("float32"), one_hot(self.train_labels[picked], self.num_classes)


class TrainStream(keras.utils.PyDataset):
    """The endless training stream of an :class:`ArrayBundle` (``fit`` draws
    ``steps_per_epoch`` batches per epoch and carries on across epochs)."""

    def __init__(self, bundle: ArrayBundle, start_epoch: int, skip_batches: int):
        super().__init__()
        self.bundle = bundle
        self.start = start_epoch * bundle.steps_per_epoch(bundle.batch_size) + skip_batches
        self._order = (None, None)

    @property
    def num_batches(self):
        return None  # endless

    def __getitem__(self, index: int):
        steps = max(self.bundle.steps_per_epoch(self.bundle.batch_size), 1)
        epoch, batch = divmod(self.start + index, steps)
        if self._order[0] != epoch:
            self._order = (epoch, self.bundle.epoch_order(epoch))
        return self.bundle.batch(epoch, batch, self._order[1])


class EvalStream(keras.utils.PyDataset):
    """Images in order, un-augmented, in batches (the last one may be smaller).

    With ``multiple`` > 1 (a data-parallel run, whose every batch is split evenly over the
    devices) batches come with sample weights, and the last one is filled up to a multiple
    of ``multiple`` with copies of its first image weighted 0: top-1 and top-5 count the
    real images only; the mean loss divides by the filled-up count (at most
    ``multiple`` - 1 more images than there are).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int,
                 batch_size: int, multiple: int = 1):
        super().__init__()
        self.images, self.labels = images, labels
        self.num_classes, self.batch_size = num_classes, batch_size
        self.multiple = multiple

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __getitem__(self, index: int):
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        x = self.images[part].astype("float32")
        y = one_hot(self.labels[part], self.num_classes)
        if self.multiple == 1:
            return x, y
        short = -len(y) % self.multiple
        weights = np.concatenate([np.ones(len(y)), np.zeros(short)]).astype("float32")
        x, y = (np.concatenate([a, np.repeat(a[:1], short, 0)]) for a in (x, y))
        return x, y, weights


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype="float32")[labels]


def augment_small(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CIFAR-style augmentation of a uint8 batch ``[n, size, size, 3]``: zero-pad by
    size/8, a random crop back to size, a random horizontal flip (each image its own)."""
    n, height, width, _ = images.shape
    pad = max(1, height // 8)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    top = rng.integers(0, 2 * pad + 1, n)
    left = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def cutout(images: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Cutout (DeVries & Taylor 2017) on a batch ``[n, height, width, 3]``: in each image a
    ``size`` x ``size`` square, centred uniformly over the image and clipped at its edges,
    set to :data:`~keras_resnet.pipeline.data.transforms.CUTOUT_FILL`."""
    n, height, width, _ = images.shape
    start = np.stack([rng.integers(0, height, n), rng.integers(0, width, n)], 1) - size // 2
    rows = np.arange(height)[None, :] - start[:, :1]
    cols = np.arange(width)[None, :] - start[:, 1:]
    inside = (((rows >= 0) & (rows < size))[:, :, None]
              & ((cols >= 0) & (cols < size))[:, None, :])
    return np.where(inside[..., None], np.asarray(CUTOUT_FILL, images.dtype), images)


def load_arrays(dataset: str, *, data_dir: str | None, image_size: int, batch_size: int,
                val_fraction: float = 0.1, seed: int = 0, augment: bool = True,
                cutout: int = 0, memory_budget: int | None = None,
                eval_multiple: int = 1) -> ArrayBundle:
    """Lists, carves and decodes a dataset into an :class:`ArrayBundle` (``eval_multiple``:
    see :attr:`ArrayBundle.eval_multiple`).

    Raises:
        DataError: a dataset other than ``folder``, images larger than 64 pixels (the
            ImageNet-style augmentation is tf.data's), images over ``memory_budget`` bytes,
            a bad folder, or fewer training images than one batch.
    """
    if dataset not in ARRAY_DATASETS:
        raise DataError(f"dataset={dataset} needs TensorFlow (tf.data); without the "
                        "TensorFlow backend train from a folder (dataset=folder), or run "
                        "with KERAS_BACKEND=tensorflow")
    if image_size > SMALL_IMAGE_MAX:
        raise DataError(f"image_size={image_size} is over {SMALL_IMAGE_MAX}, whose "
                        "ImageNet-style augmentation needs TensorFlow; run with "
                        "KERAS_BACKEND=tensorflow")
    (paths, labels), val, class_names, skipped = sources.folder_files(
        data_dir, val_fraction, seed)
    need = (len(paths) + (len(val[0]) if val else 0)) * image_size * image_size * 3
    if memory_budget is not None and need > memory_budget:
        raise DataError(f"the decoded images take {need / 2**20:.0f} MiB, over "
                        f"cache_budget_mb={memory_budget / 2**20:.0f}; raise cache_budget_mb "
                        "or run with KERAS_BACKEND=tensorflow, which streams from disk")
    if len(paths) < batch_size:
        raise DataError(f"{len(paths)} training images are fewer than batch_size="
                        f"{batch_size}; lower batch_size or add images")
    val_images = val_labels = None
    if val:
        val_images, val_labels = decode(val[0], image_size), np.asarray(val[1], "int32")
    return ArrayBundle(
        train_images=decode(paths, image_size), train_labels=np.asarray(labels, "int32"),
        val_images=val_images, val_labels=val_labels, class_names=tuple(class_names),
        batch_size=batch_size, seed=seed, augment=augment, cutout=cutout,
        skipped=tuple(skipped), eval_multiple=eval_multiple)


def decode(paths: list[str], image_size: int) -> np.ndarray:
    """Decodes image files to uint8 RGB ``[n, image_size, image_size, 3]`` (resized,
    antialiased, where a file has another size)."""
    from PIL import Image

    def load(path):
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR,
                                     reducing_gap=None)
            return np.asarray(image, dtype="uint8")

    out = np.empty((len(paths), image_size, image_size, 3), dtype="uint8")
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for i, image in enumerate(pool.map(load, paths, chunksize=256)):
            out[i] = image
    return out
