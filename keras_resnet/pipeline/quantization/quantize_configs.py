"""Which layers quantize how: tfmot's 8-bit scheme plus this package's QuantizeConfigs.

tfmot's default 8-bit scheme knows conv/BN/ReLU/Add/pooling/Dense layers. The rest of the
family is handled here:

* BatchNormalization that does not directly follow a linear Conv2D (pre-activation
  ResNets, Wide ResNets) is first folded into an exact 1x1 depthwise conv
  (:mod:`~keras_resnet.pipeline.quantization.bn_folding`);
* ``Multiply`` of squeeze-and-excitation and ``Rescaling`` of ``residual_scale`` get
  :func:`output_quantize_config` (quantize the output only).

The frozen 1x1 convs (input normalisation ``preprocess`` and CIFAR option-A shortcuts) are
stock Conv2D layers and quantize per channel exactly (one non-zero weight per channel).

Importing tfmot sets ``TF_USE_LEGACY_KERAS=1`` for the whole process, so it is imported
only inside the functions that need it, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import functools

from keras_resnet.pipeline.errors import QuantizeError, first_line
from keras_resnet.pipeline.quantization.bn_folding import fold_standalone_batch_norm

# ----------------------------------------------------------------------------------------
# Which layers need a custom QuantizeConfig, and which variants cannot be quantized.


# Layer types the 8-bit scheme here covers: tfmot's defaults, plus Multiply and Rescaling
# (OutputQuantizeConfig) and standalone BN (folded into a depthwise conv first).
QUANTIZABLE_LAYERS = (
    "InputLayer", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU", "Add",
    "ZeroPadding2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "Multiply",
    "Rescaling", "Dropout", "Dense", "Activation",
)
# Activations fused into Conv2D/Dense that TFLite runs in int8.
QUANTIZABLE_ACTIVATIONS = ("linear", "relu", "sigmoid", "softmax")
# tfmot's graph transformer re-scans the whole graph after every rewrite, so wrapping
# takes time quadratic in the layer count: 14 s for ResNet-56 (200 layers), 45 s for
# PreAct-ResNet-164 (551), over 45 CPU-minutes without finishing for ResNet-1202 (~4,300).
MAX_QAT_LAYERS = 1500
_TOO_DEEP = ("it has about {layers} layers and tfmot's QAT graph transformer takes time "
             "quadratic in the layer count (ResNet-1202 did not finish in 45 CPU-minutes); "
             f"QAT handles up to {MAX_QAT_LAYERS} layers, use post-training quantization "
             "(export with modes=ptq_int8) instead")
# Table variants rejected before any work, with the reason.
UNQUANTIZABLE: dict[str, str] = {
    "resnet1202": _TOO_DEEP.format(layers="4,300"),
    "preact_resnet1001": _TOO_DEEP.format(layers="3,400"),
}


def check_variant(variant: str) -> None:
    """Rejects, before any work, a variant whose architecture QAT cannot handle.

    Raises:
        QuantizeError: saying why.
    """
    reason = UNQUANTIZABLE.get(variant)
    if reason:
        raise QuantizeError(f"{variant} cannot be quantized: {reason}")


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



def custom_config_for(layer):
    """The QuantizeConfig this module gives ``layer``, or None for tfmot's default."""
    import tf_keras

    if isinstance(layer, tf_keras.layers.Multiply | tf_keras.layers.Rescaling):
        return output_quantize_config()
    return None



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
            raise QuantizeError(f"{name} cannot be quantized: {first_line(e)}") from None
    return qat
