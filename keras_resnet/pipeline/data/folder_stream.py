"""Image folders streamed from disk without TensorFlow: the input of JAX runs whose images
are too large or too many to hold in memory, such as 224-pixel ImageNet-style folders.

The folder is listed and carved as :mod:`keras_resnet.pipeline.data.sources` does for tf.data
(the same files, the same seed-``seed`` validation split). Each batch is decoded and
augmented with OpenCV by a pool of threads, image by image, a few batches ahead of the
one ``fit`` asks for. OpenCV releases Python's global lock while it decodes
(libjpeg-turbo) and resizes, so the threads use every core from one process, and batches
reach ``fit`` without being copied between processes. Why not Grain or ``PyDataset``
worker processes: each batch of 256 224-pixel images is 38 MiB of uint8 that a worker
process would pickle or copy through shared memory to the training process, which
threads never do, and every tool here stays a single process (SIGTERM, checkpoints, the
run lock); work that holds the global lock (Python-level transforms) would be the
reason to move to processes. Why OpenCV rather than Pillow: Pillow's bilinear resize of a
224-pixel crop took 0.76 ms here, OpenCV's a tenth of that (BUILD.md, "Input pipeline
alone").

Augmentation is the recipe of :mod:`keras_resnet.pipeline.data.transforms`:

* above 64 pixels, ImageNet-style: a random crop drawn as TensorFlow's
  ``sample_distorted_bounding_box`` draws it (aspect ratio uniform in 3/4..4/3, height
  uniform between the heights of 8% and 100% of the area, at least 10% of the image
  covered, up to 10 attempts, else the whole image), resized to the square size
  (bilinear, as TensorFlow's resize: no filtering when it shrinks), mirrored
  with probability 1/2; evaluation resizes the shorter side to size / 0.875 and takes the
  central square;
* up to 64 pixels, CIFAR-style, as :mod:`keras_resnet.pipeline.data.arrays` does;
* then Cutout where asked (DeVries & Taylor 2017).

Every image's draws are a pure function of (seed, epoch, position in the epoch) and epoch
k's order of (seed, k), so a resumed run continues the same sequence. Images come as
uint8 (a quarter of float32's bytes to the device; the model casts them), labels one-hot.

Example:
    >>> bundle = load_folder_stream("folder", data_dir="/data/imagenette", image_size=224,
    ...                             batch_size=64)
    >>> images, labels = bundle.epochs(0)[0]          # (64, 224, 224, 3) uint8, (64, 10)
"""

from __future__ import annotations

import collections
import concurrent.futures
import os

import keras
import numpy as np

from keras_resnet.pipeline.data import arrays, sources
from keras_resnet.pipeline.data.transforms import CROP_FRACTION, SMALL_IMAGE_MAX
from keras_resnet.pipeline.errors import DataError

# The crop of ImageNet-style augmentation, as transforms.random_resized_crop asks
# TensorFlow for it.
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
CROP_MIN_COVERED = 0.1
CROP_ATTEMPTS = 10
# Batches decoded ahead of the one training takes.
PREFETCH = 3


def default_threads() -> int:
    """Decoding threads: one per usable core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def sample_crop(rng: np.random.Generator, height: int, width: int):
    """A random crop window ``(top, left, crop_height, crop_width)`` of an image,
    drawn as TensorFlow's ``sample_distorted_bounding_box`` draws one for the whole-image
    box (with :data:`CROP_AREA`, :data:`CROP_ASPECT`, :data:`CROP_MIN_COVERED`,
    :data:`CROP_ATTEMPTS`; Szegedy et al. 2015's Inception crop): the whole image when
    every attempt fails."""
    total = height * width
    min_area, max_area = CROP_AREA[0] * total, CROP_AREA[1] * total
    for _ in range(CROP_ATTEMPTS):
        aspect = rng.uniform(*CROP_ASPECT)
        h = int(np.rint(np.sqrt(min_area / aspect)))
        max_h = int(np.rint(np.sqrt(max_area / aspect)))
        if np.rint(max_h * aspect) > width:
            max_h = int((width + 0.5 - 1e-7) / aspect)
            if np.rint(max_h * aspect) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += int(rng.integers(0, max_h - h + 1))
        w = int(np.rint(h * aspect))
        if w * h < min_area:
            h += 1
            w = int(np.rint(h * aspect))
        if w * h > max_area:
            h -= 1
            w = int(np.rint(h * aspect))
        area = w * h
        if (area < min_area or area > max_area or not 0 < w <= width or not 0 < h <= height
                or area < CROP_MIN_COVERED * total):
            continue
        return (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)),
                h, w)
    return 0, 0, height, width


def decode(path: str, reduce: int = 1) -> np.ndarray:
    """An image file as uint8 RGB ``[height, width, 3]``, JPEGs decoded at ``1/reduce``
    scale (1, 2, 4 or 8: libjpeg's scaled decoding). OpenCV decodes (its libjpeg-turbo
    and its resize release Python's global lock); what it cannot read (GIF) goes through
    Pillow."""
    import cv2

    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[reduce]
    image = cv2.imdecode(np.fromfile(path, np.uint8), flag)
    if image is None:
        from PIL import Image

        with Image.open(path) as pil:
            return np.asarray(pil.convert("RGB"), dtype="uint8")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _header_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:  # reads the header only
        return image.size


def train_image(path: str, rng: np.random.Generator, image_size: int, *,
                augment: bool = True) -> np.ndarray:
    """One training image: decoded, ImageNet-style augmented (or, without ``augment``,
    :func:`eval_image`), uint8 ``[image_size, image_size, 3]``. The crop is resized
    bilinearly (half-pixel centres, no filtering), as TensorFlow's resize does."""
    import cv2

    if not augment:
        return eval_image(path, image_size)
    width, height = _header_size(path)
    top, left, h, w = sample_crop(rng, height, width)
    # Decode at a reduced scale where the crop stays at least the output's size: much
    # less work for large photographs.
    reduce = max([r for r in (1, 2, 4, 8) if min(h, w) >= r * image_size], default=1)
    image = decode(path, reduce if path.lower().endswith((".jpg", ".jpeg")) else 1)
    sy, sx = image.shape[0] / height, image.shape[1] / width
    crop = image[int(top * sy):max(int((top + h) * sy), int(top * sy) + 1),
                 int(left * sx):max(int((left + w) * sx), int(left * sx) + 1)]
    out = cv2.resize(crop, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def eval_image(path: str, image_size: int) -> np.ndarray:
    """The evaluation pixels of one image, as :func:`~keras_resnet.pipeline.data.transforms.
    eval_transform` computes them: above 64 pixels the shorter side resized (area
    averaging when it shrinks, as an antialiased resize) to ``image_size / 0.875`` and
    the central square; up to 64 the whole image resized."""
    import cv2

    image = decode(path)
    height, width = image.shape[:2]

    def resize(image, size):
        shrink = size[0] < image.shape[1] or size[1] < image.shape[0]
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink
                          else cv2.INTER_LINEAR)

    if image_size <= SMALL_IMAGE_MAX:
        if (height, width) == (image_size, image_size):
            return image
        return resize(image, (image_size, image_size))
    scale = (image_size / CROP_FRACTION) / min(width, height)
    new = (max(int(round(width * scale)), image_size),
           max(int(round(height * scale)), image_size))
    image = resize(image, new)
    left, top = (new[0] - image_size) // 2, (new[1] - image_size) // 2
    return np.ascontiguousarray(image[top:top + image_size, left:left + image_size])


class StreamBundle(arrays.TrainingSet):
    """A folder dataset streamed from disk; the interface of the other bundles
    (``epochs``, ``val``, ``steps_per_epoch``, ``first_batches``, sizes, class names)."""

    input_kind = "stream"
    cached = False

    def __init__(self, train, val, class_names, *, image_size, batch_size, seed, augment,
                 cutout, skipped, threads, eval_multiple=1):
        self.eval_multiple = eval_multiple
        self.train_paths, self.train_labels = train
        self.val_files = val
        self.class_names = tuple(class_names)
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        self.augment, self.cutout = augment, cutout
        self.skipped = tuple(skipped)
        import cv2

        # The pool's threads are the parallelism: OpenCV's own threads would only compete.
        cv2.setNumThreads(1)
        self.threads = threads
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)

    @property
    def val_size(self) -> int:
        return len(self.val_files[1]) if self.val_files else 0

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the training images."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.train_size)

    def epochs(self, start_epoch: int = 0, skip_batches: int = 0) -> TrainStream:
        """The endless training stream from ``skip_batches`` batches into ``start_epoch``."""
        return TrainStream(self, start_epoch * max(self.steps_per_epoch(
            self.batch_size), 1) + skip_batches)

    @property
    def val(self) -> EvalStream | None:
        if not self.val_size:
            return None
        return EvalStream(self, *self.val_files)

    def first_batches(self, count: int) -> list:
        stream = self.epochs(0)
        return [stream[i] for i in range(count)]

    def image(self, path: str, epoch: int, position: int) -> np.ndarray:
        """Training image ``position`` of epoch ``epoch`` (``path`` is that image)."""
        rng = np.random.default_rng([self.seed, epoch, position])
        if self.image_size <= SMALL_IMAGE_MAX:
            return eval_image(path, self.image_size)  # augmented per batch (CIFAR-style)
        return train_image(path, rng, self.image_size, augment=self.augment)

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None):
        """Batch ``index`` of epoch ``epoch``: ``(uint8 images, float32 one-hot labels)``,
        decoded by the thread pool."""
        order = self.epoch_order(epoch) if order is None else order
        first = index * self.batch_size
        picked = order[first:first + self.batch_size]
        images = np.empty((len(picked), self.image_size, self.image_size, 3), np.uint8)

        def decode_part(part):
            # One task per thread, not per image: a task's own cost is that of an image.
            for i in part:
                images[i] = self.image(self.train_paths[picked[i]], epoch, first + i)

        list(self.pool.map(decode_part, np.array_split(np.arange(len(picked)),
                                                        self.threads)))
        if self.image_size <= SMALL_IMAGE_MAX and self.augment:
            rng = np.random.default_rng([self.seed, epoch, index, 1])
            images = arrays.augment_small(images, rng)
            if self.cutout:
                images = arrays.cutout(images, rng, self.cutout)
        elif self.augment and self.cutout:
            rng = np.random.default_rng([self.seed, epoch, index, 2])
            images = arrays.cutout(images, rng, self.cutout)
        labels = np.asarray(self.train_labels)[picked]
        return images, arrays.one_hot(labels, self.num_classes)


class TrainStream(keras.utils.PyDataset):
    """The endless training stream of a :class:`StreamBundle` from batch ``start`` on;
    the pool decodes :data:`PREFETCH` batches ahead of the one asked for."""

    def __init__(self, bundle: StreamBundle, start: int):
        super().__init__()
        self.bundle, self.start = bundle, start
        self.ahead = collections.OrderedDict()
        self._order = (None, None)

    @property
    def num_batches(self):
        return None  # endless

    def _submit(self, index):
        steps = max(self.bundle.steps_per_epoch(self.bundle.batch_size), 1)
        epoch, batch = divmod(self.start + index, steps)
        if self._order[0] != epoch:
            self._order = (epoch, self.bundle.epoch_order(epoch))
        order = self._order[1]
        # One batch a task: its images are decoded by the bundle's pool, in parallel.
        return self.bundle_runner.submit(self.bundle.batch, epoch, batch, order)

    @property
    def bundle_runner(self):
        if not hasattr(self, "_runner"):
            self._runner = concurrent.futures.ThreadPoolExecutor(1)
        return self._runner

    def __getitem__(self, index: int):
        for ahead in range(index, index + PREFETCH + 1):
            if ahead not in self.ahead:
                self.ahead[ahead] = self._submit(ahead)
        while self.ahead and next(iter(self.ahead)) < index:
            self.ahead.popitem(last=False)[1].cancel()
        return self.ahead.pop(index).result()


class EvalStream(keras.utils.PyDataset):
    """Validation images in order, evaluation pixels, in batches (the last may be
    smaller; filled up to a multiple of the devices as
    :class:`keras_resnet.pipeline.data.arrays.EvalStream` does)."""

    def __init__(self, bundle: StreamBundle, paths, labels):
        super().__init__()
        self.bundle, self.paths, self.labels = bundle, list(paths), np.asarray(labels)
        self.multiple = bundle.eval_multiple

    def __len__(self) -> int:
        return -(-len(self.labels) // self.bundle.batch_size)

    def __getitem__(self, index: int):
        size = self.bundle.batch_size
        part = slice(index * size, (index + 1) * size)
        images = np.stack(list(self.bundle.pool.map(
            lambda p: eval_image(p, self.bundle.image_size), self.paths[part])))
        rows = arrays.EvalStream(images, self.labels[part], self.bundle.num_classes,
                                 len(images), multiple=self.multiple)
        return rows[0]


def load_folder_stream(dataset: str, *, data_dir: str | None, image_size: int,
                       batch_size: int, val_fraction: float = 0.1, seed: int = 0,
                       augment: bool = True, cutout: int = 0,
                       threads: int | None = None, eval_multiple: int = 1) -> StreamBundle:
    """Lists and carves a folder dataset into a :class:`StreamBundle` (nothing decoded
    yet). ``eval_multiple``: the devices a data-parallel run splits each batch over; the
    last validation batch is filled up to a multiple of them (weighted 0).

    Raises:
        DataError: a dataset other than ``folder``, a bad folder, or fewer training
            images than one batch.
    """
    if dataset not in arrays.ARRAY_DATASETS:
        raise DataError(f"dataset={dataset} needs TensorFlow (tf.data); without the "
                        "TensorFlow backend train from a folder (dataset=folder), or run "
                        "with KERAS_BACKEND=tensorflow")
    (paths, labels), val, class_names, skipped = sources.folder_files(
        data_dir, val_fraction, seed)
    if len(paths) < batch_size:
        raise DataError(f"{len(paths)} training images are fewer than batch_size="
                        f"{batch_size}; lower batch_size or add images")
    return StreamBundle((paths, labels), val, class_names, image_size=image_size,
                        batch_size=batch_size, seed=seed, augment=augment, cutout=cutout,
                        skipped=skipped, threads=threads or default_threads(),
                        eval_multiple=eval_multiple)
