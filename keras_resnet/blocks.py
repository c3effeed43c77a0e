"""Residual blocks as functions over stock Keras layers.

Every block takes a tensor and returns a tensor. Only stock layers are used (no Layer
subclasses, Lambda or raw ops), so saved ``.keras`` files load without custom objects and
quantization tools and the TFLite converter see plain layers. Layers are named in the
keras.applications grammar (``conv3_block1_0_conv``, ``conv3_block1_2_bn``,
``conv3_block1_out``) and created in name order, shortcut (``_0_``) first.

The same functions build a ``tf_keras`` (Keras 2) twin of a model when called inside
:func:`layer_library`; quantization-aware training needs that twin. Inside
:func:`batch_norm_layer` they build every BatchNormalization from a subclass that computes
the same layer faster (training uses it; saved models always hold the stock layer).
"""

from __future__ import annotations

import contextlib
import contextvars
import types

import keras
import numpy as np

# One place for layer constants. keras.applications uses epsilon 1.001e-5 and Keras'
# default momentum 0.99; its weights are loaded into nets built with KERAS_APPS_BN.
BN = dict(momentum=0.9, epsilon=1e-5)
KERAS_APPS_BN = dict(momentum=0.99, epsilon=1.001e-5)

_library: contextvars.ContextVar[types.ModuleType] = contextvars.ContextVar(
    "keras_library", default=keras
)


@contextlib.contextmanager
def layer_library(module: types.ModuleType):
    """Builds blocks and models from another Keras implementation, e.g. ``tf_keras``.

    Examples:
        >>> import tf_keras
        >>> with layer_library(tf_keras):
        ...     twin = keras_resnet.resnet(depth=20)   # a tf_keras.Model
    """
    token = _library.set(module)
    try:
        yield module
    finally:
        _library.reset(token)


def library() -> types.ModuleType:
    """The Keras module (``keras`` or ``tf_keras``) blocks are currently built from."""
    return _library.get()


_batch_norm_class: contextvars.ContextVar[type | None] = contextvars.ContextVar(
    "batch_norm_class", default=None
)


@contextlib.contextmanager
def batch_norm_layer(layer_class: type):
    """Builds every BatchNormalization as ``layer_class``, a subclass of the stock layer
    that computes the same function (e.g. the fused training layer of
    :mod:`keras_resnet.pipeline.training.fused_batch_norm`). Names, weights and their order stay
    those of the stock layer.
    """
    if not issubclass(layer_class, library().layers.BatchNormalization):
        raise TypeError(f"{layer_class.__name__} is not a BatchNormalization subclass")
    token = _batch_norm_class.set(layer_class)
    try:
        yield layer_class
    finally:
        _batch_norm_class.reset(token)


def _kernel_init():
    # He et al. 2015 initialisation in fan-out mode, as torchvision.
    return library().initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def conv(x, filters, kernel_size, *, strides=1, groups=1, use_bias=False, name,
         activation=None, trainable=True):
    """Conv2D named ``{name}_conv``; strided convs pad explicitly (``{name}_pad``).

    Explicit symmetric padding matches the reference implementations (TF's "same" pads
    strided convs asymmetrically) and converts to TFLite as a plain PAD.
    """
    layers = library().layers
    padding = "same"
    if strides > 1 and kernel_size > 1:
        x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    return layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding, groups=groups,
        use_bias=use_bias, activation=activation, kernel_initializer=_kernel_init(),
        trainable=trainable, name=f"{name}_conv",
    )(x)


def batch_norm(x, *, name, zero_gamma=False, keras_applications=False):
    """BatchNormalization named ``{name}_bn``."""
    stock = library().layers.BatchNormalization
    layer_class = _batch_norm_class.get()
    if layer_class is None or not issubclass(layer_class, stock):  # e.g. a tf_keras twin
        layer_class = stock
    return layer_class(
        axis=-1, gamma_initializer="zeros" if zero_gamma else "ones",
        name=f"{name}_bn", **(KERAS_APPS_BN if keras_applications else BN),
    )(x)


def relu(x, *, name):
    return library().layers.ReLU(name=name)(x)


def conv_bn(x, filters, kernel_size, *, strides=1, groups=1, name, activation=True,
            use_bias=False, zero_gamma=False, keras_applications=False):
    """Conv, BN and (optionally) ReLU: the post-activation unit."""
    x = conv(x, filters, kernel_size, strides=strides, groups=groups, use_bias=use_bias,
             name=name)
    x = batch_norm(x, name=name, zero_gamma=zero_gamma, keras_applications=keras_applications)
    return relu(x, name=f"{name}_relu") if activation else x


def bn_relu(x, *, name, keras_applications=False):
    """BN then ReLU: the pre-activation unit (``{name}_bn``, ``{name}_relu``)."""
    x = batch_norm(x, name=name, keras_applications=keras_applications)
    return relu(x, name=f"{name}_relu")


def zero_pad_shortcut(x, filters, *, strides, name):
    """CIFAR "option A" shortcut (He et al. 2015 §4.2): subsample, zero-pad channels.

    Built as a frozen 1x1 conv whose kernel is the identity padded with zeros: exactly
    x[:, ::s, ::s, :] followed by zero channels, with no trainable parameters, and made of a
    layer that quantizes and converts to TFLite builtins.
    """
    channels = x.shape[-1]
    layer = library().layers.Conv2D(
        filters, 1, strides=strides, use_bias=False, trainable=False,
        kernel_initializer="zeros", name=f"{name}_conv",
    )
    y = layer(x)
    layer.kernel.assign(np.eye(channels, filters, dtype="float32").reshape(1, 1, channels, filters))
    return y


def shortcut(x, filters, *, strides, kind="projection", preact=False, name,
             keras_applications=False):
    """The shortcut branch of a block whose shape changes (names ``{name}_0_*``).

    Args:
        x: block input (for pre-activation blocks: the pre-activated input).
        filters: output channels.
        strides: spatial stride.
        kind: "projection", "avgpool" (ResNet-D) or "zeropad" (CIFAR option A).
        preact: pre-activation nets project with a bare conv (the next block normalises).
        name: block prefix, e.g. ``conv3_block1``.
    """
    prefix = f"{name}_0"
    layers = library().layers
    if kind == "zeropad":
        return zero_pad_shortcut(x, filters, strides=strides, name=prefix)
    if kind == "avgpool" and strides > 1:
        x = layers.AveragePooling2D(strides, strides=strides, padding="same",
                                    name=f"{prefix}_pool")(x)
        strides = 1
    if preact:
        return conv(x, filters, 1, strides=strides, use_bias=keras_applications, name=prefix)
    return conv_bn(x, filters, 1, strides=strides, activation=False,
                   use_bias=keras_applications, keras_applications=keras_applications,
                   name=prefix)


def squeeze_excite(x, *, ratio, name):
    """Squeeze-and-excitation (Hu et al. 2018) on a residual branch (``{name}_se_*``)."""
    layers = library().layers
    channels = x.shape[-1]
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_squeeze")(x)
    s = layers.Conv2D(max(1, int(channels * ratio)), 1, activation="relu",
                      name=f"{name}_se_reduce")(s)
    s = layers.Conv2D(channels, 1, activation="sigmoid", name=f"{name}_se_expand")(s)
    return layers.Multiply(name=f"{name}_se_excite")([x, s])


def _merge(residual, short, *, name, se_ratio, residual_scale, drop_rate, activation):
    """SE, scaling and stochastic depth on the residual branch; add; optional ReLU."""
    layers = library().layers
    if se_ratio:
        residual = squeeze_excite(residual, ratio=se_ratio, name=name)
    if residual_scale != 1.0:
        residual = layers.Rescaling(residual_scale, name=f"{name}_scale")(residual)
    if drop_rate:
        # Dropping the whole residual per sample and rescaling by 1/(1-p) is stochastic
        # depth (Huang et al. 2016); at inference the layer is the identity.
        residual = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1),
                                  name=f"{name}_drop")(residual)
    if activation:
        x = layers.Add(name=f"{name}_add")([short, residual])
        return relu(x, name=f"{name}_out")
    return layers.Add(name=f"{name}_out")([short, residual])


def basic_block(x, filters, *, strides=1, shortcut_kind="projection", se_ratio=0.0,
                zero_init_residual=False, residual_scale=1.0, drop_rate=0.0, name):
    """Post-activation basic block: two 3x3 convs (He et al. 2015).

    Examples:
        >>> y = basic_block(x, 64, strides=2, name="conv3_block1")
    """
    short = x
    if strides > 1 or x.shape[-1] != filters:
        short = shortcut(x, filters, strides=strides, kind=shortcut_kind, name=name)
    y = conv_bn(x, filters, 3, strides=strides, name=f"{name}_1")
    y = conv_bn(y, filters, 3, activation=False, zero_gamma=zero_init_residual,
                name=f"{name}_2")
    return _merge(y, short, name=name, se_ratio=se_ratio, residual_scale=residual_scale,
                  drop_rate=drop_rate, activation=True)


def bottleneck_block(x, filters, *, strides=1, width=None, groups=1, expansion=4,
                     shortcut_kind="projection", se_ratio=0.0, zero_init_residual=False,
                     residual_scale=1.0, drop_rate=0.0, keras_applications=False, name):
    """Post-activation bottleneck block: 1x1, 3x3 (strided, "v1.5"), 1x1 x expansion.

    Args:
        filters: base width; the block outputs ``expansion * filters`` channels.
        width: inner width of the 3x3 (default ``filters``; wider for WRN/ResNeXt).
        groups: groups of the 3x3 conv (ResNeXt cardinality).
        keras_applications: keras.applications' v1 layout (stride on the first 1x1, conv
            biases), so its published weights load.

    Examples:
        >>> y = bottleneck_block(x, 128, strides=2, name="conv3_block1")
    """
    width = width or filters
    out = expansion * filters
    short = x
    if strides > 1 or x.shape[-1] != out:
        short = shortcut(x, out, strides=strides, kind=shortcut_kind, name=name,
                         keras_applications=keras_applications)
    ka = dict(use_bias=keras_applications, keras_applications=keras_applications)
    s1, s2 = (strides, 1) if keras_applications else (1, strides)
    y = conv_bn(x, width, 1, strides=s1, name=f"{name}_1", **ka)
    y = conv_bn(y, width, 3, strides=s2, groups=groups, name=f"{name}_2", **ka)
    y = conv_bn(y, out, 1, activation=False, zero_gamma=zero_init_residual,
                name=f"{name}_3", **ka)
    return _merge(y, short, name=name, se_ratio=se_ratio, residual_scale=residual_scale,
                  drop_rate=drop_rate, activation=True)


def preact_basic_block(x, filters, *, strides=1, se_ratio=0.0, residual_scale=1.0,
                       drop_rate=0.0, name):
    """Pre-activation basic block (He et al. 2016; Wide ResNets): BN-ReLU-conv twice.

    When the shape changes, the shortcut is a 1x1 conv of the pre-activated input.
    """
    pre = bn_relu(x, name=f"{name}_preact")
    short = x
    if strides > 1 or x.shape[-1] != filters:
        short = shortcut(pre, filters, strides=strides, preact=True, name=name)
    y = conv(pre, filters, 3, strides=strides, name=f"{name}_1")
    y = bn_relu(y, name=f"{name}_1")
    y = conv(y, filters, 3, name=f"{name}_2")
    return _merge(y, short, name=name, se_ratio=se_ratio, residual_scale=residual_scale,
                  drop_rate=drop_rate, activation=False)


def preact_bottleneck_block(x, filters, *, strides=1, width=None, groups=1, expansion=4,
                            se_ratio=0.0, residual_scale=1.0, drop_rate=0.0,
                            keras_applications=False, name):
    """Pre-activation bottleneck block (He et al. 2016; keras.applications ResNetV2).

    With ``keras_applications=True`` the layout is keras.applications' exactly: biases on
    the convs that no BN follows, and a strided block without a projection takes a
    1x1 max-pool shortcut.
    """
    layers = library().layers
    width = width or filters
    out = expansion * filters
    pre = bn_relu(x, name=f"{name}_preact", keras_applications=keras_applications)
    short = x
    if x.shape[-1] != out:
        short = shortcut(pre, out, strides=strides, preact=True, name=name,
                         keras_applications=keras_applications)
    elif strides > 1:
        short = layers.MaxPooling2D(1, strides=strides, name=f"{name}_0_pool")(x)
    ka = dict(keras_applications=keras_applications)
    y = conv(pre, width, 1, name=f"{name}_1")
    y = bn_relu(y, name=f"{name}_1", **ka)
    if keras_applications:  # keras.applications pads every 3x3 of ResNetV2 explicitly
        y = layers.ZeroPadding2D(1, name=f"{name}_2_pad")(y)
        y = layers.Conv2D(width, 3, strides=strides, use_bias=False, groups=groups,
                          kernel_initializer=_kernel_init(), name=f"{name}_2_conv")(y)
    else:
        y = conv(y, width, 3, strides=strides, groups=groups, name=f"{name}_2")
    y = bn_relu(y, name=f"{name}_2", **ka)
    y = conv(y, out, 1, use_bias=keras_applications, name=f"{name}_3")
    return _merge(y, short, name=name, se_ratio=se_ratio, residual_scale=residual_scale,
                  drop_rate=drop_rate, activation=False)
