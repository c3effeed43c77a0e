"""Optimisation: learning-rate schedule, optimizer, weight decay and compile.

Training and the benchmarks prepare a model the same way, through
:func:`prepare_for_training` (or its parts), on any Keras backend: this module needs Keras
only.
"""

from __future__ import annotations

import keras

from keras_resnet.pipeline.config import STEP_BOUNDARIES, ResolvedConfig


def add_weight_decay(model: keras.Model, weight_decay: float) -> None:
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


def make_schedule(kind: str, learning_rate: float, *, total_steps: int, warmup_steps: int):
    """Learning-rate schedule over optimizer steps, from built-in Keras schedules.

    "cosine" decays to zero after a linear warm-up from zero (Goyal et al. 2017;
    Loshchilov & Hutter 2017); "step" divides by 10 at 50% and 75% of training, after
    ``warmup_steps`` at a tenth of the rate (He et al. 2015); "constant" keeps the rate.
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


def make_optimizer(resolved: ResolvedConfig, schedule) -> keras.optimizers.Optimizer:
    """The run's optimizer over ``schedule``; AdamW's decay skips BN parameters and biases."""
    name = resolved.optimizer
    if name == "sgd":
        return keras.optimizers.SGD(schedule, momentum=resolved.momentum,
                                    nesterov=resolved.nesterov)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(schedule, momentum=resolved.momentum)
    if name == "adam":
        return keras.optimizers.Adam(schedule)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=resolved.weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return optimizer


def compile_model(model: keras.Model, resolved: ResolvedConfig, optimizer, num_classes: int,
                  *, jit_compile: bool = False) -> None:
    """Compiles with cross-entropy on logits (with the run's label smoothing) and top-1/5."""
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(5, name="top5"))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=resolved.label_smoothing),
        metrics=metrics, jit_compile=jit_compile)


def prepare_for_training(model: keras.Model, resolved: ResolvedConfig, num_classes: int, *,
                         steps_per_epoch: int, jit_compile: bool = False):
    """Weight decay, schedule, optimizer and compile, as a run of ``resolved`` does.

    Returns:
        The optimizer.
    """
    if resolved.optimizer != "adamw":
        add_weight_decay(model, resolved.weight_decay)
    optimizer = make_optimizer(resolved, run_schedule(resolved, steps_per_epoch))
    compile_model(model, resolved, optimizer, num_classes, jit_compile=jit_compile)
    return optimizer


def run_schedule(resolved: ResolvedConfig, steps_per_epoch: int):
    """The learning-rate schedule of a whole run of ``resolved``."""
    return make_schedule(resolved.lr_schedule, resolved.learning_rate,
                         total_steps=steps_per_epoch * resolved.epochs,
                         warmup_steps=int(round(resolved.warmup_epochs * steps_per_epoch)))
