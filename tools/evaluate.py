"""Evaluates a .keras or .tflite classifier: top-1/top-5, per-class accuracy, confusion PNG.

Options left unset come from the training run's config.json next to the model (dataset,
data_dir, image size, val_fraction, seed), so evaluating a run needs only its model.

Examples:
    python tools/evaluate.py --model=runs/digits/model.keras --split=test \\
        --output_json=runs/digits/eval_test.json
    python tools/evaluate.py --model=runs/r20/model.tflite --dataset=folder \\
        --data_dir=/data/cifar --split=val --output_json=/tmp/eval.json

Bad input ends with one line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN kernels: 1.6x faster ResNet training on CPUs where TensorFlow leaves them off by
# default (AMD, AVX2-only); see BUILD.md "Performance".
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import _cli  # noqa: E402
from absl import flags  # noqa: E402

# Own flag registry: both tools can then be imported into one process (tests).
FLAGS = flags.FlagValues()
_integer = functools.partial(flags.DEFINE_integer, flag_values=FLAGS)
_string = functools.partial(flags.DEFINE_string, flag_values=FLAGS)
_float = functools.partial(flags.DEFINE_float, flag_values=FLAGS)

_string("model", None, "the .keras or .tflite model to evaluate.")
_string("dataset", None, "TFDS name, folder, digits or synthetic (default: the "
        "training run's).")
_string("data_dir", None, "TFDS data dir or folder root (default: the run's).")
_string("split", "test", "train, val or test (or a TFDS split such as "
        "test[:1000]); val reproduces the run's validation images.")
_integer("image_size", None, "input side (default: the model's).")
_integer("batch_size", 64, "evaluation batch size.")
_float("val_fraction", None, "as in training (default: the run's).")
_integer("seed", None, "as in training (default: the run's).")
_integer("num_threads", None, "LiteRT interpreter threads (.tflite only).")
_string("output_json", None, "write the results here (default: print only).")
_string("confusion_png", None, "confusion-matrix image (default: next to "
        "--output_json, else next to the model).")


def main(argv: list[str]) -> int:
    """Parses flags and evaluates; returns the exit status (2 for bad input)."""
    status, _ = _cli.parse(FLAGS, argv, doc=__doc__)
    if status is not None:
        return status
    if not FLAGS.model:
        return _cli.error("--model is required (a .keras or .tflite file)")
    from keras_resnet.pipeline import data, evaluate

    try:
        predictor = evaluate.load_predictor(FLAGS.model, num_threads=FLAGS.num_threads)
        run = evaluate.run_config(FLAGS.model) or {}
        dataset = FLAGS.dataset or run.get("dataset")
        if not dataset:
            raise data.UserError("--dataset is required (the model has no training run's "
                                 "config.json next to it)")
        same_data = FLAGS.dataset is None or FLAGS.dataset == run.get("dataset")
        data_dir = FLAGS.data_dir or (run.get("data_dir") if same_data else None)
        image_size = FLAGS.image_size or predictor.image_size or run.get("image_size")
        if not image_size:
            raise data.UserError("--image_size is required (the model's input size is "
                                 "not fixed)")
        split = data.eval_data(
            dataset, data_dir, FLAGS.split, int(image_size), FLAGS.batch_size,
            val_fraction=FLAGS.val_fraction if FLAGS.val_fraction is not None
            else run.get("val_fraction", 0.1),
            seed=FLAGS.seed if FLAGS.seed is not None else run.get("seed", 0),
            num_classes=predictor.num_outputs)
        labels = evaluate.run_labels(FLAGS.model) if same_data else None
        results = evaluate.evaluate(predictor, split, labels=labels)
    except data.UserError as e:
        return _cli.error(str(e))

    if FLAGS.confusion_png:
        png = FLAGS.confusion_png
    else:
        base = FLAGS.output_json or FLAGS.model
        tag = "".join(c if c.isalnum() else "_" for c in FLAGS.split)
        png = os.path.splitext(base)[0] + f"_confusion_{tag}.png"
    evaluate.plot_confusion(results["confusion_matrix"], results["class_names"], png,
                            title=f"{os.path.basename(FLAGS.model)} on {dataset} "
                                  f"{FLAGS.split}: top-1 {results['top1']:.4f}")
    results = {"model": os.path.abspath(FLAGS.model), "format": predictor.format,
               "dataset": dataset, "data_dir": data_dir, "split": FLAGS.split,
               "image_size": int(image_size), "skipped_images": len(split.skipped),
               **results, "confusion_png": os.path.abspath(png)}
    if FLAGS.output_json:
        folder = os.path.dirname(os.path.abspath(FLAGS.output_json))
        os.makedirs(folder, exist_ok=True)
        with open(FLAGS.output_json, "w") as f:
            json.dump(results, f, indent=1)
    top5 = f", top-5 {results['top5']:.4f}" if results["top5"] is not None else ""
    print(f"{results['format']} model on {dataset} {FLAGS.split} ({results['images']} "
          f"images): top-1 {results['top1']:.4f}{top5}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
