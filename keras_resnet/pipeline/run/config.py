"""What one training run is: :class:`TrainConfig`, the recipes, and :func:`resolve`.

Every :class:`TrainConfig` field left ``None`` takes the value of the run's recipe;
:func:`resolve` validates the options and returns a frozen :class:`ResolvedConfig`, which
is what the run folder records (``config.json``) and what a resumed run must match.

Recipes (``recipe=``; the default is ``he2015`` for CIFAR-style nets and ``imagenet``
otherwise, so that a run without options reproduces the paper the architecture comes from):

* ``he2015``: He et al. 2015, §4.2: 164 epochs, batch 128, SGD momentum 0.9, learning
  rate 0.1 x batch/128 divided by 10 at 50% and 75% of training, weight decay 1e-4.
* ``fast``: a budget-aware recipe for CIFAR-size data (see :data:`RECIPES` for each
  ingredient and its reference): 30 epochs by default, and built to be cut short with
  ``epochs=`` (every schedule length scales with it).
* ``imagenet``: 90 epochs, batch 256, SGD momentum 0.9, learning rate 0.1 x batch/256
  (Goyal et al. 2017) with 5 linear warm-up epochs and cosine decay, label smoothing 0.1,
  weight decay 1e-4, 224x224 images.

Weight decay never applies to BatchNormalization parameters or biases.

Example:
    >>> resolved = resolve(TrainConfig(depth=20, recipe="fast", epochs=15))
    >>> resolved.learning_rate, resolved.lr_schedule
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from keras_resnet import configs
from keras_resnet import weights as weights_lib
from keras_resnet.pipeline.data.splits import DEFAULT_CACHE_BUDGET_MB
from keras_resnet.pipeline.errors import UserError, choose

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("step", "cosine", "constant")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
AUTO_BOOL = ("auto", "true", "false")
# Step schedule: learning rate divided by 10 at these fractions of training (He et al.).
STEP_BOUNDARIES = (0.5, 0.75)
# Options that do not change what a run computes: a resumed run may change them.
RESUMABLE_CHANGES = ("epochs", "model_dir", "verbose", "keep_checkpoints", "overwrite",
                     "cache_budget_mb", "fused_batch_norm", "checkpoint_every_steps")
# Options that change what a run computes, added after runs were recorded without them,
# and the value that computes what those runs did.
ADDED_OPTIONS = {"ema_decay": 0.0, "cutout": 0}
# Epochs of at least this many steps are checkpointed every tenth of an epoch by default.
LONG_EPOCH_STEPS = 2000


def truthy(value: str, auto: bool) -> bool:
    """Resolves an auto/true/false option: ``auto`` when it is "auto"."""
    choose("option", value, AUTO_BOOL)
    return auto if value == "auto" else value == "true"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Defaults of one training recipe.

    ``learning_rate`` is ``base_lr x batch_size / reference_batch``; ``warmup_fraction``
    (when set) makes the warm-up a fraction of the run instead of ``warmup_epochs``.
    """

    name: str
    epochs: int
    batch_size: int
    reference_batch: int
    base_lr: float
    lr_schedule: str
    warmup_epochs: float
    weight_decay: float
    label_smoothing: float
    dataset: str
    reference: str
    nesterov: bool = False
    warmup_fraction: float | None = None
    ema_decay: float = 0.0
    ema_bn_batches: int = 100
    cutout: int = 0


RECIPES = {
    "he2015": Recipe(
        "he2015", epochs=164, batch_size=128, reference_batch=128, base_lr=0.1,
        lr_schedule="step", warmup_epochs=0, weight_decay=1e-4, label_smoothing=0.0,
        dataset="cifar10", reference="He et al. 2015, §4.2"),
    "fast": Recipe(
        "fast", epochs=30, batch_size=64, reference_batch=64, base_lr=0.1,
        lr_schedule="cosine", warmup_epochs=0, warmup_fraction=0.05, weight_decay=5e-4,
        label_smoothing=0.0, nesterov=True, dataset="cifar10",
        reference=("budget-aware (Li et al. 2020): linear warm-up over 5% of the epochs "
                   "(Goyal et al. 2017), cosine decay to zero at the last step (Loshchilov & "
                   "Hutter 2017); Nesterov momentum 0.9 (Sutskever et al. 2013); batch 64 "
                   "with learning rate 0.1 x batch/64 (Goyal et al. 2017); weight decay "
                   "5e-4 (Zagoruyko & Komodakis 2016)")),
    "imagenet": Recipe(
        "imagenet", epochs=90, batch_size=256, reference_batch=256, base_lr=0.1,
        lr_schedule="cosine", warmup_epochs=5, weight_decay=1e-4, label_smoothing=0.1,
        dataset="imagenet2012",
        reference="Goyal et al. 2017; He et al. 2019 (cosine, smoothing)"),
}


def _option(default=None, help="", **extra):  # noqa: A002 - "help" as in argparse
    metadata = {"help": help, **extra}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """One experiment; fields left None take the recipe's value (listed below).

    tools/train.py has one flag per field, generated from this class, with the same help.
    """

    depth: int | None = _option(
        help="ResNet depth: 18/34/50/101/152/200 (ImageNet-style) or 6n+2 such as 20, 56, "
             "110 (CIFAR-style).")
    model: str | None = _option(
        help="variant name instead of depth, e.g. resnet56, resnet50d, wrn_28_10 (see "
             "keras_resnet.VARIANTS).")
    model_options: dict[str, Any] = _option(
        {}, help='ResNetConfig overrides, e.g. {"se_ratio": 0.0625} (JSON on the command '
                 'line).')
    recipe: str | None = _option(
        help="training recipe: he2015, fast or imagenet (default: he2015 for CIFAR-style "
             "nets, imagenet otherwise).", choices=tuple(RECIPES))
    dataset: str | None = _option(
        help="TFDS name (cifar10, cifar100, imagenette, imagenet2012, ...), folder, digits "
             "or synthetic (recipe: cifar10 CIFAR-style, imagenet2012 otherwise).")
    data_dir: str | None = _option(
        help="TFDS data dir (must hold the prepared dataset; nothing is downloaded) or the "
             "root of a folder dataset.")
    model_dir: str | None = _option(
        help="run directory (default: runs/<model>_<dataset>).")
    epochs: int | None = _option(
        help="total epochs; a resumed run finishes at this count (recipe: he2015 164, fast "
             "30, imagenet 90).")
    batch_size: int | None = _option(
        help="global batch size, split evenly over replicas (recipe: he2015 128, fast 64, "
             "imagenet 256).")
    image_size: int | None = _option(
        help="square input side (default: 32 CIFAR-style, 224 otherwise).")
    learning_rate: float | None = _option(
        help="peak learning rate (recipe: he2015 0.1 x batch/128, fast 0.1 x batch/64, "
             "imagenet 0.1 x batch/256).")
    weight_decay: float | None = _option(
        help="decay of conv/dense kernels, never BN or biases (recipe: he2015 1e-4, fast "
             "5e-4, imagenet 1e-4).")
    label_smoothing: float | None = _option(
        help="label smoothing of the cross-entropy (recipe: 0 CIFAR-style, 0.1 imagenet).")
    ema_decay: float | None = _option(
        help="per-step decay of an exponential moving average of the weights, scored on "
             "the validation data every epoch beside them; the saved models take the "
             "average where it scores higher (0: off; recipe: 0).")
    ema_bn_batches: int | None = _option(
        help="training batches over which the weight average's BatchNormalization "
             "statistics are estimated before it is scored or saved (precise BN; 0: it "
             "keeps the running statistics of the trained weights; recipe: 100).")
    seed: int = _option(0, help="seeds initialisation, validation carving, shuffling and "
                                "augmentation.")
    optimizer: str = _option("sgd", help="sgd, adam, adamw or rmsprop.", choices=OPTIMIZERS)
    momentum: float = _option(0.9, help="momentum of sgd and rmsprop.")
    nesterov: bool | None = _option(help="Nesterov momentum for sgd (recipe: on for fast).")
    lr_schedule: str | None = _option(
        help="step (/10 at 50% and 75%), cosine (to zero) or constant (recipe: he2015 "
             "step, otherwise cosine).", choices=SCHEDULES)
    warmup_epochs: float | None = _option(
        help="warm-up epochs: linear for cosine, lr/10 for step/constant (recipe: he2015 0, "
             "fast 5% of the epochs, imagenet 5).")
    mixed_precision: str = _option(
        "auto", help="auto (float16 with a GPU; bfloat16 on a CPU with AMX or AVX512_BF16; "
                     "else float32), true or false; saved models are float32 either way.",
        choices=AUTO_BOOL)
    fused_batch_norm: bool = _option(
        True, help="train BatchNormalization with TensorFlow's fused kernel (the same layer, "
                   "faster); saved models hold the stock layer either way.")
    jit_compile: str = _option("auto", help="XLA: auto (with a GPU and one replica), true "
                                            "or false.", choices=AUTO_BOOL)
    steps_per_epoch: int | None = _option(
        help="steps per epoch (default: one pass over the training data).")
    initial_weights: str | None = _option(
        help="imagenet, cifar10 (the weights shipped in this package, for the variants "
             "that have them), or a .keras / .weights.h5 file; the classification head is "
             "always new.")
    freeze_bn: bool = _option(False, help="keep every BatchNormalization layer frozen.")
    freeze_backbone_epochs: int = _option(
        0, help="train only the new head for this many epochs first (needs "
                "initial_weights).")
    strategy: str = _option(
        "auto", help="auto, default, mirrored or multiworker (auto: multi-worker when "
                     "TF_CONFIG names a cluster, mirrored over GPUs, else default).",
        choices=STRATEGIES)
    val_fraction: float = _option(
        0.1, help="fraction of train carved off as validation when the dataset has no "
                  "validation split; 0 for none.")
    augment: bool = _option(True, help="random crops and flips on the training data.")
    cutout: int | None = _option(
        help="side in pixels of a square set to the mean pixel at a random place in each "
             "augmented training image (Cutout, DeVries & Taylor 2017; 16 for CIFAR-10 in "
             "the paper; 0: none; recipe: 0).")
    cache_budget_mb: int = _option(
        DEFAULT_CACHE_BUDGET_MB, help="decoded training images kept in memory up to this "
                                      "size; larger data streams from disk.")
    keep_checkpoints: int = _option(2, help="checkpoints kept (the newest).")
    checkpoint_every_steps: int | None = _option(
        help="also checkpoint every this many steps within an epoch; 0 for epoch ends only "
             "(default: 0 for epochs under 2,000 steps, else a tenth of an epoch). SIGTERM "
             "and SIGINT always checkpoint the step they stop after.")
    overwrite: bool = _option(False, help="replace a run found in model_dir instead of "
                                          "resuming it.")
    verbose: str = _option("auto", help="Keras progress bar: auto (on a terminal), true or "
                                        "false; one summary line per epoch is always printed.",
                           choices=AUTO_BOOL)


TrainConfig.__doc__ += "\n    Attributes:\n" + "\n".join(
    f"        {f.name}: {f.metadata['help']}" for f in dataclasses.fields(TrainConfig))


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    """A validated :class:`TrainConfig` with every recipe default filled in.

    Besides the options it names the variant (``model``), the recipe, the architecture
    (``ResNetConfig`` fields) and the ``model_dir`` actually used.
    """

    depth: int | None
    model: str
    model_options: dict[str, Any]
    recipe: str
    recipe_reference: str
    architecture: dict[str, Any]
    dataset: str
    data_dir: str | None
    model_dir: str
    epochs: int
    batch_size: int
    image_size: int
    learning_rate: float
    weight_decay: float
    label_smoothing: float
    ema_decay: float
    ema_bn_batches: int
    seed: int
    optimizer: str
    momentum: float
    nesterov: bool
    lr_schedule: str
    warmup_epochs: float
    mixed_precision: str
    fused_batch_norm: bool
    jit_compile: str
    steps_per_epoch: int | None
    initial_weights: str | None
    freeze_bn: bool
    freeze_backbone_epochs: int
    strategy: str
    val_fraction: float
    augment: bool
    cutout: int
    cache_budget_mb: int
    keep_checkpoints: int
    checkpoint_every_steps: int | None
    overwrite: bool
    verbose: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def architecture_arg(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``keras_resnet.resnet()`` argument naming the architecture of a run's options
    (a :class:`ResolvedConfig`'s ``to_dict()`` or a run's config.json): ``depth=`` where the
    run gave a depth (depths outside the variant table, e.g. 8 or 14, exist only so), else
    ``variant=``."""
    depth = values.get("depth")
    return {"depth": int(depth)} if depth is not None else {"variant": values["model"]}


def build_network(values: Mapping[str, Any], *, classes: int, image_size: int | None = None,
                  classifier_activation=None, **options):
    """The network a run's options describe, the one builder of every copy of a run's model
    (training, saving, checking a saved model, the tf_keras twin of QAT, shipped weights).

    Args:
        values: the run's options: a :class:`ResolvedConfig`'s ``to_dict()`` or config.json
            (``depth`` or ``model``, ``model_options``, ``image_size``).
        classes: the classifier's classes.
        image_size: the input side (default: the run's).
        classifier_activation: None (logits, as runs train and save) or "softmax".
        options: further ``keras_resnet.resnet()`` arguments (``input_shape``,
            ``include_top``, ``include_preprocessing``, ...).

    The input takes raw 0..255 pixels (``include_preprocessing=True`` unless given).
    Inside ``keras_resnet.layer_library(tf_keras)`` it builds the tf_keras copy.
    """
    import keras_resnet

    size = image_size or int(values["image_size"])
    # JSON has no tuples; ResNetConfig fields such as depths are tuples.
    model_options = {k: tuple(v) if isinstance(v, list) else v
                     for k, v in (values.get("model_options") or {}).items()}
    arguments = {"input_shape": (size, size, 3), "include_preprocessing": True,
                 "classifier_activation": classifier_activation, **options}
    return keras_resnet.resnet(**architecture_arg(values), classes=classes, **arguments,
                               **model_options)


def resolve(config: TrainConfig) -> ResolvedConfig:
    """Validates a config and fills every unset option from the recipe.

    Raises:
        UserError: a bad option or combination, in one sentence naming the argument.
    """
    c = config
    for field in dataclasses.fields(TrainConfig):
        valid = field.metadata.get("choices")
        value = getattr(c, field.name)
        if valid and value is not None:
            choose(field.name, value, valid)
    variant, arch = _variant(c)
    if not isinstance(c.model_options, dict):
        raise UserError(f"model_options={c.model_options!r} must be a dict of ResNetConfig "
                        "fields")
    try:
        arch = arch.replace(**c.model_options)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e
    recipe = RECIPES[c.recipe or ("he2015" if arch.stem == "cifar" else "imagenet")]
    options = dict(c.model_options)
    epochs = recipe.epochs if c.epochs is None else c.epochs
    batch_size = recipe.batch_size if c.batch_size is None else c.batch_size
    given = recipe_values(recipe, epochs=epochs, batch_size=batch_size)
    warmup = given["warmup_epochs"] if c.warmup_epochs is None else c.warmup_epochs
    _check(c, epochs=epochs, batch_size=batch_size, warmup=warmup)
    if c.initial_weights == "imagenet":
        try:
            weights_lib.check_imagenet(variant, include_top=False, classes=None,
                                       argument="initial_weights")
        except ValueError as e:
            raise UserError(str(e)) from None
        # keras.applications' weights need its layout (conv biases, BN epsilon, ...).
        options["keras_applications"] = True
    elif c.initial_weights in weights_lib.pretrained_names():
        _check_shipped(c.initial_weights, variant)
    elif c.initial_weights is not None:
        path = os.path.expanduser(c.initial_weights)
        if not path.endswith((".keras", ".weights.h5")):
            names = ", ".join(f"'{n}'" for n in ("imagenet", *weights_lib.pretrained_names()))
            raise UserError(f"initial_weights={c.initial_weights} must be one of {names}, a "
                            ".keras file or a .weights.h5 file")
        if not os.path.isfile(path):
            raise UserError(f"initial_weights file {path} does not exist")
    image_size = arch.default_size if c.image_size is None else c.image_size
    if image_size < arch.min_size:
        raise UserError(f"image_size={image_size} is too small for {variant}; use at "
                        f"least {arch.min_size}")
    dataset = c.dataset or recipe.dataset
    values = {f.name: getattr(c, f.name) for f in dataclasses.fields(TrainConfig)}
    values.update(
        model=variant, model_options=options, recipe=recipe.name,
        recipe_reference=recipe.reference, architecture=dataclasses.asdict(arch),
        dataset=dataset, epochs=epochs, batch_size=batch_size, image_size=image_size,
        model_dir=c.model_dir or default_model_dir(c),
        **{key: given[key] if getattr(c, key) is None else getattr(c, key)
           for key in given})
    resolved = ResolvedConfig(**values)
    for ok, message in (
            (resolved.learning_rate > 0, "learning_rate must be positive"),
            (resolved.weight_decay >= 0, "weight_decay must be at least 0"),
            (0 <= resolved.momentum < 1, "momentum must be at least 0 and below 1"),
            (0 <= resolved.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 <= resolved.ema_decay < 1, "ema_decay must be in [0, 1) (0: no average)"),
            (resolved.ema_bn_batches >= 0, "ema_bn_batches must be at least 0 (0: the "
                                           "average keeps the running BN statistics)"),
            (0 <= resolved.cutout <= resolved.image_size,
             f"cutout must be from 0 (none) to image_size={resolved.image_size}"),
            (resolved.augment or not resolved.cutout,
             "cutout works on augmented images only; drop cutout or keep augment on")):
        if not ok:
            raise UserError(message)
    return resolved


def recipe_values(recipe: Recipe, *, epochs: int, batch_size: int) -> dict[str, Any]:
    """The training options ``recipe`` gives a run of ``epochs`` epochs at ``batch_size``.

    The learning rate follows the recipe's scaling rule (``base_lr x batch_size /
    reference_batch``); a ``warmup_fraction`` becomes that fraction of ``epochs``.
    """
    return {
        "lr_schedule": recipe.lr_schedule,
        "warmup_epochs": (recipe.warmup_epochs if recipe.warmup_fraction is None
                          else round(recipe.warmup_fraction * epochs, 3)),
        "weight_decay": recipe.weight_decay, "label_smoothing": recipe.label_smoothing,
        "nesterov": recipe.nesterov, "ema_decay": recipe.ema_decay,
        "ema_bn_batches": recipe.ema_bn_batches, "cutout": recipe.cutout,
        "learning_rate": recipe.base_lr * batch_size / recipe.reference_batch,
    }


def recipe_changes(values: dict[str, Any]) -> dict[str, Any] | None:
    """The training options of a run that differ from what its recipe gives.

    ``values`` is a run's resolved options (its ``config.json``). A batch size other than
    the recipe's is a change, the learning rate only where it departs from the recipe's
    scaling rule at that batch size; the warm-up is compared at the run's epochs, and the
    average's BN batches only when the run keeps an average. None for a run that names
    no recipe.

    Example:
        >>> recipe_changes(dataclasses.asdict(resolve(TrainConfig(
        ...     depth=44, recipe="fast", epochs=60, label_smoothing=0.1))))
        {'label_smoothing': 0.1}
    """
    recipe = RECIPES.get(values.get("recipe"))
    if recipe is None:
        return None
    batch_size = values.get("batch_size", recipe.batch_size)
    # optimizer, momentum and augment have TrainConfig defaults rather than recipe values
    fixed = {f.name: f.default for f in dataclasses.fields(TrainConfig)
             if f.name in ("optimizer", "momentum", "augment")}
    expected = {"batch_size": recipe.batch_size, **fixed,
                **recipe_values(recipe, epochs=values.get("epochs", recipe.epochs),
                                batch_size=batch_size)}
    if not values.get("ema_decay"):
        del expected["ema_bn_batches"]
    changes = {}
    for key, want in expected.items():
        got = values.get(key, want)
        same = (math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
                if isinstance(want, float) and isinstance(got, int | float) else got == want)
        if not same:
            changes[key] = got
    return changes


def checkpoint_interval(resolved: ResolvedConfig, steps_per_epoch: int) -> int:
    """Steps between mid-epoch checkpoints (0: epoch ends only).

    By default an epoch of :data:`LONG_EPOCH_STEPS` steps or more (ImageNet: 5,004 at batch
    256) is checkpointed every tenth of an epoch, so a crash or SIGKILL costs at most that
    (minutes of GPU time, against hours for a whole epoch), while ResNet-50's ~200 MB
    checkpoint, ten times an epoch, costs a second or two in each of those minutes. Short
    epochs (CIFAR: 703 steps at batch 64) are checkpointed at their ends only.
    """
    if resolved.checkpoint_every_steps is not None:
        return resolved.checkpoint_every_steps
    return steps_per_epoch // 10 if steps_per_epoch >= LONG_EPOCH_STEPS else 0


def default_model_dir(config: TrainConfig) -> str:
    """``runs/<model>_<dataset>``, with the names as given (``default`` for no dataset)."""
    name = config.model or f"resnet{config.depth}"
    return os.path.join("runs", f"{name}_{config.dataset or 'default'}")


def _check(c: TrainConfig, *, epochs, batch_size, warmup):
    checks = [
        (isinstance(epochs, int) and epochs >= 1, "epochs must be at least 1"),
        (isinstance(batch_size, int) and batch_size >= 1,
         "batch_size must be a positive integer"),
        (0 <= warmup < epochs, "warmup_epochs must be below epochs"),
        (0 <= c.val_fraction < 1, "val_fraction must be at least 0 and below 1"),
        (c.steps_per_epoch is None or c.steps_per_epoch >= 1,
         "steps_per_epoch must be at least 1"),
        (0 <= c.freeze_backbone_epochs < epochs, "freeze_backbone_epochs must be below epochs"),
        (c.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
        (c.checkpoint_every_steps is None or c.checkpoint_every_steps >= 0,
         "checkpoint_every_steps must be at least 0"),
        (c.cache_budget_mb >= 0, "cache_budget_mb must be at least 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if c.freeze_backbone_epochs and not c.initial_weights:
        raise UserError("freeze_backbone_epochs needs initial_weights (a pretrained backbone "
                        "to keep frozen)")


def _check_shipped(name: str, variant: str) -> None:
    """Refuses shipped weights ``name`` that this package has for other variants only."""
    if weights_lib.pretrained(variant, name) is not None:
        return
    have = [v for v, entries in weights_lib.PRETRAINED.items() if name in entries]
    choices = [f"'{n}'" for n in weights_lib.PRETRAINED.get(variant, {})]
    if variant in weights_lib.IMAGENET_WEIGHTS:
        choices.insert(0, "'imagenet'")
    raise UserError(f"initial_weights='{name}' is not available for {variant} (it exists for "
                    f"{', '.join(have)}); for {variant} choose "
                    f"{', '.join(choices + ['a .keras file', 'a .weights.h5 file'])}")


def _variant(c: TrainConfig):
    if (c.depth is None) == (c.model is None):
        raise UserError("pass exactly one of depth (e.g. 50, 20) or model (e.g. resnet56)")
    try:
        if c.depth is not None:
            return configs.config_for_depth(c.depth)
        return configs.resolve_variant(c.model)
    except ValueError as e:
        raise UserError(str(e)) from e


def recorded_config(values: dict[str, Any]) -> dict[str, Any]:
    """A run's config.json values, with :data:`ADDED_OPTIONS` where the run predates them."""
    return {**ADDED_OPTIONS, **values}


def resume_conflicts(old: dict[str, Any], new: ResolvedConfig) -> list[str]:
    """Options of ``new`` that differ from a run's recorded config, as ``name=old->new``.

    Options in :data:`RESUMABLE_CHANGES` may change; everything else decides what the run
    computes, so a resumed run must keep it. A run recorded before an option of
    :data:`ADDED_OPTIONS` existed ran with its value there.
    """
    conflicts = []
    old = recorded_config(old)
    # Compared as config.json stores them (tuples become lists).
    for key, value in json.loads(json.dumps(new.to_dict())).items():
        if key in RESUMABLE_CHANGES or key not in old:
            continue
        before = old[key]
        if before != value and not _same_path(key, before, value):
            conflicts.append(f"{key}={before!r} -> {value!r}")
    return conflicts


def _same_path(key, before, value):
    if key != "data_dir" or not before or not value:
        return False
    return os.path.realpath(os.path.expanduser(before)) == os.path.realpath(
        os.path.expanduser(value))
