"""BatchNormalization on TensorFlow's fused kernel, for training; saved models stay stock.

Keras 3's ``BatchNormalization`` computes the batch moments and the normalisation as
separate element-wise ops on the TensorFlow backend, and under a mixed policy casts its
input to float32 and back (keras-team/keras-core#225). TensorFlow's ``FusedBatchNormV3``
(oneDNN on x86 CPUs, cuDNN on GPUs) does both in one kernel, forward and backward, and
takes bfloat16/float16 input with float32 statistics directly.

:class:`BatchNormalization` here is a subclass of the stock layer that overrides ``call``
only: the same variables (created by the stock ``build``, in the same order), config,
momentum and epsilon, and the same moving-statistics update as Keras' (the biased batch
variance; the kernel returns the Bessel-corrected one, which is converted back). Its class
name is the stock layer's, because Keras keys ``.weights.h5`` entries by class name and
order: checkpoints of a model built with it load into the stock model and back.

Training builds its model inside :func:`fused_layers`; before anything is saved as
``.keras`` the weights go into a stock float32 model (see
:func:`keras_resnet.pipeline.training.network.save_model`), so no artefact holds this class.

Where the kernel does not apply, the stock computation runs: other backends, inputs that
are not 4-D channels-last, masks, ``renorm``, and ``synchronized=True`` (cross-replica
statistics, which the kernel cannot gather; keras_resnet builds no such layer, so under
MirroredStrategy each replica normalises with its own batch, as the stock layer does).
"""

from __future__ import annotations

import contextlib

import keras

from keras_resnet import blocks
from keras_resnet.pipeline.training import machine

# cuDNN refuses epsilon below 1e-5; TensorFlow's own wrapper raises it to this value.
_CUDNN_MIN_EPSILON = 1.001e-5


class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by TensorFlow's fused kernel.

    Example:
        >>> with fused_layers():
        ...     model = keras_resnet.resnet(depth=20)
    """

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        stats = self.moving_mean
        gamma = self.gamma if self.scale else tf.ones_like(stats)
        beta = self.beta if self.center else tf.zeros_like(stats)
        epsilon = self.epsilon
        if machine.accelerator("tensorflow"):  # cuDNN's kernel
            epsilon = max(epsilon, _CUDNN_MIN_EPSILON)
        train = bool(training) and self.trainable
        if not train:
            y, *_ = tf.raw_ops.FusedBatchNormV3(
                x=inputs, scale=tf.cast(gamma, "float32"), offset=tf.cast(beta, "float32"),
                mean=tf.cast(self.moving_mean, "float32"),
                variance=tf.cast(self.moving_variance, "float32"), epsilon=epsilon,
                data_format="NHWC", is_training=False)
            return y
        empty = tf.constant([], "float32")
        y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=tf.cast(gamma, "float32"), offset=tf.cast(beta, "float32"),
            mean=empty, variance=empty, epsilon=epsilon, exponential_avg_factor=1.0,
            data_format="NHWC", is_training=True)
        # The kernel normalises with the biased variance but returns the unbiased one;
        # Keras' moving variance follows the biased one.
        shape = tf.shape(inputs, out_type="int64")
        count = tf.cast(shape[0] * shape[1] * shape[2], "float32")
        variance = variance * ((count - 1.0) / count)
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            self.moving_variance * momentum + variance * (1.0 - momentum))
        return y

    def _fusable(self, inputs, training, mask) -> bool:
        if keras.config.backend() != "tensorflow" or mask is not None:
            return False
        if self.renorm or self.synchronized or not isinstance(training, bool | None):
            return False
        return (len(inputs.shape) == 4 and self.axis in (-1, 3)
                and keras.backend.standardize_dtype(inputs.dtype) in _KERNEL_DTYPES)


# Input dtypes FusedBatchNormV3 takes (with float32 statistics).
_KERNEL_DTYPES = ("float32", "bfloat16", "float16")


@contextlib.contextmanager
def fused_layers():
    """Models built inside use :class:`BatchNormalization` (training only)."""
    with blocks.batch_norm_layer(BatchNormalization):
        yield
