"""Training: strategy selection, recipes, compile, fit, checkpoints and resume.

:func:`train` runs one experiment described by a :class:`TrainConfig` and writes a run
directory (``model_dir``):

    config.json       every option, resolved defaults, library versions
    labels.txt        class names in label order, one per line
    checkpoints/      epoch_NNNN.weights.h5 (weights + optimizer state), checkpoint.json
    logs/             TensorBoard event files
    history.csv       one row per completed epoch
    best.keras        the model of the best validation top-1 so far
    model.keras       the final model
    metrics.json      final losses and top-1, epochs, wall time, images/s
    curves.png        loss and accuracy curves

Models are built with ``include_preprocessing=True`` and ``classifier_activation=None``:
they take raw 0..255 RGB pixels and return logits.

Re-running the same command after an interruption resumes after the last completed epoch
(weights, optimizer state, epoch, best score and history are restored) and finishes with
the requested number of epochs. A directory holding a run of another model is refused.

Recipes (used for every option left unset):

* CIFAR-style nets (``--depth`` 6n+2, WRN, pre-activation CIFAR nets): He et al. 2015
  §4.2: 164 epochs, batch 128, SGD momentum 0.9, learning rate 0.1 x batch/128 divided by
  10 at 50% and 75% of training, weight decay 1e-4, 32x32 images.
* ImageNet-style nets: 90 epochs, batch 256, SGD momentum 0.9, learning rate
  0.1 x batch/256 (Goyal et al. 2017) with 5 linear warm-up epochs and cosine decay,
  label smoothing 0.1, weight decay 1e-4, 224x224 images.

Weight decay never applies to BatchNormalization parameters or biases: it is an L2 penalty
on conv/dense kernels (the classic coupled form the recipes were tuned with), or for
``optimizer="adamw"`` the optimizer's decoupled decay with those variables excluded.

Example:
    >>> from keras_resnet.pipeline import train
    >>> metrics = train.train(train.TrainConfig(depth=20, dataset="digits", epochs=3,
    ...                                         model_dir="/tmp/run"))
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import keras_resnet
from keras_resnet import configs
from keras_resnet import weights as weights_lib
from keras_resnet.pipeline import data as data_lib
from keras_resnet.pipeline.data import UserError

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("step", "cosine", "constant")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
AUTO_BOOL = ("auto", "true", "false")
RUN_FILES = ("config.json", "labels.txt", "model.keras", "best.keras", "metrics.json",
             "history.csv", "curves.png")
RUN_DIRS = ("checkpoints", "logs")
CHECKPOINT_STATE = "checkpoint.json"
# config.json keys that fix the architecture: a run directory may only continue a run
# whose values match.
IDENTITY_KEYS = ("model", "model_options", "num_classes", "image_size")
# Step schedule: learning rate divided by 10 at these fractions of training (He et al.).
STEP_BOUNDARIES = (0.5, 0.75)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Defaults of one training recipe."""

    name: str
    epochs: int
    batch_size: int
    reference_batch: int  # learning_rate is base_lr x batch_size / reference_batch
    base_lr: float
    lr_schedule: str
    warmup_epochs: float
    weight_decay: float
    label_smoothing: float
    dataset: str
    reference: str


RECIPES = {
    "cifar": Recipe("cifar", epochs=164, batch_size=128, reference_batch=128, base_lr=0.1,
                    lr_schedule="step", warmup_epochs=0, weight_decay=1e-4,
                    label_smoothing=0.0, dataset="cifar10",
                    reference="He et al. 2015, §4.2"),
    "imagenet": Recipe("imagenet", epochs=90, batch_size=256, reference_batch=256,
                       base_lr=0.1, lr_schedule="cosine", warmup_epochs=5, weight_decay=1e-4,
                       label_smoothing=0.1, dataset="imagenet2012",
                       reference="Goyal et al. 2017; He et al. 2019 (cosine, smoothing)"),
}


@dataclasses.dataclass
class TrainConfig:
    """One experiment. Fields left None take the recipe's value.

    Attributes:
        depth: ResNet depth (18/34/50/101/152/200 ImageNet-style, 6n+2 CIFAR-style).
        model: a variant name from ``keras_resnet.VARIANTS`` (instead of ``depth``).
        model_options: ResNetConfig overrides, e.g. ``{"se_ratio": 0.0625}``.
        dataset: TFDS name, "folder", "digits" or "synthetic".
        data_dir: TFDS data dir or the image-folder root.
        model_dir: the run directory.
        epochs: total epochs of the run (a resumed run finishes at this count).
        batch_size: global batch size, split evenly over replicas.
        image_size: square input side.
        learning_rate: peak learning rate (default: the recipe's, scaled with the batch).
        weight_decay: L2 / decoupled decay of conv and dense kernels.
        label_smoothing: label smoothing of the cross-entropy.
        seed: seeds initialisation, validation carving, shuffling and augmentation.
        optimizer: sgd, adam, adamw or rmsprop.
        momentum: momentum of sgd and rmsprop.
        lr_schedule: step (/10 at 50% and 75%), cosine or constant.
        warmup_epochs: linear warm-up for cosine; for step/constant, epochs at a tenth of
            the learning rate (He et al.'s ResNet-110 warm-up).
        mixed_precision: auto (on with a GPU), true or false.
        jit_compile: auto (XLA with a GPU and one replica), true or false.
        steps_per_epoch: cap the steps of an epoch (default: one pass over the data).
        initial_weights: "imagenet" or a .keras / .weights.h5 file; the head is new.
        freeze_bn: keep every BatchNormalization layer frozen (inference mode).
        freeze_backbone_epochs: train only the head for this many epochs first.
        strategy: auto, default, mirrored or multiworker.
        val_fraction: fraction of train carved off as validation when the dataset has no
            validation split.
        augment: random crops and flips on the training data.
        cache_budget_mb: decoded training images kept in memory up to this size.
        keep_checkpoints: epoch checkpoints kept on disk (the newest ones).
        overwrite: replace a run of another model found in ``model_dir``.
        verbose: Keras progress bar: auto (on a terminal), true or false.
    """

    depth: int | None = None
    model: str | None = None
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str | None = None
    data_dir: str | None = None
    model_dir: str = "runs/default"
    epochs: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    seed: int = 0
    optimizer: str = "sgd"
    momentum: float = 0.9
    lr_schedule: str | None = None
    warmup_epochs: float | None = None
    mixed_precision: str = "auto"
    jit_compile: str = "auto"
    steps_per_epoch: int | None = None
    initial_weights: str | None = None
    freeze_bn: bool = False
    freeze_backbone_epochs: int = 0
    strategy: str = "auto"
    val_fraction: float = 0.1
    augment: bool = True
    cache_budget_mb: int = data_lib.DEFAULT_CACHE_BUDGET // 2**20
    keep_checkpoints: int = 2
    overwrite: bool = False
    verbose: str = "auto"


class TrainingStopped(UserError):
    """Training stopped because the loss stopped being finite."""


# --------------------------------------------------------------------------- resolving


def resolve(config: TrainConfig) -> dict[str, Any]:
    """Validates a config and fills every unset option from the recipe.

    Returns:
        A dict of every option plus ``model`` (variant name), ``model_options`` and
        ``recipe``; ``num_classes`` is added once the data is known.

    Raises:
        UserError: a bad option or combination, in one sentence.
    """
    c = config
    _choose("optimizer", c.optimizer, OPTIMIZERS)
    _choose("strategy", c.strategy, STRATEGIES)
    for name in ("mixed_precision", "jit_compile", "verbose"):
        _choose(name, getattr(c, name), AUTO_BOOL)
    if c.lr_schedule is not None:
        _choose("lr_schedule", c.lr_schedule, SCHEDULES)
    variant, arch = _variant(c)
    if not isinstance(c.model_options, dict):
        raise UserError(f"model_options={c.model_options!r} must be a dict of ResNetConfig "
                        "fields")
    try:
        arch = arch.replace(**c.model_options)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e
    recipe = RECIPES["cifar" if arch.stem == "cifar" else "imagenet"]
    r = dataclasses.asdict(c)
    r["model"] = variant
    r["model_options"] = dict(c.model_options)
    r["recipe"] = recipe.name
    r["recipe_reference"] = recipe.reference
    r["architecture"] = dataclasses.asdict(arch)
    r["dataset"] = c.dataset or recipe.dataset
    r["epochs"] = recipe.epochs if c.epochs is None else c.epochs
    r["batch_size"] = recipe.batch_size if c.batch_size is None else c.batch_size
    r["image_size"] = arch.default_size if c.image_size is None else c.image_size
    r["lr_schedule"] = c.lr_schedule or recipe.lr_schedule
    r["warmup_epochs"] = recipe.warmup_epochs if c.warmup_epochs is None else c.warmup_epochs
    r["weight_decay"] = recipe.weight_decay if c.weight_decay is None else c.weight_decay
    r["label_smoothing"] = (recipe.label_smoothing if c.label_smoothing is None
                            else c.label_smoothing)
    r["learning_rate"] = (recipe.base_lr * r["batch_size"] / recipe.reference_batch
                          if c.learning_rate is None else c.learning_rate)
    checks = [
        (isinstance(r["epochs"], int) and r["epochs"] >= 1, "epochs must be at least 1"),
        (isinstance(r["batch_size"], int) and r["batch_size"] >= 1,
         "batch_size must be a positive integer"),
        (r["learning_rate"] > 0, "learning_rate must be positive"),
        (r["weight_decay"] >= 0, "weight_decay must be at least 0"),
        (0 <= r["label_smoothing"] < 1, "label_smoothing must be in [0, 1)"),
        (0 <= r["warmup_epochs"] < r["epochs"], "warmup_epochs must be below epochs"),
        (0 <= c.val_fraction < 1, "val_fraction must be at least 0 and below 1"),
        (c.steps_per_epoch is None or c.steps_per_epoch >= 1,
         "steps_per_epoch must be at least 1"),
        (0 <= c.freeze_backbone_epochs < r["epochs"],
         "freeze_backbone_epochs must be below epochs"),
        (c.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
        (c.cache_budget_mb >= 0, "cache_budget_mb must be at least 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if c.freeze_backbone_epochs and not c.initial_weights:
        raise UserError("freeze_backbone_epochs needs initial_weights (a pretrained backbone "
                        "to keep frozen)")
    if c.initial_weights == "imagenet":
        if variant not in weights_lib.IMAGENET_WEIGHTS:
            raise UserError(
                f"initial_weights=imagenet is not available for {variant}; it exists for "
                f"{', '.join(weights_lib.IMAGENET_WEIGHTS)}"
            )
        # keras.applications' weights need its layout (conv biases, BN epsilon, ...).
        r["model_options"]["keras_applications"] = True
    elif c.initial_weights is not None:
        path = os.path.expanduser(c.initial_weights)
        if not path.endswith((".keras", ".weights.h5")):
            raise UserError(f"initial_weights={c.initial_weights} must be 'imagenet', a "
                            ".keras file or a .weights.h5 file")
        if not os.path.isfile(path):
            raise UserError(f"initial_weights file {path} does not exist")
    if r["image_size"] < arch.min_size:
        raise UserError(f"image_size={r['image_size']} is too small for {variant}; use at "
                        f"least {arch.min_size}")
    return r


def _choose(name, value, valid):
    if value not in valid:
        raise UserError(f"{name}={value!r} is not valid; choose one of {', '.join(valid)}")


def _variant(c: TrainConfig):
    if (c.depth is None) == (c.model is None):
        raise UserError("pass exactly one of --depth (e.g. 50, 20) or --model (e.g. resnet56)")
    try:
        if c.depth is not None:
            return configs.config_for_depth(c.depth)
        key = c.model.lower().replace("-", "_")
        return key, configs.get_config(key)
    except ValueError as e:
        raise UserError(str(e)) from e


def _truthy(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "true"


# --------------------------------------------------------------------------- strategy


def _cluster_workers() -> int:
    try:
        spec = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError as e:
        raise UserError(f"TF_CONFIG is not valid JSON ({e})") from e
    cluster = spec.get("cluster", {})
    return sum(len(cluster.get(k, [])) for k in ("chief", "worker"))


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Picks the distribution strategy.

    "auto" is MultiWorkerMirroredStrategy when TF_CONFIG describes a cluster of several
    workers, MirroredStrategy over all visible GPUs when there is one, and the default
    (single-device) strategy otherwise. "mirrored" without GPUs mirrors over all logical
    CPU devices.

    Must run before any other TensorFlow work when a multi-worker strategy is chosen.
    """
    _choose("strategy", name, STRATEGIES)
    workers = _cluster_workers()
    if name == "auto":
        if workers > 1:
            name = "multiworker"
        else:
            # physical (not logical) devices: listing them does not initialise TF.
            name = "mirrored" if tf.config.list_physical_devices("GPU") else "default"
    if name == "multiworker":
        if workers < 1:
            raise UserError("strategy=multiworker needs TF_CONFIG describing the cluster "
                            "(cluster.worker addresses and this task's type and index)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The public tf.distribute name of ``strategy`` (its class may be an internal alias)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    name = type(strategy).__name__
    return "DefaultStrategy" if name == "_DefaultDistributionStrategy" else name


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run directory (always, unless multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


# --------------------------------------------------------------------------- model


def build_model(resolved: dict[str, Any], num_classes: int) -> keras.Model:
    """Builds the run's model (raw-pixel input, logits out) with its initial weights."""
    size = resolved["image_size"]
    try:
        model = keras_resnet.resnet(
            **_architecture_arg(resolved), classes=num_classes, input_shape=(size, size, 3),
            include_preprocessing=True, classifier_activation=None,
            **resolved["model_options"])
    except ValueError as e:
        raise UserError(str(e)) from e
    if resolved["initial_weights"]:
        load_initial_weights(model, resolved)
    return model


def _architecture_arg(resolved):
    # Depths outside the variant table (e.g. 8 or 14) exist only through depth=.
    if resolved.get("depth") is not None:
        return {"depth": resolved["depth"]}
    return {"variant": resolved["model"]}


def load_initial_weights(model: keras.Model, resolved: dict[str, Any]) -> None:
    """Sets every layer but the head from "imagenet" or a .keras / .weights.h5 file.

    The model stays one flat functional graph: weights are copied layer by layer by name
    from a source model, never by nesting that model.
    """
    spec = resolved["initial_weights"]
    size = resolved["image_size"]
    variant, options = resolved["model"], resolved["model_options"]
    if spec == "imagenet":
        try:
            source = keras_resnet.resnet(variant=variant, weights="imagenet", include_top=False,
                                         include_preprocessing=True,
                                         input_shape=(size, size, 3))
        except Exception as e:  # download or file errors: report them in one sentence
            raise UserError(f"could not load the ImageNet weights of {variant} "
                            f"({_first_line(e)}); check the network or the keras cache "
                            "(~/.keras/models)") from e
        what = f"the ImageNet weights of {variant}"
    elif spec.endswith(".keras"):
        path = os.path.expanduser(spec)
        try:
            source = keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as e:
            raise UserError(f"could not load initial_weights {path} ({_first_line(e)})") from e
        what = path
    else:
        path = os.path.expanduser(spec)
        source = _model_for_weights_file(path, variant, options, size, resolved.get("depth"))
        what = path
    copied = copy_backbone(source, model, source_name=what)
    log.info("initialised %d layers from %s; new head", copied, what)


def _model_for_weights_file(path, variant, options, size, depth):
    """A model of ``variant`` holding a Keras 3 .weights.h5 file (matched by layer order)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            dense = []
            f.visititems(lambda name, obj: dense.append(obj.shape)
                         if name.startswith("layers/dense") and name.endswith("vars/0")
                         else None)
    except OSError as e:
        raise UserError(f"initial_weights {path} is not a readable HDF5 file ({e})") from e
    classes = dense[-1][-1] if dense else None
    errors = []
    for preprocessing in (True, False):
        try:
            source = keras_resnet.resnet(
                **_architecture_arg({"depth": depth, "model": variant}), classes=classes,
                include_top=bool(dense), input_shape=(size, size, 3),
                include_preprocessing=preprocessing, classifier_activation=None, **options)
            source.load_weights(path)
            return source
        except Exception as e:
            errors.append(_first_line(e))
    raise UserError(f"initial_weights {path} does not hold {variant} weights ({errors[0]})")


def copy_backbone(source: keras.Model, target: keras.Model, *, source_name: str) -> int:
    """Copies weights by layer name into every weighted layer of target but ``predictions``.

    A source without a ``preprocess`` layer leaves the target's. Returns layers copied.
    """
    by_name = {layer.name: layer for layer in source.layers}
    wanted = {layer.name for layer in target.layers if layer.weights}
    extra = [layer.name for layer in source.layers
             if layer.weights and layer.name not in wanted and layer.name != "predictions"]
    if extra:
        raise UserError(f"{source_name} has layers that {target.name} lacks (e.g. "
                        f"{extra[0]!r}), so it is a different architecture")
    copied = 0
    for layer in target.layers:
        if not layer.weights or layer.name == "predictions":
            continue
        src = by_name.get(layer.name)
        if src is None:
            if layer.name == "preprocess":
                continue
            raise UserError(f"{source_name} has no layer {layer.name!r}, so it is not a "
                            f"{target.name} network")
        want = [tuple(w.shape) for w in layer.weights]
        have = [tuple(w.shape) for w in src.weights]
        if want != have:
            raise UserError(f"{source_name}: layer {layer.name!r} has weight shapes {have}, "
                            f"{target.name} needs {want}")
        layer.set_weights(src.get_weights())
        copied += 1
    return copied


def _patch_for_multiworker(model, strategy):
    """Works around two Keras 3 bugs that stop fit() under MultiWorkerMirroredStrategy.

    Both are in Keras' TensorFlow trainer (keras-team/keras#20585) and are patched on this
    model instance only:

    * before the first step Keras reduces one distributed (images, labels) batch with
      ``strategy.reduce`` to learn input shapes, which the multi-worker strategy cannot do
      for a nested batch; only shapes matter there, so this worker's first replica's batch
      is used instead;
    * it averages each step's scalar logs with ``strategy.reduce(..., axis=0)``, which
      fails on scalars; the steps here return them as length-1 vectors, which that
      reduction averages over all replicas of all workers.
    """
    cls = type(model)

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    def vector_logs(step):
        def run(data):
            return {k: tf.reshape(v, [1]) for k, v in step(model, data).items()}
        return run

    model._maybe_symbolic_build = maybe_symbolic_build
    model.train_step = vector_logs(cls.train_step)
    model.test_step = vector_logs(cls.test_step)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _add_weight_decay(model, weight_decay):
    """Classic (coupled) L2 on conv and dense kernels only: never BN parameters or biases.

    Keras' L2(l) adds l*sum(w^2), whose gradient 2*l*w equals the papers' decay wd*w for
    l = wd/2. The penalty is attached to the variables, not written into layer configs, so
    saved models carry no training-only regularisers.
    """
    if not weight_decay:
        return
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        # Frozen-by-design layers (input normalisation, option-A shortcuts) are skipped.
        if (isinstance(layer, keras.layers.Conv2D | keras.layers.Dense) and layer.trainable
                and kernel is not None):
            kernel.regularizer = keras.regularizers.L2(weight_decay / 2)


# --------------------------------------------------------------------------- optimisation


def make_schedule(kind: str, learning_rate: float, *, total_steps: int, warmup_steps: int):
    """Learning-rate schedule over optimizer steps, from built-in Keras schedules.

    Built-ins keep saved models loadable without custom objects.
    """
    total_steps = max(total_steps, 1)
    if kind == "cosine":
        if warmup_steps:
            return keras.optimizers.schedules.CosineDecay(
                0.0, max(total_steps - warmup_steps, 1), warmup_target=learning_rate,
                warmup_steps=warmup_steps)
        return keras.optimizers.schedules.CosineDecay(learning_rate, total_steps)
    # PiecewiseConstantDecay switches after a boundary step, so a change meant for step
    # (0-based) k sits at boundary k - 1.
    starts, values = [], [learning_rate]
    if warmup_steps:
        starts, values = [warmup_steps], [learning_rate / 10, learning_rate]
    if kind == "step":
        for fraction in STEP_BOUNDARIES:
            start = max(int(total_steps * fraction), (starts[-1] + 1) if starts else 1)
            starts.append(start)
            values.append(values[-1] / 10)
    if not starts:
        return learning_rate
    boundaries = [start - 1 for start in starts]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def make_optimizer(resolved: dict[str, Any], schedule) -> keras.optimizers.Optimizer:
    name = resolved["optimizer"]
    if name == "sgd":
        return keras.optimizers.SGD(schedule, momentum=resolved["momentum"])
    if name == "rmsprop":
        return keras.optimizers.RMSprop(schedule, momentum=resolved["momentum"])
    if name == "adam":
        return keras.optimizers.Adam(schedule)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=resolved["weight_decay"])
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return optimizer


def _compile(model, resolved, optimizer, num_classes, jit_compile):
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5"))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=resolved["label_smoothing"]),
        metrics=metrics, jit_compile=jit_compile)


# --------------------------------------------------------------------------- run dir


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def write_atomic(path: str, text: str) -> None:
    """Writes a text file so that readers see the old or the new content, never half."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_atomic(path: str, save) -> None:
    # Keras checks the extension, so the temporary name keeps it.
    base, ext = (path[:-len(".weights.h5")], ".weights.h5") if path.endswith(
        ".weights.h5") else os.path.splitext(path)
    tmp = f"{base}.tmp{ext}"
    save(tmp)
    os.replace(tmp, path)


def _describe(cfg):
    options = cfg.get("model_options") or {}
    extra = f" {options}" if options else ""
    return (f"{cfg.get('model')}{extra} ({cfg.get('num_classes')} classes, "
            f"{cfg.get('image_size')}px)")


def check_model_dir(model_dir: str, identity: dict[str, Any], *, overwrite: bool) -> None:
    """Refuses a model_dir that holds a run of another model (or clears it on overwrite)."""
    config_path = os.path.join(model_dir, "config.json")
    if os.path.isfile(config_path):
        try:
            old = _read_json(config_path)
        except (OSError, json.JSONDecodeError):
            old = {}
        mismatch = [k for k in identity if k in old and old.get(k) != identity[k]]
        if not old or mismatch:
            if not overwrite:
                new = {**old, **identity}
                raise UserError(
                    f"model_dir {model_dir} holds a run of {_describe(old)}, not "
                    f"{_describe(new)}; choose another --model_dir or pass --overwrite to "
                    "replace it"
                )
    elif os.path.isdir(os.path.join(model_dir, "checkpoints")) and not overwrite:
        raise UserError(f"model_dir {model_dir} holds checkpoints but no config.json; "
                        "choose another --model_dir or pass --overwrite to replace them")
    if overwrite:
        for name in RUN_FILES:
            if os.path.exists(os.path.join(model_dir, name)):
                os.remove(os.path.join(model_dir, name))
        for name in RUN_DIRS:
            shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)


def read_checkpoint_state(model_dir: str) -> dict[str, Any] | None:
    """The last completed epoch's checkpoint record, or None for a fresh run."""
    path = os.path.join(model_dir, "checkpoints", CHECKPOINT_STATE)
    if not os.path.isfile(path):
        return None
    state = _read_json(path)
    if not os.path.isfile(os.path.join(model_dir, "checkpoints", state["weights"])):
        raise UserError(f"{path} names {state['weights']}, which is missing; pass "
                        "--overwrite to start the run again")
    return state


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "keras_resnet": keras_resnet.__version__,
           "tensorflow": tf.__version__, "keras": keras.__version__,
           "numpy": np.__version__}
    try:
        import tensorflow_datasets as tfds

        out["tensorflow_datasets"] = tfds.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


# --------------------------------------------------------------------------- callbacks


class RunMonitor(keras.callbacks.Callback):
    """Per-epoch bookkeeping: progress line, NaN guard, checkpoints, best model, history.

    Checkpoints are written as ``epoch_NNNN.weights.h5`` (weights and optimizer state)
    through a temporary file and a rename, then ``checkpoint.json`` is replaced the same
    way: an interrupted write leaves the previous epoch's checkpoint intact.
    """

    def __init__(self, *, run_dir, chief, state, phase, batch_size, steps_per_epoch,
                 keep, total_epochs, start_time):
        super().__init__()
        self.run_dir = run_dir
        self.chief = chief
        self.state = state
        self.phase = phase
        self.batch_size = batch_size
        self.steps = steps_per_epoch
        self.keep = keep
        self.total_epochs = total_epochs
        self.start_time = start_time
        self.bad_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        # The rate the epoch starts with (the schedule moves on during it).
        self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.t0 = time.perf_counter()
        self.t_train = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_step = (self.epoch, batch)
            self.model.stop_training = True

    def on_test_begin(self, logs=None):
        if self.t_train is None:  # validation starts: the epoch's training part is over
            self.t_train = time.perf_counter() - self.t0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if self.bad_step is not None:
            return  # never checkpoint a diverged model
        train_time = self.t_train or (time.perf_counter() - self.t0)
        logs["learning_rate"] = self.lr
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()},
               "images_per_sec": self.steps * self.batch_size / max(train_time, 1e-9),
               "epoch_time_s": time.perf_counter() - self.t0}
        self.state["history"].append(row)
        self.state["epoch"] = epoch + 1
        self.state["phase"] = self.phase
        self.state["wall_time_s"] = self.state.get("wall_time_before_s", 0.0) + (
            time.perf_counter() - self.start_time)
        val = logs.get("val_accuracy")
        improved = val is not None and val > self.state.get("best_val_accuracy", -1.0)
        if improved:
            self.state["best_val_accuracy"] = float(val)
            self.state["best_epoch"] = epoch + 1
        if self.chief:
            if improved:
                _save_atomic(os.path.join(self.run_dir, "best.keras"), self.model.save)
            self._checkpoint(epoch + 1)
        print(_epoch_line(row, self.total_epochs), flush=True)

    def _checkpoint(self, epoch):
        folder = os.path.join(self.run_dir, "checkpoints")
        os.makedirs(folder, exist_ok=True)
        name = f"epoch_{epoch:04d}.weights.h5"
        _save_atomic(os.path.join(folder, name), self.model.save_weights)
        self.state["weights"] = name
        write_atomic(os.path.join(folder, CHECKPOINT_STATE), json.dumps(self.state, indent=1))
        write_history(self.run_dir, self.state["history"])
        for old in sorted(f for f in os.listdir(folder) if f.startswith("epoch_")
                          and f.endswith(".weights.h5") and ".tmp" not in f)[:-self.keep]:
            os.remove(os.path.join(folder, old))


def _epoch_line(row, total_epochs):
    parts = [f"epoch {row['epoch']}/{total_epochs}"]
    for key, label in (("loss", "loss"), ("accuracy", "top1"), ("val_loss", "val_loss"),
                       ("val_accuracy", "val_top1"), ("val_top5", "val_top5")):
        if key in row:
            parts.append(f"{label} {row[key]:.4f}")
    parts.append(f"lr {row['learning_rate']:.3g}")
    parts.append(f"{row['images_per_sec']:.1f} images/s")
    parts.append(f"{row['epoch_time_s']:.1f}s")
    return " - ".join(parts)


def write_history(run_dir: str, history: list[dict[str, float]]) -> None:
    """Rewrites history.csv from the checkpointed history (so no epoch appears twice)."""
    if not history:
        return
    keys = ["epoch"] + sorted({k for row in history for k in row} - {"epoch"})
    tmp = os.path.join(run_dir, "history.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in history:
            writer.writerow(row)
    os.replace(tmp, os.path.join(run_dir, "history.csv"))


def plot_curves(history: list[dict[str, float]], path: str, title: str) -> None:
    """Writes a PNG of loss and top-1 accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "top-1")):
        for prefix, name in (("", "train"), ("val_", "validation")):
            values = [row.get(prefix + key) for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- train


def _set_trainable(model, phase_head_only, original, freeze_bn):
    for layer in model.layers:
        trainable = original[layer.name]
        if phase_head_only and layer.name != "predictions":
            trainable = False
        if freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
            trainable = False
        layer.trainable = trainable


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) one experiment; returns the final metrics (also metrics.json).

    Raises:
        UserError: bad options, data or model_dir; TrainingStopped when the loss became
            NaN or infinite (the last good checkpoint is kept).
    """
    start = time.perf_counter()
    resolved = resolve(config)
    # A multi-worker strategy must exist before any other TensorFlow work.
    strategy = make_strategy(resolved["strategy"])
    replicas = strategy.num_replicas_in_sync
    batch = resolved["batch_size"]
    if batch % replicas:
        raise UserError(f"batch_size={batch} does not divide evenly over {replicas} "
                        f"replicas; use a multiple of {replicas}")
    # Only the chief writes the run directory; other workers read its checkpoints.
    chief = is_chief(strategy)
    run_dir = os.path.abspath(os.path.expanduser(resolved["model_dir"]))
    partial_identity = {k: resolved[k] for k in ("model", "model_options", "image_size")}
    if chief:
        check_model_dir(run_dir, partial_identity, overwrite=resolved["overwrite"])

    keras.utils.set_random_seed(resolved["seed"])
    bundle = data_lib.load_data(
        resolved["dataset"], data_dir=resolved["data_dir"], image_size=resolved["image_size"],
        batch_size=batch, val_fraction=resolved["val_fraction"], seed=resolved["seed"],
        augment=resolved["augment"], cache_budget=resolved["cache_budget_mb"] * 2**20)
    num_classes = bundle.num_classes
    resolved["num_classes"] = num_classes
    identity = {k: resolved[k] for k in IDENTITY_KEYS}
    if chief:
        check_model_dir(run_dir, identity, overwrite=False)
    state = read_checkpoint_state(run_dir)

    gpu = bool(tf.config.list_physical_devices("GPU"))
    mixed = _truthy(resolved["mixed_precision"], gpu)
    jit = _truthy(resolved["jit_compile"], gpu and replicas == 1)
    if mixed and not gpu:
        raise UserError("mixed_precision=true needs a GPU (float16 is slow and inexact on "
                        "CPU); use --mixed_precision=auto")
    keras.mixed_precision.set_dtype_policy("mixed_float16" if mixed else "float32")

    steps = resolved["steps_per_epoch"] or bundle.steps_per_epoch(batch)
    epochs = resolved["epochs"]
    resolved.update({
        "replicas": replicas, "per_replica_batch_size": batch // replicas,
        "strategy_resolved": strategy_name(strategy), "mixed_precision_resolved": mixed,
        "jit_compile_resolved": jit, "steps_per_epoch_resolved": steps,
        "train_images": bundle.train_size, "val_images": bundle.val_size,
        "skipped_images": len(bundle.skipped), "cached_in_memory": bundle.cached,
        "augmentation": data_lib.augmentation_style(resolved["image_size"]),
        "input": "raw RGB pixels 0..255 (float32); normalisation is inside the model",
        "output": "logits", "versions": versions(),
    })
    total_steps = steps * epochs
    warmup_steps = int(round(resolved["warmup_epochs"] * steps))
    schedule = make_schedule(resolved["lr_schedule"], resolved["learning_rate"],
                             total_steps=total_steps, warmup_steps=warmup_steps)

    def one_hot(x, y):
        return x, tf.one_hot(y, num_classes)

    val_ds = bundle.val.map(one_hot) if bundle.val is not None else None

    with strategy.scope():
        model = build_model(resolved, num_classes)
        original = {layer.name: layer.trainable for layer in model.layers}
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            _patch_for_multiworker(model, strategy)
        if resolved["optimizer"] != "adamw":
            _add_weight_decay(model, resolved["weight_decay"])
    if chief:
        # Written once the model is known to build, so bad options leave no run behind.
        os.makedirs(run_dir, exist_ok=True)
        write_atomic(os.path.join(run_dir, "config.json"),
                     json.dumps(resolved, indent=1, sort_keys=True, default=str))
        write_atomic(os.path.join(run_dir, "labels.txt"), "\n".join(bundle.class_names) + "\n")

    state = state or {"epoch": 0, "history": [], "best_val_accuracy": -1.0}
    state["wall_time_before_s"] = state.get("wall_time_s", 0.0)
    done = state["epoch"]
    if done:
        print(f"resuming {run_dir} after epoch {done}/{epochs}", flush=True)
    freeze = resolved["freeze_backbone_epochs"]
    phases = [(0, freeze, True), (freeze, epochs, False)] if freeze else [(0, epochs, False)]
    # A checkpoint is restored into the phase (head-only or whole network) that saved it,
    # because its optimizer state covers that phase's trainable variables.
    ckpt_phase = min(state.get("phase", 0), len(phases) - 1) if done else -1
    verbose = 1 if _truthy(resolved["verbose"], sys.stdout.isatty()) else 0
    iterations = 0
    for index, (first, last, head_only) in enumerate(phases):
        loading = index == ckpt_phase
        if index < ckpt_phase or (last <= done and not loading):
            continue
        with strategy.scope():
            _set_trainable(model, head_only, original, resolved["freeze_bn"])
            optimizer = make_optimizer(resolved, schedule)
            _compile(model, resolved, optimizer, num_classes, jit)
            if loading:
                _restore(model, optimizer, run_dir, state)
            elif iterations:
                optimizer.iterations.assign(iterations)  # the schedule continues
        begin = max(first, done)
        if begin < last:
            monitor = RunMonitor(run_dir=run_dir, chief=chief, state=state, phase=index,
                                 batch_size=batch, steps_per_epoch=steps,
                                 keep=resolved["keep_checkpoints"], total_epochs=epochs,
                                 start_time=start)
            callbacks = [monitor]
            if chief:
                callbacks.append(keras.callbacks.TensorBoard(
                    os.path.join(run_dir, "logs"), write_graph=False, profile_batch=0))
            train_ds = _stream(bundle, begin, steps, batch, one_hot)
            with warnings.catch_warnings():
                # Validation sets that skip undecodable files have no known length, and
                # Keras warns "ran out of data" at their (normal) end.
                warnings.filterwarnings("ignore", message="Your input ran out of data")
                model.fit(train_ds, epochs=last, initial_epoch=begin, steps_per_epoch=steps,
                          validation_data=val_ds, callbacks=callbacks, verbose=verbose,
                          shuffle=False)
            if monitor.bad_step is not None:
                bad_epoch, bad_batch = monitor.bad_step
                kept = (f"the last good checkpoint (epoch {state['epoch']}) is kept in "
                        f"{run_dir}/checkpoints" if state["epoch"] else
                        "no epoch had completed, so there is no checkpoint")
                raise TrainingStopped(
                    f"the loss became NaN or infinite at epoch {bad_epoch + 1}, step "
                    f"{bad_batch + 1}, so training stopped; {kept}; lower --learning_rate "
                    "or check the data")
        iterations = int(keras.ops.convert_to_numpy(optimizer.iterations))
        done = max(done, last)
    _set_trainable(model, False, original, resolved["freeze_bn"])
    return _finish(model, state, resolved, run_dir, start, bundle, chief=chief)


def _stream(bundle, epoch, steps, batch, one_hot):
    """The training stream from ``epoch``: continues exactly where earlier steps left it."""
    data_epoch, offset = divmod(epoch * steps, bundle.steps_per_epoch(batch) or 1)
    return bundle.epochs(data_epoch).skip(offset).map(one_hot)


def _restore(model, optimizer, run_dir, state):
    path = os.path.join(run_dir, "checkpoints", state["weights"])
    optimizer.build(model.trainable_variables)  # optimizer slots must exist to be loaded
    try:
        model.load_weights(path)
    except Exception as e:
        raise UserError(f"checkpoint {path} does not fit this run ({_first_line(e)}); pass "
                        "the options it was started with, or --overwrite") from e


def _finish(model, state, resolved, run_dir, start, bundle, *, chief):
    history = state["history"]
    last = history[-1] if history else {}
    rates = [row["images_per_sec"] for row in history]
    # The first epoch includes graph tracing; leave it out of the steady-state rate.
    steady = rates[1:] if len(rates) > 1 else rates
    metrics = {
        "model": resolved["model"], "dataset": resolved["dataset"],
        "epochs": state["epoch"], "epochs_requested": resolved["epochs"],
        "train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"),
        "val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy"),
        "val_top5": last.get("val_top5"),
        "best_val_accuracy": state.get("best_val_accuracy") if state.get(
            "best_epoch") else None,
        "best_epoch": state.get("best_epoch"),
        "wall_time_s": state.get("wall_time_s", time.perf_counter() - start),
        "images_per_sec": float(np.median(steady)) if steady else None,
        "train_images": bundle.train_size, "val_images": bundle.val_size,
        "skipped_images": len(bundle.skipped),
        "note": "train_* are running means over the last epoch, with augmentation",
    }
    if not chief:
        return metrics
    _save_atomic(os.path.join(run_dir, "model.keras"), model.save)
    write_atomic(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=1))
    write_history(run_dir, history)
    if history:
        plot_curves(history, os.path.join(run_dir, "curves.png"),
                    f"{resolved['model']} on {resolved['dataset']}")
    return metrics
