"""tools/evaluate.py: agrees with Keras model.evaluate; .keras and .tflite; bad input.

Uses the ResNet-8 run that tests/test_export.py trains on real CIFAR-10 images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_export import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, cifar_small):
    return make_run(tmp_path_factory.mktemp("runs"), cifar_small)


def _evaluate(capsys, *flags) -> tuple[int, str, str]:
    import evaluate as evaluate_tool

    status = evaluate_tool.main(["evaluate", *flags])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_keras_file_agrees_with_model_evaluate(run, cifar_small, capsys):
    import keras

    from keras_resnet.pipeline import data

    out_json = run / "eval_val.json"
    status, out, err = _evaluate(capsys, f"--model={run / 'model.keras'}", "--split=val",
                                 f"--output_json={out_json}")
    assert status == 0, err
    result = json.loads(out_json.read_text())
    # The same validation images through Keras' own evaluate loop.
    model = keras.saving.load_model(run / "model.keras")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["sparse_categorical_accuracy",
                           keras.metrics.SparseTopKCategoricalAccuracy(5)])
    split = data.eval_data("folder", str(cifar_small), "val", 32, 64)
    _, top1, top5 = model.evaluate(split.dataset, verbose=0)
    assert result["images"] == split.size == 500
    assert result["top1"] == pytest.approx(top1, abs=1e-6)
    assert result["top5"] == pytest.approx(top5, abs=1e-6)
    assert f"top-1 {result['top1']:.4f}" in out
    # Per-class accuracy and the confusion matrix describe the same predictions.
    confusion = np.asarray(result["confusion_matrix"])
    assert confusion.sum() == 500 and confusion.shape == (10, 10)
    assert np.trace(confusion) / 500 == pytest.approx(result["top1"])
    assert len(result["per_class"]) == 10
    assert result["per_class"]["airplane"]["count"] == 50
    assert result["class_names"][0] == "airplane"
    assert (run / "eval_val_confusion_val.png").stat().st_size > 1000


def test_tflite_file_uses_the_same_preprocessing(run, cifar_small, capsys, tmp_path):
    import keras

    from keras_resnet.pipeline import export

    model = keras.saving.load_model(run / "model.keras")
    tflite = run / "model_float32.tflite"
    tflite.write_bytes(export.convert(model, "float32"))
    results = {}
    for name in ("model.keras", "model_float32.tflite"):
        out_json = tmp_path / f"{name}.json"
        status, _, err = _evaluate(capsys, f"--model={run / name}", "--split=val",
                                   f"--output_json={out_json}")
        assert status == 0, err
        results[name] = json.loads(out_json.read_text())
    keras_result, tflite_result = results["model.keras"], results["model_float32.tflite"]
    assert tflite_result["format"] == "tflite" and keras_result["format"] == "keras"
    # A float32 file computes the same logits up to float rounding: same predictions.
    assert tflite_result["top1"] == pytest.approx(keras_result["top1"], abs=0.004)
    assert np.abs(np.asarray(tflite_result["confusion_matrix"])
                  - np.asarray(keras_result["confusion_matrix"])).sum() <= 4


@pytest.mark.parametrize("flags, message", [
    ([], "--model is required"),
    (["--model=/nonexistent/model.keras"], "/nonexistent/model.keras"),
    (["--model=MODEL", "--split=nonsense"], "nonsense"),
    (["--model=MODEL", "--dataset=folder", "--data_dir=/nonexistent"], "/nonexistent"),
    (["--model=MODEL", "--no_such_flag=1"], "no_such_flag"),
])
def test_bad_input_is_one_error_line(run, capsys, flags, message):
    flags = [f.replace("MODEL", str(run / "model.keras")) for f in flags]
    status, _, err = _evaluate(capsys, *flags)
    assert status == 2
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
