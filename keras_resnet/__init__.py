"""keras_resnet: the ResNet family as Keras 3 functional models.

Examples:
    >>> import keras_resnet
    >>> model = keras_resnet.ResNet50()
    >>> cifar = keras_resnet.resnet(depth=20)            # CIFAR ResNet-20, 10 classes
    >>> custom = keras_resnet.resnet(variant="resnet50d", se_ratio=1 / 16)
    >>> trained = keras_resnet.ResNet20(weights="cifar10")  # shipped CIFAR-10 weights
"""

from keras_resnet.blocks import (
    basic_block,
    bottleneck_block,
    layer_library,
    preact_basic_block,
    preact_bottleneck_block,
    squeeze_excite,
)
from keras_resnet.configs import VARIANTS, ResNetConfig, config_for_depth, get_config
from keras_resnet.models import (
    CONSTRUCTORS,
    WRN16_8,
    WRN28_10,
    WRN40_4,
    PreActResNet164,
    PreActResNet1001,
    ResNet18,
    ResNet20,
    ResNet32,
    ResNet34,
    ResNet44,
    ResNet50,
    ResNet50D,
    ResNet50V2,
    ResNet56,
    ResNet101,
    ResNet101D,
    ResNet101V2,
    ResNet110,
    ResNet152,
    ResNet152V2,
    ResNet200,
    ResNet1202,
    ResNeXt50_32x4d,
    SEResNet50,
    SEResNet101,
    WideResNet50_2,
    WideResNet101_2,
    feature_model,
    resnet,
)
from keras_resnet.weights import (
    CIFAR10_CLASSES,
    PRETRAINED,
    load_h5_by_name,
    save_by_name,
    shipped_weights,
    transfer_weights,
)

__version__ = "0.1.0"

__all__ = [
    "CIFAR10_CLASSES",
    "PRETRAINED",
    "save_by_name",
    "shipped_weights",
    "VARIANTS",
    "ResNetConfig",
    "config_for_depth",
    "get_config",
    "load_h5_by_name",
    "transfer_weights",
    "CONSTRUCTORS",
    "PreActResNet1001",
    "PreActResNet164",
    "ResNeXt50_32x4d",
    "ResNet101",
    "ResNet101D",
    "ResNet101V2",
    "ResNet110",
    "ResNet1202",
    "ResNet152",
    "ResNet152V2",
    "ResNet18",
    "ResNet20",
    "ResNet200",
    "ResNet32",
    "ResNet34",
    "ResNet44",
    "ResNet50",
    "ResNet50D",
    "ResNet50V2",
    "ResNet56",
    "SEResNet101",
    "SEResNet50",
    "WRN16_8",
    "WRN28_10",
    "WRN40_4",
    "WideResNet101_2",
    "WideResNet50_2",
    "basic_block",
    "bottleneck_block",
    "feature_model",
    "layer_library",
    "preact_basic_block",
    "preact_bottleneck_block",
    "resnet",
    "squeeze_excite",
]
