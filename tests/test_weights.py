"""keras.applications ImageNet weights, tested offline.

A keras.applications model with random weights (and randomised BN statistics) is saved in
its legacy HDF5 layout, the same layer-name layout as the published files; our loader
carries it into our architecture and the outputs must agree to 1e-5.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_resnet as kr
from keras_resnet import weights as weights_lib

REFERENCES = {
    "resnet50": keras.applications.ResNet50,
    "resnet50v2": keras.applications.ResNet50V2,
}


def _randomise_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                rng.normal(0, 0.1, beta.shape).astype("float32"),
                rng.normal(0, 0.1, mean.shape).astype("float32"),
                rng.uniform(0.5, 1.5, var.shape).astype("float32"),
            ])


# Fast tier: ResNet50 with its top, ResNet50V2 without; the other two in the slow tier.
FAST_REFERENCES = {("resnet50", True), ("resnet50v2", False)}


@pytest.fixture(scope="module",
                params=[(v, top) if (v, top) in FAST_REFERENCES
                        else pytest.param((v, top), marks=pytest.mark.slow)
                        for v in REFERENCES for top in (True, False)],
                ids=lambda p: f"{p[0]}-{'top' if p[1] else 'notop'}")
def reference_file(request, tmp_path_factory):
    variant, include_top = request.param
    ref = REFERENCES[variant](weights=None, include_top=include_top,
                              classifier_activation=None)
    _randomise_bn(ref)
    path = tmp_path_factory.mktemp("weights") / f"{variant}.h5"
    ref.save(path)  # legacy HDF5: weights grouped by layer name, as the published files
    return variant, include_top, ref, path


def _logits(model, x):
    return model.predict(x, verbose=0)


def assert_agree(actual, desired, tol=1e-5):
    """Agreement to ``tol`` relative to the output scale (feature maps reach ~50)."""
    np.testing.assert_allclose(actual, desired, rtol=tol,
                               atol=tol * max(1.0, float(np.abs(desired).max())))


def test_weights_imagenet_matches_keras_applications(reference_file, monkeypatch):
    variant, include_top, ref, path = reference_file
    requested = []

    def fake_download(v, *, include_top):
        requested.append((v, include_top))
        return str(path)

    monkeypatch.setattr(weights_lib, "imagenet_file", fake_download)
    model = kr.resnet(variant=variant, weights="imagenet", include_top=include_top,
                      classifier_activation=None,
                      input_shape=None if include_top else (96, 96, 3))
    assert requested == [(variant, include_top)]
    size = 224 if include_top else 96
    x = np.random.default_rng(1).uniform(-120, 130, (2, size, size, 3)).astype("float32")
    assert_agree(_logits(model, x), _logits(ref, x))


def test_same_mapping_carries_a_model_in_memory(reference_file):
    variant, include_top, ref, _ = reference_file
    model = kr.resnet(variant=variant, keras_applications=True, include_top=include_top,
                      classifier_activation=None)
    n = kr.transfer_weights(ref, model)
    assert n == sum(1 for layer in ref.layers if layer.weights)
    x = np.random.default_rng(2).uniform(-120, 130, (1, 224, 224, 3)).astype("float32")
    assert_agree(_logits(model, x), _logits(ref, x))


def test_imagenet_weights_keep_v1_quirks():
    """keras.applications v1 strides in the first 1x1 and has conv biases."""
    model = kr.resnet(variant="resnet50", keras_applications=True)
    assert model.get_layer("conv3_block1_1_conv").strides == (2, 2)
    assert model.get_layer("conv3_block1_2_conv").strides == (1, 1)
    assert model.get_layer("conv3_block1_1_conv").use_bias
    v15 = kr.ResNet50()
    assert v15.get_layer("conv3_block1_2_conv").strides == (2, 2)
    assert not v15.get_layer("conv3_block1_1_conv").use_bias


def test_download_is_hash_checked_and_cached(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    fname = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    (served / fname).write_bytes(b"not really weights")
    good = hashlib.md5((served / fname).read_bytes()).hexdigest()
    monkeypatch.setattr(weights_lib, "BASE_URL", served.as_uri() + "/")
    monkeypatch.setitem(weights_lib.IMAGENET_WEIGHTS, "resnet50", ("0" * 32, good))
    path = weights_lib.imagenet_file("resnet50", include_top=False, cache_dir=str(tmp_path))
    assert open(path, "rb").read() == b"not really weights"
    (served / fname).unlink()  # second call is served from the cache
    assert weights_lib.imagenet_file("resnet50", include_top=False,
                                     cache_dir=str(tmp_path)) == path
    (served / fname).write_bytes(b"tampered")
    monkeypatch.setitem(weights_lib.IMAGENET_WEIGHTS, "resnet50", ("0" * 32, "1" * 32))
    with pytest.raises(ValueError):
        weights_lib.imagenet_file("resnet50", include_top=False, cache_dir=str(tmp_path / "b"))


def test_weights_from_local_files(tmp_path):
    model = kr.ResNet20()
    x = np.random.default_rng(3).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    model.save_weights(tmp_path / "w.weights.h5")
    model.save(tmp_path / "m.keras")
    model.save(tmp_path / "legacy.h5")
    for f in ("w.weights.h5", "m.keras", "legacy.h5"):
        other = kr.ResNet20(weights=str(tmp_path / f))
        np.testing.assert_array_equal(_logits(other, x), _logits(model, x))


def test_mismatched_weights_name_the_layer(tmp_path):
    kr.ResNet20().save(tmp_path / "r20.h5")
    with pytest.raises(ValueError, match="has no weights for layer 'conv2_block4_1_conv'"):
        kr.ResNet32(weights=str(tmp_path / "r20.h5"))
    kr.ResNet20(classes=5).save(tmp_path / "r20c5.h5")
    with pytest.raises(ValueError, match="layer 'predictions' expects weight shapes"):
        kr.ResNet20(weights=str(tmp_path / "r20c5.h5"))


def test_include_preprocessing_matches_keras_applications_preprocess_input(reference_file,
                                                                            monkeypatch):
    variant, include_top, ref, path = reference_file
    if not include_top:
        pytest.skip("one check per variant is enough")
    monkeypatch.setattr(weights_lib, "imagenet_file", lambda v, *, include_top: str(path))
    model = kr.resnet(variant=variant, weights="imagenet", include_preprocessing=True,
                      classifier_activation=None)
    module = keras.applications.resnet_v2 if variant.endswith("v2") else keras.applications.resnet
    pixels = np.random.default_rng(4).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    assert_agree(_logits(model, pixels), _logits(ref, module.preprocess_input(pixels.copy())))


# --------------------------------------------------------------------------- shipped weights


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A shipped-weights entry for resnet8 written by save_by_name into a temporary folder."""
    source = kr.resnet(depth=8, classes=10, input_shape=(32, 32, 3), include_preprocessing=True)
    _randomise_bn(source)
    sha = weights_lib.save_by_name(source, tmp_path / "resnet8_test.h5")
    entry = weights_lib.Pretrained(file="resnet8_test.h5", sha256=sha,
                                   classes=kr.CIFAR10_CLASSES, image_size=32, card="none.json")
    monkeypatch.setattr(weights_lib, "PRETRAINED_DIR", tmp_path)
    monkeypatch.setitem(weights_lib.PRETRAINED, "resnet8", {"cifar10": entry})
    return source, entry


def test_shipped_weights_load_with_top_as_logits_and_without_top(shipped, tmp_path):
    source, _ = shipped
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    want = source.predict_on_batch(x)
    model = kr.resnet(depth=8, weights="cifar10")
    assert model.input_shape == (None, 32, 32, 3) and model.get_layer("preprocess")
    # stored as float16: within float16 rounding of the source
    np.testing.assert_allclose(model.predict_on_batch(x), want, atol=2e-3)
    assert np.allclose(model.predict_on_batch(x).sum(-1), 1.0, atol=1e-5)  # softmax
    logits = kr.resnet(depth=8, weights="cifar10", classifier_activation=None)
    np.testing.assert_allclose(keras.ops.softmax(logits.predict_on_batch(x)), want, atol=2e-3)
    backbone = kr.resnet(depth=8, weights="cifar10", include_top=False, pooling="avg")
    assert backbone.output_shape == (None, 64)
    np.testing.assert_array_equal(backbone.get_layer("conv1_conv").get_weights()[0],
                                  model.get_layer("conv1_conv").get_weights()[0])
    # save and reload without custom objects
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(again.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6)


def test_shipped_weights_bad_requests_are_one_line_errors(shipped):
    _, entry = shipped
    cases = [
        (dict(depth=8, weights="cifar10", classes=100), "needs classes=10"),
        (dict(depth=8, weights="cifar10", include_preprocessing=False),
         "leave include_preprocessing unset"),
        (dict(depth=14, weights="cifar10"), "weights='cifar10' is not available for resnet14"),
        (dict(depth=8, weights="cifar10", se_ratio=0.25), "change the architecture"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            kr.resnet(**kwargs)
        assert "\n" not in str(info.value)
    assert kr.resnet(depth=8, weights="cifar10", include_top=False, classes=100) is not None
    damaged = bytearray(entry.path.read_bytes())
    damaged[-100] ^= 0xFF
    entry.path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"have sha256 .*expected .*damaged: reinstall") as info:
        kr.resnet(depth=8, weights="cifar10")
    assert "\n" not in str(info.value)


SHIPPED = kr.shipped_weights()


@pytest.mark.parametrize("record", SHIPPED, ids=[f"{w['variant']}-{w['weights']}"
                                                 for w in SHIPPED])
def test_every_shipped_model_loads_and_matches_its_card(record, cifar_small):
    """Each shipped file: its sha256 and classes as the card says, the documented shapes
    with and without top, QAT int8 within 0.5 point of float, and a sanity check on 300
    real CIFAR-10 training images (chance 10%; the held-out test split is measured
    elsewhere, never here)."""
    from keras_resnet.pipeline import data

    entry = weights_lib.pretrained(record["variant"], record["weights"])
    card = weights_lib.read_card(entry)
    assert card["sha256"] == entry.sha256 == record["sha256"]
    assert hashlib.sha256(entry.path.read_bytes()).hexdigest() == entry.sha256
    assert card["classes"] == list(kr.CIFAR10_CLASSES) == list(record["classes"])
    assert card["bytes"] == entry.path.stat().st_size
    top1 = record["top1"]
    for key in ("float", "float_flip", "qat_int8", "qat_int8_flip", "ptq_int8",
                "ptq_int8_flip"):
        assert 0.5 < top1[key] < 1.0, (key, top1)
    assert top1["qat_int8"] >= top1["float"] - 0.005  # QAT int8 within 0.5 point
    assert record["command"].startswith("python tools/train.py")
    model = kr.resnet(variant=record["variant"], weights=record["weights"])
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    backbone = kr.resnet(variant=record["variant"], weights=record["weights"],
                         include_top=False, pooling="avg")
    assert backbone.output_shape == (None, 64)
    split = data.eval_data("folder", str(cifar_small), "train", 32, 300)
    images, labels = data.take(split.dataset, 300)
    accuracy = float(np.mean(model.predict(images, verbose=0).argmax(-1) == labels))
    assert accuracy > 0.8, accuracy


def test_readme_weights_table_is_generated_from_the_registry():
    import model_table  # tools/model_table.py

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin, end = "<!-- weights-table:begin -->\n", "\n<!-- weights-table:end -->"
    assert readme[readme.index(begin) + len(begin):readme.index(end)] == \
        model_table.weights_table(), "regenerate: python tools/model_table.py --readme=README.md"
    assert {(w["variant"], w["weights"]) for w in kr.shipped_weights()} == {
        (v, n) for v, entries in kr.PRETRAINED.items() for n in entries}
    have = ", ".join(v for v, entries in kr.PRETRAINED.items() if "cifar10" in entries)
    with pytest.raises(ValueError) as refused:
        kr.resnet(variant="resnet1202", weights="cifar10")
    assert str(refused.value) == (f"weights='cifar10' is not available for resnet1202; it "
                                  f"exists for {have}")


def test_zoo_page_tables_are_generated_from_the_model_cards():
    import model_table  # tools/model_table.py

    page = (Path(__file__).resolve().parents[1] / "docs" / "zoo.md").read_text()
    for marker in ("weights-table", "zoo-table"):
        begin, end = f"<!-- {marker}:begin -->\n", f"\n<!-- {marker}:end -->"
        assert page[page.index(begin) + len(begin):page.index(end)] == \
            model_table.TABLES[marker](), (
                "regenerate: python tools/model_table.py --readme=docs/zoo.md")
    rows = model_table.zoo_table().splitlines()[2:]
    assert len(rows) == len(kr.shipped_weights())
    assert "`python tools/train.py --depth=56 " in rows[-1] and "cutout 16" in rows[-1]
    assert "2 cores (amx_bf16, avx512_bf16), mixed_bfloat16, 2.4 h |" in rows[-1]


def test_weights_table_says_dash_for_what_a_card_does_not_record(monkeypatch):
    import model_table  # tools/model_table.py

    record = {"variant": "resnet8", "weights": "cifar10", "recipe": None,
              "recipe_changes": None, "epochs": None, "train_images": None, "bytes": None,
              "dtype": None, "training_time_s": None, "cpu": None,
              "top1": dict.fromkeys(["float", "float_flip", "qat_int8", "qat_int8_flip",
                                     "ptq_int8", "ptq_int8_flip"])}
    monkeypatch.setattr(kr, "shipped_weights", lambda: [record])
    row = model_table.weights_table().splitlines()[-1]
    assert row == "| `resnet8` | `cifar10` | - (-) | - (-) | - (-) | - | - | - | - |"
    monkeypatch.setattr(kr, "shipped_weights", lambda: [{**record, "epochs": 30}])
    assert "| 30 |" in model_table.weights_table().splitlines()[-1]
    # A run on a GPU is timed on it, not on the host's CPU.
    gpu = {**record, "training_time_s": 434.0, "cpu": "Intel(R) Xeon(R) Processor",
           "accelerator": "NVIDIA H200"}
    monkeypatch.setattr(kr, "shipped_weights", lambda: [gpu])
    assert model_table.weights_table().splitlines()[-1].endswith("| 0.1 h on NVIDIA H200 |")
    # A run resumed elsewhere names each machine once, in order.
    moved = {**gpu, "machines": [{"accelerator": "NVIDIA H200", "cpu": "Xeon"},
                                 {"accelerator": None, "cpu": "AMD EPYC"}]}
    monkeypatch.setattr(kr, "shipped_weights", lambda: [moved])
    assert model_table.weights_table().splitlines()[-1].endswith(
        "| 0.1 h on NVIDIA H200 + AMD EPYC |")
