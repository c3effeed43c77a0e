"""Architecture tests, table-driven over keras_resnet.VARIANTS.

Golden parameter counts come from the papers and reference implementations (torchvision,
keras.applications, timm); behaviour tests run on every variant, full size where it is
cheap (counts, symbolic shapes) and on a reduced copy of each variant (same blocks, stem,
shortcut and options; fewer and narrower blocks) where it runs data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_resnet as kr
from keras_resnet import configs

# Trainable parameters with the default top (1000 ImageNet / 10 CIFAR-10 classes).
GOLDEN_TRAINABLE = {
    "resnet18": 11_689_512,  # torchvision
    "resnet34": 21_797_672,  # torchvision
    "resnet50": 25_557_032,  # torchvision
    "resnet101": 44_549_160,  # torchvision
    "resnet152": 60_192_808,  # torchvision
    "resnet200": 64_673_832,  # He et al. 2016 Table 5: 64.7M
    "resnet50v2": 25_568_360,  # keras.applications ResNet50V2 (25,613,800 with BN stats)
    "resnet101v2": 44_577_896,  # keras.applications ResNet101V2
    "resnet152v2": 60_236_904,  # keras.applications ResNet152V2
    "resnet50d": 25_576_264,  # timm resnet50d
    "resnet101d": 44_568_392,  # timm resnet101d
    "se_resnet50": 28_088_024,  # Hu et al. 2018 Table 2: 28.1M
    "se_resnet101": 49_326_872,  # Hu et al. 2018 Table 2: 49.3M
    "wide_resnet50_2": 68_883_240,  # torchvision
    "wide_resnet101_2": 126_886_696,  # torchvision
    "resnext50_32x4d": 25_028_904,  # torchvision
    "resnet20": 269_722,  # He et al. 2015 Table 6: 0.27M
    "resnet32": 464_154,  # 0.46M
    "resnet44": 658_586,  # 0.66M
    "resnet56": 853_018,  # 0.85M
    "resnet110": 1_727_962,  # 1.7M
    "resnet1202": 19_421_274,  # 19.4M
    "preact_resnet164": 1_703_258,  # He et al. 2016 Table 3: 1.7M
    "preact_resnet1001": 10_327_706,  # 10.2M
    "wrn_16_8": 10_961_370,  # Zagoruyko & Komodakis 2016: 11.0M
    "wrn_28_10": 36_479_194,  # 36.5M
    "wrn_40_4": 8_949_210,  # 8.9M
}
HUGE = {"resnet1202", "preact_resnet1001"}  # minutes to build: slow tier only
ALL = list(kr.VARIANTS)


def _trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _variant_params(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in HUGE else name


def tiny(name: str) -> kr.ResNetConfig:
    """The same architecture with two blocks per stage and narrow widths."""
    c = kr.VARIANTS[name]
    widths = tuple(16 * 2**i for i in range(len(c.depths)))
    return dataclasses.replace(c, depths=(2,) * len(c.depths), widths=widths,
                               width_factor=min(c.width_factor, 2), stem_width=16)


def _distinct_tiny_variants():
    """One variant per distinct reduced architecture (resnet101 reduces to resnet50, ...)."""
    seen = {}
    for name in kr.VARIANTS:
        seen.setdefault(dataclasses.replace(tiny(name), reference=""), name)
    return list(seen.values())


def tiny_model(name, **kw):
    c = tiny(name)
    kw.setdefault("input_shape", (32, 32, 3) if c.stem == "cifar" else (64, 64, 3))
    kw.setdefault("classes", 7)
    return kr.resnet(config=c, name=name, **kw)


TINY = _distinct_tiny_variants()
# Reduced copies the fast tier trains: basic, bottleneck, pre-activation and wide blocks;
# the deep-stem, squeeze-excitation, grouped and wide-bottleneck ones train in the slow
# tier (and under QAT and other backends there).
TRAINED_FAST = {"resnet18", "resnet20", "resnet50", "preact_resnet164", "wrn_16_8"}


def _slow_unless(names, name):
    return name if name in names else pytest.param(name, marks=pytest.mark.slow)


def images(model, n=2, seed=0):
    shape = model.input_shape[1:]
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype("float32")


def test_every_variant_has_a_golden_count():
    assert set(GOLDEN_TRAINABLE) == set(kr.VARIANTS)


@pytest.mark.parametrize("name", [_variant_params(n) for n in ALL])
def test_golden_parameter_count_and_output_shape(name):
    model = kr.resnet(variant=name)
    c = kr.VARIANTS[name]
    assert _trainable(model) == GOLDEN_TRAINABLE[name]
    assert model.input_shape == (None, c.default_size, c.default_size, 3)
    assert model.output_shape == (None, c.default_classes)
    assert model.name == name


def test_resnet50_without_top_counts():
    model = kr.ResNet50(include_top=False)
    assert _trainable(model) == 23_508_032
    assert model.count_params() == 23_561_152
    assert model.output_shape == (None, None, None, 2048)


# Full size, one variant per distinct architecture in the fast tier (deeper copies in the
# slow tier).
@pytest.mark.parametrize("name", [_slow_unless(TINY, n) for n in ALL if n not in HUGE])
def test_full_size_forward_at_non_default_size(name):
    c = kr.VARIANTS[name]
    size = 48 if c.stem == "cifar" else 96
    model = kr.resnet(variant=name, include_top=False, pooling="avg",
                      input_shape=(size, size, 3))
    out = model(images(model, 1), training=False)
    assert out.shape[0] == 1 and out.shape[1] == model.output_shape[-1]
    assert np.isfinite(keras.ops.convert_to_numpy(out)).all()


@pytest.mark.parametrize("name", TINY)
def test_shapes_with_and_without_top_and_pooling(name):
    c = tiny(name)
    channels = c.widths[-1] * c.width_factor * c.expansion
    side = 32 if c.stem == "cifar" else 64
    out_side = side // c.min_size
    with_top = tiny_model(name)
    assert with_top(images(with_top)).shape == (2, 7)
    for pooling, shape in ((None, (2, out_side, out_side, channels)),
                           ("avg", (2, channels)), ("max", (2, channels))):
        m = tiny_model(name, include_top=False, pooling=pooling)
        assert tuple(m(images(m)).shape) == shape, pooling
    # any size the network supports, including non-square
    m = tiny_model(name, include_top=False, input_shape=(side + 16, side, 3))
    assert m(images(m)).shape[1:3] == (-(-(side + 16) // c.min_size), out_side)


@pytest.mark.parametrize("name", TINY)
def test_save_and_load_without_custom_objects(name, tmp_path):
    model = tiny_model(name)
    x = images(model)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # safe_mode stays on, no custom_objects
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)),
                                  keras.ops.convert_to_numpy(loaded(x)))
    assert [w.name for w in loaded.weights] == [w.name for w in model.weights]


@pytest.mark.parametrize("name", [_slow_unless(TRAINED_FAST, n) for n in TINY])
def test_trainable_end_to_end(name):
    keras.utils.set_random_seed(0)
    model = tiny_model(name, classifier_activation=None)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  # Tracing costs more than ten eager steps of a tiny net, except for
                  # grouped convolutions, whose eager gradient is slow on CPU.
                  run_eagerly=name != "resnext50_32x4d")
    x = images(model, n=8, seed=1)
    y = np.arange(8) % 7
    # training-mode loss (batch statistics): the moving BN averages lag a few steps
    losses = [float(model.train_on_batch(x, y)) for _ in range(10)]
    assert losses[-1] < 0.9 * losses[0], losses


def test_layer_names_follow_keras_applications_grammar():
    names = [layer.name for layer in kr.ResNet50().layers]
    for expected in ("conv1_conv", "conv1_bn", "conv1_relu", "pool1_pool", "conv2_block1_0_conv",
                     "conv3_block1_0_bn", "conv3_block2_2_conv", "conv3_block1_2_pad",
                     "conv4_block6_out", "conv5_block3_out", "avg_pool", "predictions"):
        assert expected in names
    assert len(names) == len(set(names))


def test_only_stock_layers():
    stock = set(dir(keras.layers))
    for name in TINY:
        model = tiny_model(name, stochastic_depth=0.1, residual_scale=0.5)
        for layer in model.layers:
            assert type(layer).__name__ in stock, (name, layer.name)
            assert type(layer).__name__ != "Lambda"


def test_option_a_shortcut_subsamples_and_zero_pads_without_trainable_params():
    model = kr.ResNet20()
    layer = model.get_layer("conv3_block1_0_conv")
    assert not layer.trainable and layer.trainable_weights == []
    probe = keras.Model(model.input, [model.get_layer("conv2_block3_out").output, layer.output])
    x, y = (keras.ops.convert_to_numpy(t) for t in probe(images(model)))
    np.testing.assert_array_equal(y[..., :16], x[:, ::2, ::2, :])
    assert not y[..., 16:].any()
    assert y.shape == (2, 16, 16, 32)


def test_depth_resolves_imagenet_and_cifar_families():
    assert kr.resnet(50).name == "resnet50"
    assert _trainable(kr.resnet(depth=20)) == GOLDEN_TRAINABLE["resnet20"]
    m = kr.resnet(depth=14)  # any 6n+2 depth builds a CIFAR ResNet
    assert m.get_layer("conv4_block2_out") is not None and m.output_shape == (None, 10)


def test_options_zero_init_scale_and_stochastic_depth():
    model = tiny_model("resnet50", zero_init_residual=True, residual_scale=0.2,
                       stochastic_depth=0.5)
    gamma = model.get_layer("conv2_block1_3_bn").gamma
    assert not keras.ops.convert_to_numpy(gamma).any()
    assert model.get_layer("conv2_block1_scale").scale == 0.2
    names = {layer.name for layer in model.layers}
    assert "conv2_block1_drop" not in names  # first block: rate 0
    assert model.get_layer("conv5_block2_drop").rate == pytest.approx(0.5)
    x = images(model)
    a, b = model(x, training=False), model(x, training=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_zero_init_residual_makes_blocks_start_as_identity():
    model = tiny_model("resnet18", zero_init_residual=True, include_top=False)
    probe = keras.Model(model.input, [model.get_layer("conv2_block1_out").output,
                                      model.get_layer("pool1_pool").output])
    out, inp = (keras.ops.convert_to_numpy(t) for t in probe(images(model)))
    np.testing.assert_allclose(out, np.maximum(inp, 0), atol=1e-6)


def test_feature_model_returns_stage_outputs():
    features = kr.feature_model(kr.ResNet50(include_top=False, input_shape=(224, 224, 3)))
    out = features(np.zeros((1, 224, 224, 3), "float32"))
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"conv2": (1, 56, 56, 256), "conv3": (1, 28, 28, 512),
                      "conv4": (1, 14, 14, 1024), "conv5": (1, 7, 7, 2048)}


def test_input_tensor_and_preprocessing():
    inp = keras.Input((40, 40, 3))
    model = kr.ResNet20(input_tensor=inp, include_preprocessing=True)
    assert model.input_shape == (None, 40, 40, 3)
    pre = model.get_layer("preprocess")
    assert not pre.trainable
    probe = keras.Model(model.input, pre.output)
    pixels = np.full((1, 40, 40, 3), 255.0, "float32")
    expected = (255 - np.array([0.485, 0.456, 0.406]) * 255) / (np.array([0.229, 0.224, 0.225])
                                                               * 255)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(probe(pixels))[0, 0, 0], expected,
                               rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=51), "depth=51 is not a ResNet depth; choose one of 18, 34, 50"),
        (dict(variant="resnet51"), "variant='resnet51' is not a known ResNet; choose one of"),
        (dict(depth=50, pooling="mean"), "pooling='mean' is not valid"),
        (dict(depth=50, input_shape=(16, 16, 3)), "too small for resnet50: height and width "
                                                    "must be at least 32"),
        (dict(depth=50, input_shape=(224, 224)), "must be (height, width, channels)"),
        (dict(depth=50, weights="imagenet", classes=10), "needs classes=1000"),
        (dict(depth=18, weights="imagenet"), "weights='imagenet' is not available for resnet18"),
        (dict(depth=50, weights="/no/such/file.h5"), "neither None, 'imagenet' nor an existing"),
        (dict(depth=50, se_ratio=2.0), "se_ratio=2.0 must be in [0, 1)"),
        (dict(depth=50, no_such_option=1), "unknown ResNet option(s) ['no_such_option']"),
        (dict(depth=20, variant="resnet20"), "pass exactly one of depth=, variant= or config="),
        (dict(depth=20, classes=0), "classes=0 must be a positive integer"),
    ],
)
def test_clear_errors(kwargs, message):
    with pytest.raises(ValueError) as info:
        kr.resnet(**kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_constructors_cover_the_table():
    assert sorted(kr.CONSTRUCTORS.values()) == sorted(kr.VARIANTS)
    for public, variant in kr.CONSTRUCTORS.items():
        fn = getattr(kr, public)
        assert fn.__name__ == public and kr.VARIANTS[variant].reference in fn.__doc__


def test_config_depth_property_matches_name():
    for name in ("resnet18", "resnet50", "resnet152", "resnet200", "resnet20", "resnet110",
                 "resnet1202", "preact_resnet164", "preact_resnet1001"):
        assert kr.VARIANTS[name].depth == int(name.rsplit("resnet", 1)[1]), name
    assert configs.wrn_config(28, 10).depths == (4, 4, 4)
    assert kr.VARIANTS["wrn_28_10"].depth == 28 and kr.VARIANTS["wrn_16_8"].depth == 16


def test_docs_model_table_matches_the_golden_counts():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    table = readme.split("<!-- model-table:begin -->")[1].split("<!-- model-table:end -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        rows[cells[1]] = (int(cells[2]), int(cells[3].replace(",", "")), cells[0])
    assert set(rows) == set(kr.VARIANTS), (
        "regenerate: python tools/model_table.py --readme=docs/models.md")
    for name, (depth, params, public) in rows.items():
        assert params == GOLDEN_TRAINABLE[name], name
        assert depth == kr.VARIANTS[name].depth and kr.CONSTRUCTORS[public] == name
