"""What a source gives the input pipelines (:class:`Split`, shared by the sources of
:mod:`~keras_resnet.pipeline.data.sources` and :mod:`~keras_resnet.pipeline.data.tfds_sources`
and read by :mod:`~keras_resnet.pipeline.data.tfdata`), and the memory decoded images may
take."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

AUTOTUNE = -1  # tf.data.AUTOTUNE; TensorFlow loads only where a tf.data split is made
BUILTIN_DATASETS = ("folder", "digits", "synthetic")
# Decoded training images (and the shuffle buffer) are kept in memory up to this size.
DEFAULT_CACHE_BUDGET_MB = 2048


@dataclasses.dataclass
class Split:
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
