"""evaluation and tools/evaluate.py: agrees with Keras model.evaluate; .keras, .tflite on
LiteRT and MediaPipe; flip TTA; an evaluation folder on its own; bad input.

Uses the ResNet-8 run of ``cifar_run_template`` (conftest), trained on real CIFAR-10 images.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import (
    TEST_ENV,
    copy_run,
    python_subprocess,
    require_mediapipe,
    tool,
    tool_error,
    tool_subprocess,
)

from keras_resnet.pipeline.deploy import scoring


@pytest.fixture(scope="module")
def run(tmp_path_factory, cifar_run_template):
    return copy_run(cifar_run_template, tmp_path_factory.mktemp("runs") / "run")


def _evaluate(capsys, *flags) -> tuple[int, str, str]:
    return tool(capsys, "evaluate", *flags)


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


@pytest.fixture(scope="module")
def exported(run):
    """The run's float32 and uint8-I/O PTQ int8 files, with metadata, as export writes them."""
    from keras_resnet import pipeline

    pipeline.export(run, modes=["float32"], eval_samples=64, latency_runs=1)
    uint8 = run.parent / "uint8_run"
    shutil.copytree(run, uint8)
    pipeline.export(uint8, modes=["ptq_int8"], io="uint8", representative_samples=100,
                    eval_samples=64, latency_runs=1)
    return {"float32": run / "model_float32.tflite",
            "uint8": uint8 / "model_ptq_int8.tflite"}


def test_tflite_file_uses_the_same_preprocessing(run, exported, capsys, tmp_path):
    results = {}
    for name in ("model.keras", "model_float32.tflite"):
        out_json = tmp_path / f"{name}.json"
        status, _, err = _evaluate(capsys, f"--model={run / name}", "--split=val",
                                   f"--output_json={out_json}")
        assert status == 0, err
        results[name] = json.loads(out_json.read_text())
    keras_result, tflite_result = results["model.keras"], results["model_float32.tflite"]
    assert tflite_result["format"] == "tflite" and keras_result["format"] == "keras"
    assert tflite_result["runtime"] == "litert"
    # A float32 file computes the same logits up to float rounding: same predictions.
    assert tflite_result["top1"] == pytest.approx(keras_result["top1"], abs=0.004)
    assert np.abs(np.asarray(tflite_result["confusion_matrix"])
                  - np.asarray(keras_result["confusion_matrix"])).sum() <= 4


def test_compare_scores_two_models_on_the_same_images(run, exported, capsys, tmp_path):
    from keras_resnet import pipeline

    out_json = tmp_path / "compare.json"
    status, out, err = _evaluate(capsys, f"--model={run / 'model.keras'}",
                                 f"--compare={exported['uint8']}", "--split=val",
                                 f"--output_json={out_json}")
    assert status == 0, err
    result = json.loads(out_json.read_text())
    alone = [pipeline.evaluate(path, split="val", dataset="folder",
                               data_dir=json.loads((run / "config.json").read_text())[
                                   "data_dir"], confusion_png=tmp_path / "c.png")["top1"]
             for path in (run / "model.keras", exported["uint8"])]
    assert result["images"] == 500
    assert (result["top1"], result["other_top1"]) == pytest.approx(alone, abs=1e-9)
    assert f"model.keras: top-1 {alone[0]:.4f}" in out
    assert f"model_ptq_int8.tflite: top-1 {alone[1]:.4f}" in out
    # Images right in one model only account for the difference of the two top-1 figures.
    assert (result["only_model_right"] - result["only_other_right"]) == round(
        (alone[0] - alone[1]) * 500)
    assert 0.8 <= result["agreement"] <= 1.0
    names = (run / "labels.txt").read_text().split()
    assert list(result["per_class"]) == names
    for name in names:
        c = result["per_class"][name]
        assert c["count"] == 50 and c["change"] == pytest.approx(c["other_top1"] - c["top1"])
        assert re.search(rf"^\| {name} \| 50 \| {c['top1']:.4f} \| {c['other_top1']:.4f} \|",
                         out, re.M)
    changes = [result["per_class"][n]["change"] for n in result["losing"]]
    assert changes == sorted(changes) and all(c < 0 for c in changes)
    if result["losing"]:
        assert f"Classes losing most: {result['losing'][0]}" in out


def test_compare_bad_input(run, capsys, tmp_path):
    model = f"--model={run / 'model.keras'}"
    err = tool_error(capsys, "evaluate", model, f"--compare={tmp_path / 'none.tflite'}")
    assert "none.tflite does not exist" in err
    assert "leave out --tta" in tool_error(capsys, "evaluate", model,
                                           f"--compare={run / 'model.keras'}", "--tta=flip")


@pytest.mark.parametrize("kind", ["float32", "uint8"])
def test_mediapipe_and_litert_agree_on_real_images(exported, kind, capsys, tmp_path):
    """MediaPipe Tasks' ImageClassifier, with no options, runs the exported files.

    It names the classes from the embedded labels, and on the same 500 real CIFAR-10
    images its top-1 equals the LiteRT interpreter's (both run the same kernels on the
    same pixels: expected equal; the bound allows one image).
    """
    require_mediapipe()
    from keras_resnet.pipeline.deploy.mediapipe_tasks import MediaPipeClassifier

    path = exported[kind]
    classifier = MediaPipeClassifier(path)
    result = classifier.classify(np.zeros((32, 32, 3), np.uint8))
    names = {c.category_name for c in result.classifications[0].categories}
    assert names == set((path.parent / "labels.txt").read_text().split())
    assert sum(c.score for c in result.classifications[0].categories) == pytest.approx(
        1.0, abs=0.02)  # softmax scores: meaningful to threshold
    classifier.close()
    top1 = {}
    for runtime in ("litert", "mediapipe"):
        out_json = tmp_path / f"{runtime}.json"
        status, out, err = _evaluate(capsys, f"--model={path}", "--split=val",
                                     f"--runtime={runtime}", f"--output_json={out_json}")
        assert status == 0, err
        top1[runtime] = json.loads(out_json.read_text())["top1"]
    assert f"tflite model on mediapipe, folder val (500 images): top-1 {top1['mediapipe']:.4f}" \
        in out
    assert abs(top1["mediapipe"] - top1["litert"]) <= 1 / 500, top1


def test_flip_tta_averages_each_image_with_its_mirror(run, capsys, tmp_path):
    from keras_resnet import pipeline
    from keras_resnet.pipeline import data

    plain = pipeline.evaluate(run / "model.keras", split="val", confusion_png=tmp_path / "a.png")
    flip = pipeline.evaluate(run / "model.keras", split="val", tta="flip",
                             confusion_png=tmp_path / "b.png")
    assert flip["tta"] == "flip" and flip["images"] == plain["images"] == 500
    # the same figure by hand: mean of the softmax of each image and its mirror
    predictor = scoring.load_predictor(run / "model.keras")
    split = data.eval_data("folder", json.loads((run / "config.json").read_text())["data_dir"],
                           "val", 32, 100)
    hits = 0
    for images, labels in split.dataset:
        images = np.asarray(images)
        p = (scoring.probabilities(predictor(images))
             + scoring.probabilities(predictor(images[:, :, ::-1]))) / 2
        hits += int((p.argmax(-1) == np.asarray(labels)).sum())
    assert flip["top1"] == pytest.approx(hits / 500)
    status, out, _ = _evaluate(capsys, f"--model={run / 'model.keras'}", "--split=val",
                               "--tta=flip", f"--confusion_png={tmp_path / 'c.png'}")
    assert status == 0 and "with flip TTA" in out


def test_an_evaluation_folder_on_its_own(run, cifar_small, capsys, tmp_path):
    """data_dir holding only test/<class>/ images: classes come from the run's labels."""
    alone = tmp_path / "eval_set"
    shutil.copytree(cifar_small / "val", alone / "test")
    shutil.rmtree(alone / "test" / "truck")  # an evaluation set may lack a class
    status, out, err = _evaluate(capsys, f"--model={run / 'model.keras'}", "--dataset=folder",
                                 f"--data_dir={alone}", "--split=test",
                                 f"--output_json={tmp_path / 'r.json'}")
    assert status == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["images"] == 450 and result["class_names"][-1] == "truck"
    assert result["per_class"]["truck"]["count"] == 0
    # the messages where a split really is missing say so truly
    err = tool_error(capsys, "evaluate", f"--model={run / 'model.keras'}", "--dataset=folder",
                     f"--data_dir={alone}", "--split=val")
    assert f"data_dir {alone} has test/ but no train/ folder, so there is no val split" in err
    flat = tmp_path / "flat"
    shutil.copytree(cifar_small / "val", flat)
    err = tool_error(capsys, "evaluate", f"--model={run / 'model.keras'}", "--dataset=folder",
                     f"--data_dir={flat}", "--split=test")
    assert f"data_dir {flat} has no test/ folder, so there is no test split" in err


@pytest.mark.parametrize("flags, message", [
    ([], "--model is required"),
    (["--model=/nonexistent/model.keras"], "/nonexistent/model.keras"),
    (["--model=MODEL", "--split=nonsense"], "nonsense"),
    (["--model=MODEL", "--dataset=folder", "--data_dir=/nonexistent"], "/nonexistent"),
    (["--model=MODEL", "--no_such_flag=1"], "no_such_flag"),
    (["--model=MODEL", "--runtime=mediapipe"], "--runtime=mediapipe runs .tflite files"),
    (["--model=MODEL", "--runtime=onnx"], "--runtime='onnx' is not valid"),
    (["--model=MODEL", "--tta=crop"], "--tta='crop' is not valid; choose one of none, flip"),
])
def test_bad_input_is_one_error_line(run, capsys, flags, message):
    flags = [f.replace("MODEL", str(run / "model.keras")) for f in flags]
    status, _, err = _evaluate(capsys, *flags)
    assert status == 2
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err


@pytest.mark.parametrize("name, kind", [("model.keras", "a Keras archive"),
                                        ("model.tflite", "a TFLite flatbuffer")])
def test_a_file_that_is_not_a_model_is_named_not_missing(tmp_path, capsys, name, kind):
    fake = tmp_path / name
    fake.write_text("<html>404 Not Found</html>\n")
    err = tool_error(capsys, "evaluate", f"--model={fake}", "--dataset=digits")
    assert err.startswith(f"error: {fake} is not {kind} (it holds text); pass a ")


# What TensorFlow's import printed on tools' stderr when the user exported
# TF_CPP_MIN_LOG_LEVEL=3, and what TFLite prints when it makes its first interpreter.
NATIVE_NOISE = ("WARNING: All log messages before absl::InitializeLog()",
                "oneDNN custom operations are on", "Could not find cuda drivers",
                "Created TensorFlow Lite XNNPACK delegate for CPU")


@pytest.mark.parametrize("runtime, level", [("litert", "3"), ("mediapipe", None)])
def test_tflite_evaluation_prints_no_native_notices(exported, runtime, level):
    """A fresh process: TFLite prints its delegate notice once per process."""
    if runtime == "mediapipe":
        require_mediapipe()
    env = {k: v for k, v in TEST_ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    result = tool_subprocess("evaluate", f"--model={exported['float32']}", "--split=val",
                             f"--runtime={runtime}", "--batch_size=250", env=env,
                             timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"tflite model on {runtime}, folder val (500 images)" in result.stdout
    output = result.stdout + result.stderr
    assert not [line for line in NATIVE_NOISE if line in output], output


EGL_MISSING = "libEGL.so.1: cannot open shared object file: No such file or directory"
EGL_LINE = ("MediaPipe Tasks cannot load its native library (libEGL.so.1 missing); "
            "apt-get install -y libegl1 libgles2")


def test_mediapipe_load_failures_are_one_line_with_the_fix():
    from keras_resnet.pipeline.deploy.mediapipe_tasks import describe_load_failure

    assert describe_load_failure(OSError(EGL_MISSING)) == EGL_LINE
    assert describe_load_failure(ImportError(
        "libGLESv2.so.2: cannot open shared object file: No such file or directory")) == (
        "MediaPipe Tasks cannot load its native library (libGLESv2.so.2 missing); "
        "apt-get install -y libegl1 libgles2")
    assert describe_load_failure("libfoo.so.3: cannot open shared object file: x") == (
        "MediaPipe Tasks cannot load its native library (libfoo.so.3 missing); install the "
        "system package that provides libfoo.so.3")
    assert describe_load_failure(OSError("undefined symbol: eglGetDisplay")) == (
        "MediaPipe Tasks cannot load its native library (undefined symbol: eglGetDisplay); "
        "apt-get install -y libegl1 libgles2 provides the system libraries it needs")


def test_mediapipe_without_its_native_library_skips_and_refuses(monkeypatch, tmp_path,
                                                                capsys):
    """As on python:3.11-slim: MediaPipe installed, libmediapipe.so's libEGL.so.1 absent."""
    bindings = pytest.importorskip("mediapipe.tasks.python.core.mediapipe_c_bindings")
    from keras_resnet.pipeline.deploy.mediapipe_tasks import MediaPipeClassifier, unavailable
    from keras_resnet.pipeline.errors import ExportError

    def refuse(*args, **kwargs):
        raise OSError(EGL_MISSING)

    monkeypatch.setattr(bindings, "load_raw_library", refuse)
    assert unavailable() == EGL_LINE
    with pytest.raises(pytest.skip.Exception, match=re.escape(EGL_LINE)):
        require_mediapipe()  # what every MediaPipe test calls first
    header = tmp_path / "model.tflite"
    header.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    with pytest.raises(ExportError, match=re.escape(EGL_LINE)):
        MediaPipeClassifier(header)
    err = tool_error(capsys, "evaluate", f"--model={header}", "--dataset=digits",
                     "--runtime=mediapipe")
    assert err == f"error: {EGL_LINE}"


def test_a_real_missing_library_in_a_fresh_process(exported):
    """ctypes itself fails to open libmediapipe.so, as the dynamic loader would; the
    evaluate tool says so in one line and inspect_tflite still reads the metadata."""
    pytest.importorskip("mediapipe")
    out = python_subprocess(f"""
        import ctypes, sys
        real = ctypes.CDLL.__init__
        def refuse(self, name, *args, **kwargs):
            if str(name).endswith("libmediapipe.so"):
                raise OSError({EGL_MISSING!r})
            real(self, name, *args, **kwargs)
        ctypes.CDLL.__init__ = refuse
        sys.stderr = sys.stdout
        sys.path.insert(0, "tools")
        import evaluate, inspect_tflite
        model = sys.argv[1]
        print("status", evaluate.main(["evaluate.py", f"--model={{model}}", "--split=val",
                                       "--runtime=mediapipe"]))
        print("status", inspect_tflite.main(["inspect_tflite.py", model]))
    """, str(exported["float32"]), timeout=300)
    assert f"error: {EGL_LINE}\nstatus 2\n" in out
    assert "labels (['labels.txt']): airplane, automobile" in out and out.endswith("status 0\n")


def test_predict_batches_streams_the_first_images_of_a_dataset():
    """Export and QAT score their models batch by batch: the first ``limit`` images (None:
    all), each predictor's classes in dataset order, the labels beside them, and the score
    rows of the first ``keep`` images only."""
    from keras_resnet.pipeline.deploy.scoring import predict_batches

    rng = np.random.default_rng(0)
    batches = [(rng.uniform(0, 255, (n, 4, 4, 3)).astype("float32"),
                rng.integers(0, 3, n)) for n in (4, 4, 3)]
    seen = []

    def by_mean(images):
        seen.append(len(images))
        return np.stack([images.mean((1, 2, 3)), 128 * np.ones(len(images)),
                         images[:, 0, 0, 0]], axis=-1)

    def first(images):
        return np.eye(3)[np.zeros(len(images), int)]

    every = np.concatenate([by_mean(x) for x, _ in batches])
    want, labels = np.argmax(every, -1), np.concatenate([y for _, y in batches])
    seen.clear()
    got = predict_batches(batches, None, by_mean, first, keep=6)
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_array_equal(got.classes[0], want)
    np.testing.assert_array_equal(got.classes[1], np.zeros(11, int))
    np.testing.assert_allclose(got.scores[0], every[:6], rtol=1e-6)
    assert got.scores[1].shape == (6, 3)
    assert got.top1(0) == pytest.approx(np.mean(want == labels) * 100)
    assert got.top1(1) == pytest.approx(np.mean(labels == 0) * 100)
    assert seen == [4, 4, 3]
    seen.clear()
    got = predict_batches(batches, 6, by_mean)
    np.testing.assert_array_equal(got.labels, labels[:6])
    np.testing.assert_array_equal(got.classes[0], want[:6])
    assert got.scores[0].shape[0] == 0  # keep=0: no score rows are held
    assert seen == [4, 2]  # the third batch is never read through a model
    got = predict_batches([], None, by_mean)
    assert got.labels.shape == got.classes[0].shape == (0,) and got.top1() == 0.0
