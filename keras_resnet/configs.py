"""Architecture definitions: one frozen dataclass and one table of named variants.

An entry here says what a network *is* (blocks, depths, widths, stem, shortcut); how it is
trained lives in the tools' flags and a run directory's ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "deep", "cifar")
SHORTCUTS = ("projection", "avgpool", "zeropad")
IMAGENET_DEPTHS = (18, 34, 50, 101, 152, 200)


@dataclass(frozen=True)
class ResNetConfig:
    """What a residual network is.

    Attributes:
        block: "basic" (two 3x3 convs) or "bottleneck" (1x1-3x3-1x1, output 4x wider).
        depths: number of blocks in each stage.
        widths: base channels of each stage (a bottleneck stage outputs 4x this).
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool), "deep" (three 3x3 convs + max-pool,
            He et al. 2019) or "cifar" (one 3x3/1 conv).
        stem_width: output channels of the stem.
        preact: pre-activation blocks (He et al. 2016, "Identity Mappings").
        shortcut: how a block that changes shape projects its shortcut: "projection"
            (strided 1x1 conv + BN), "avgpool" (2x2 average pool, then 1x1 conv + BN;
            ResNet-D) or "zeropad" (CIFAR option A: subsample and zero-pad channels, no
            trainable parameters).
        groups: groups of the 3x3 convolution of a bottleneck (ResNeXt cardinality).
        width_per_group: bottleneck inner width per group at width 64 (64 = ResNet,
            128 = Wide ResNet-50-2, 4 with groups=32 = ResNeXt-50 32x4d).
        width_factor: multiplies every stage width (Wide ResNets for CIFAR, "k").
        se_ratio: squeeze-and-excitation reduction ratio (0 = off; Hu et al. use 1/16).
        zero_init_residual: initialise the last BN gamma of each block to zero.
        residual_scale: y = x + a * F(x) with this a.
        stochastic_depth: drop rate of the last block; earlier blocks scale linearly from 0
            (Huang et al. 2016).
        keras_applications: reproduce keras.applications exactly so its published weights
            load: stride in the first 1x1 conv (v1), biases on convs, BN epsilon 1.001e-5
            and momentum 0.99, and for pre-activation nets the stride in the last block of a
            stage with a max-pool shortcut.
        default_classes: classes of the default top (1000 ImageNet, 10 CIFAR-10).
        default_size: default input side when a top is included.
        reference: the paper the variant comes from.
    """

    block: str
    depths: tuple[int, ...]
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    preact: bool = False
    shortcut: str = "projection"
    groups: int = 1
    width_per_group: int = 64
    width_factor: int = 1
    se_ratio: float = 0.0
    zero_init_residual: bool = False
    residual_scale: float = 1.0
    stochastic_depth: float = 0.0
    keras_applications: bool = False
    default_classes: int = 1000
    default_size: int = 224
    reference: str = ""

    def __post_init__(self):
        _choice("block", self.block, BLOCKS)
        _choice("stem", self.stem, STEMS)
        _choice("shortcut", self.shortcut, SHORTCUTS)
        if len(self.depths) != len(self.widths) or not all(d >= 1 for d in self.depths):
            raise ValueError(
                f"depths={self.depths} and widths={self.widths} must have one positive "
                "entry per stage"
            )
        if self.groups < 1 or self.width_factor < 1 or self.width_per_group < 1:
            raise ValueError("groups, width_factor and width_per_group must be >= 1")
        if not 0.0 <= self.se_ratio < 1.0:
            raise ValueError(f"se_ratio={self.se_ratio} must be in [0, 1)")
        if not 0.0 <= self.stochastic_depth < 1.0:
            raise ValueError(f"stochastic_depth={self.stochastic_depth} must be in [0, 1)")
        grouped = [f"{k}={v}" for k, v, plain in (("groups", self.groups, 1), (
            "width_per_group", self.width_per_group, 64)) if v != plain]
        if self.block == "basic" and grouped:
            raise ValueError(f"{' and '.join(grouped)} shape a bottleneck's grouped 3x3 "
                             'convolution, which a net of block="basic" does not have; leave '
                             "them out, or use a bottleneck net such as resnet50")
        if self.shortcut == "zeropad" and self.block != "basic":
            raise ValueError('shortcut="zeropad" (CIFAR option A) needs block="basic"')

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def depth(self) -> int:
        """Layer count in the papers' convention.

        Weighted layers on the main path plus stem and classifier (He et al.); Wide ResNets
        (pre-activation basic blocks) count the stem and the stage-entry 1x1 projections
        instead, depth 6n+4 (Zagoruyko & Komodakis).
        """
        convs_per_block = 3 if self.block == "bottleneck" else 2
        if self.preact and self.block == "basic":
            return convs_per_block * sum(self.depths) + 1 + len(self.depths)
        return convs_per_block * sum(self.depths) + 2

    @property
    def min_size(self) -> int:
        """Smallest input side the network accepts (its total downsampling)."""
        stem_stride = 1 if self.stem == "cifar" else 4
        return stem_stride * 2 ** (len(self.depths) - 1)

    def replace(self, **changes) -> ResNetConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(self))
            raise ValueError(f"unknown ResNet option(s) {unknown}; valid options are {valid}")
        return dataclasses.replace(self, **changes)


def _choice(what, value, valid):
    if value not in valid:
        raise ValueError(f"{what}={value!r} is not valid; choose one of {', '.join(valid)}")


_HE2015 = "He et al. 2015, Deep Residual Learning for Image Recognition"
_V15 = "He et al. 2015 (v1.5: stride on the 3x3, as torchvision)"
_HE2016 = "He et al. 2016, Identity Mappings in Deep Residual Networks"
_TRICKS = "He et al. 2019, Bag of Tricks for Image Classification (ResNet-D)"
_SE = "Hu et al. 2018, Squeeze-and-Excitation Networks"
_WRN = "Zagoruyko & Komodakis 2016, Wide Residual Networks"
_RESNEXT = "Xie et al. 2017, Aggregated Residual Transformations (ResNeXt)"

_IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


def cifar_config(depth: int) -> ResNetConfig:
    """CIFAR ResNet of depth 6n+2 (He et al. 2015 §4.2): widths 16-32-64, option A."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth={depth} is not 6n+2 (e.g. 20, 32, 44, 56, 110)")
    n = (depth - 2) // 6
    return ResNetConfig(
        block="basic", depths=(n, n, n), widths=(16, 32, 64), stem="cifar", stem_width=16,
        shortcut="zeropad", default_classes=10, default_size=32, reference=_HE2015,
    )


def preact_cifar_config(depth: int) -> ResNetConfig:
    """Pre-activation bottleneck CIFAR ResNet of depth 9n+2 (He et al. 2016)."""
    n = (depth - 2) // 9
    return ResNetConfig(
        block="bottleneck", depths=(n, n, n), widths=(16, 32, 64), stem="cifar",
        stem_width=16, preact=True, default_classes=10, default_size=32, reference=_HE2016,
    )


def wrn_config(depth: int, k: int) -> ResNetConfig:
    """Wide ResNet WRN-depth-k for CIFAR, depth 6n+4 (Zagoruyko & Komodakis 2016)."""
    n = (depth - 4) // 6
    return ResNetConfig(
        block="basic", depths=(n, n, n), widths=(16, 32, 64), width_factor=k, stem="cifar",
        stem_width=16, preact=True, default_classes=10, default_size=32, reference=_WRN,
    )


def _imagenet(depth, **kw) -> ResNetConfig:
    block, depths = _IMAGENET_DEPTHS[depth]
    kw.setdefault("reference", _V15 if block == "bottleneck" else _HE2015)
    return ResNetConfig(block=block, depths=depths, **kw)


VARIANTS: dict[str, ResNetConfig] = {
    **{f"resnet{d}": _imagenet(d) for d in IMAGENET_DEPTHS},
    **{
        f"resnet{d}v2": _imagenet(d, preact=True, keras_applications=True, reference=_HE2016)
        for d in (50, 101, 152)
    },
    **{
        f"resnet{d}d": _imagenet(d, stem="deep", shortcut="avgpool", reference=_TRICKS)
        for d in (50, 101)
    },
    **{f"se_resnet{d}": _imagenet(d, se_ratio=1 / 16, reference=_SE) for d in (50, 101)},
    **{
        f"wide_resnet{d}_2": _imagenet(d, width_per_group=128, reference=_WRN)
        for d in (50, 101)
    },
    "resnext50_32x4d": _imagenet(50, groups=32, width_per_group=4, reference=_RESNEXT),
    **{f"resnet{d}": cifar_config(d) for d in (20, 32, 44, 56, 110, 1202)},
    **{f"preact_resnet{d}": preact_cifar_config(d) for d in (164, 1001)},
    **{f"wrn_{d}_{k}": wrn_config(d, k) for d, k in ((16, 8), (28, 10), (40, 4))},
}


def resolve_variant(variant: str) -> tuple[str, ResNetConfig]:
    """``(key, config)`` of a named variant; names are case- and dash-insensitive.

    Raises:
        ValueError: an unknown name, listing the valid ones.
    """
    key = str(variant).lower().replace("-", "_")
    if key not in VARIANTS:
        raise ValueError(
            f"variant={variant!r} is not a known ResNet; choose one of {', '.join(VARIANTS)}"
        )
    return key, VARIANTS[key]


def get_config(variant: str) -> ResNetConfig:
    """Looks up a named variant, with an error that lists the valid names."""
    return resolve_variant(variant)[1]


def config_for_depth(depth: int) -> tuple[str, ResNetConfig]:
    """Resolves ``--depth``: 18/34/50/101/152/200 are ImageNet-style, other 6n+2 are CIFAR."""
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ValueError(f"depth={depth!r} must be an integer")
    if depth in IMAGENET_DEPTHS:
        return f"resnet{depth}", VARIANTS[f"resnet{depth}"]
    if depth >= 8 and (depth - 2) % 6 == 0:
        return f"resnet{depth}", cifar_config(depth)
    raise ValueError(
        f"depth={depth} is not a ResNet depth; choose one of "
        f"{', '.join(map(str, IMAGENET_DEPTHS))} (ImageNet-style) or 6n+2 such as "
        "20, 32, 44, 56, 110, 1202 (CIFAR-style)"
    )
