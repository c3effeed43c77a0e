"""Conversion, op audit and LiteRT (tflite, litert, exporting) and tools/export_tflite.py.

A tiny CIFAR ResNet-8 trained for one epoch on real CIFAR-10 images (``cifar_run_template``
in conftest) is the run folder. Nothing here imports tfmot.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from conftest import copy_run, litert_scores, require_mediapipe, tool, tool_error

from keras_resnet.pipeline.deploy import scoring
from keras_resnet.pipeline.errors import ExportError


@pytest.fixture(scope="module")
def trained(cifar_run_template, cifar_small):
    """(run folder, Keras model, 64 validation images, their labels)."""
    import keras

    from keras_resnet.pipeline import data

    model = keras.saving.load_model(cifar_run_template / "model.keras")
    val = data.eval_data("folder", str(cifar_small), "val", 32, 64)
    images, labels = next(iter(val.dataset))
    return cifar_run_template, model, np.asarray(images), np.asarray(labels)


@pytest.fixture
def run_copy(cifar_run_template, tmp_path):
    return copy_run(cifar_run_template, tmp_path / "run")


def test_float32_export_matches_keras(trained):
    from keras_resnet.pipeline.deploy import tflite

    _, model, images, _ = trained
    content = tflite.convert(scoring.with_softmax(model), "float32")
    report = tflite.audit(content, int8=False)
    assert report.input_type == "FLOAT32" and "CONV_2D" in report.ops
    assert report.ends_in_softmax and report.num_outputs == 10
    probabilities = litert_scores(content, images)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities,
                               scoring.softmax(model.predict(images, verbose=0)), atol=1e-5)


@pytest.mark.parametrize("io", ["float32", "uint8", "int8"])
def test_ptq_int8_is_all_int8_and_close_to_keras(trained, io):
    from keras_resnet.pipeline.deploy import tflite
    from keras_resnet.pipeline.deploy.litert import LiteRTModel

    _, model, images, _ = trained
    content = tflite.convert(scoring.with_softmax(model), "ptq_int8", io=io,
                             representative=images)
    report = tflite.audit(content, int8=True)
    assert report.mac_types and all(t[1:] == ("INT8",) * 3 for t in report.mac_types)
    assert report.input_type == io.upper() and report.ends_in_softmax
    runtime = LiteRTModel(content)
    if io != "float32":
        # Raw pixels calibrate to 0..255: the int8/uint8 input is the pixel, exactly.
        scale, zero = runtime.input["quantization"]
        assert scale == pytest.approx(1.0) and zero == (0 if io == "uint8" else -128)
        # int8 softmax output: TFLite's fixed 1/256 steps
        assert runtime.output["quantization"][0] == pytest.approx(1 / 256)
    want = scoring.softmax(model.predict(images, verbose=0))
    got = runtime.predict(images)
    # Probabilities within a few 1/256 quantization steps; the same top class nearly always.
    assert np.max(np.abs(got - want)) < 0.1
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.85


def test_audit_fails_on_flex_op():
    import tensorflow as tf

    from keras_resnet.pipeline.deploy import tflite

    erf = tf.function(tf.math.erf, input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([erf.get_concrete_function()],
                                                               erf)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                           tf.lite.OpsSet.SELECT_TF_OPS]
    content = converter.convert()
    assert "CUSTOM:FlexErf" in tflite.inspect(content).ops
    with pytest.raises(tflite.ExportError, match="non-builtin op.*FlexErf"):
        tflite.audit(content, int8=False, name="flex.tflite")


def test_convert_refuses_flex_ops():
    import keras
    import tensorflow as tf

    from keras_resnet.pipeline.deploy import tflite

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(tf.math.erf)(inputs))
    with pytest.raises(tflite.ExportError, match="builtin ops only"):
        tflite.convert(model, "float32")


@pytest.mark.parametrize("mode", ["float32", "dynamic"])
def test_audit_fails_on_float_conv_in_int8_file(trained, mode):
    from keras_resnet.pipeline.deploy import tflite

    content = tflite.convert(trained[1], mode)
    tflite.audit(content, int8=False)  # a fine float file ...
    with pytest.raises(tflite.ExportError, match="CONV_2D with FLOAT32/"):
        tflite.audit(content, int8=True, name=f"{mode}.tflite")  # ... but not int8


def test_metadata_refuses_labels_that_do_not_fit(trained):
    from keras_resnet.pipeline.deploy import metadata, tflite

    content = tflite.convert(scoring.with_softmax(trained[1]), "float32")
    for labels, message in ((list("abcdefghi"), "labels has 9 class names but the model has "
                                                "10 outputs"),
                            (["a", "b", "", *"cdefghi"], "non-empty single-line")):
        with pytest.raises(metadata.MetadataError, match=message):
            metadata.attach(content, labels=labels, variant="resnet8", description="test")
    assert metadata.read(content) == {"metadata": None, "associated_files": [],
                                      "labels": None}


def test_convert_rejects_bad_requests(trained):
    from keras_resnet.pipeline.deploy import tflite

    model = trained[1]
    with pytest.raises(tflite.ExportError, match="needs an int8 model"):
        tflite.convert(model, "float16", io="uint8")
    with pytest.raises(tflite.ExportError, match="representative images"):
        tflite.convert(model, "ptq_int8", representative=np.zeros((0, 32, 32, 3)))
    with pytest.raises(tflite.ExportError, match="mode='int4' is not valid"):
        tflite.convert(model, "int4")


def test_cli_exports_verifies_and_hands_off(run_copy, capsys):
    from keras_resnet.pipeline.deploy import metadata, tflite

    status, out, _ = tool(capsys, "export_tflite", f"--model_dir={run_copy}",
                          "--eval_samples=200", "--latency_runs=5",
                          "--representative_samples=100", "--io=uint8")
    assert status == 0, out
    assert "qat_int8 left out: run qat first" in out
    for mode in ("float32", "float16", "dynamic", "ptq_int8"):
        assert (run_copy / f"model_{mode}.tflite").is_file()
        assert f"| {mode} (model_{mode}.tflite) |" in out
    handoff = json.loads((run_copy / "model_ptq_int8.json").read_text())
    assert handoff["input"]["dtype"] == "uint8" and handoff["input"]["shape"] == [1, 32, 32, 3]
    assert handoff["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert handoff["labels"] == "labels.txt" and "quantization" in handoff["output"]
    summary = json.loads((run_copy / "export.json").read_text())
    float_row = next(r for r in summary["rows"] if r["name"].startswith("float32"))
    assert float_row["max_diff"] <= 1e-5 and float_row["top1_change"] == 0.0
    # The files are scored batch by batch on the first 200 validation images.
    assert summary["eval_images"] == 200
    assert summary["keras_top1"] == pytest.approx(_keras_top1(run_copy, 200), abs=0.5)
    assert handoff["validation_images"] == 200 and "softmax" in handoff["output"]["meaning"]
    labels = (run_copy / "labels.txt").read_text().split()
    for mode in ("float32", "float16", "dynamic", "ptq_int8"):
        content = (run_copy / f"model_{mode}.tflite").read_bytes()
        assert tflite.inspect(content).ends_in_softmax, mode
        found = metadata.read(content)
        assert found["labels"] == labels and found["associated_files"] == ["labels.txt"]
        general = found["metadata"]
        assert general["author"] == "keras_resnet" and general["license"] == "Apache-2.0"
        assert general["name"] and general["version"] and "resnet8" in general["description"]
        image = general["subgraph_metadata"][0]["input_tensor_metadata"][0]
        assert image["process_units"][0]["options"] == {"mean": [0.0], "std": [1.0]}
        assert image["content"]["content_properties"]["color_space"] == "RGB"
        assert (image["stats"]["min"], image["stats"]["max"]) == ([0.0], [255.0])
        scores = general["subgraph_metadata"][0]["output_tensor_metadata"][0]
        assert scores["associated_files"][0]["type"] == "TENSOR_AXIS_LABELS"

    # Exporting again refuses to replace the files.
    err = tool_error(capsys, "export_tflite", f"--model_dir={run_copy}", "--modes=float32")
    assert "model_float32.tflite already exists; pass --overwrite" in err


def _keras_top1(run, images: int) -> float:
    """Top-1 (%) of the run's Keras model on its first validation images, in one batch."""
    import keras

    from keras_resnet.pipeline import data

    config = json.loads((run / "config.json").read_text())
    val = data.eval_data("folder", config["data_dir"], "val", 32, 64,
                         val_fraction=config["val_fraction"], seed=config["seed"])
    x, y = data.take(val.dataset, images)
    model = keras.saving.load_model(run / "model.keras")
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y) * 100)


def test_cli_fails_when_int8_accuracy_drops(run_copy, capsys, monkeypatch):
    # An int8 file scoring 50 points below Keras float fails: exit status 1, not 2.
    from keras_resnet.pipeline import exporting

    verify = exporting.verify

    def fifty_points_lower(*args, **kwargs):
        row = verify(*args, **kwargs)
        return dataclasses.replace(row, top1=row.top1 - 50, top1_change=row.top1_change - 50)

    monkeypatch.setattr(exporting, "verify", fifty_points_lower)
    status, _, err = tool(capsys, "export_tflite", f"--model_dir={run_copy}",
                          "--modes=ptq_int8", "--eval_samples=64", "--latency_runs=2",
                          "--max_accuracy_drop=1")
    assert status == 1
    assert "points below Keras float, more than --max_accuracy_drop=1.0" in err
    assert tool_error(capsys, "export_tflite", f"--model_dir={run_copy}",
                      "--max_accuracy_drop=-100") == (
        "error: --max_accuracy_drop=-100.0 must be at least 0")


def _error_of(capsys, *flags) -> str:
    return tool_error(capsys, "export_tflite", *flags)


def test_cli_bad_inputs(run_copy, tmp_path, capsys):
    import keras

    assert "does not exist" in _error_of(capsys, f"--model_dir={tmp_path / 'nope'}")

    incomplete = tmp_path / "incomplete"
    shutil.copytree(run_copy, incomplete)
    (incomplete / "labels.txt").unlink()
    assert "is incomplete: labels.txt missing" in _error_of(capsys,
                                                            f"--model_dir={incomplete}")
    assert not list(incomplete.glob("*.tflite"))

    nine = tmp_path / "nine_labels"
    shutil.copytree(run_copy, nine)
    (nine / "labels.txt").write_text("\n".join("abcdefghi") + "\n")
    assert "labels.txt has 9 names but config.json says num_classes=10" in _error_of(
        capsys, f"--model_dir={nine}", "--modes=float32")
    assert not list(nine.glob("*.tflite"))

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

    assert "parity_samples=0 must be at least 1" in _error_of(
        capsys, f"--model_dir={run_copy}", "--modes=float32", "--parity_samples=0")
    err = _error_of(capsys, f"--model_dir={run_copy}", "--modes=ptq_int8",
                    "--representative_samples=0", "--eval_samples=8")
    assert "full-integer quantization needs calibration images" in err

    assert "needs" in _error_of(capsys, f"--model_dir={run_copy}", "--modes=qat_int8")
    assert "--modes=int4 is not valid" in _error_of(capsys, f"--model_dir={run_copy}",
                                                    "--modes=int4")
    assert "applies to int8 files only" in _error_of(capsys, f"--model_dir={run_copy}",
                                                     "--modes=float32", "--io=uint8")


def test_files_that_are_not_models_are_named(run_copy, tmp_path, capsys):
    from keras_resnet.pipeline.deploy.litert import LiteRTModel

    fake = tmp_path / "model.tflite"
    fake.write_text("not a flatbuffer")
    with pytest.raises(ExportError, match=re.escape(
            f"{fake} is not a TFLite flatbuffer (it holds text); pass a .tflite file")):
        LiteRTModel(path=fake)
    (run_copy / "model.keras").write_bytes(b"")
    err = _error_of(capsys, f"--model_dir={run_copy}", "--modes=float32")
    assert err == (f"error: {run_copy / 'model.keras'} is not a Keras archive (it is empty); "
                   "pass a .keras file saved with model.save()")


def _rich_metadata() -> bytes:
    """A metadata flatbuffer using every kind of schema member: enums, unions, tables,
    vectors of floats, strings and tables, and float32 values with no exact binary form."""
    import flatbuffers
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    boxes = fb.BoundingBoxPropertiesT()
    boxes.index, boxes.type = [1, 0, 3, 2], fb.BoundingBoxType.BOUNDARIES
    boxes.coordinateType = fb.CoordinateType.PIXEL
    content = fb.ContentT()
    content.contentPropertiesType, content.contentProperties = (
        fb.ContentProperties.BoundingBoxProperties, boxes)
    content.range = fb.ValueRangeT()
    content.range.min = content.range.max = 2
    calibration = fb.ScoreCalibrationOptionsT()
    calibration.scoreTransformation, calibration.defaultScore = (
        fb.ScoreTransformationType.LOG, 0.1)
    normalization = fb.NormalizationOptionsT()
    normalization.mean, normalization.std = [127.5, 0.3], [1e-3, 2.0]
    units = []
    for kind, options in ((fb.ProcessUnitOptions.ScoreCalibrationOptions, calibration),
                          (fb.ProcessUnitOptions.NormalizationOptions, normalization)):
        unit = fb.ProcessUnitT()
        unit.optionsType, unit.options = kind, options
        units.append(unit)
    calibration_file = fb.AssociatedFileT()
    calibration_file.name, calibration_file.locale = "scores.txt", "en"
    calibration_file.type = fb.AssociatedFileType.TENSOR_AXIS_SCORE_CALIBRATION
    tensor = fb.TensorMetadataT()
    tensor.name, tensor.content, tensor.processUnits = "boxes", content, units
    tensor.associatedFiles, tensor.dimensionNames = [calibration_file], ["a", "b"]
    tensor.stats = fb.StatsT()
    tensor.stats.max, tensor.stats.min = [1.5], [-0.25]
    group = fb.TensorGroupT()
    group.name, group.tensorNames = "group", ["boxes"]
    graph = fb.SubGraphMetadataT()
    graph.inputTensorMetadata = graph.outputTensorMetadata = [tensor]
    graph.outputTensorGroups = [group]
    model = fb.ModelMetadataT()
    model.name, model.version, model.minParserVersion = "rich", "1", "1.2.0"
    model.subgraphMetadata = [graph]
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), b"M001")
    return bytes(builder.Output())


def test_metadata_reads_as_mediapipe_does_without_its_native_library(trained, monkeypatch):
    """metadata.read is pure Python: the JSON MediaPipe's native converter writes, and it
    still works where libmediapipe.so cannot load (a slim image without libEGL)."""
    from keras_resnet.pipeline.deploy import metadata, tflite

    require_mediapipe()  # MediaPipe's own converter is the reference
    plain = tflite.convert(scoring.with_softmax(trained[1]), "float32")
    content = metadata.attach(plain, labels=list("abcdefghij"), variant="resnet8",
                              description="test")
    # importable once attach() has provided the version helper MediaPipe's wheel lacks
    from mediapipe.tasks.python.core import mediapipe_c_bindings
    from mediapipe.tasks.python.metadata import metadata as mediapipe_metadata

    rich = _rich_metadata()
    assert metadata.as_dict(rich) == json.loads(mediapipe_metadata.convert_to_json(rich))
    assert metadata.as_dict(rich)["subgraph_metadata"][0]["input_tensor_metadata"][0][
        "process_units"][1]["options"] == {"mean": [127.5, 0.3], "std": [0.001, 2.0]}
    native = json.loads(mediapipe_metadata.MetadataDisplayer.with_model_buffer(
        bytearray(content)).get_metadata_json())

    def refuse(*args, **kwargs):
        raise OSError("libEGL.so.1: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(mediapipe_c_bindings, "load_raw_library", refuse)
    found = metadata.read(content)
    assert found["metadata"] == native and found["labels"] == list("abcdefghij")
    assert metadata.attach(plain, labels=list("klmnopqrst"), variant="resnet8",
                           description="again")  # writing needs no native code either


def test_cli_reports_gpu_delegate_and_onnx_row(run_copy, capsys):
    pytest.importorskip("onnxruntime", reason="ONNX export needs onnx, onnxruntime and "
                        "tf2onnx (pip install -c constraints.txt -e .[train])")
    from keras_resnet.pipeline.deploy import onnx_export

    status, out, err = tool(capsys, "export_tflite", f"--model_dir={run_copy}",
                            "--modes=float16,ptq_int8,onnx", "--eval_samples=100",
                            "--latency_runs=3", "--representative_samples=50")
    assert status == 0, out + err
    assert re.search(r"\| float16 \(model_float16.tflite\) \|.*\| all ops \|$", out, re.M)
    assert re.search(r"\| ptq_int8 .*\| all ops, runs dequantized \|$", out, re.M)
    assert re.search(r"\| onnx \(model.onnx\) \|.*\| n/a \(ONNX Runtime\) \|$", out, re.M)
    report = json.loads((run_copy / "export.json").read_text())
    rows = {r["name"].split()[0]: r for r in report["rows"]}
    assert rows["float16"]["gpu_delegate"] == "all ops" and rows["float16"]["gpu_fallback"] == []
    assert rows["ptq_int8"]["gpu_delegate"] == "all ops, runs dequantized"
    onnx_row = rows["onnx"]
    assert onnx_row["runtime"] == "ONNX Runtime" and onnx_row["gpu_delegate"] == ""
    assert abs(onnx_row["top1_change"]) <= 0.1 and onnx_row["max_diff"] < 1e-4
    assert onnx_row["latency_1"] > 0 and onnx_row["latency_2"] > 0
    content = (run_copy / "model.onnx").read_bytes()
    assert onnx_row["size"] == len(content)
    props = onnx_export.read_metadata(content)
    assert json.loads(props["labels"]) == (run_copy / "labels.txt").read_text().split()
    assert "raw" in props["input"] and "0..255" in props["input"]
    assert props["architecture"] == "resnet8"
    runner = onnx_export.OnnxModel(path=run_copy / "model.onnx", num_threads=1)
    assert runner.input.name == "image" and runner.input.shape[1:] == [32, 32, 3]
    assert runner.session.get_outputs()[0].name == "probabilities"
