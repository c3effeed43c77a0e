"""int8 diagnosis and repair: per-layer error (TFLite's quantization debugger) and keep_float.

The damaged run: the tiny ResNet-8 of ``cifar_run_template`` with one channel of a block's
first conv scaled up 300x by its BatchNormalization and the next conv's weights for that
channel scaled down 300x. The float model computes the same function (ReLU is positively
homogeneous), but the int8 tensor between the two convs shares one scale over all its
channels, so the other channels collapse to a few int8 steps: post-training int8 loses
several points, as outlier channels make it lose on real models.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import copy_run, require_mediapipe, tool, tool_error

from keras_resnet.pipeline.deploy import scoring

DAMAGED = ("conv3_block1_1_bn", "conv3_block1_2_conv")
SCALE = 300.0


def damage(model) -> None:
    """Scales channel 0 between two convs up and back down: same float function."""
    bn, conv = (model.get_layer(name) for name in DAMAGED)
    gamma, beta, mean, var = bn.get_weights()
    gamma[0] *= SCALE
    beta[0] *= SCALE
    bn.set_weights([gamma, beta, mean, var])
    kernel, *rest = conv.get_weights()
    kernel[:, :, 0, :] /= SCALE
    conv.set_weights([kernel, *rest])


@pytest.fixture(scope="module")
def damaged_template(cifar_run_template, tmp_path_factory):
    import keras

    from keras_resnet.pipeline import data

    run = copy_run(cifar_run_template, tmp_path_factory.mktemp("damaged") / "run")
    model = keras.saving.load_model(run / "model.keras")
    config = json.loads((run / "config.json").read_text())
    val = data.eval_data("folder", config["data_dir"], "val", 32, 100)
    images = data.take(val.dataset, 100)[0]
    before = model.predict(images, verbose=0)
    damage(model)
    np.testing.assert_allclose(model.predict(images, verbose=0), before, atol=2e-4)
    model.save(run / "model.keras")
    return run


@pytest.fixture
def damaged_run(damaged_template, tmp_path):
    return copy_run(damaged_template, tmp_path / "run")


def test_layer_errors_point_at_the_damaged_layer(damaged_template):
    import keras

    from keras_resnet.pipeline import data
    from keras_resnet.pipeline.quantization import selective as sq

    model = scoring.with_softmax(keras.saving.load_model(damaged_template / "model.keras"))
    config = json.loads((damaged_template / "config.json").read_text())
    train = data.eval_data("folder", config["data_dir"], "train", 32, 64)
    session = sq.Debugger(model, data.take(train.dataset, 100)[0], debug_images=32)
    errors = session.layer_errors()
    assert errors[0].layer == "conv3_block1_1_conv" and errors[0].op == "CONV_2D"
    # The collapsed channels: most of the signal of the other channels is lost, while the
    # error in units of the int8 step looks like plain rounding.
    others = [e.channel_nsr for e in errors if not e.layer.startswith("conv3_block1_")]
    assert errors[0].channel_nsr > 0.3 and errors[0].channel_nsr > 10 * max(others)
    assert errors[0].rmse_scale < 0.5
    assert {e.layer for e in errors} >= {"conv1_conv", "predictions", "conv3_block1_add"}
    table = sq.format_layer_errors(errors, top=3)
    assert "| conv3_block1_1_conv | CONV_2D |" in table and table.count("\n| ") == 4

    content, floats = session.convert_keep_float(["conv3_block1_1_conv"])
    # The damaged tensor stays float: the conv writing it and the conv reading it.
    assert floats == ["conv3_block1_1_conv", "conv3_block1_2_conv"]
    from keras_resnet.pipeline.deploy import tflite

    audit = tflite.audit(content, int8=False)
    float_macs = [m for m in audit.mac_types if m[1:] == ("FLOAT32",) * 3]
    assert len(float_macs) == 2 and len(audit.mac_types) - 2 == sum(
        m[1:] == ("INT8",) * 3 for m in audit.mac_types)
    with pytest.raises(sq.ExportError, match="keep_float=conv9 names no quantized layer"):
        session.convert_keep_float(["conv9"])


def test_keep_float_auto_repairs_a_damaged_int8_export(damaged_run, capsys):
    from keras_resnet.pipeline.deploy import metadata, tflite

    # Without the repair: the drop is reported with the layers adding most error.
    status, out, err = tool(capsys, "export_tflite", f"--model_dir={damaged_run}",
                            "--modes=ptq_int8", "--latency_runs=3",
                            "--representative_samples=100")
    assert status == 1, out + err
    assert "more than --max_accuracy_drop=1.0" in err
    assert "| conv3_block1_1_conv | CONV_2D |" in out and "keep_float=auto" in out
    broken = json.loads((damaged_run / "export.json").read_text())
    assert broken["rows"][0]["top1_change"] < -2.0
    assert broken["layer_errors"][0]["layer"] == "conv3_block1_1_conv"

    status, out, err = tool(capsys, "export_tflite", f"--model_dir={damaged_run}",
                            "--modes=ptq_int8", "--keep_float=auto", "--latency_runs=3",
                            "--representative_samples=100", "--overwrite")
    assert status == 0, out + err
    report = json.loads((damaged_run / "export.json").read_text())
    row = report["rows"][0]
    assert report["failed"] == [] and row["top1_change"] >= -1.0
    kept = report["keep_float"]
    assert kept["named"][:1] == ["conv3_block1_1_conv"] and kept["within_limit"]
    assert "conv3_block1_2_conv" in kept["float_layers"] == row["float_layers"]
    assert kept["steps"][0][0] == 0 and kept["size"] > kept["int8_size"]
    assert "keep_float: 3 layer(s) run in float" in out or "layer(s) run in float" in out
    content = (damaged_run / "model_ptq_int8.tflite").read_bytes()
    audit = tflite.audit(content, int8=False)  # builtin ops only
    assert "QUANTIZE" in audit.ops and "DEQUANTIZE" in audit.ops
    assert metadata.read(content)["labels"] == (damaged_run / "labels.txt").read_text().split()
    sidecar = json.loads((damaged_run / "model_ptq_int8.json").read_text())
    assert sidecar["float_layers"] == row["float_layers"]


def test_repaired_file_runs_in_mediapipe_tasks(damaged_template, tmp_path):
    require_mediapipe()
    from keras_resnet.pipeline import data, exporting
    from keras_resnet.pipeline.deploy.litert import LiteRTModel
    from keras_resnet.pipeline.deploy.mediapipe_tasks import MediaPipeClassifier

    run = copy_run(damaged_template, tmp_path / "run")
    exporting.export(run, modes=["ptq_int8"], keep_float=["conv3_block1_1_conv"],
                     eval_samples=32, latency_runs=2, representative_samples=50)
    config = json.loads((run / "config.json").read_text())
    images = data.take(data.eval_data("folder", config["data_dir"], "val", 32, 16).dataset,
                       16)[0]
    path = run / "model_ptq_int8.tflite"
    classifier = MediaPipeClassifier(path)
    try:
        got = classifier(images)
    finally:
        classifier.close()
    want = LiteRTModel(path=path).predict(images)
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9
    np.testing.assert_allclose(got, want, atol=0.02)


def test_keep_float_bad_requests(damaged_run, capsys):
    args = (f"--model_dir={damaged_run}", "--eval_samples=8", "--latency_runs=1")
    assert "--keep_float applies to the ptq_int8 file; add ptq_int8 to modes" in tool_error(
        capsys, "export_tflite", *args, "--modes=float32", "--keep_float=auto")
    assert "--keep_float needs --io=float32" in tool_error(
        capsys, "export_tflite", *args, "--modes=ptq_int8", "--keep_float=auto", "--io=uint8")
    assert "takes auto or layer names, not both" in tool_error(
        capsys, "export_tflite", *args, "--modes=ptq_int8", "--keep_float=auto,conv1_conv")
    err = tool_error(capsys, "export_tflite", *args, "--modes=ptq_int8",
                     "--keep_float=conv9_conv", "--representative_samples=20")
    assert "--keep_float=conv9_conv names no quantized layer of the model" in err
    assert not (damaged_run / "model_ptq_int8.tflite").exists()
