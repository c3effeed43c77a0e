"""A run's training input on the Keras backend it runs on: tf.data on TensorFlow, arrays
in memory elsewhere (JAX, PyTorch), without importing TensorFlow there."""

from __future__ import annotations

import keras

from keras_resnet.pipeline.data.transforms import SMALL_IMAGE_MAX


def load_bundle(options, *, replicas: int = 1):
    """The training and validation input of a run.

    Args:
        options: the run's resolved options (a
            :class:`~keras_resnet.pipeline.run.config.ResolvedConfig`): its dataset,
            data_dir, image_size, batch_size, val_fraction, seed, augment, cutout and
            cache_budget_mb.
        replicas: the devices a data-parallel run splits each batch over (JAX): the last
            validation batch is filled up to a multiple of them.

    Returns:
        On the TensorFlow backend a :class:`~keras_resnet.pipeline.data.tfdata.DataBundle`
        (tf.data). Elsewhere (JAX, PyTorch) a folder dataset: images up to 64 pixels
        decoded into memory (:class:`~keras_resnet.pipeline.data.arrays.ArrayBundle`),
        larger ones streamed from disk
        (:class:`~keras_resnet.pipeline.data.folder_stream.StreamBundle`).
    """
    common = dict(data_dir=options.data_dir, image_size=options.image_size,
                  batch_size=options.batch_size, val_fraction=options.val_fraction,
                  seed=options.seed, augment=options.augment, cutout=options.cutout)
    budget = options.cache_budget_mb * 2**20
    if keras.config.backend() == "tensorflow":
        from keras_resnet.pipeline.data import tfdata

        return tfdata.load_data(options.dataset, cache_budget=budget, **common)
    if options.image_size > SMALL_IMAGE_MAX:
        # Large images stream from disk (ImageNet-style folders do not fit in memory).
        from keras_resnet.pipeline.data import folder_stream

        return folder_stream.load_folder_stream(options.dataset, eval_multiple=replicas,
                                                **common)
    from keras_resnet.pipeline.data import arrays

    return arrays.load_arrays(options.dataset, memory_budget=budget, eval_multiple=replicas,
                              **common)


def one_hot_labels(num_classes: int):
    """``dataset -> dataset`` with one-hot labels: a tf.data map on TensorFlow; the array
    streams of other backends come one-hot already."""
    if keras.config.backend() != "tensorflow":
        return lambda dataset: dataset
    import tensorflow as tf

    return lambda dataset: dataset.map(lambda x, y: (x, tf.one_hot(y, num_classes)))
