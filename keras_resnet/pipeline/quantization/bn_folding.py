"""Pre-activation BatchNormalization as a 1x1 depthwise conv, so that it quantizes to int8.

tfmot folds a BatchNormalization into the conv before it only when that conv is linear and
the BN its only consumer. A BN after an Add or a pool (pre-activation blocks, Wide ResNets)
would otherwise run in TFLite as float MUL and ADD between a DEQUANTIZE and a QUANTIZE.
"""

from __future__ import annotations

import numpy as np


def _is_linear_conv(layer) -> bool:
    import tf_keras

    return (isinstance(layer, tf_keras.layers.Conv2D | tf_keras.layers.DepthwiseConv2D)
            and tf_keras.activations.serialize(layer.activation) == "linear")


def _folds_into_conv(bn) -> bool:
    """True when tfmot folds this BN into the conv before it (Conv2DBatchNormQuantize).

    tfmot matches conv -> BN only when the conv is linear and the BN is its only consumer.
    """
    inbound = bn.inbound_nodes[0].inbound_layers
    if isinstance(inbound, list):
        return False
    return _is_linear_conv(inbound) and len(inbound._outbound_nodes) == 1



def fold_standalone_batch_norm(model):
    """Replaces every BN that tfmot cannot fold into a conv by an equal 1x1 depthwise conv.

    A BN after an Add or a pool (pre-activation blocks) computes ``x * a + b`` per channel
    at inference. Quantized as a BN layer, TFLite would run it as float MUL and ADD between
    a DEQUANTIZE and a QUANTIZE, because the tensor between them has no range. As a 1x1
    DepthwiseConv2D with kernel ``a`` and bias ``b`` it is one int8 op whose per-channel
    weight quantization is exact (one weight per channel). Its statistics are frozen from
    then on, as in any BN folded for inference; ``a`` and ``b`` remain trainable.

    Args:
        model: a float ``tf_keras`` model (not modified).

    Returns:
        A ``tf_keras`` model computing the same function; the new layers keep the BN names.
    """
    import tf_keras

    folded = {}

    def clone(layer):
        if (isinstance(layer, tf_keras.layers.BatchNormalization)
                and not _folds_into_conv(layer)):
            folded[layer.name] = _affine_of(layer)
            return tf_keras.layers.DepthwiseConv2D(1, use_bias=True, name=layer.name)
        return layer

    if not any(isinstance(layer, tf_keras.layers.BatchNormalization)
               and not _folds_into_conv(layer) for layer in model.layers):
        return model
    result = tf_keras.models.clone_model(model, clone_function=clone)
    for name, (scale, offset) in folded.items():
        result.get_layer(name).set_weights([scale.reshape(1, 1, -1, 1), offset])
    return result


def _affine_of(bn):
    """The per-channel ``(a, b)`` of an inference-mode BN: ``y = x * a + b``."""
    weights = {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in bn.weights}
    mean, variance = weights["moving_mean"], weights["moving_variance"]
    gamma = weights.get("gamma", np.ones_like(mean))
    beta = weights.get("beta", np.zeros_like(mean))
    scale = gamma / np.sqrt(variance + bn.epsilon)
    return scale.astype("float32"), (beta - mean * scale).astype("float32")
