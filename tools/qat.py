"""Quantization-aware training of a run of tools/train.py: ``python tools/qat.py --model_dir=RUN``.

Builds the tf_keras twin of RUN/model.keras from the same architecture definition, copies
the weights by layer name and checks that the float outputs match, wraps it for 8-bit QAT
(tfmot), calibrates the quantization ranges on training images, fine-tunes with the run's
input pipeline at a low learning rate, and writes:

    RUN/model_qat.h5        the QAT model (tf_keras)
    RUN/model_int8.tflite   the int8 TFLite model (builtin ops only, audited, ends in a
                            softmax, carries metadata: labels, normalisation, description)
    RUN/model_int8.json     hand-off for apps that do not read metadata
    RUN/qat.json            twin difference, top-1 of the float, QAT and int8 models

Examples:
    python tools/qat.py --model_dir=runs/r20 --steps_per_epoch=100
    python tools/qat.py --model_dir=runs/pets --dataset=folder --data_dir=/data/pets \\
        --io=uint8 --overwrite

Bad input ends with one line ``error: ...`` and exit status 2.
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
flags.DEFINE_string("dataset", None, "dataset (default: the run's).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "data directory (default: the run's).", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 1, "fine-tuning epochs.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", None, "batch size (default: the run's).", flag_values=FLAGS)
flags.DEFINE_float("learning_rate", None, "initial learning rate, cosine-decayed to 0 "
                   "(default: 0.1% of the run's peak).", flag_values=FLAGS)
flags.DEFINE_integer("steps_per_epoch", None, "steps per epoch (default: one pass over the "
                     "training data).", flag_values=FLAGS)
flags.DEFINE_integer("calibration_steps", 32, "training batches that set the quantization "
                     "ranges before fine-tuning.", flag_values=FLAGS)
flags.DEFINE_bool("freeze_bn", True, "keep the float run's BN statistics and affine "
                  "parameters during fine-tuning.", flag_values=FLAGS)
flags.DEFINE_string("io", "float32", "input/output type of model_int8.tflite: float32, int8 "
                    "or uint8 (uint8: camera frames go in as they are).", flag_values=FLAGS)
flags.DEFINE_integer("agreement_samples", None, "validation images on which the float, QAT "
                     "and int8 models are scored and compared (default: the whole "
                     "validation split).", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace existing model_qat.h5 / model_int8.tflite.",
                  flag_values=FLAGS)
flags.DEFINE_string("verbose", "auto", "Keras progress bar: auto (on a terminal), true or "
                    "false.", flag_values=FLAGS)


def main(argv: list[str]) -> int:
    """Parses flags and runs QAT; returns the exit status (2 for bad input)."""
    status, _ = _cli.parse(FLAGS, argv, doc=__doc__, required={"model_dir": _cli.RUN_FOLDER})
    if status is not None:
        return status
    from keras_resnet import pipeline

    status, _ = _cli.call(FLAGS, pipeline.qat, "model_dir")
    return status or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
