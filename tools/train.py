"""Trains a ResNet: ``python tools/train.py --depth=50``.

Every option not given takes the recipe of the network: he2015 (He et al. 2015) for
CIFAR-style nets, imagenet (90 epochs, cosine, warm-up, label smoothing) otherwise;
``--recipe=fast`` is the short-budget CIFAR recipe (see keras_resnet/pipeline/run/config.py and
BUILD.md). Re-running the same command resumes an interrupted run; only --epochs may change.

Examples:
    python tools/train.py --depth=50 --data_dir=~/tensorflow_datasets    # ImageNet (TFDS)
    python tools/train.py --depth=20 --dataset=cifar10 --recipe=fast --model_dir=runs/r20
    python tools/train.py --model=resnet56 --dataset=folder --data_dir=/data/pets
    python tools/train.py --depth=20 --dataset=digits --epochs=5 --batch_size=64 \\
        --model_dir=runs/digits
    python tools/train.py --depth=50 --dataset=synthetic --batch_size=32 \\
        --steps_per_epoch=10 --epochs=2 --model_dir=/tmp/bench

Bad input ends with one line ``error: ...`` and exit status 2. SIGTERM (or Ctrl+C) stops
after the running step with a checkpoint, one line, and exit status 143 (130); the same
command resumes from that step.
"""

from __future__ import annotations

import json
import logging
import sys

import _cli

_cli.setup()

from absl import flags  # noqa: E402

from keras_resnet.pipeline.run.config import TrainConfig  # noqa: E402

# Own flag registry: several tools can then be imported into one process (tests).
FLAGS = flags.FlagValues()
_cli.define_from_dataclass(FLAGS, TrainConfig, module_name="tools/train.py")


def main(argv: list[str]) -> int:
    """Parses flags and trains; returns the exit status (2 for bad input)."""
    status, _ = _cli.parse(FLAGS, argv, doc=__doc__)
    if status is not None:
        return status
    logging.getLogger("keras_resnet").setLevel(logging.INFO)  # "initialised 52 layers ..."
    from keras_resnet import pipeline
    from keras_resnet.pipeline.errors import Interrupted

    try:
        metrics = pipeline.train(_cli.dataclass_from_flags(FLAGS, TrainConfig))
    except Interrupted as e:
        print(str(e), file=sys.stderr, flush=True)
        return e.status
    except ValueError as e:  # UserError, or a flag that is not valid JSON
        return _cli.user_error(e, FLAGS)
    except KeyboardInterrupt:  # a second Ctrl+C
        print("interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        return 130
    shown = {k: metrics[k] for k in ("epochs", "train_loss", "train_accuracy", "val_loss",
                                     "val_accuracy", "wall_time_s", "images_per_sec")}
    print("done: " + json.dumps(shown), flush=True)
    return 0


if __name__ == "__main__":
    _cli.finish(main(sys.argv))
