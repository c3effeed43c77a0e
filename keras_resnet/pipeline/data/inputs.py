"""A run's training input on the Keras backend it runs on: tf.data on TensorFlow, arrays
in memory elsewhere (JAX, PyTorch), without importing TensorFlow there."""

from __future__ import annotations

import keras


def load_bundle(options):
    """The training and validation input of a run.

    Args:
        options: the run's resolved options (a
            :class:`~keras_resnet.pipeline.run.config.ResolvedConfig`): its dataset,
            data_dir, image_size, batch_size, val_fraction, seed, augment, cutout and
            cache_budget_mb.

    Returns:
        On the TensorFlow backend a :class:`~keras_resnet.pipeline.data.tfdata.DataBundle`
        (tf.data), else an :class:`~keras_resnet.pipeline.data.arrays.ArrayBundle` (folder
        datasets of images up to 64 pixels, decoded into memory).
    """
    common = dict(data_dir=options.data_dir, image_size=options.image_size,
                  batch_size=options.batch_size, val_fraction=options.val_fraction,
                  seed=options.seed, augment=options.augment, cutout=options.cutout)
    budget = options.cache_budget_mb * 2**20
    if keras.config.backend() == "tensorflow":
        from keras_resnet.pipeline.data import tfdata

        return tfdata.load_data(options.dataset, cache_budget=budget, **common)
    from keras_resnet.pipeline.data import arrays

    return arrays.load_arrays(options.dataset, memory_budget=budget, **common)


def one_hot_labels(num_classes: int):
    """``dataset -> dataset`` with one-hot labels: a tf.data map on TensorFlow; the array
    streams of other backends come one-hot already."""
    if keras.config.backend() != "tensorflow":
        return lambda dataset: dataset
    import tensorflow as tf

    return lambda dataset: dataset.map(lambda x, y: (x, tf.one_hot(y, num_classes)))
