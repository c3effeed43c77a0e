"""The network of a run: built as it is saved, built as it trains, and saved.

A run trains :func:`build_training_model` (its dtype policy, the fused BatchNormalization
of :mod:`~keras_resnet.pipeline.training.fused_batch_norm`) and saves through :func:`save_model`,
which writes the weights into :func:`build_stock_model`, the stock float32 model of the same
architecture: every ``.keras`` file a run writes loads without custom objects on every
backend, in float32. Checkpoints (``.weights.h5``) are the same for both models, since
Keras keys them by layer class name and order, which the two share.

This module needs Keras only (TensorFlow is imported by the fused layer when it runs).
"""

from __future__ import annotations

import contextlib
import logging
import os

import keras

import keras_resnet
from keras_resnet import weights as weights_lib
from keras_resnet.pipeline.errors import UserError, first_line
from keras_resnet.pipeline.run import safe_writes
from keras_resnet.pipeline.run.config import ResolvedConfig, build_network
from keras_resnet.pipeline.training import fused_batch_norm, optimization

log = logging.getLogger(__name__)


def build_model(resolved: ResolvedConfig, num_classes: int, *,
                initial_weights: bool = True) -> keras.Model:
    """Builds the run's model as it is saved: stock layers, raw-pixel input, logits out.

    It is built in the current Keras dtype policy (float32 unless changed), with the run's
    ``initial_weights`` unless ``initial_weights=False``.
    """
    try:
        model = build_network(resolved.to_dict(), classes=num_classes)
    except ValueError as e:
        raise UserError(str(e)) from e
    if initial_weights and resolved.initial_weights:
        load_initial_weights(model, resolved)
    return model


def build_training_model(resolved: ResolvedConfig, num_classes: int, *,
                         policy: str = "float32") -> keras.Model:
    """The model a run trains: :func:`build_model`'s network computed in ``policy``, with
    the fused BatchNormalization layer when ``resolved.fused_batch_norm``.

    Layer names, weights and their order are :func:`build_model`'s, so checkpoints of either
    load into the other; save it with :func:`save_model`.
    """
    fused = fused_batch_norm.fused_layers() if resolved.fused_batch_norm else (
        contextlib.nullcontext())
    with dtype_policy(policy), fused:
        return build_model(resolved, num_classes)


def build_stock_model(resolved: ResolvedConfig, num_classes: int) -> keras.Model:
    """The stock float32 model that :func:`save_model` writes a trained model through."""
    with dtype_policy("float32"):
        return build_model(resolved, num_classes, initial_weights=False)


@contextlib.contextmanager
def dtype_policy(policy: str):
    """Sets the global Keras dtype policy for the models built inside, then restores it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def save_model(model: keras.Model, stock: keras.Model, path: str) -> None:
    """Saves a trained model as a stock float32 ``.keras`` file, through ``stock`` (its
    :func:`build_stock_model`).

    Weights and trainable flags are copied by layer name and, when both are compiled, the
    optimizer state by position, so the file is the one the run would have written had it
    trained with stock layers in float32: no fused layer class, no mixed dtype policy.
    """
    weights_lib.transfer_weights(model, stock)
    trainable = {layer.name: layer.trainable for layer in model.layers}
    for layer in stock.layers:
        layer.trainable = trainable[layer.name]
    source, target = (optimization.plain_optimizer(m) for m in (model, stock))
    if source is not None and target is not None and source.built and target.built:
        pairs = list(zip(target.variables, source.variables, strict=True))
        for a, b in pairs:
            a.assign(keras.ops.convert_to_numpy(b.value))
    safe_writes.save_atomic(path, stock.save)


def load_initial_weights(model: keras.Model, resolved: ResolvedConfig) -> None:
    """Sets every layer but the head from "imagenet", shipped weights such as "cifar10"
    (``keras_resnet.PRETRAINED``, read from the package) or a .keras / .weights.h5 file.

    The model stays one flat functional graph: weights are copied layer by layer by name
    from a source model, never by nesting that model.
    """
    from keras_resnet.pipeline.run.formats import check_file_format

    spec = resolved.initial_weights
    size = resolved.image_size
    check_file_format(spec)  # a .keras / .weights.h5 file that is something else
    if spec == "imagenet":
        try:
            source = keras_resnet.resnet(variant=resolved.model, weights="imagenet",
                                         include_top=False, include_preprocessing=True,
                                         input_shape=(size, size, 3))
        except Exception as e:  # download or file errors: report them in one sentence
            raise UserError(f"could not load the ImageNet weights of {resolved.model} "
                            f"({first_line(e)}); check the network or the keras cache "
                            "(~/.keras/models)") from e
        what = f"the ImageNet weights of {resolved.model}"
    elif weights_lib.pretrained(resolved.model, spec) is not None:
        try:
            source = keras_resnet.resnet(variant=resolved.model, weights=spec,
                                         include_top=False, input_shape=(size, size, 3))
        except ValueError as e:  # a damaged or unreadable file in the installed package
            raise UserError(first_line(e)) from e
        what = f"the shipped {spec} weights of {resolved.model}"
    elif spec.endswith(".keras"):
        what = os.path.expanduser(spec)
        try:
            source = keras.saving.load_model(what, compile=False, safe_mode=True)
        except Exception as e:
            raise UserError(f"could not load initial_weights {what} ({first_line(e)})") from e
    else:
        what = os.path.expanduser(spec)
        source = _model_for_weights_file(what, resolved)
    problem = weights_lib.mismatch(source, model, ignore=("predictions", "preprocess"))
    if problem:
        raise UserError(f"initial_weights {what} {problem}, so it is not a {model.name} "
                        "network")
    copied = weights_lib.transfer_weights(source, model, skip=("predictions",))
    log.info("initialised %d layers from %s; new head", copied, what)


def _model_for_weights_file(path: str, resolved: ResolvedConfig) -> keras.Model:
    """A model of the run's variant holding a Keras 3 .weights.h5 file (by layer order)."""
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
            source = build_network(resolved.to_dict(), classes=classes,
                                   include_top=bool(dense),
                                   include_preprocessing=preprocessing)
            source.load_weights(path)
            return source
        except Exception as e:
            errors.append(first_line(e))
    raise UserError(f"initial_weights {path} does not hold {resolved.model} weights "
                    f"({errors[0]})")
