"""keras_resnet.pipeline.export and tools/export_tflite.py: conversion, op audit, LiteRT.

A tiny CIFAR ResNet-8 is trained for one epoch on real CIFAR-10 images (``cifar_small``)
and written as a run folder in the format of tools/train.py. Nothing here imports tfmot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

_TEMPLATES: dict[str, Path] = {}


def make_run(root: Path, data_dir: Path, *, epochs: int = 1) -> Path:
    """Trains ResNet-8 on ``data_dir`` (``train/`` and ``val/`` class folders) into a run.

    Writes model.keras (raw-pixel input, logits), config.json and labels.txt as
    tools/train.py does. Trained once per session; callers get a private copy.
    """
    key = str(data_dir)
    if key not in _TEMPLATES:
        import keras

        import keras_resnet
        from keras_resnet.pipeline import data

        template = root / "template_run"
        template.mkdir(parents=True)
        keras.utils.set_random_seed(0)
        bundle = data.load_data("folder", data_dir=str(data_dir), image_size=32,
                                batch_size=64, seed=0)
        model = keras_resnet.resnet(depth=8, classes=bundle.num_classes,
                                    input_shape=(32, 32, 3), include_preprocessing=True,
                                    classifier_activation=None)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(bundle.train, epochs=epochs, verbose=0, shuffle=False)
        model.save(template / "model.keras")
        config = {"model": "resnet8", "depth": 8, "model_options": {},
                  "num_classes": bundle.num_classes, "image_size": 32, "dataset": "folder",
                  "data_dir": str(data_dir), "val_fraction": 0.1, "seed": 0,
                  "batch_size": 64, "learning_rate": 0.05}
        (template / "config.json").write_text(json.dumps(config, indent=1))
        (template / "labels.txt").write_text("\n".join(bundle.class_names) + "\n")
        _TEMPLATES[key] = template
    run = root / f"run_{len(list(root.glob('run_*')))}"
    shutil.copytree(_TEMPLATES[key], run)
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_small):
    """(run folder, Keras model, 64 validation images, their labels)."""
    import keras

    from keras_resnet.pipeline import data

    run = make_run(tmp_path_factory.mktemp("runs"), cifar_small)
    model = keras.saving.load_model(run / "model.keras")
    val = data.eval_data("folder", str(cifar_small), "val", 32, 64)
    images, labels = next(iter(val.dataset))
    return run, model, np.asarray(images), np.asarray(labels)


@pytest.fixture
def run_copy(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    return run


def test_float32_export_matches_keras(trained):
    from keras_resnet.pipeline import export

    _, model, images, _ = trained
    content = export.convert(model, "float32")
    report = export.audit(content, int8=False)
    assert report.input_type == "FLOAT32" and "CONV_2D" in report.ops
    logits = export.LiteRTModel(content).predict(images)
    np.testing.assert_allclose(logits, model.predict(images, verbose=0), atol=1e-4)


@pytest.mark.parametrize("io", ["float32", "uint8", "int8"])
def test_ptq_int8_is_all_int8_and_close_to_keras(trained, io):
    from keras_resnet.pipeline import export

    _, model, images, _ = trained
    content = export.convert(model, "ptq_int8", io=io, representative=images)
    report = export.audit(content, int8=True)
    assert report.mac_types and all(t[1:] == ("INT8",) * 3 for t in report.mac_types)
    assert report.input_type == io.upper()
    runtime = export.LiteRTModel(content)
    if io != "float32":
        # Raw pixels calibrate to 0..255: the int8/uint8 input is the pixel, exactly.
        scale, zero = runtime.input["quantization"]
        assert scale == pytest.approx(1.0) and zero == (0 if io == "uint8" else -128)
    want = model.predict(images, verbose=0)
    got = runtime.predict(images)
    # One epoch of training: logits span a few units; int8 keeps them within a few steps.
    assert np.max(np.abs(got - want)) < 0.1 * np.ptp(want)
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.85


def test_audit_fails_on_flex_op():
    import tensorflow as tf

    from keras_resnet.pipeline import export

    erf = tf.function(tf.math.erf, input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([erf.get_concrete_function()],
                                                               erf)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                           tf.lite.OpsSet.SELECT_TF_OPS]
    content = converter.convert()
    assert "CUSTOM:FlexErf" in export.inspect(content).ops
    with pytest.raises(export.ExportError, match="non-builtin op.*FlexErf"):
        export.audit(content, int8=False, name="flex.tflite")


def test_convert_refuses_flex_ops():
    import keras
    import tensorflow as tf

    from keras_resnet.pipeline import export

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(tf.math.erf)(inputs))
    with pytest.raises(export.ExportError, match="builtin ops only"):
        export.convert(model, "float32")


@pytest.mark.parametrize("mode", ["float32", "dynamic"])
def test_audit_fails_on_float_conv_in_int8_file(trained, mode):
    from keras_resnet.pipeline import export

    content = export.convert(trained[1], mode)
    export.audit(content, int8=False)  # a fine float file ...
    with pytest.raises(export.ExportError, match="CONV_2D with FLOAT32/"):
        export.audit(content, int8=True, name=f"{mode}.tflite")  # ... but not int8


def test_convert_rejects_bad_requests(trained):
    from keras_resnet.pipeline import export

    model = trained[1]
    with pytest.raises(export.ExportError, match="needs an int8 model"):
        export.convert(model, "float16", io="uint8")
    with pytest.raises(export.ExportError, match="representative images"):
        export.convert(model, "ptq_int8", representative=np.zeros((0, 32, 32, 3)))
    with pytest.raises(export.ExportError, match="mode='int4' is not valid"):
        export.convert(model, "int4")


def test_cli_exports_verifies_and_hands_off(run_copy, capsys):
    import export_tflite

    status = export_tflite.main(["export_tflite", f"--model_dir={run_copy}",
                                 "--eval_samples=200", "--latency_runs=5",
                                 "--representative_samples=100", "--io=uint8"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "qat_int8 left out: run tools/qat.py first" in out
    for mode in ("float32", "float16", "dynamic", "ptq_int8"):
        assert (run_copy / f"model_{mode}.tflite").is_file()
        assert f"| {mode} (model_{mode}.tflite) |" in out
    handoff = json.loads((run_copy / "model_ptq_int8.json").read_text())
    assert handoff["input"]["dtype"] == "uint8" and handoff["input"]["shape"] == [1, 32, 32, 3]
    assert handoff["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert handoff["labels"] == "labels.txt" and "quantization" in handoff["output"]
    summary = json.loads((run_copy / "export.json").read_text())
    float_row = next(r for r in summary["rows"] if r["name"].startswith("float32"))
    assert float_row["max_diff"] <= 1e-4 and float_row["top1_change"] == 0.0

    # Exporting again refuses to replace the files.
    status = export_tflite.main(["export_tflite", f"--model_dir={run_copy}",
                                 "--modes=float32"])
    assert status == 2
    assert "model_float32.tflite already exists; pass --overwrite" in capsys.readouterr().err


def test_cli_fails_when_int8_accuracy_drops(run_copy, capsys):
    import export_tflite

    # A negative allowance turns any int8 file into a failure: exit status 1, not 2.
    status = export_tflite.main(["export_tflite", f"--model_dir={run_copy}",
                                 "--modes=ptq_int8", "--eval_samples=64", "--latency_runs=2",
                                 "--max_accuracy_drop=-100"])
    assert status == 1
    assert "points below Keras float, more than --max_accuracy_drop" in capsys.readouterr().err


def _error_of(capsys, *flags) -> str:
    import export_tflite

    assert export_tflite.main(["export_tflite", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_bad_inputs(trained, run_copy, tmp_path, capsys):
    import keras

    assert "does not exist" in _error_of(capsys, f"--model_dir={tmp_path / 'nope'}")

    incomplete = tmp_path / "incomplete"
    shutil.copytree(run_copy, incomplete)
    (incomplete / "labels.txt").unlink()
    assert "is incomplete: labels.txt missing" in _error_of(capsys,
                                                            f"--model_dir={incomplete}")

    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    inputs = keras.Input((32, 32, 3))
    mlp = keras.Model(inputs, keras.layers.Dense(10, name="head")(
        keras.layers.Flatten()(inputs)))
    mlp.save(other / "model.keras")
    assert "is not the resnet8 that config.json describes" in _error_of(
        capsys, f"--model_dir={other}", "--modes=float32")

    unknown = tmp_path / "unknown"
    shutil.copytree(run_copy, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config.update(model="resnet7", depth=7)
    (unknown / "config.json").write_text(json.dumps(config))
    assert "describes no ResNet this package builds" in _error_of(
        capsys, f"--model_dir={unknown}", "--modes=float32")

    empty = tmp_path / "empty_data"
    empty.mkdir()
    err = _error_of(capsys, f"--model_dir={run_copy}", "--modes=ptq_int8",
                    f"--data_dir={empty}")
    assert "no training images for the representative dataset" in err

    err = _error_of(capsys, f"--model_dir={run_copy}", "--modes=ptq_int8",
                    "--representative_samples=0", "--eval_samples=8")
    assert "full-integer quantization needs calibration images" in err

    assert "needs" in _error_of(capsys, f"--model_dir={run_copy}", "--modes=qat_int8")
    assert "--modes=int4 is not valid" in _error_of(capsys, f"--model_dir={run_copy}",
                                                    "--modes=int4")
    assert "applies to int8 files only" in _error_of(capsys, f"--model_dir={run_copy}",
                                                     "--modes=float32", "--io=uint8")
