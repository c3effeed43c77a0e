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

import functools
import json
import logging
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
_bool = functools.partial(flags.DEFINE_bool, flag_values=FLAGS)

_integer("depth", None, "ResNet depth: 18/34/50/101/152/200 (ImageNet-style) or "
         "6n+2 such as 20, 56, 110 (CIFAR-style).")
_string("model", None, "variant name instead of --depth, e.g. resnet56, "
        "resnet50d, wrn_28_10 (see keras_resnet.VARIANTS).")
_string("model_options", None, 'JSON dict of ResNetConfig overrides, e.g. '
        '\'{"se_ratio": 0.0625}\'.')
_string("dataset", None, "TFDS name (cifar10, cifar100, imagenette, "
        "imagenet2012, ...), folder, digits or synthetic; default cifar10 for "
        "CIFAR-style nets, imagenet2012 otherwise.")
_string("data_dir", None, "TFDS data dir (must hold the prepared dataset; "
        "nothing is downloaded) or the root of a folder dataset.")
_string("model_dir", None, "run directory; default runs/<model>_<dataset>.")
_integer("epochs", None, "total epochs (recipe: 164 CIFAR-style, 90 otherwise).")
_integer("batch_size", None, "global batch size, split over replicas "
         "(recipe: 128 CIFAR-style, 256 otherwise).")
_integer("image_size", None, "square input side (default 32 CIFAR-style, 224 "
         "otherwise).")
_float("learning_rate", None, "peak learning rate (recipe: 0.1 x batch/128 "
       "CIFAR-style, 0.1 x batch/256 otherwise).")
_float("weight_decay", None, "decay of conv/dense kernels, never BN or biases "
       "(recipe: 1e-4).")
_float("label_smoothing", None, "label smoothing (recipe: 0 CIFAR-style, 0.1 "
       "otherwise).")
_integer("seed", 0, "seeds initialisation, validation carving, shuffling and "
         "augmentation.")
_string("optimizer", "sgd", "sgd, adam, adamw or rmsprop.")
_float("momentum", 0.9, "momentum of sgd and rmsprop.")
_string("lr_schedule", None, "step (/10 at 50% and 75%), cosine or constant "
        "(recipe: step CIFAR-style, cosine otherwise).")
_float("warmup_epochs", None, "warm-up epochs: linear for cosine, lr/10 for "
       "step/constant (recipe: 0 CIFAR-style, 5 otherwise).")
_string("mixed_precision", "auto", "auto (on with a GPU), true or false.")
_string("jit_compile", "auto", "XLA: auto (with a GPU and one replica), true or "
        "false.")
_integer("steps_per_epoch", None, "steps per epoch (default: one pass over the "
         "training data).")
_string("initial_weights", None, "imagenet, or a .keras / .weights.h5 file; the "
        "classification head is always new.")
_bool("freeze_bn", False, "keep every BatchNormalization layer frozen.")
_integer("freeze_backbone_epochs", 0, "train only the new head for this many "
         "epochs first (needs --initial_weights).")
_string("strategy", "auto", "auto, default, mirrored or multiworker (auto: "
        "multi-worker when TF_CONFIG names a cluster, mirrored over GPUs, else "
        "default).")
_float("val_fraction", 0.1, "fraction of train carved off as validation when "
       "the dataset has no validation split; 0 for none.")
_bool("augment", True, "random crops and flips on the training data.")
_integer("cache_budget_mb", 2048, "decoded training images kept in memory up to "
         "this size; larger data streams from disk.")
_integer("keep_checkpoints", 2, "epoch checkpoints kept (the newest).")
_bool("overwrite", False, "replace a run of another model found in --model_dir.")
_string("verbose", "auto", "Keras progress bar: auto (on a terminal), true or "
        "false; one summary line per epoch is always printed.")

_CONFIG_FLAGS = (
    "depth", "model", "dataset", "data_dir", "model_dir", "epochs", "batch_size",
    "image_size", "learning_rate", "weight_decay", "label_smoothing", "seed", "optimizer",
    "momentum", "lr_schedule", "warmup_epochs", "mixed_precision", "jit_compile",
    "steps_per_epoch", "initial_weights", "freeze_bn", "freeze_backbone_epochs", "strategy",
    "val_fraction", "augment", "cache_budget_mb", "keep_checkpoints", "overwrite", "verbose",
)


def main(argv: list[str]) -> int:
    """Parses flags and trains; returns the exit status (2 for bad input)."""
    status, _ = _cli.parse(FLAGS, argv, doc=__doc__)
    if status is not None:
        return status
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    from keras_resnet.pipeline import train

    values = {name: FLAGS[name].value for name in _CONFIG_FLAGS}
    try:
        options = json.loads(FLAGS.model_options) if FLAGS.model_options else {}
    except json.JSONDecodeError as e:
        return _cli.error(f"--model_options is not valid JSON ({e})")
    if values["model_dir"] is None:
        name = values["model"] or f"resnet{values['depth']}"
        values["model_dir"] = os.path.join("runs", f"{name}_{values['dataset'] or 'default'}")
    try:
        metrics = train.train(train.TrainConfig(model_options=options, **values))
    except train.UserError as e:
        return _cli.error(str(e))
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume after the last completed "
              "epoch", file=sys.stderr, flush=True)
        return 130
    shown = {k: metrics[k] for k in ("epochs", "train_loss", "train_accuracy", "val_loss",
                                     "val_accuracy", "wall_time_s", "images_per_sec")}
    print("done: " + json.dumps(shown), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
