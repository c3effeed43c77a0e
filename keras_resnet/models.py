"""Builds keras.Model objects from the variant table in :mod:`keras_resnet.configs`."""

from __future__ import annotations

import sys

import numpy as np

from keras_resnet import blocks, configs
from keras_resnet import weights as weights_lib
from keras_resnet.configs import ResNetConfig

POOLINGS = (None, "avg", "max")

# Pixel statistics for include_preprocessing=True, inputs in 0..255 RGB.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def resnet(depth: int | None = None, *, variant: str | None = None,
           config: ResNetConfig | None = None, include_top: bool = True, weights=None,
           input_tensor=None, input_shape=None, pooling=None, classes: int | None = None,
           classifier_activation="softmax", include_preprocessing: bool | None = None,
           name: str | None = None, **options):
    """Builds any ResNet of the family as a functional keras.Model.

    Exactly one of ``depth``, ``variant`` or ``config`` selects the architecture. Depths
    18/34/50/101/152/200 are ImageNet-style ResNets (v1.5, as torchvision); other depths
    6n+2 are CIFAR ResNets (He et al. 2015, §4.2).

    Args:
        depth: layer count, e.g. 50 or 20.
        variant: a name from ``keras_resnet.VARIANTS``, e.g. "resnet50d" or "wrn_28_10".
        config: a ResNetConfig, for architectures outside the table.
        include_top: end with global average pooling and a ``predictions`` Dense layer.
        weights: None (random), "imagenet" (keras.applications' published weights, for
            resnet50/101/152 and their v2), "cifar10" (weights shipped in this package,
            trained by tools/train.py, for the variants of ``keras_resnet.PRETRAINED``;
            raw 0..255 RGB input, normalised inside) or the path of a weights file.
        input_tensor: optional Keras tensor to use as the image input.
        input_shape: (height, width, 3); default (224, 224, 3) or (32, 32, 3) with a top,
            (None, None, 3) without.
        pooling: None, "avg" or "max" for the output when ``include_top=False``.
        classes: classes of the top; default 1000 (ImageNet-style) or 10 (CIFAR-style).
        classifier_activation: activation of the top; None returns logits.
        include_preprocessing: take raw 0..255 RGB pixels and normalise inside the model
            (a frozen 1x1 conv: exact, stock, quantizable), so exported models need no
            preprocessing code. Default: on for shipped weights ("cifar10"), else off.
        name: model name; default the variant name.
        **options: any ResNetConfig field overriding the variant, e.g. ``se_ratio=1/16``,
            ``stochastic_depth=0.1``, ``zero_init_residual=True``, ``width_factor=2``.

    Returns:
        A keras.Model (or tf_keras.Model inside ``blocks.layer_library(tf_keras)``).

    Examples:
        >>> model = keras_resnet.resnet(50, classes=10, input_shape=(160, 160, 3))
        >>> cifar = keras_resnet.resnet(variant="resnet56")
    """
    variant, config = _resolve(depth, variant, config)
    if options:
        config = config.replace(**options)
    _ensure_recursion_limit(config)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not valid; choose one of None, 'avg', 'max'")
    keras = blocks.library()
    shipped = None
    if weights == "imagenet":
        weights_lib.check_imagenet(variant, include_top=include_top, classes=classes)
        config = config.replace(keras_applications=True)
    elif isinstance(weights, str) and weights in weights_lib.pretrained_names() + ("cifar10",):
        shipped = weights_lib.check_pretrained(
            variant, weights, include_top=include_top, classes=classes,
            include_preprocessing=include_preprocessing)
        include_preprocessing = True
        if options:
            raise ValueError(f"weights={weights!r} hold {variant} as it is; options "
                             f"{sorted(options)} change the architecture")
    elif weights is not None:
        weights_lib.check_path(weights)
    classes = config.default_classes if classes is None else classes
    if not isinstance(classes, int) or classes < 1:
        raise ValueError(f"classes={classes!r} must be a positive integer")
    input_shape = _input_shape(input_shape, input_tensor, config, include_top, variant)

    if input_tensor is None:
        inputs = x = keras.layers.Input(shape=input_shape, name="input_layer")
    else:
        if not _is_keras_tensor(keras, input_tensor):
            input_tensor = keras.layers.Input(tensor=input_tensor, shape=input_shape)
        x = input_tensor
        inputs = keras.utils.get_source_inputs(input_tensor)

    if include_preprocessing:
        x = _preprocess(x, weights=weights, config=config)
    x = _stem(x, config)
    x = _stages(x, config)
    if config.preact:
        x = blocks.bn_relu(x, name="post", keras_applications=config.keras_applications)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        # float32 logits keep softmax and the loss stable under mixed precision
        x = keras.layers.Dense(classes, activation=classifier_activation, dtype="float32",
                               name="predictions")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    model = keras.Model(inputs, x, name=name or variant)

    if weights == "imagenet":
        weights_lib.load_imagenet(model, variant, include_top=include_top)
    elif shipped is not None:
        weights_lib.load_pretrained(model, shipped)
    elif weights is not None:
        weights_lib.load_file(model, weights)
    return model


def _resolve(depth, variant, config) -> tuple[str, ResNetConfig]:
    given = [a for a in (depth, variant, config) if a is not None]
    if len(given) != 1:
        raise ValueError("pass exactly one of depth=, variant= or config=")
    if config is not None:
        if not isinstance(config, ResNetConfig):
            raise ValueError(f"config must be a ResNetConfig, got {type(config).__name__}")
        return "resnet", config
    if variant is not None:
        return configs.resolve_variant(variant)
    return configs.config_for_depth(depth)


def _ensure_recursion_limit(config: ResNetConfig) -> None:
    # Keras walks functional graphs recursively; ResNet-1202 and pre-activation ResNet-1001
    # (thousands of layers) need more than Python's default 1,000 frames. Only ever raised.
    needed = 40 * sum(config.depths) + 2000
    if sys.getrecursionlimit() < needed:
        sys.setrecursionlimit(needed)


def _is_keras_tensor(keras, tensor) -> bool:
    try:
        return keras.backend.is_keras_tensor(tensor)
    except (AttributeError, ValueError):
        return False


def _input_shape(input_shape, input_tensor, config, include_top, variant):
    if input_shape is None and input_tensor is not None:
        input_shape = tuple(input_tensor.shape[1:])
    if input_shape is None:
        size = config.default_size if include_top else None
        return (size, size, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape={input_shape} must be (height, width, channels), channels last"
        )
    h, w, _ = input_shape
    if any(s is not None and s < config.min_size for s in (h, w)):
        raise ValueError(
            f"input_shape={input_shape} is too small for {variant}: height and width must "
            f"be at least {config.min_size}"
        )
    return input_shape


def _preprocess(x, *, weights, config):
    """Normalises raw 0..255 RGB pixels with a frozen 1x1 conv named ``preprocess``.

    keras.applications' weights expect their own preprocessing: "caffe" (BGR, mean
    subtracted) for v1 and [-1, 1] for v2; anything else gets ImageNet mean/std.
    """
    if weights == "imagenet" and not config.preact:
        kernel = np.eye(3, dtype="float32")[::-1]  # RGB -> BGR
        bias = -np.asarray(_CAFFE_MEAN_BGR, dtype="float32")
    else:
        mean, std = ((127.5,) * 3, (127.5,) * 3) if weights == "imagenet" else (
            IMAGENET_MEAN, IMAGENET_STD)
        kernel = np.diag(1.0 / np.asarray(std)).astype("float32")
        bias = (-np.asarray(mean) / np.asarray(std)).astype("float32")
    layer = blocks.library().layers.Conv2D(3, 1, trainable=False, name="preprocess")
    y = layer(x)
    layer.set_weights([kernel.reshape(1, 1, 3, 3), bias])
    return y


def _stem(x, c: ResNetConfig):
    ka = c.keras_applications
    post = not c.preact
    if c.stem == "cifar":
        if post:
            return blocks.conv_bn(x, c.stem_width, 3, name="conv1")
        return blocks.conv(x, c.stem_width, 3, name="conv1")
    if c.stem == "deep":
        half = c.stem_width // 2
        x = blocks.conv_bn(x, half, 3, strides=2, name="conv1_1")
        x = blocks.conv_bn(x, half, 3, name="conv1_2")
        if post:
            x = blocks.conv_bn(x, c.stem_width, 3, name="conv1_3")
        else:
            x = blocks.conv(x, c.stem_width, 3, name="conv1_3")
    elif post:
        x = blocks.conv_bn(x, c.stem_width, 7, strides=2, use_bias=ka, keras_applications=ka,
                           name="conv1")
    else:
        x = blocks.conv(x, c.stem_width, 7, strides=2, use_bias=ka, name="conv1")
    layers = blocks.library().layers
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)


def _stages(x, c: ResNetConfig):
    total = sum(c.depths)
    index = 0
    last_stage = len(c.depths) - 1
    for stage, (n, base) in enumerate(zip(c.depths, c.widths, strict=True)):
        filters = base * c.width_factor
        for b in range(n):
            if c.preact and c.keras_applications:
                # keras.applications ResNetV2 strides in the last block of a stage
                strides = 2 if (b == n - 1 and stage < last_stage) else 1
            else:
                strides = 2 if (b == 0 and stage > 0) else 1
            drop = c.stochastic_depth * index / max(total - 1, 1)
            common = dict(strides=strides, se_ratio=c.se_ratio, drop_rate=drop,
                          residual_scale=c.residual_scale,
                          name=f"conv{stage + 2}_block{b + 1}")
            if c.block == "bottleneck":
                width = int(filters * c.width_per_group / 64) * c.groups
                bottleneck = dict(width=width, groups=c.groups, expansion=c.expansion,
                                  keras_applications=c.keras_applications)
                if c.preact:
                    x = blocks.preact_bottleneck_block(x, filters, **bottleneck, **common)
                else:
                    x = blocks.bottleneck_block(
                        x, filters, shortcut_kind=c.shortcut,
                        zero_init_residual=c.zero_init_residual, **bottleneck, **common)
            elif c.preact:
                x = blocks.preact_basic_block(x, filters, **common)
            else:
                x = blocks.basic_block(x, filters, shortcut_kind=c.shortcut,
                                       zero_init_residual=c.zero_init_residual, **common)
            index += 1
    return x


def feature_model(model):
    """Returns a model mapping the input to the conv2..conv5 stage outputs.

    For detection and segmentation backbones (FPN and the like). Outputs are a dict keyed
    by stage name ("conv2", "conv3", ...), at strides 4, 8, 16, 32 for ImageNet-style nets.

    Examples:
        >>> features = keras_resnet.feature_model(keras_resnet.ResNet50(include_top=False))
        >>> features(images)["conv4"].shape   # (batch, 14, 14, 1024) at 224x224
    """
    keras = blocks.library()
    outputs = {}
    for layer in model.layers:
        parts = layer.name.split("_")
        if len(parts) == 3 and parts[0].startswith("conv") and parts[2] == "out":
            outputs[parts[0]] = layer.output  # later blocks of a stage overwrite earlier
    if not outputs:
        raise ValueError(f"model {model.name!r} has no ResNet stage outputs (convN_blockM_out)")
    return keras.Model(model.inputs, outputs, name=f"{model.name}_features")


def _constructor(variant: str, public_name: str):
    config = configs.VARIANTS[variant]

    def build(include_top=True, weights=None, input_tensor=None, input_shape=None,
              pooling=None, classes=None, classifier_activation="softmax", **kwargs):
        return resnet(variant=variant, include_top=include_top, weights=weights,
                      input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
                      classes=classes, classifier_activation=classifier_activation, **kwargs)

    build.__name__ = build.__qualname__ = public_name
    imagenet = "; weights='imagenet' loads keras.applications' weights" if (
        variant in weights_lib.IMAGENET_WEIGHTS) else ""
    for name in weights_lib.PRETRAINED.get(variant, {}):
        imagenet += f"; weights={name!r} loads the {name} weights shipped in this package"
    build.__doc__ = (
        f"{public_name}: {config.reference}.\n\n"
        f"Same arguments as keras.applications constructors (see keras_resnet.resnet); "
        f"default {config.default_classes} classes at {config.default_size}x"
        f"{config.default_size}{imagenet}.\n\n"
        f"Examples:\n    >>> model = keras_resnet.{public_name}()\n"
    )
    return build


# Public constructor name -> variant key. One row per model, no per-depth functions.
CONSTRUCTORS = {
    "ResNet18": "resnet18", "ResNet34": "resnet34", "ResNet50": "resnet50",
    "ResNet101": "resnet101", "ResNet152": "resnet152", "ResNet200": "resnet200",
    "ResNet50V2": "resnet50v2", "ResNet101V2": "resnet101v2", "ResNet152V2": "resnet152v2",
    "ResNet50D": "resnet50d", "ResNet101D": "resnet101d",
    "SEResNet50": "se_resnet50", "SEResNet101": "se_resnet101",
    "WideResNet50_2": "wide_resnet50_2", "WideResNet101_2": "wide_resnet101_2",
    "ResNeXt50_32x4d": "resnext50_32x4d",
    "ResNet20": "resnet20", "ResNet32": "resnet32", "ResNet44": "resnet44",
    "ResNet56": "resnet56", "ResNet110": "resnet110", "ResNet1202": "resnet1202",
    "PreActResNet164": "preact_resnet164", "PreActResNet1001": "preact_resnet1001",
    "WRN16_8": "wrn_16_8", "WRN28_10": "wrn_28_10", "WRN40_4": "wrn_40_4",
}

ResNet18 = _constructor("resnet18", "ResNet18")
ResNet34 = _constructor("resnet34", "ResNet34")
ResNet50 = _constructor("resnet50", "ResNet50")
ResNet101 = _constructor("resnet101", "ResNet101")
ResNet152 = _constructor("resnet152", "ResNet152")
ResNet200 = _constructor("resnet200", "ResNet200")
ResNet50V2 = _constructor("resnet50v2", "ResNet50V2")
ResNet101V2 = _constructor("resnet101v2", "ResNet101V2")
ResNet152V2 = _constructor("resnet152v2", "ResNet152V2")
ResNet50D = _constructor("resnet50d", "ResNet50D")
ResNet101D = _constructor("resnet101d", "ResNet101D")
SEResNet50 = _constructor("se_resnet50", "SEResNet50")
SEResNet101 = _constructor("se_resnet101", "SEResNet101")
WideResNet50_2 = _constructor("wide_resnet50_2", "WideResNet50_2")
WideResNet101_2 = _constructor("wide_resnet101_2", "WideResNet101_2")
ResNeXt50_32x4d = _constructor("resnext50_32x4d", "ResNeXt50_32x4d")
ResNet20 = _constructor("resnet20", "ResNet20")
ResNet32 = _constructor("resnet32", "ResNet32")
ResNet44 = _constructor("resnet44", "ResNet44")
ResNet56 = _constructor("resnet56", "ResNet56")
ResNet110 = _constructor("resnet110", "ResNet110")
ResNet1202 = _constructor("resnet1202", "ResNet1202")
PreActResNet164 = _constructor("preact_resnet164", "PreActResNet164")
PreActResNet1001 = _constructor("preact_resnet1001", "PreActResNet1001")
WRN16_8 = _constructor("wrn_16_8", "WRN16_8")
WRN28_10 = _constructor("wrn_28_10", "WRN28_10")
WRN40_4 = _constructor("wrn_40_4", "WRN40_4")
