"""QAT (quantization, quantize_configs, calibration) and tools/qat.py: twin, QAT, int8 file.

Importing tfmot switches ``tf.keras`` to tf_keras for the whole process, so everything that
needs tfmot runs in a subprocess; the checks of bad input (all rejected before tfmot is
imported) run in-process.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import (
    copy_run,
    python_subprocess,
    require_mediapipe,
    tool,
    tool_error,
    tool_subprocess,
)

# Bound on int8 vs QAT Keras agreement of top-1 predictions on validation images. The two
# differ only by int8 rounding of BN-folded weights and requantization.
MIN_AGREEMENT = 0.90


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cifar_run_template):
    return copy_run(cifar_run_template, tmp_path_factory.mktemp("runs") / "run")


@pytest.fixture(scope="module")
def qat_run(run_dir):
    """The run after ``tools/qat.py --epochs=1`` (12 fine-tuning steps of 64 images).

    The run's config says it was trained with label smoothing 0.1 and Cutout 8, which QAT
    takes over.
    """
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "label_smoothing": 0.1,
                                                     "cutout": 8}))
    result = tool_subprocess("qat", f"--model_dir={run_dir}", "--epochs=1",
                             "--steps_per_epoch=12", "--calibration_steps=8", "--io=float32")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result.stdout


def test_qat_writes_models_and_report(qat_run):
    run, stdout = qat_run
    for name in ("model_qat.h5", "model_int8.tflite", "model_int8.json", "qat.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "qat.json").read_text())
    assert report["twin_max_abs_probability_diff"] < 1e-5
    assert (report["label_smoothing"], report["cutout"]) == (0.1, 8)  # the run's config
    assert "max |probability difference| vs Keras 3" in stdout
    assert "op audit: builtin ops only, every conv/FC in int8" in stdout
    handoff = json.loads((run / "model_int8.json").read_text())
    assert handoff["input"]["shape"] == [1, 32, 32, 3]
    assert handoff["input"]["range"] == [0, 255] and handoff["input"]["color"] == "RGB"
    # By default the models are scored on the whole validation split (val/: 500 images).
    assert handoff["validation_images"] == report["eval_images"] == 500
    assert "top-1 on 500 validation images: float" in stdout
    from keras_resnet.pipeline.deploy import metadata, tflite

    content = (run / "model_int8.tflite").read_bytes()
    assert tflite.inspect(content).ends_in_softmax and "SOFTMAX" in report["int8_ops"]
    found = metadata.read(content)
    assert found["labels"] == (run / "labels.txt").read_text().split()
    assert "quantization-aware-trained int8" in found["metadata"]["description"]


def test_int8_agrees_with_qat_model_and_frozen_layers_stay_frozen(qat_run, cifar_small):
    run, _ = qat_run
    out = python_subprocess("""
        import json, sys
        import keras, numpy as np
        from keras_resnet.pipeline.quantization import calibration
        from keras_resnet.pipeline import data
        from keras_resnet.pipeline.deploy.litert import LiteRTModel
        run, data_dir = sys.argv[1:]
        model = keras.saving.load_model(f"{run}/model.keras")
        val = data.eval_data("folder", data_dir, "val", 32, 100)
        images, labels = data.take(val.dataset, 200)
        qat = calibration.load_qat(f"{run}/model_qat.h5")
        want = qat.predict(images, verbose=0)
        got = LiteRTModel(path=f"{run}/model_int8.tflite").predict(images)

        def kernel(layer):
            return [w.numpy() for w in layer.weights if w.name.endswith("kernel:0")][0]

        frozen = {name: float(np.max(np.abs(
            kernel(qat.get_layer(f"quant_{name}")) - model.get_layer(name).kernel.numpy())))
            for name in ("preprocess", "conv3_block1_0_conv", "conv4_block1_0_conv")}
        print(json.dumps({
            "agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
            "max_diff": float(np.max(np.abs(got - want))), "range": float(np.ptp(want)),
            "frozen": frozen}))
    """, str(run), str(cifar_small))
    result = json.loads(out.strip().splitlines()[-1])
    assert result["agreement"] >= MIN_AGREEMENT, result
    # probabilities: int8 softmax steps of 1/256 plus requantization of the logits
    assert result["max_diff"] < 0.1, result
    # The frozen input normalisation and option-A shortcuts were not fine-tuned.
    assert all(v == 0.0 for v in result["frozen"].values()), result


def test_export_verifies_qat_and_float_files(qat_run, tmp_path, capsys):
    from keras_resnet.pipeline.deploy import tflite
    from keras_resnet.pipeline.deploy.litert import LiteRTModel

    run = copy_run(qat_run[0], tmp_path / "run")
    status, out, _ = tool(capsys, "export_tflite", f"--model_dir={run}",
                          "--modes=float32,qat_int8", "--eval_samples=200",
                          "--latency_runs=3", "--max_accuracy_drop=100")
    assert status == 0, out
    assert "model_int8.tflite: written by qat; audit passed" in out
    for name, int8 in (("model_float32.tflite", False), ("model_int8.tflite", True)):
        content = (run / name).read_bytes()
        tflite.audit(content, int8=int8)
        assert LiteRTModel(content).predict(
            np.zeros((1, 32, 32, 3), "float32")).shape == (1, 10)
    # the export re-measured the QAT file on the whole validation split
    assert json.loads((run / "model_int8.json").read_text())["validation_images"] == 200


def test_mediapipe_runs_the_qat_file_like_litert(qat_run, capsys):
    """MediaPipe Tasks' ImageClassifier (the Android task runtime) on the int8 QAT file.

    It reads labels and normalisation from the metadata; on the same real images its
    top-1 equals the LiteRT interpreter's (expected exactly: both run the same int8
    kernels on the same pixels; the bound allows 1 image in 500).
    """
    require_mediapipe()
    run, _ = qat_run
    top1 = {}
    for runtime in ("litert", "mediapipe"):
        status, out, err = tool(capsys, "evaluate", f"--model={run / 'model_int8.tflite'}",
                                "--split=val", f"--runtime={runtime}",
                                f"--output_json={run / f'{runtime}.json'}")
        assert status == 0, err
        top1[runtime] = json.loads((run / f"{runtime}.json").read_text())["top1"]
    assert "on mediapipe" in out
    assert abs(top1["mediapipe"] - top1["litert"]) <= 1 / 500, top1


_VARIANTS_SCRIPT = """
    import json, sys
    from pathlib import Path
    import keras, numpy as np
    import keras_resnet
    from keras_resnet.pipeline.quantization import calibration, aware, quantize_configs
    from keras_resnet.pipeline import data
    from keras_resnet.pipeline.deploy import tflite
    from keras_resnet.pipeline.deploy.litert import LiteRTModel
    from keras_resnet.pipeline.run.reader import Run

    data_dir = sys.argv[1]
    val = data.eval_data("folder", data_dir, "train", 32, 64)
    images, _ = data.take(val.dataset, 64)
    cases = {
        # pre-activation basic blocks (Wide ResNet), identity and projection shortcuts
        "wrn_16_8": dict(depths=(2, 1, 1), width_factor=1),
        # pre-activation bottlenecks with SE, residual scaling and stochastic depth
        "preact_resnet164": dict(depths=(1, 1, 1), se_ratio=0.25, residual_scale=0.5,
                                 stochastic_depth=0.1),
        # grouped 3x3 convs
        "resnext50_32x4d": dict(depths=(1, 1, 1, 1)),
    }
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    results = {}
    for variant, options in cases.items():
        model = keras_resnet.resnet(variant=variant, classes=10, input_shape=(32, 32, 3),
                                    include_preprocessing=True, classifier_activation=None,
                                    **options)
        for layer in model.layers:  # non-trivial BN statistics make the twin check real
            if isinstance(layer, keras.layers.BatchNormalization):
                g, b, m, v = layer.get_weights()
                layer.set_weights([g * rng.uniform(0.5, 1.5, g.shape), rng.normal(0, .1, b.shape),
                                   rng.normal(0, .1, m.shape), v * rng.uniform(0.5, 2, v.shape)])
        run = Run(path=Path("."), labels=tuple("abcdefghij"), config=dict(
            model=variant, model_options=options, num_classes=10, image_size=32))
        twin, diff = aware.build_twin(run, model, sample=images[:8])
        qat = quantize_configs.quantize_model(twin, variant=variant)
        calibration.calibrate(qat, val.dataset, steps=1)
        content = tflite.convert(qat, "qat_int8", io="uint8")
        report = tflite.audit(content, int8=True)
        want = qat.predict(images, verbose=0)
        got = LiteRTModel(content).predict(images)
        results[variant] = dict(
            twin_diff=diff, ops=dict(report.ops), io=report.input_type,
            # Random nets give near-uniform probabilities, which the int8 softmax's 1/256
            # steps can tie: the QAT model's class agrees when it has the file's top score.
            agreement=float(np.mean(np.take_along_axis(
                got, want.argmax(-1)[:, None], -1)[:, 0] >= got.max(-1))),
            max_diff=float(np.max(np.abs(got - want))), range=float(np.ptp(want)))
    print(json.dumps(results))
"""


@pytest.mark.slow  # a QAT run per block kind; the fast tier quantizes the plain net
def test_preact_se_and_grouped_variants_quantize_to_int8(cifar_small):
    out = python_subprocess(_VARIANTS_SCRIPT, str(cifar_small))
    results = json.loads(out.strip().splitlines()[-1])
    for variant, r in results.items():
        assert r["twin_diff"] < 1e-4, (variant, r)
        assert r["io"] == "UINT8", (variant, r)
        # Every op is a builtin (audit passed) and no float MUL/ADD islands remain.
        assert "DEQUANTIZE" not in r["ops"], (variant, r)
        assert r["max_diff"] < 0.1, (variant, r)  # probabilities
        assert r["agreement"] >= MIN_AGREEMENT - 0.1, (variant, r)  # random weights: ties
    # Standalone (pre-activation) BN runs as an int8 1x1 depthwise conv; SE as int8 MUL.
    assert results["wrn_16_8"]["ops"]["DEPTHWISE_CONV_2D"] >= 3
    assert results["preact_resnet164"]["ops"]["LOGISTIC"] == 3
    assert results["resnext50_32x4d"]["ops"]["CONV_2D"] >= 10


def _qat_error(capsys, *flags) -> str:
    return tool_error(capsys, "qat", *flags)


def test_qat_bad_inputs(run_dir, tmp_path, capsys):
    import keras

    assert "does not exist" in _qat_error(capsys, f"--model_dir={tmp_path / 'none'}")
    assert "--model_dir is required" in _qat_error(capsys)

    incomplete = tmp_path / "incomplete"
    shutil.copytree(run_dir, incomplete)
    (incomplete / "model.keras").unlink()
    assert "model.keras missing" in _qat_error(capsys, f"--model_dir={incomplete}")

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for name in ("model_qat.h5", "model_int8.tflite", "model_int8.json", "qat.json"):
        (run / name).unlink(missing_ok=True)
    (run / "model_qat.h5").write_bytes(b"")
    assert "model_qat.h5 already exists; pass --overwrite" in _qat_error(
        capsys, f"--model_dir={run}")
    (run / "model_qat.h5").unlink()

    inputs = keras.Input((32, 32, 3))
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs))).save(
        run / "model.keras")
    assert "is not the resnet8 that config.json describes" in _qat_error(
        capsys, f"--model_dir={run}")

    config = json.loads((run / "config.json").read_text())
    config.update(model="resnet1202", depth=None)
    (run / "config.json").write_text(json.dumps(config))
    err = _qat_error(capsys, f"--model_dir={run}")
    assert "resnet1202 cannot be quantized" in err and "quadratic in the layer count" in err

    shutil.copy(run_dir / "model.keras", run / "model.keras")
    config.update(model="resnet8", depth=8)
    (run / "config.json").write_text(json.dumps(config))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no class sub-folders" in _qat_error(capsys, f"--model_dir={run}",
                                                f"--data_dir={empty}")


def test_qat_loss_is_the_runs_smoothed_cross_entropy_on_integer_labels():
    out = python_subprocess("""
        import json
        import numpy as np
        from keras_resnet.pipeline.quantization import calibration
        logits = np.random.default_rng(0).normal(0, 3, (6, 10)).astype("float32")
        labels = np.array([0, 3, 9, 2, 2, 7])
        print(json.dumps({str(s): float(calibration.sparse_cross_entropy(s)(labels, logits))
                          for s in (0.0, 0.1)}))
    """)
    got = json.loads(out.strip().splitlines()[-1])
    logits = np.random.default_rng(0).normal(0, 3, (6, 10))
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    onehot = np.eye(10)[[0, 3, 9, 2, 2, 7]]
    for smoothing in (0.0, 0.1):
        target = (1 - smoothing) * onehot + smoothing / 10
        assert got[str(smoothing)] == pytest.approx(-(target * log_p).sum(-1).mean(), rel=1e-5)


def test_load_qat_names_a_file_that_is_not_hdf5(tmp_path):
    from keras_resnet.pipeline.errors import QuantizeError
    from keras_resnet.pipeline.quantization import calibration

    fake = tmp_path / "model_qat.h5"
    fake.write_text("version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    with pytest.raises(QuantizeError) as refused:
        calibration.load_qat(fake)  # refused before tf_keras or tfmot are imported
    assert str(refused.value) == (f"{fake} is not an HDF5 file (it holds text); pass an .h5 "
                                  "model saved by Keras (tools/qat.py writes model_qat.h5)")
