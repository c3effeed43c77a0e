"""Quantization-aware training of a wrapped model: range calibration, fine-tuning, saving.

tfmot starts activation ranges at [-6, 6] and moves them with an EMA of decay 0.999, so a
fine-tune of a few hundred steps would keep ranges far from the data: :func:`calibrate`
sets them from training batches first. :func:`fine_tune` then trains only what the float
model trained (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference").
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

from keras_resnet.pipeline.errors import QuantizeError, first_line
from keras_resnet.pipeline.quantization.quantize_configs import quantize_scope
from keras_resnet.pipeline.run import formats, safe_writes

# The model takes raw 0..255 pixels; pinning the input range makes its int8 scale exactly 1,
# so an 8-bit camera frame is the quantized input with no arithmetic.
PIXEL_RANGE = (0.0, 255.0)


# ----------------------------------------------------------------------------------------
# Range calibration, fine-tuning, saving.


def _quantize_wrappers(model) -> Iterator:
    for layer in model.layers:
        inner = getattr(layer, "layer", None)
        if inner is not None:
            yield layer, inner


@contextlib.contextmanager
def training_setup(model, *, freeze_bn: bool = True):
    """Makes a QAT model train only what the float model trained.

    tfmot's QuantizeWrapperV2 lists every quantized kernel as trainable, even of a layer
    built with ``trainable=False``, so fine-tuning would change the frozen ``preprocess``
    conv and option-A shortcut kernels. Inside this context each wrapper's trainable
    weights are exactly its layer's; the weight lists are restored on exit, so a saved
    ``.h5`` keeps tfmot's weight order (which loading relies on).

    Args:
        model: a QAT model.
        freeze_bn: also freeze every BN (statistics and gamma/beta): a short fine-tune at
            a low learning rate keeps the float run's statistics instead of re-estimating
            them from small batches.
    """
    import tf_keras

    saved = []
    for wrapper, inner in _quantize_wrappers(model):
        saved.append((wrapper, inner, list(wrapper._trainable_weights),
                      list(wrapper._non_trainable_weights), inner.trainable))
        if freeze_bn and isinstance(inner, tf_keras.layers.BatchNormalization):
            inner.trainable = False
        # tfmot moves a quantized kernel out of its layer into the wrapper's lists.
        kernels = [weight for weight, _, _ in getattr(wrapper, "_weight_vars", [])]
        own = {id(w) for w in [*inner.weights, *kernels]}
        rest = [w for w in wrapper._trainable_weights if id(w) not in own]
        # In place: assigning a list of variables to a layer attribute re-tracks them by
        # their own ``trainable`` flag, which is True for every kernel.
        if inner.trainable:
            wrapper._trainable_weights[:] = rest + kernels
        else:
            wrapper._trainable_weights[:] = rest
            wrapper._non_trainable_weights.extend(kernels)
    try:
        yield model
    finally:
        for wrapper, inner, trainable_weights, non_trainable_weights, trainable in saved:
            wrapper._trainable_weights[:] = trainable_weights
            wrapper._non_trainable_weights[:] = non_trainable_weights
            inner.trainable = trainable


@contextlib.contextmanager
def _range_tracking(decay):
    """Makes tfmot's activation-range EMAs use ``decay`` (a tf.Variable) while traced.

    tfmot hard-codes an EMA decay of 0.999 starting from [-6, 6]: a fine-tune of a few
    hundred steps would keep ranges far from the data. Calibration sets them directly.
    """
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    original = quant_ops.MovingAvgQuantize

    def tracked(*args, ema_decay=0.999, **kwargs):
        del ema_decay
        return original(*args, ema_decay=decay, **kwargs)

    quant_ops.MovingAvgQuantize = tracked
    try:
        yield
    finally:
        quant_ops.MovingAvgQuantize = original


def calibrate(qat_model, dataset, *, steps: int = 32) -> int:
    """Sets the QAT model's quantization ranges from data before fine-tuning.

    Runs ``steps`` batches in training mode with BN frozen and dropout off, so that the
    activation ranges become the mean of the per-batch min/max, and weight ranges are set.

    Args:
        qat_model: a model from :func:`quantize_model`.
        dataset: batches of ``(images, labels)`` or images.
        steps: batches to use.

    Returns:
        The batches used.

    Raises:
        QuantizeError: the dataset is empty.
    """
    import tensorflow as tf
    import tf_keras

    dropouts = {inner: inner.rate for _, inner in _quantize_wrappers(qat_model)
                if isinstance(inner, tf_keras.layers.Dropout)}
    for layer in dropouts:
        layer.rate = 0.0
    decay = tf.Variable(0.0, trainable=False, dtype=tf.float32)
    used = 0
    try:
        with _range_tracking(decay), training_setup(qat_model, freeze_bn=True):
            step = tf.function(lambda x: qat_model(x, training=True))
            for batch in dataset.take(steps):
                images = batch[0] if isinstance(batch, tuple | list) else batch
                decay.assign(used / (used + 1))  # running mean of the batch ranges
                step(images)
                used += 1
    finally:
        for layer, rate in dropouts.items():
            layer.rate = rate
    if not used:
        raise QuantizeError("the calibration dataset is empty; quantization ranges need images")
    return used


def pin_input_range(qat_model, low: float = PIXEL_RANGE[0], high: float = PIXEL_RANGE[1]):
    """Fixes the input quantization range to raw pixel values (int8 scale 1, exact)."""
    for layer in qat_model.layers:
        if type(layer).__name__ == "QuantizeLayer":
            for weight in layer.weights:
                if weight.name.endswith("_min:0"):
                    weight.assign(low)
                elif weight.name.endswith("_max:0"):
                    weight.assign(high)


def fine_tune(qat_model, train, val=None, *, epochs: int = 1, learning_rate: float = 1e-3,
              freeze_bn: bool = True, steps_per_epoch: int | None = None,
              label_smoothing: float = 0.0, verbose=2):
    """Fine-tunes a QAT model with SGD + momentum and a cosine-decayed low learning rate.

    Args:
        qat_model: a model from :func:`quantize_model` (already calibrated).
        train: batches of ``(raw pixels, integer labels)``.
        val: optional validation batches.
        epochs: passes over ``train``.
        learning_rate: initial learning rate; about 1% of the float run's is typical.
        freeze_bn: keep BN statistics and affine parameters of the float model.
        steps_per_epoch: limit each epoch (default: the whole dataset).
        label_smoothing: the float run's label smoothing, so that fine-tuning pulls the
            logits towards the targets the float model was trained on.
        verbose: Keras fit verbosity.

    A model ending in a softmax ``Activation`` layer (the twins of this package) trains on
    the logits before it: cross-entropy on the int8-quantized probabilities would lose the
    gradient of every example whose true class rounds to probability 0. Any other model's
    output is trained as logits.

    Returns:
        The Keras History.
    """
    import tf_keras

    steps = steps_per_epoch
    if steps is None:
        cardinality = int(train.cardinality())
        steps = cardinality if cardinality > 0 else None
    schedule = learning_rate
    if steps:
        schedule = tf_keras.optimizers.schedules.CosineDecay(learning_rate, epochs * steps)
    last = qat_model.layers[-1]
    inner = getattr(last, "layer", last)
    ends_in_softmax = (isinstance(inner, tf_keras.layers.Activation)
                       and tf_keras.activations.serialize(inner.activation) == "softmax")
    # Otherwise the model's own output is trained: logits, as the twins used to end.
    trained = (tf_keras.Model(qat_model.inputs, last.input) if ends_in_softmax
               else qat_model)
    with training_setup(qat_model, freeze_bn=freeze_bn):
        # Compiled inside the context so the optimizer sees the restricted weight lists.
        trained.compile(
            optimizer=tf_keras.optimizers.SGD(schedule, momentum=0.9),
            loss=sparse_cross_entropy(label_smoothing),
            metrics=[tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
        history = trained.fit(train, validation_data=val, epochs=epochs,
                                steps_per_epoch=steps_per_epoch, verbose=verbose)
    pin_input_range(qat_model)
    return history


def sparse_cross_entropy(label_smoothing: float = 0.0):
    """tf_keras cross-entropy on logits and integer labels, with label smoothing.

    tf_keras' sparse loss has no ``label_smoothing``; with smoothing the labels are one-hot
    encoded first and the smoothed categorical loss is used, which is the training loss of
    the Keras 3 run (``optimization.compile_model``).
    """
    import tensorflow as tf
    import tf_keras

    if not label_smoothing:
        return tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    smoothed = tf_keras.losses.CategoricalCrossentropy(from_logits=True,
                                                       label_smoothing=label_smoothing)

    def smoothed_sparse_cross_entropy(labels, logits):
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        return smoothed(tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype), logits)

    return smoothed_sparse_cross_entropy


def save_qat(qat_model, path) -> None:
    """Saves a QAT model as ``.h5`` (a QAT ``.keras`` file does not load back)."""
    with quantize_scope(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are saving your model as an HDF5 file")
        safe_writes.save_atomic(path, lambda tmp: qat_model.save(tmp, include_optimizer=False))


def load_qat(path):
    """Loads a QAT ``.h5`` model saved by :func:`save_qat`.

    Raises:
        QuantizeError: the file does not exist, is not an HDF5 file or is not a QAT
            model.
    """
    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"{path} does not exist; run tools/qat.py first")
    formats.check_file_format(path, error=QuantizeError)
    import tf_keras

    try:
        with quantize_scope():
            return tf_keras.models.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - h5 loading raises many types
        raise QuantizeError(f"{path} cannot be loaded as a QAT model ({first_line(e)})") \
            from None
