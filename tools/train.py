"""Trains a ResNet: ``python tools/train.py --depth=50``.

Every option not given takes the recipe of the network (CIFAR-style nets: He et al. 2015;
ImageNet-style nets: 90 epochs, cosine, warm-up, label smoothing); see
keras_resnet/pipeline/train.py. Re-running the same command resumes an interrupted run.

Examples:
    python tools/train.py --depth=50 --data_dir=~/tensorflow_datasets    # ImageNet (TFDS)
    python tools/train.py --depth=20 --dataset=cifar10 --model_dir=runs/r20
    python tools/train.py --model=resnet56 --dataset=folder --data_dir=/data/pets
    python tools/train.py --depth=20 --dataset=digits --epochs=5 --batch_size=64 \\
        --model_dir=runs/digits
    python tools/train.py --depth=50 --dataset=synthetic --batch_size=32 \\
        --steps_per_epoch=10 --epochs=2 --model_dir=/tmp/bench

Bad input ends with one line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_integer("depth", None, "ResNet depth: 18/34/50/101/152/200 (ImageNet-style) or "
                     "6n+2 such as 20, 56, 110 (CIFAR-style).")
flags.DEFINE_string("model", None, "variant name instead of --depth, e.g. resnet56, "
                    "resnet50d, wrn_28_10 (see keras_resnet.VARIANTS).")
flags.DEFINE_string("model_options", None, 'JSON dict of ResNetConfig overrides, e.g. '
                    '\'{"se_ratio": 0.0625}\'.')
flags.DEFINE_string("dataset", None, "TFDS name (cifar10, cifar100, imagenette, "
                    "imagenet2012, ...), folder, digits or synthetic; default cifar10 for "
                    "CIFAR-style nets, imagenet2012 otherwise.")
flags.DEFINE_string("data_dir", None, "TFDS data dir (must hold the prepared dataset; "
                    "nothing is downloaded) or the root of a folder dataset.")
flags.DEFINE_string("model_dir", None, "run directory; default runs/<model>_<dataset>.")
flags.DEFINE_integer("epochs", None, "total epochs (recipe: 164 CIFAR-style, 90 otherwise).")
flags.DEFINE_integer("batch_size", None, "global batch size, split over replicas "
                     "(recipe: 128 CIFAR-style, 256 otherwise).")
flags.DEFINE_integer("image_size", None, "square input side (default 32 CIFAR-style, 224 "
                     "otherwise).")
flags.DEFINE_float("learning_rate", None, "peak learning rate (recipe: 0.1 x batch/128 "
                   "CIFAR-style, 0.1 x batch/256 otherwise).")
flags.DEFINE_float("weight_decay", None, "decay of conv/dense kernels, never BN or biases "
                   "(recipe: 1e-4).")
flags.DEFINE_float("label_smoothing", None, "label smoothing (recipe: 0 CIFAR-style, 0.1 "
                   "otherwise).")
flags.DEFINE_integer("seed", 0, "seeds initialisation, validation carving, shuffling and "
                     "augmentation.")
flags.DEFINE_string("optimizer", "sgd", "sgd, adam, adamw or rmsprop.")
flags.DEFINE_float("momentum", 0.9, "momentum of sgd and rmsprop.")
flags.DEFINE_string("lr_schedule", None, "step (/10 at 50% and 75%), cosine or constant "
                    "(recipe: step CIFAR-style, cosine otherwise).")
flags.DEFINE_float("warmup_epochs", None, "warm-up epochs: linear for cosine, lr/10 for "
                   "step/constant (recipe: 0 CIFAR-style, 5 otherwise).")
flags.DEFINE_string("mixed_precision", "auto", "auto (on with a GPU), true or false.")
flags.DEFINE_string("jit_compile", "auto", "XLA: auto (with a GPU and one replica), true or "
                    "false.")
flags.DEFINE_integer("steps_per_epoch", None, "steps per epoch (default: one pass over the "
                     "training data).")
flags.DEFINE_string("initial_weights", None, "imagenet, or a .keras / .weights.h5 file; the "
                    "classification head is always new.")
flags.DEFINE_bool("freeze_bn", False, "keep every BatchNormalization layer frozen.")
flags.DEFINE_integer("freeze_backbone_epochs", 0, "train only the new head for this many "
                     "epochs first (needs --initial_weights).")
flags.DEFINE_string("strategy", "auto", "auto, default, mirrored or multiworker (auto: "
                    "multi-worker when TF_CONFIG names a cluster, mirrored over GPUs, else "
                    "default).")
flags.DEFINE_float("val_fraction", 0.1, "fraction of train carved off as validation when "
                   "the dataset has no validation split; 0 for none.")
flags.DEFINE_bool("augment", True, "random crops and flips on the training data.")
flags.DEFINE_integer("cache_budget_mb", 2048, "decoded training images kept in memory up to "
                     "this size; larger data streams from disk.")
flags.DEFINE_integer("keep_checkpoints", 2, "epoch checkpoints kept (the newest).")
flags.DEFINE_bool("overwrite", False, "replace a run of another model found in --model_dir.")
flags.DEFINE_string("verbose", "auto", "Keras progress bar: auto (on a terminal), true or "
                    "false; one summary line per epoch is always printed.")

_CONFIG_FLAGS = (
    "depth", "model", "dataset", "data_dir", "model_dir", "epochs", "batch_size",
    "image_size", "learning_rate", "weight_decay", "label_smoothing", "seed", "optimizer",
    "momentum", "lr_schedule", "warmup_epochs", "mixed_precision", "jit_compile",
    "steps_per_epoch", "initial_weights", "freeze_bn", "freeze_backbone_epochs", "strategy",
    "val_fraction", "augment", "cache_budget_mb", "keep_checkpoints", "overwrite", "verbose",
)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str]) -> int:
    """Parses flags and trains; returns the exit status (2 for bad input)."""
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        return _error(str(e))
    if len(rest) > 1:
        return _error(f"unexpected arguments {rest[1:]}; options are --name=value flags")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    from keras_resnet.pipeline import train

    values = {name: FLAGS[name].value for name in _CONFIG_FLAGS}
    try:
        options = json.loads(FLAGS.model_options) if FLAGS.model_options else {}
    except json.JSONDecodeError as e:
        return _error(f"--model_options is not valid JSON ({e})")
    if values["model_dir"] is None:
        name = values["model"] or f"resnet{values['depth']}"
        values["model_dir"] = os.path.join("runs", f"{name}_{values['dataset'] or 'default'}")
    try:
        metrics = train.train(train.TrainConfig(model_options=options, **values))
    except train.UserError as e:
        return _error(str(e))
    shown = {k: metrics[k] for k in ("epochs", "train_loss", "train_accuracy", "val_loss",
                                     "val_accuracy", "wall_time_s", "images_per_sec")}
    print("done: " + json.dumps(shown), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
