"""Per-image transforms: decoding, resizing, training augmentation, evaluation crops.

Augmentation follows the image size: up to 64 pixels, CIFAR-style (pad by size/8, random
crop, horizontal flip; He et al. 2015 §4.2); above, ImageNet-style (random resized crop with
8%-100% area and 3/4-4/3 aspect ratio, flip; evaluation resizes the shorter side to
size/0.875 and takes the central crop). Either may end with Cutout (DeVries & Taylor 2017):
a square of the image set to the mean pixel of the models' normalisation. Random ops are
stateless and take their seed as an argument, so a pipeline built from them is a pure
function of its seeds. Each transform imports TensorFlow itself: the constants and
:func:`augmentation_style` load without it.
"""

from __future__ import annotations

from keras_resnet.models import IMAGENET_MEAN

# Images up to this side get CIFAR-style augmentation; larger ones ImageNet-style.
SMALL_IMAGE_MAX = 64
# Evaluation of large images: resize the shorter side to size / CROP_FRACTION, centre crop.
CROP_FRACTION = 0.875
# What Cutout writes: the mean pixel that ``include_preprocessing`` maps to about zero,
# as the paper zeroes normalised pixels (whole levels, so uint8 arrays hold it exactly).
CUTOUT_FILL = tuple(round(v) for v in IMAGENET_MEAN)


def augmentation_style(image_size: int) -> str:
    """"cifar" (pad + random crop + flip) up to 64 pixels, "imagenet" above."""
    return "cifar" if image_size <= SMALL_IMAGE_MAX else "imagenet"


def to_rgb(image):
    import tensorflow as tf

    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    return image


def decode_image(contents):
    """Decodes JPEG/PNG/BMP/GIF bytes to a uint8 [height, width, 3] image."""
    import tensorflow as tf

    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_uint8(image, size):
    """Resizes to size x size (antialiased), keeping uint8; a no-op at the right size."""
    import tensorflow as tf

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
    import tensorflow as tf

    image = to_rgb(image)
    if image_size <= SMALL_IMAGE_MAX:
        return resize_uint8(image, image_size)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (image_size / CROP_FRACTION) / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
    resized = tf.image.resize(image, new, antialias=True)
    top = (new[0] - image_size) // 2
    left = (new[1] - image_size) // 2
    crop = resized[top:top + image_size, left:left + image_size]
    crop = tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8)
    return tf.ensure_shape(crop, [image_size, image_size, 3])


def augment_small(image, seed, image_size, flip):
    """CIFAR-style: zero-pad by size/8, random crop back, random horizontal flip."""
    import tensorflow as tf

    pad = max(1, image_size // 8)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    x = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    x = tf.image.stateless_random_crop(x, [image_size, image_size, 3], seed=seeds[0])
    if flip:
        x = tf.image.stateless_random_flip_left_right(x, seed=seeds[1])
    return tf.cast(x, tf.float32)


def cutout(image, seed, size):
    """Cutout (DeVries & Taylor 2017): sets a ``size`` x ``size`` square of a float image
    ``[height, width, 3]`` to :data:`CUTOUT_FILL`. The square's centre is uniform over the
    image, and the square is clipped where it reaches past an edge."""
    import tensorflow as tf

    shape = tf.shape(image)
    centre = tf.random.stateless_uniform([2], seed, maxval=tf.int32.max, dtype=tf.int32)
    centre = centre % shape[:2]
    start = centre - size // 2
    rows = tf.range(shape[0])
    cols = tf.range(shape[1])
    inside = ((rows[:, None] >= start[0]) & (rows[:, None] < start[0] + size)
              & (cols[None, :] >= start[1]) & (cols[None, :] < start[1] + size))
    fill = tf.constant(CUTOUT_FILL, image.dtype)
    return tf.where(inside[:, :, None], fill, image)


def random_resized_crop(image, seed, image_size, flip, *, contents=None):
    """Inception-style crop (8%-100% of the area, aspect 3/4-4/3), resize, flip.

    With ``contents`` (JPEG bytes) only the crop window is decoded.
    """
    import tensorflow as tf

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
