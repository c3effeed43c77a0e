"""Optimisation: learning-rate schedule, optimizer, weight decay and compile.

Training and the benchmarks prepare a model the same way, through
:func:`prepare_for_training` (or its parts), on any Keras backend: this module needs Keras
only.
"""

from __future__ import annotations

import contextlib

import keras

from keras_resnet.pipeline.run.config import STEP_BOUNDARIES, ResolvedConfig


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
    """The run's optimizer over ``schedule``; AdamW's decay skips BN parameters and biases.

    With ``ema_decay``, the optimizer also keeps the weight average (Keras' ``use_ema``, in
    its variables, so checkpoints hold it and a resumed run continues it); ``fit`` then
    leaves the trained weights in the model, and the run decides whether to take the
    average (:func:`use_average`).
    """
    name = resolved.optimizer
    ema = ({"use_ema": True, "ema_momentum": resolved.ema_decay} if resolved.ema_decay
           else {})
    if name == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=resolved.momentum,
                                         nesterov=resolved.nesterov, **ema)
    elif name == "rmsprop":
        optimizer = keras.optimizers.RMSprop(schedule, momentum=resolved.momentum, **ema)
    elif name == "adam":
        optimizer = keras.optimizers.Adam(schedule, **ema)
    else:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=resolved.weight_decay,
                                           **ema)
        optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    if ema:
        # Keras' fit ends by overwriting the weights with the average; a run fits in
        # segments (phases, a resumed epoch), each of which must continue the trained
        # weights, so that overwrite is left to use_average.
        optimizer.finalize_variable_values = lambda var_list: None
    return optimizer


def plain_optimizer(model: keras.Model):
    """The model's optimizer without the LossScaleOptimizer that mixed_float16 wraps it in
    (None before compile)."""
    optimizer = getattr(model, "optimizer", None)
    return getattr(optimizer, "inner_optimizer", optimizer)


def _average_pairs(model: keras.Model):
    optimizer = plain_optimizer(model)
    if optimizer is None or not getattr(optimizer, "use_ema", False) or not optimizer.built:
        return []
    averages = optimizer._model_variables_moving_average  # noqa: SLF001 - Keras' own slots
    return [(v, a) for v, a in zip(model.trainable_variables, averages, strict=True)
            if a is not None]


def has_average(model: keras.Model) -> bool:
    """Whether the model's optimizer keeps a weight average (``ema_decay`` > 0)."""
    return bool(_average_pairs(model))


def start_average(model: keras.Model) -> None:
    """Starts the average at the current weights (an optimizer that takes over a run
    part-way: its step count is not 0, so Keras would average from zeros)."""
    plain_optimizer(model).build(model.trainable_variables)
    for variable, average in _average_pairs(model):
        average.assign(_copy(variable))


def _copy(variable):
    # On JAX, assign() keeps the very array it is given, and a train or test step donates
    # (frees) the model's arrays: a weight and its average must never share one.
    return keras.ops.copy(variable.value)


def _batch_norms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)]


def _moving_statistics(model: keras.Model) -> list:
    """Each BatchNormalization layer's moving mean and moving variance, in layer order."""
    return [v for layer in _batch_norms(model)
            for v in (layer.moving_mean, layer.moving_variance)]


def estimate_bn_statistics(model: keras.Model, batches) -> None:
    """Sets each BatchNormalization layer's moving mean and variance to the mean, over
    ``batches`` (an iterable of ``(images, labels)``), of the per-channel mean and variance
    its input has in a training-mode forward pass ("precise BN": Wu & Johnson 2021,
    Rethinking "Batch" in BatchNorm, section 3).

    The running statistics belong to the weights they were updated with; a weight average
    scored with the trained weights' statistics scores lower than it should (BUILD.md
    "Training recipes"). The same batches give the same statistics.
    """
    layers = _batch_norms(model)
    if not layers:
        return
    inputs = keras.Model(model.input, [layer.input for layer in layers])

    def batch_moments(images):
        moments = []
        for x in inputs(images, training=True):
            x = keras.ops.cast(x, "float32")
            axes = list(range(len(x.shape) - 1))
            moments.append((keras.ops.mean(x, axes), keras.ops.var(x, axes)))
        return moments

    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        batch_moments = tf.function(batch_moments, reduce_retracing=True)

    sums, count = None, 0
    for images, *_ in batches:
        moments = batch_moments(images)
        sums = moments if sums is None else [
            (m0 + m, v0 + v) for (m0, v0), (m, v) in zip(sums, moments, strict=True)]
        count += 1
    if not count:
        raise ValueError("estimate_bn_statistics needs at least one batch")
    for layer, (mean, variance) in zip(layers, sums, strict=True):
        layer.moving_mean.assign(mean / count)
        layer.moving_variance.assign(variance / count)


class AverageBNStatistics:
    """The weight average's BatchNormalization statistics over fixed ``batches``, estimated
    (:func:`estimate_bn_statistics`) once per training step of the average.

    A run scores the average, may save it as its best model and may end with it, all at the
    same step; pass one of these as ``bn_batches`` to :func:`use_average` or
    :func:`swapped_average` and the batches are run through the model once per step, the
    later calls setting the statistics the first one estimated. The average must be in the
    model's weights when it is applied (as those two functions ensure).
    """

    def __init__(self, batches):
        self.batches = batches
        self.estimates = 0  # how many times the batches were run through a model
        self._optimizer = self._step = None  # of the values kept
        self._values = []

    def apply(self, model: keras.Model) -> None:
        """Sets the model's BN statistics to the average's at the optimizer's current step."""
        optimizer = plain_optimizer(model)
        step = int(keras.ops.convert_to_numpy(optimizer.iterations))
        variables = _moving_statistics(model)
        if optimizer is self._optimizer and step == self._step:
            for variable, value in zip(variables, self._values, strict=True):
                variable.assign(value)
            return
        estimate_bn_statistics(model, self.batches)
        self.estimates += 1
        self._optimizer, self._step = optimizer, step
        self._values = [keras.ops.convert_to_numpy(v.value) for v in variables]


def use_average(model: keras.Model, bn_batches=None) -> None:
    """Replaces the trained weights by their average, for good; with ``bn_batches``, the
    BatchNormalization statistics are then estimated for the average over those batches
    (:func:`estimate_bn_statistics`), or taken from an :class:`AverageBNStatistics`."""
    for variable, average in _average_pairs(model):
        variable.assign(_copy(average))
    if isinstance(bn_batches, AverageBNStatistics):
        bn_batches.apply(model)
    elif bn_batches is not None:
        estimate_bn_statistics(model, bn_batches)


@contextlib.contextmanager
def swapped_average(model: keras.Model, bn_batches=None):
    """The average in the model's weights for the duration of the block (to score or save
    it), with BatchNormalization statistics for it when ``bn_batches`` is given (batches or
    an :class:`AverageBNStatistics`, as in :func:`use_average`); the trained weights and
    their statistics come back afterwards."""
    pairs = _average_pairs(model)
    kept = [variable for variable, _ in pairs]
    if bn_batches is not None:
        kept += _moving_statistics(model)
    values = [keras.ops.convert_to_numpy(v.value) for v in kept]
    try:
        use_average(model, bn_batches)
        yield
    finally:
        for variable, value in zip(kept, values, strict=True):
            variable.assign(value)


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


def apply_weight_decay(model: keras.Model, resolved: ResolvedConfig) -> None:
    """The run's weight decay as an L2 penalty on the kernels (:func:`add_weight_decay`),
    unless the optimizer is AdamW, which decays the weights itself."""
    if resolved.optimizer != "adamw":
        add_weight_decay(model, resolved.weight_decay)


def prepare_for_training(model: keras.Model, resolved: ResolvedConfig, num_classes: int, *,
                         steps_per_epoch: int, jit_compile: bool = False):
    """Weight decay, schedule, optimizer and compile, as a run of ``resolved`` does.

    Returns:
        The optimizer.
    """
    apply_weight_decay(model, resolved)
    optimizer = make_optimizer(resolved, run_schedule(resolved, steps_per_epoch))
    compile_model(model, resolved, optimizer, num_classes, jit_compile=jit_compile)
    return optimizer


def run_schedule(resolved: ResolvedConfig, steps_per_epoch: int):
    """The learning-rate schedule of a whole run of ``resolved``."""
    return make_schedule(resolved.lr_schedule, resolved.learning_rate,
                         total_steps=steps_per_epoch * resolved.epochs,
                         warmup_steps=int(round(resolved.warmup_epochs * steps_per_epoch)))
