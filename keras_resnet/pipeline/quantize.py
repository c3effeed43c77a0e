"""Quantization-aware training (QAT) of a trained run, and calibration data for PTQ.

tensorflow-model-optimization (tfmot) quantizes only Keras 2 (``tf_keras``) models, so QAT
works on a ``tf_keras`` twin built from the same architecture definition as the Keras 3
model of the run, with the weights copied by layer name (Jacob et al. 2018, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference").

tfmot's default 8-bit scheme knows conv/BN/ReLU/Add/pooling/Dense layers. The rest of the
family is annotated here with :func:`output_quantize_config` (quantize the output only):

* BatchNormalization that does not directly follow a linear Conv2D (pre-activation
  ResNets, Wide ResNets): TFLite runs it as an int8 MUL and ADD;
* ``Multiply`` of squeeze-and-excitation and ``Rescaling`` of ``residual_scale``.

The frozen 1x1 convs (input normalisation ``preprocess`` and CIFAR option-A shortcuts) are
stock Conv2D layers and quantize per channel exactly (one non-zero weight per channel).

Importing tfmot sets ``TF_USE_LEGACY_KERAS=1`` for the whole process, so it is imported
only inside the functions that need it, never when this module is imported.

Example:
    >>> run = read_run("runs/cifar_resnet20")
    >>> model = load_keras_model(run)
    >>> twin, diff = build_twin(run, model)
    >>> qat = quantize_model(twin)
    >>> calibrate(qat, train_ds)
    >>> fine_tune(qat, train_ds, val_ds, epochs=2)
    >>> save_qat(qat, run.path / "model_qat.h5")
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from keras_resnet.pipeline.data import UserError

RUN_FILES = ("model.keras", "config.json", "labels.txt")
CONFIG_KEYS = ("model", "num_classes", "image_size")
QAT_FILE = "model_qat.h5"
# Float outputs of the twin must match the Keras 3 model up to float32 rounding through
# ~100 layers; a wrong weight or layer order shows up as differences of order 1.
TWIN_TOLERANCE = 1e-3
# The model takes raw 0..255 pixels; pinning the input range makes its int8 scale exactly 1,
# so an 8-bit camera frame is the quantized input with no arithmetic.
PIXEL_RANGE = (0.0, 255.0)


class QuantizeError(UserError):
    """A run folder, architecture or data that cannot be quantized, in one sentence."""


@dataclasses.dataclass(frozen=True)
class Run:
    """A run folder written by tools/train.py.

    Attributes:
        path: the folder.
        config: the parsed ``config.json``.
        labels: class names in label order (``labels.txt``).
    """

    path: Path
    config: dict
    labels: tuple[str, ...]

    @property
    def variant(self) -> str:
        return self.config["model"]

    @property
    def architecture(self) -> dict:
        """The ``resnet()`` argument naming the architecture, as tools/train.py built it.

        Depths outside the variant table (e.g. 8 or 14) exist only through ``depth=``.
        """
        depth = self.config.get("depth")
        return {"depth": int(depth)} if depth is not None else {"variant": self.variant}

    @property
    def model_options(self) -> dict:
        options = dict(self.config.get("model_options") or {})
        # JSON has no tuples; ResNetConfig fields such as depths are tuples.
        return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.config["image_size"]
        return (int(size), int(size)) if isinstance(size, int | float) else tuple(size)[:2]


def read_run(run_dir) -> Run:
    """Reads and validates a run folder (model.keras, config.json, labels.txt).

    Raises:
        QuantizeError: the folder or one of its files is missing or incomplete.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise QuantizeError(f"run folder {path} does not exist; pass the --model_dir that "
                            "tools/train.py wrote")
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        raise QuantizeError(f"run folder {path} is incomplete: {', '.join(missing)} missing "
                            "(tools/train.py writes model.keras, config.json and labels.txt)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantizeError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    absent = [k for k in CONFIG_KEYS if not isinstance(config, dict) or k not in config]
    if absent:
        raise QuantizeError(f"{path / 'config.json'} lacks the key(s) {', '.join(absent)}")
    labels = tuple(line.strip() for line in (path / "labels.txt").read_text().splitlines()
                   if line.strip())
    if len(labels) != int(config["num_classes"]):
        raise QuantizeError(f"{path / 'labels.txt'} has {len(labels)} names but config.json "
                            f"says num_classes={config['num_classes']}")
    return Run(path=path, config=config, labels=labels)


def data_settings(run: Run, *, dataset: str | None = None, data_dir: str | None = None,
                  batch_size: int | None = None) -> dict:
    """``load_data``/``eval_data`` arguments reproducing the run's data and validation split.

    The run's ``val_fraction`` and ``seed`` carve exactly its validation images again.
    """
    config = run.config
    dataset = dataset or config.get("dataset")
    if not dataset:
        raise QuantizeError(f"{run.path / 'config.json'} names no dataset; pass --dataset")
    batch_size = int(batch_size or config.get("batch_size") or 64)
    if batch_size < 1:
        raise QuantizeError(f"--batch_size={batch_size} must be a positive integer")
    size = run.image_size
    if size[0] != size[1]:
        raise QuantizeError(f"image_size={list(size)} is not square; the input pipeline "
                            "makes square images")
    return {
        "dataset": dataset,
        "data_dir": data_dir or config.get("data_dir"),
        "image_size": size[0],
        "batch_size": batch_size,
        "val_fraction": float(config.get("val_fraction", 0.1)),
        "seed": int(config.get("seed", 0)),
        "num_classes": run.num_classes if dataset == "synthetic" else None,
    }


def take(dataset, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num_samples`` ``(images, labels)`` of a batched dataset, as arrays."""
    images, labels, count = [], [], 0
    for x, y in dataset:
        images.append(np.asarray(x, dtype="float32")[: num_samples - count])
        labels.append(np.asarray(y)[: num_samples - count])
        count += len(images[-1])
        if count >= num_samples:
            break
    if not count:
        return np.zeros((0,), "float32"), np.zeros((0,), "int32")
    return np.concatenate(images), np.concatenate(labels)


def load_keras_model(run: Run):
    """Loads the run's Keras 3 ``model.keras``.

    Raises:
        QuantizeError: the file is not a loadable Keras model.
    """
    import keras

    path = run.path / "model.keras"
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a bad archive
        raise QuantizeError(f"{path} cannot be loaded as a Keras model ({_first_line(e)})") \
            from None


def check_architecture(run: Run, model) -> None:
    """Checks that ``model`` is the architecture ``config.json`` describes.

    Builds the Keras 3 model of the config (no weights) and compares the names and shapes
    of all weighted layers.

    Raises:
        QuantizeError: the config names no buildable ResNet, or the model differs from it.
    """
    import keras_resnet

    try:
        reference = keras_resnet.resnet(
            **run.architecture, classes=run.num_classes, input_shape=tuple(
                model.input_shape[1:]), include_preprocessing=True,
            classifier_activation=None, **run.model_options)
    except (ValueError, TypeError) as e:
        raise QuantizeError(f"{run.path / 'config.json'} describes no ResNet this package "
                            f"builds ({_first_line(e)})") from None
    _compare_layers(model, reference, run)


def _compare_layers(model, reference, run: Run) -> None:
    def shapes(m):
        return {layer.name: [tuple(w.shape) for w in layer.weights]
                for layer in m.layers if layer.weights}

    got, want = shapes(model), shapes(reference)
    source = run.path / "model.keras"
    what = f"{source} is not the {run.variant} that config.json describes"
    extra = sorted(set(got) - set(want))
    if extra:
        raise QuantizeError(f"{what}: it has layer(s) {', '.join(extra[:3])} that "
                            f"{run.variant} lacks")
    missing = sorted(set(want) - set(got))
    if missing:
        raise QuantizeError(f"{what}: it lacks layer(s) {', '.join(missing[:3])}")
    differ = [name for name in want if got[name] != want[name]]
    if differ:
        name = differ[0]
        raise QuantizeError(f"{what}: layer {name!r} has weight shapes {got[name]}, "
                            f"expected {want[name]}")


def build_twin(run: Run, model, *, sample: np.ndarray | None = None):
    """Builds the ``tf_keras`` twin of ``model`` and copies its weights by layer name.

    The twin is built from the architecture in ``config.json`` by the same code as the
    Keras 3 model, always in float32 (QAT fails under mixed precision).

    Args:
        run: the run, for the architecture (``model``, ``model_options``, ``num_classes``).
        model: the trained Keras 3 model.
        sample: images to compare float outputs on (default: 4 random images).

    Returns:
        ``(twin, max_abs_diff)``: the twin and the largest logit difference from ``model``.

    Raises:
        QuantizeError: the variant is unknown, or ``model`` is not that architecture.
    """
    import tf_keras

    import keras_resnet

    input_shape = tuple(model.input_shape[1:])
    try:
        with keras_resnet.layer_library(tf_keras):
            twin = keras_resnet.resnet(
                **run.architecture, classes=run.num_classes, input_shape=input_shape,
                include_preprocessing=True, classifier_activation=None, **run.model_options)
    except (ValueError, TypeError) as e:
        raise QuantizeError(f"{run.path / 'config.json'} describes no ResNet this package "
                            f"builds ({_first_line(e)})") from None
    source = run.path / "model.keras"
    _compare_layers(model, twin, run)
    try:
        keras_resnet.transfer_weights(model, twin)
    except ValueError as e:
        raise QuantizeError(f"{source} is not the {run.variant} that config.json describes "
                            f"({_first_line(e)})") from None
    if sample is None:
        sample = np.random.default_rng(0).uniform(0, 255, (4, *input_shape)).astype("float32")
    want = np.asarray(model(sample, training=False), dtype="float32")
    got = np.asarray(twin(sample, training=False), dtype="float32")
    diff = float(np.max(np.abs(want - got)))
    if not diff <= TWIN_TOLERANCE * max(1.0, float(np.max(np.abs(want)))):
        raise QuantizeError(f"the tf_keras twin of {source} differs from it by {diff:.3g} in "
                            "the logits; the saved model does not match its architecture")
    return twin, diff


# ----------------------------------------------------------------------------------------
# Which layers need a custom QuantizeConfig, and which variants cannot be quantized.


# Layer types the 8-bit scheme here covers: tfmot's defaults, plus Multiply and Rescaling
# (OutputQuantizeConfig) and standalone BN (folded into a depthwise conv first).
QUANTIZABLE_LAYERS = (
    "InputLayer", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU", "Add",
    "ZeroPadding2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "Multiply",
    "Rescaling", "Dropout", "Dense",
)
# Activations fused into Conv2D/Dense that TFLite runs in int8.
QUANTIZABLE_ACTIVATIONS = ("linear", "relu", "sigmoid")
# tfmot's graph transformer re-scans the whole graph after every rewrite, so wrapping
# takes time quadratic in the layer count: 14 s for ResNet-56 (200 layers), 45 s for
# PreAct-ResNet-164 (551), over 45 CPU-minutes without finishing for ResNet-1202 (~4,300).
MAX_QAT_LAYERS = 1500
_TOO_DEEP = ("it has about {layers} layers and tfmot's QAT graph transformer takes time "
             "quadratic in the layer count (ResNet-1202 did not finish in 45 CPU-minutes); "
             f"QAT handles up to {MAX_QAT_LAYERS} layers, use post-training quantization "
             "(tools/export_tflite.py --modes=ptq_int8) instead")
# Table variants rejected before any work, with the reason.
UNQUANTIZABLE: dict[str, str] = {
    "resnet1202": _TOO_DEEP.format(layers="4,300"),
    "preact_resnet1001": _TOO_DEEP.format(layers="3,400"),
}


def check_variant(run: Run) -> None:
    """Rejects, before any work, a run whose architecture QAT cannot handle.

    Raises:
        QuantizeError: saying why.
    """
    reason = UNQUANTIZABLE.get(run.variant)
    if reason:
        raise QuantizeError(f"{run.variant} cannot be quantized: {reason}")


def check_quantizable(model, *, name: str) -> None:
    """Rejects a float ``tf_keras`` model the 8-bit scheme here cannot quantize, saying why.

    Raises:
        QuantizeError: the variant is listed in :data:`UNQUANTIZABLE`, has more than
            :data:`MAX_QAT_LAYERS` layers, or a layer has a type, activation or dtype that
            has no 8-bit implementation here.
    """
    import tf_keras

    reason = UNQUANTIZABLE.get(name)
    if reason:
        raise QuantizeError(f"{name} cannot be quantized: {reason}")
    if len(model.layers) > MAX_QAT_LAYERS:
        raise QuantizeError(f"{name} cannot be quantized: "
                            + _TOO_DEEP.format(layers=f"{len(model.layers):,}"))
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in QUANTIZABLE_LAYERS:
            raise QuantizeError(f"{name} cannot be quantized: layer {layer.name!r} is a {kind}, "
                                "which has no 8-bit implementation in tfmot or here")
        activation = getattr(layer, "activation", None)
        if activation is not None:
            act = tf_keras.activations.serialize(activation)
            if act not in QUANTIZABLE_ACTIVATIONS:
                raise QuantizeError(f"{name} cannot be quantized: layer {layer.name!r} uses "
                                    f"activation {act!r}")
        if kind != "InputLayer" and layer.compute_dtype != "float32":
            raise QuantizeError(f"{name} cannot be quantized: layer {layer.name!r} computes "
                                f"in {layer.compute_dtype}; QAT needs a float32 model")


def _is_linear_conv(layer) -> bool:
    import tf_keras

    return (isinstance(layer, tf_keras.layers.Conv2D | tf_keras.layers.DepthwiseConv2D)
            and tf_keras.activations.serialize(layer.activation) == "linear")


def _folds_into_conv(bn) -> bool:
    """True when tfmot folds this BN into the conv before it (Conv2DBatchNormQuantize).

    tfmot matches conv -> BN only when the conv is linear and the BN is its only consumer.
    """
    inbound = bn.inbound_nodes[0].inbound_layers
    if isinstance(inbound, list):
        return False
    return _is_linear_conv(inbound) and len(inbound._outbound_nodes) == 1


def custom_config_for(layer):
    """The QuantizeConfig this module gives ``layer``, or None for tfmot's default."""
    import tf_keras

    if isinstance(layer, tf_keras.layers.Multiply | tf_keras.layers.Rescaling):
        return output_quantize_config()
    return None


def fold_standalone_batch_norm(model):
    """Replaces every BN that tfmot cannot fold into a conv by an equal 1x1 depthwise conv.

    A BN after an Add or a pool (pre-activation blocks) computes ``x * a + b`` per channel
    at inference. Quantized as a BN layer, TFLite would run it as float MUL and ADD between
    a DEQUANTIZE and a QUANTIZE, because the tensor between them has no range. As a 1x1
    DepthwiseConv2D with kernel ``a`` and bias ``b`` it is one int8 op whose per-channel
    weight quantization is exact (one weight per channel). Its statistics are frozen from
    then on, as in any BN folded for inference; ``a`` and ``b`` remain trainable.

    Args:
        model: a float ``tf_keras`` model (not modified).

    Returns:
        A ``tf_keras`` model computing the same function; the new layers keep the BN names.
    """
    import tf_keras

    folded = {}

    def clone(layer):
        if (isinstance(layer, tf_keras.layers.BatchNormalization)
                and not _folds_into_conv(layer)):
            folded[layer.name] = _affine_of(layer)
            return tf_keras.layers.DepthwiseConv2D(1, use_bias=True, name=layer.name)
        return layer

    if not any(isinstance(layer, tf_keras.layers.BatchNormalization)
               and not _folds_into_conv(layer) for layer in model.layers):
        return model
    result = tf_keras.models.clone_model(model, clone_function=clone)
    for name, (scale, offset) in folded.items():
        result.get_layer(name).set_weights([scale.reshape(1, 1, -1, 1), offset])
    return result


def _affine_of(bn):
    """The per-channel ``(a, b)`` of an inference-mode BN: ``y = x * a + b``."""
    weights = {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in bn.weights}
    mean, variance = weights["moving_mean"], weights["moving_variance"]
    gamma = weights.get("gamma", np.ones_like(mean))
    beta = weights.get("beta", np.zeros_like(mean))
    scale = gamma / np.sqrt(variance + bn.epsilon)
    return scale.astype("float32"), (beta - mean * scale).astype("float32")


@functools.cache
def _config_classes() -> dict[str, type]:
    """Defines the QuantizeConfig classes (needs tfmot, so only on first use)."""
    import tensorflow_model_optimization as tfmot

    class OutputQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
        """Quantizes a layer's output only; its weights (BN gamma/beta) stay float.

        TFLite folds BN parameters into int8 MUL/ADD constants at conversion; a Multiply or
        Rescaling has no weights. Only the output range has to be learned.
        """

        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return [tfmot.quantization.keras.quantizers.MovingAverageQuantizer(
                num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]

        def get_config(self):
            return {}

    return {"OutputQuantizeConfig": OutputQuantizeConfig}


def output_quantize_config():
    """A QuantizeConfig that quantizes only the output of a layer (8 bits, asymmetric)."""
    return _config_classes()["OutputQuantizeConfig"]()


@contextlib.contextmanager
def quantize_scope():
    """tfmot's ``quantize_scope`` with this module's QuantizeConfigs registered.

    Loading a QAT ``.h5`` file needs it.
    """
    import tensorflow_model_optimization as tfmot

    with tfmot.quantization.keras.quantize_scope(_config_classes()):
        yield


def quantize_model(twin, *, variant: str | None = None):
    """Wraps a float ``tf_keras`` ResNet for quantization-aware training.

    Args:
        twin: the float ``tf_keras`` model (see :func:`build_twin`).
        variant: its variant name, only for error messages.

    Returns:
        The QAT model: float weights, fake-quantized weights and activations.

    Raises:
        QuantizeError: the model contains a layer nothing here can quantize.
    """
    import tensorflow_model_optimization as tfmot
    import tf_keras

    qk = tfmot.quantization.keras
    name = variant or twin.name
    check_quantizable(twin, name=name)

    def annotate(layer):
        config = custom_config_for(layer)
        if config is None:
            return layer
        return qk.quantize_annotate_layer(layer, quantize_config=config)

    with quantize_scope():
        annotated = tf_keras.models.clone_model(fold_standalone_batch_norm(twin),
                                                clone_function=annotate)
        annotated = qk.quantize_annotate_model(annotated)
        try:
            qat = qk.quantize_apply(annotated)
        except (RuntimeError, ValueError) as e:
            raise QuantizeError(f"{name} cannot be quantized: {_first_line(e)}") from None
    return qat


# ----------------------------------------------------------------------------------------
# Range calibration, fine-tuning, saving.


def _quantize_wrappers(model) -> Iterator:
    for layer in model.layers:
        inner = getattr(layer, "layer", None)
        if inner is not None:
            yield layer, inner


@contextlib.contextmanager
def training_setup(model, *, freeze_bn: bool = True):
    """Makes a QAT model train only what the float model trained.

    tfmot's QuantizeWrapperV2 lists every quantized kernel as trainable, even of a layer
    built with ``trainable=False``, so fine-tuning would change the frozen ``preprocess``
    conv and option-A shortcut kernels. Inside this context each wrapper's trainable
    weights are exactly its layer's; the weight lists are restored on exit, so a saved
    ``.h5`` keeps tfmot's weight order (which loading relies on).

    Args:
        model: a QAT model.
        freeze_bn: also freeze every BN (statistics and gamma/beta): a short fine-tune at
            a low learning rate keeps the float run's statistics instead of re-estimating
            them from small batches.
    """
    import tf_keras

    saved = []
    for wrapper, inner in _quantize_wrappers(model):
        saved.append((wrapper, inner, list(wrapper._trainable_weights),
                      list(wrapper._non_trainable_weights), inner.trainable))
        if freeze_bn and isinstance(inner, tf_keras.layers.BatchNormalization):
            inner.trainable = False
        # tfmot moves a quantized kernel out of its layer into the wrapper's lists.
        kernels = [weight for weight, _, _ in getattr(wrapper, "_weight_vars", [])]
        own = {id(w) for w in [*inner.weights, *kernels]}
        rest = [w for w in wrapper._trainable_weights if id(w) not in own]
        # In place: assigning a list of variables to a layer attribute re-tracks them by
        # their own ``trainable`` flag, which is True for every kernel.
        if inner.trainable:
            wrapper._trainable_weights[:] = rest + kernels
        else:
            wrapper._trainable_weights[:] = rest
            wrapper._non_trainable_weights.extend(kernels)
    try:
        yield model
    finally:
        for wrapper, inner, trainable_weights, non_trainable_weights, trainable in saved:
            wrapper._trainable_weights[:] = trainable_weights
            wrapper._non_trainable_weights[:] = non_trainable_weights
            inner.trainable = trainable


@contextlib.contextmanager
def _range_tracking(decay):
    """Makes tfmot's activation-range EMAs use ``decay`` (a tf.Variable) while traced.

    tfmot hard-codes an EMA decay of 0.999 starting from [-6, 6]: a fine-tune of a few
    hundred steps would keep ranges far from the data. Calibration sets them directly.
    """
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    original = quant_ops.MovingAvgQuantize

    def tracked(*args, ema_decay=0.999, **kwargs):
        del ema_decay
        return original(*args, ema_decay=decay, **kwargs)

    quant_ops.MovingAvgQuantize = tracked
    try:
        yield
    finally:
        quant_ops.MovingAvgQuantize = original


def calibrate(qat_model, dataset, *, steps: int = 32) -> int:
    """Sets the QAT model's quantization ranges from data before fine-tuning.

    Runs ``steps`` batches in training mode with BN frozen and dropout off, so that the
    activation ranges become the mean of the per-batch min/max, and weight ranges are set.

    Args:
        qat_model: a model from :func:`quantize_model`.
        dataset: batches of ``(images, labels)`` or images.
        steps: batches to use.

    Returns:
        The batches used.

    Raises:
        QuantizeError: the dataset is empty.
    """
    import tensorflow as tf
    import tf_keras

    dropouts = {inner: inner.rate for _, inner in _quantize_wrappers(qat_model)
                if isinstance(inner, tf_keras.layers.Dropout)}
    for layer in dropouts:
        layer.rate = 0.0
    decay = tf.Variable(0.0, trainable=False, dtype=tf.float32)
    used = 0
    try:
        with _range_tracking(decay), training_setup(qat_model, freeze_bn=True):
            step = tf.function(lambda x: qat_model(x, training=True))
            for batch in dataset.take(steps):
                images = batch[0] if isinstance(batch, tuple | list) else batch
                decay.assign(used / (used + 1))  # running mean of the batch ranges
                step(images)
                used += 1
    finally:
        for layer, rate in dropouts.items():
            layer.rate = rate
    if not used:
        raise QuantizeError("the calibration dataset is empty; quantization ranges need images")
    return used


def pin_input_range(qat_model, low: float = PIXEL_RANGE[0], high: float = PIXEL_RANGE[1]):
    """Fixes the input quantization range to raw pixel values (int8 scale 1, exact)."""
    for layer in qat_model.layers:
        if type(layer).__name__ == "QuantizeLayer":
            for weight in layer.weights:
                if weight.name.endswith("_min:0"):
                    weight.assign(low)
                elif weight.name.endswith("_max:0"):
                    weight.assign(high)


def fine_tune(qat_model, train, val=None, *, epochs: int = 1, learning_rate: float = 1e-3,
              freeze_bn: bool = True, steps_per_epoch: int | None = None, verbose=2):
    """Fine-tunes a QAT model with SGD + momentum and a cosine-decayed low learning rate.

    Args:
        qat_model: a model from :func:`quantize_model` (already calibrated).
        train: batches of ``(raw pixels, integer labels)``.
        val: optional validation batches.
        epochs: passes over ``train``.
        learning_rate: initial learning rate; about 1% of the float run's is typical.
        freeze_bn: keep BN statistics and affine parameters of the float model.
        steps_per_epoch: limit each epoch (default: the whole dataset).
        verbose: Keras fit verbosity.

    Returns:
        The Keras History.
    """
    import tf_keras

    steps = steps_per_epoch
    if steps is None:
        cardinality = int(train.cardinality())
        steps = cardinality if cardinality > 0 else None
    schedule = learning_rate
    if steps:
        schedule = tf_keras.optimizers.schedules.CosineDecay(learning_rate, epochs * steps)
    with training_setup(qat_model, freeze_bn=freeze_bn):
        # Compiled inside the context so the optimizer sees the restricted weight lists.
        qat_model.compile(
            optimizer=tf_keras.optimizers.SGD(schedule, momentum=0.9),
            loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        history = qat_model.fit(train, validation_data=val, epochs=epochs,
                                steps_per_epoch=steps_per_epoch, verbose=verbose)
    pin_input_range(qat_model)
    return history


def save_qat(qat_model, path) -> None:
    """Saves a QAT model as ``.h5`` (a QAT ``.keras`` file does not load back)."""
    with quantize_scope(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are saving your model as an HDF5 file")
        qat_model.save(os.fspath(path), include_optimizer=False)


def load_qat(path):
    """Loads a QAT ``.h5`` model saved by :func:`save_qat`.

    Raises:
        QuantizeError: the file does not exist or is not a QAT model.
    """
    import tf_keras

    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"{path} does not exist; run tools/qat.py first")
    try:
        with quantize_scope():
            return tf_keras.models.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - h5 loading raises many types
        raise QuantizeError(f"{path} cannot be loaded as a QAT model ({_first_line(e)})") \
            from None


def representative_images(dataset, num_samples: int) -> np.ndarray:
    """Draws ``num_samples`` images (float32 raw pixels) from batches of a dataset.

    Raises:
        QuantizeError: the dataset yields no images.
    """
    images, count = [], 0
    for batch in dataset:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        x = np.asarray(x, dtype="float32")
        images.append(x[: num_samples - count])
        count += len(images[-1])
        if count >= num_samples:
            break
    if not count:
        raise QuantizeError("the representative dataset is empty: no training images found "
                            "for calibration")
    return np.concatenate(images)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."

