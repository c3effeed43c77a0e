"""Packages a trained run's weights to ship inside keras_resnet (``weights="cifar10"``).

    python tools/ship_weights.py --model_dir=runs/r20_fast30 --name=cifar10 \\
        --command="python tools/train.py ..."

Writes ``keras_resnet/pretrained/<variant>_<name>.h5`` (name-keyed HDF5: float16 unless that
moves validation top-1 by more than 0.05 point, then float32) and its JSON model card
(recipe, command, training time and CPU, validation top-1 of the float model and of the
run's QAT and PTQ int8 files with and without flip TTA), then prints the ``PRETRAINED``
entry to add to keras_resnet/weights.py. Run tools/qat.py and tools/export_tflite.py
--modes=ptq_int8 on the run first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _cli

_cli.setup()

from absl import flags  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_string("model_dir", None, "the finished run folder.", flag_values=FLAGS)
flags.DEFINE_string("name", "cifar10", "the weights name users pass.", flag_values=FLAGS)
flags.DEFINE_string("out_dir", str(Path(__file__).resolve().parents[1] / "keras_resnet" /
                                   "pretrained"), "where the files go.", flag_values=FLAGS)
flags.DEFINE_string("dtype", "auto", "storage type: auto (float16 unless it moves "
                    "validation top-1 by more than 0.05 point), float16 or float32.",
                    flag_values=FLAGS)
flags.DEFINE_string("command", None, "the training command, for the model card.",
                    flag_values=FLAGS)


def main(argv: list[str]) -> int:
    status, _ = _cli.parse(FLAGS, argv, doc=__doc__, required={"model_dir": _cli.RUN_FOLDER})
    if status is not None:
        return status
    from keras_resnet import pipeline
    from keras_resnet.pipeline import shipping

    try:
        card = shipping.ship(FLAGS.model_dir, name=FLAGS.name, out_dir=FLAGS.out_dir,
                             dtype=FLAGS.dtype, command=FLAGS.command)
    except pipeline.UserError as e:
        return _cli.user_error(e, FLAGS)
    v = card["validation"]
    print(f"wrote {card['file']} ({card['bytes']:,} bytes, {card['dtype']}); validation top-1 "
          f"{v['top1_float32']:.4f} float32, {v['top1_stored']:.4f} stored "
          f"({v['predictions_changed_by_storage']} of {v['images']} predictions changed)")
    print(f'    "{card["variant"]}": {{"{card["weights"]}": Pretrained(\n'
          f'        file="{card["file"]}", sha256="{card["sha256"]}",\n'
          f'        classes=CIFAR10_CLASSES, image_size={card["image_size"]}, '
          f'card="{Path(card["file"]).stem}.json")}},')
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
