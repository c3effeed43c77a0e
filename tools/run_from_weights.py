"""Writes a run folder holding weights shipped in keras_resnet, for the other tools.

    python tools/run_from_weights.py --model=resnet20 --data_dir=CIFAR_ROOT \\
        --model_dir=runs/r20_shipped

The folder (model.keras, config.json, labels.txt) carries the model card's data settings
(dataset, val_fraction, seed), so ``tools/export_tflite.py --model_dir=runs/r20_shipped``
and ``tools/evaluate.py --split=val`` measure the shipped model on the validation images its
card was measured on: the folder of all CIFAR-10 training images, with the card's
validation split carved from it. The tool prints the validation top-1 of the written model
beside the card's.

Bad input ends with one line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import sys

import _cli

_cli.setup()

from absl import flags  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_string("model_dir", None, "the run folder to write.", flag_values=FLAGS)
flags.DEFINE_string("model", "resnet20", "the variant with shipped weights, e.g. resnet20 "
                    "or resnet56.", flag_values=FLAGS)
flags.DEFINE_string("weights", "cifar10", "the shipped weights name.", flag_values=FLAGS)
flags.DEFINE_string("dataset", None, "dataset (default: the model card's, folder).",
                    flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "folder of the training images (<class>/ or "
                    "train/<class>/).", flag_values=FLAGS)
flags.DEFINE_float("val_fraction", None, "validation share (default: the card's).",
                   flag_values=FLAGS)
flags.DEFINE_integer("seed", None, "validation carve seed (default: the card's).",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 250, "evaluation batch size recorded for the tools.",
                     flag_values=FLAGS)
flags.DEFINE_bool("check", True, "measure the validation top-1 of the written model.",
                  flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace a run already in --model_dir.",
                  flag_values=FLAGS)


def main(argv: list[str]) -> int:
    """Parses flags and writes the run folder; returns the exit status (2 for bad input)."""
    status, _ = _cli.parse(FLAGS, argv, doc=__doc__,
                           required={"model_dir": "the run folder to write"})
    if status is not None:
        return status
    from keras_resnet import pipeline

    status, info = _cli.call(FLAGS, pipeline.run_from_weights, "model_dir")
    if status is not None:
        return status
    line = f"wrote {info['model_dir']}: {info['model']} with the shipped {info['weights']} weights"
    if "top1" in info:
        line += (f"; validation top-1 {info['top1']:.4f} on {info['images']} images "
                 f"(model card: {info['card_top1']})")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
