"""Exports a run to TFLite (and ONNX) and verifies every file:
``tools/export_tflite.py --model_dir=RUN``.

Modes (``--modes``, comma-separated; default ``all``):

    float32    RUN/model_float32.tflite   the float model
    float16    RUN/model_float16.tflite   float16 weights, float32 compute
    dynamic    RUN/model_dynamic.tflite   dynamic-range: int8 weights, float activations
    ptq_int8   RUN/model_ptq_int8.tflite  full-integer post-training quantization,
                                          calibrated on images of the training data
    qat_int8   RUN/model_int8.tflite      the QAT int8 model: the file tools/qat.py wrote,
                                          or converted from RUN/model_qat.h5 when absent
                                          (or with --overwrite)
    onnx       RUN/model.onnx             the float model for ONNX Runtime (class names
                                          and input convention in its metadata_props)

``all`` is every TFLite mode (qat_int8 only when tools/qat.py has run); onnx is written
when named. Every graph ends in a softmax and
carries TFLite metadata (labels, input normalisation, description) that MediaPipe Tasks'
ImageClassifier reads; see ``python tools/inspect_tflite.py FILE``. Every file is converted
with TFLite builtin ops only and audited (no Flex/custom ops; in int8 files every CONV_2D,
DEPTHWISE_CONV_2D and FULLY_CONNECTED runs in int8), then run with the LiteRT interpreter on
the run's validation split (model.onnx with ONNX Runtime). One table compares size, top-1,
scores against the Keras float model, latency with 1 and 2 threads and whether LiteRT's
GPU delegate takes every op of the file (else it names the ops that fall back to the CPU).
A ``<file>.json`` next to each file is the hand-off for apps that do not read metadata.

int8 diagnosis and repair: when the ptq_int8 file loses more than --max_accuracy_drop (or
with --layer_errors), the per-layer quantization error of TFLite's quantization debugger
is printed, largest first. --keep_float=auto re-exports ptq_int8 with the layers adding
most error kept in float, two at a time, until it is within --max_accuracy_drop;
--keep_float=NAME,... keeps the named Keras layers float. The file keeps builtin ops only.

Exit status: 0 when every int8 file is within --max_accuracy_drop points of the Keras
float top-1, 1 when one is not, 2 for bad input (one line ``error: ...``).

Examples:
    python tools/export_tflite.py --model_dir=runs/r20
    python tools/export_tflite.py --model_dir=runs/r20 --modes=ptq_int8 --io=uint8 \\
        --overwrite
    python tools/export_tflite.py --model_dir=runs/r20 --modes=float16,onnx
    python tools/export_tflite.py --model_dir=runs/r20 --modes=ptq_int8 --keep_float=auto \\
        --overwrite
"""

from __future__ import annotations

import sys

import _cli

_cli.setup()

from absl import flags  # noqa: E402

# Own flag registry: several tools can then be imported in one process (tests).
FLAGS = flags.FlagValues()

flags.DEFINE_string("model_dir", None, "run folder of tools/train.py (model.keras, "
                    "config.json, labels.txt).", flag_values=FLAGS)
flags.DEFINE_list("modes", ["all"], "comma-separated: float32, float16, dynamic, ptq_int8, "
                  "qat_int8, onnx, or all (the TFLite modes).", flag_values=FLAGS)
flags.DEFINE_string("io", "float32", "input/output type of the int8 files: float32, int8 or "
                    "uint8 (uint8: camera frames go in as they are).", flag_values=FLAGS)
flags.DEFINE_string("dataset", None, "dataset (default: the run's).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "data directory (default: the run's).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", None, "batch size of the input pipeline (default: the "
                     "run's).", flag_values=FLAGS)
flags.DEFINE_integer("representative_samples", 200, "training images calibrating ptq_int8.",
                     flag_values=FLAGS)
flags.DEFINE_integer("eval_samples", 0, "validation images to evaluate on (0: all).",
                     flag_values=FLAGS)
flags.DEFINE_integer("parity_samples", 100, "validation images on which scores are compared "
                     "with the Keras float model.", flag_values=FLAGS)
flags.DEFINE_integer("latency_runs", 50, "timed single-image runs per thread count.",
                     flag_values=FLAGS)
flags.DEFINE_float("max_accuracy_drop", 1.0, "largest allowed top-1 drop (points) of an int8 "
                   "file below the Keras float model.", flag_values=FLAGS)
flags.DEFINE_string("keep_float", None, "ptq_int8 only: auto (keep the layers adding most "
                    "quantization error in float until the file is within "
                    "--max_accuracy_drop) or comma-separated Keras layer names.",
                    flag_values=FLAGS)
flags.DEFINE_bool("layer_errors", False, "print the per-layer quantization error of ptq_int8 "
                  "even when it is within --max_accuracy_drop.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace existing output files.", flag_values=FLAGS)


def main(argv: list[str]) -> int:
    """Parses flags and exports; returns the exit status (2 for bad input, 1 for a drop)."""
    status, _ = _cli.parse(FLAGS, argv, doc=__doc__, required={"model_dir": _cli.RUN_FOLDER})
    if status is not None:
        return status
    from keras_resnet import pipeline

    status, report = _cli.call(FLAGS, pipeline.export, "model_dir")
    if status is not None:
        return status
    for name in report["failed"]:
        row = next(r for r in report["rows"] if r["name"] == name)
        print(f"fail: {name} top-1 is {-row['top1_change']:.2f} points below Keras float, "
              f"more than --max_accuracy_drop={FLAGS.max_accuracy_drop}", file=sys.stderr)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
