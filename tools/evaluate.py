"""Evaluates a .keras or .tflite classifier: top-1/top-5, per-class accuracy, confusion PNG.

Options left unset come from the training run's config.json next to the model (dataset,
data_dir, image size, val_fraction, seed), so evaluating a run needs only its model. A
.tflite file runs on the LiteRT interpreter, or with ``--runtime=mediapipe`` through
MediaPipe Tasks' ImageClassifier as an Android app runs it (labels and normalisation from
the file's metadata); a .onnx file on ONNX Runtime. ``--tta=flip`` averages each image with
its mirror image.

``--compare=OTHER`` runs a second model on the same images and prints the top-1 of both,
the per-class top-1 side by side by class name (the classes that lose most first) and how
often the two agree, e.g. the float model against its int8 file.

Examples:
    python tools/evaluate.py --model=runs/digits/model.keras --split=test \\
        --output_json=runs/digits/eval_test.json
    python tools/evaluate.py --model=runs/r20/model_int8.tflite --runtime=mediapipe \\
        --split=val
    python tools/evaluate.py --model=runs/r20/model.keras --dataset=folder \\
        --data_dir=/data/cifar --split=test --tta=flip
    python tools/evaluate.py --model=runs/r20/model.keras \\
        --compare=runs/r20/model_ptq_int8.tflite --split=val

Bad input ends with one line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import functools
import sys

import _cli

_cli.setup()

from absl import flags  # noqa: E402

# Own flag registry: several tools can then be imported into one process (tests).
FLAGS = flags.FlagValues()
_integer = functools.partial(flags.DEFINE_integer, flag_values=FLAGS)
_string = functools.partial(flags.DEFINE_string, flag_values=FLAGS)
_float = functools.partial(flags.DEFINE_float, flag_values=FLAGS)

_string("model", None, "the .keras, .tflite or .onnx model to evaluate.")
_string("compare", None, "a second model scored on the same images: both top-1 figures, "
        "per-class top-1 side by side and agreement.")
_string("dataset", None, "TFDS name, folder, digits or synthetic (default: the "
        "training run's).")
_string("data_dir", None, "TFDS data dir or folder root (default: the run's); a folder "
        "may hold test/<class>/ images alone.")
_string("split", "test", "train, val or test (or a TFDS split such as "
        "test[:1000]); val reproduces the run's validation images.")
_integer("image_size", None, "input side (default: the model's).")
_integer("batch_size", 64, "evaluation batch size.")
_float("val_fraction", None, "as in training (default: the run's).")
_integer("seed", None, "as in training (default: the run's).")
_integer("num_threads", None, "LiteRT interpreter threads (.tflite only).")
_string("runtime", "litert", "litert (the interpreter) or mediapipe (MediaPipe Tasks' "
        "ImageClassifier, reading the file's metadata); .tflite only.")
_string("tta", "none", "test-time augmentation: none, or flip (average each image with "
        "its mirror image).")
_string("output_json", None, "write the results here (default: print only).")
_string("confusion_png", None, "confusion-matrix image (default: next to "
        "--output_json, else next to the model).")


def main(argv: list[str]) -> int:
    """Parses flags and evaluates; returns the exit status (2 for bad input)."""
    status, _ = _cli.parse(FLAGS, argv, doc=__doc__,
                           required={"model": "a .keras, .tflite or .onnx file"})
    if status is not None:
        return status
    from keras_resnet import pipeline

    if FLAGS.compare:
        return _compare(pipeline)
    from keras_resnet.pipeline.errors import UserError

    options = {name: FLAGS[name].value for name in FLAGS if name not in ("model", "compare")}
    try:
        results = pipeline.evaluate(FLAGS.model, **options)
    except UserError as e:
        return _cli.user_error(e, FLAGS)
    top5 = f", top-5 {results['top5']:.4f}" if results["top5"] is not None else ""
    runtime = f" on {results['runtime']}" if results["format"] == "tflite" else ""
    tta = " with flip TTA" if results["tta"] == "flip" else ""
    print(f"{results['format']} model{runtime}{tta}, {results['dataset']} {results['split']} "
          f"({results['images']} images): top-1 {results['top1']:.4f}{top5}", flush=True)
    return 0


def _compare(pipeline) -> int:
    """--compare: both models on the same images."""
    from keras_resnet.pipeline.errors import UserError

    if FLAGS.tta != "none" or FLAGS.confusion_png:
        return _cli.error("--compare scores plain predictions; leave out --tta and "
                          "--confusion_png")
    options = {name: FLAGS[name].value for name in (
        "split", "dataset", "data_dir", "image_size", "batch_size", "val_fraction", "seed",
        "num_threads", "runtime", "output_json")}
    try:
        report = pipeline.compare(FLAGS.model, FLAGS.compare, **options)
    except UserError as e:
        return _cli.user_error(e, FLAGS)
    print(report["table"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
