"""Why a post-training int8 file loses accuracy, and the repair: keep a few layers in float.

:func:`layer_errors` runs TFLite's quantization debugger
(``tf.lite.experimental.QuantizationDebugger``) on the calibrated model: every quantized op
is checked against the same op computed in float on its (dequantized) int8 input, on
training images, so each layer's figure is the error that layer adds. The ranking figure
is the mean per-channel noise-to-signal ratio of the op's output (``channel_nsr``: for
each output channel, mean squared quantization error over mean squared value, averaged
over the channels). An int8 tensor shares one scale over all channels, so one channel with
a range far beyond the others leaves the rest a few int8 steps: their values, and so this
ratio, collapse while the debugger's own ``rmse/scale`` (error in units of the int8 step)
still reads the ~0.29 of plain rounding. Both are reported.

:func:`convert_keep_float` re-quantizes the calibrated model with named layers left in
float (``QuantizationDebugOptions(denylisted_nodes=...)``): a layer "kept float" keeps its
output tensor float, so the op writing it and the ops reading it (through PAD/RESHAPE) run
in float, with QUANTIZE/DEQUANTIZE ops at the borders. The file keeps builtin ops only.
:func:`repair` keeps the layers with the largest error in float, a few at a time, until the
file is within the accuracy limit (Wu et al. 2020, "Integer Quantization for Deep Learning
Inference", §6: partial quantization, leaving the most sensitive layers unquantized).

Example:
    >>> session = Debugger(model, representative)
    >>> errors = session.layer_errors()              # largest first
    >>> content = session.convert_keep_float([errors[0].layer])
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Callable, Sequence

import numpy as np

from keras_resnet.pipeline.deploy import tflite
from keras_resnet.pipeline.errors import ExportError, first_line

# Ops that move int8 values without arithmetic: a float tensor passes through them float.
PASS_THROUGH = ("PAD", "PADV2", "RESHAPE", "MAX_POOL_2D")
# Ops whose output is worth keeping float (they compute; QUANTIZE & co. only convert).
CANDIDATE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "MEAN",
                 "AVERAGE_POOL_2D", "TRANSPOSE_CONV")
DEBUG_IMAGES = 64
AUTO = "auto"


@dataclasses.dataclass
class LayerError:
    """The quantization error one layer adds.

    Attributes:
        layer: the Keras layer whose output the op computes (the name ``keep_float`` takes).
        op: the TFLite op.
        channel_nsr: mean per-channel noise-to-signal ratio of its int8 output.
        rmse_scale: root-mean-square error in units of the int8 step (0.29 is rounding).
        tensor: the TFLite tensor name of the output.
    """

    layer: str
    op: str
    channel_nsr: float
    rmse_scale: float
    tensor: str


def channel_nsr(float_values, quantized, scale, zero_point) -> float:
    """Mean over channels (last axis) of mean squared error / mean squared float value."""
    f = np.asarray(float_values, np.float64)
    q = (np.asarray(quantized, np.float64) - zero_point) * scale
    axes = tuple(range(f.ndim - 1))
    signal = np.mean(f ** 2, axis=axes)
    noise = np.mean((q - f) ** 2, axis=axes)
    live = signal > 0
    return float(np.mean(noise[live] / signal[live])) if live.any() else 0.0


# Keras layers that own a computing op (the BN and ReLU fused into a conv are not).
OWNER_LAYERS = ("Conv2D", "DepthwiseConv2D", "Dense", "Add", "Multiply",
                "GlobalAveragePooling2D", "AveragePooling2D", "Conv2DTranspose")


def layer_name(tensor: str, layers: dict[str, str]) -> str | None:
    """The Keras layer a TFLite tensor's op computes, from its (fused) name.

    ``layers`` maps layer names to class names; a layer of :data:`OWNER_LAYERS` named in
    the tensor name wins over the layers fused into it, e.g.
    ``r/conv2_block1_1_relu_1/Relu;r/conv2_block1_1_bn_1/add;r/conv2_block1_1_conv_1/conv``
    -> ``conv2_block1_1_conv``.
    """
    found = []
    for part in tensor.split(";"):
        for scope in part.split("/"):
            for name in (scope, re.sub(r"_\d+$", "", scope)):
                if name in layers and name not in found:
                    found.append(name)
    owners = [name for name in found if layers[name] in OWNER_LAYERS]
    return (owners or found or [None])[-1]


class Debugger:
    """One calibration of a model, diagnosed and re-quantized with layers kept float.

    Args:
        model: the float Keras model (ending in its softmax, as exported).
        representative: float32 raw-pixel training images calibrating the int8 file.
        debug_images: how many of them the per-layer error is measured on.

    Raises:
        ExportError: the model does not convert or calibrate.
    """

    def __init__(self, model, representative: np.ndarray, *, debug_images: int = DEBUG_IMAGES):
        import tensorflow as tf

        self.layers = {layer.name: type(layer).__name__ for layer in model.layers}
        images = np.asarray(representative, np.float32)[:max(1, debug_images)]

        def debug_dataset():
            for image in images:
                yield [image[None]]

        self._options = tf.lite.experimental.QuantizationDebugOptions
        converter = tflite.converter(model, "ptq_int8", representative=representative)
        try:
            with tflite.quiet_conversion():
                self._debugger = tf.lite.experimental.QuantizationDebugger(
                    converter=converter, debug_dataset=debug_dataset,
                    debug_options=self._options(
                        layer_direct_compare_metrics={"channel_nsr": channel_nsr}))
        except Exception as e:  # noqa: BLE001 - the converter raises many types
            raise ExportError(f"the quantization debugger could not calibrate the model "
                              f"({first_line(e)})") from None
        self._errors = None

    def layer_errors(self) -> list[LayerError]:
        """Every computing layer's error, largest ``channel_nsr`` first."""
        if self._errors is None:
            with tflite.quiet_conversion():
                self._debugger.run()
                dump = io.StringIO()
                self._debugger.layer_statistics_dump(dump)
                _, names = tflite.graph(self._debugger.get_debug_quantized_model())
            errors = []
            for row in csv.DictReader(io.StringIO(dump.getvalue())):
                tensor = names[int(row["tensor_idx"])]
                layer = layer_name(tensor, self.layers)
                if row["op_name"] not in CANDIDATE_OPS or layer is None:
                    continue
                scale = float(row["scale"] or 0)
                mse = float(row["mean_squared_error"])
                errors.append(LayerError(
                    layer=layer, op=row["op_name"], channel_nsr=float(row["channel_nsr"]),
                    rmse_scale=float(np.sqrt(mse)) / scale if scale else 0.0, tensor=tensor))
            self._errors = sorted(errors, key=lambda e: -e.channel_nsr)
        return self._errors

    def convert_keep_float(self, layers: Sequence[str]) -> tuple[bytes, list[str]]:
        """The int8 file with ``layers`` (Keras layer names) kept float.

        Returns:
            The flatbuffer, and every layer that runs in float in it (the named ones and
            the ones reading their outputs).

        Raises:
            ExportError: a name that is not a quantized layer of the model.
        """
        errors = {e.layer: e for e in self.layer_errors()}
        unknown = [name for name in layers if name not in errors]
        if unknown:
            raise ExportError(f"keep_float={','.join(unknown)} names no quantized layer of "
                              f"the model; choose from {', '.join(sorted(errors)[:8])}, ... "
                              "(the export's layer-error table lists them) or auto")
        with tflite.quiet_conversion():
            ops, names = tflite.graph(self._debugger.get_nondebug_quantized_model())
        readers: dict[int, list[tflite.Op]] = {}
        output_of = {}  # layer -> index of the tensor its op writes
        for op in ops:
            for i in op.inputs:
                readers.setdefault(i, []).append(op)
            if op.name in CANDIDATE_OPS and op.outputs:
                owner = layer_name(names[op.outputs[0]], self.layers)
                output_of.setdefault(owner, op.outputs[0])
        keep = set()
        for name in layers:
            if name not in output_of:
                raise ExportError(f"the int8 model has no op computing layer {name}")
            keep.add(names[output_of[name]])
            pending = [output_of[name]]
            while pending:  # the readers of the float tensor, through data-moving ops
                for op in readers.get(pending.pop(), []):
                    keep.update(names[o] for o in op.outputs)
                    if op.name in PASS_THROUGH:
                        pending.extend(op.outputs)
        self._debugger.options = self._options(denylisted_nodes=sorted(keep))
        try:
            with tflite.quiet_conversion():
                content = self._debugger.get_nondebug_quantized_model()
        finally:
            self._debugger.options = self._options()
        op_of = {names[o]: op.name for op in ops for o in op.outputs}
        # A tensor no layer names (the final softmax's) is named by its op.
        float_layers = sorted({layer_name(t, self.layers) or op_of.get(t, t) for t in keep})
        return content, float_layers


@dataclasses.dataclass
class Repair:
    """What :func:`repair` did.

    Attributes:
        content: the file it settled on.
        kept: the layers named to stay float (largest error first).
        float_layers: every layer that runs in float in the file.
        top1: its top-1 (%) on the scoring images.
        steps: ``(layers named, top-1)`` of each file tried, in order.
        within: whether ``top1`` is within the limit.
    """

    content: bytes
    kept: list[str]
    float_layers: list[str]
    top1: float
    steps: list[tuple[int, float]]
    within: bool


def repair(session: Debugger, score: Callable[[bytes], float], *, target: float,
           plain: bytes | None = None, step: int = 2, max_layers: int | None = None,
           log: Callable[[str], None] = print) -> Repair:
    """Keeps the layers with the largest error float, ``step`` at a time, until
    ``score(file) >= target``.

    Args:
        session: the calibrated model.
        score: file content -> top-1 (%) on the validation images.
        target: the top-1 to reach (Keras float top-1 minus the allowed drop).
        plain: the all-int8 file, tried first (None: start with ``step`` layers float).
        step: layers added per round.
        max_layers: the most layers named (default: all candidates).
        log: progress lines.
    """
    order = [e.layer for e in session.layer_errors()]
    limit = len(order) if max_layers is None else min(max_layers, len(order))
    steps = []
    if plain is not None:
        top1 = score(plain)
        steps.append((0, top1))
        log(f"keep_float=auto: all layers int8: top-1 {top1:.2f}%")
        if top1 >= target:
            return Repair(plain, [], [], top1, steps, True)
    count, content, floats, top1 = 0, plain, [], steps[-1][1] if steps else float("nan")
    while count < limit:
        count = min(count + step, limit)
        content, floats = session.convert_keep_float(order[:count])
        top1 = score(content)
        steps.append((count, top1))
        log(f"keep_float=auto: {count} layer(s) float ({', '.join(order[:count])}): "
            f"top-1 {top1:.2f}%")
        if top1 >= target:
            return Repair(content, order[:count], floats, top1, steps, True)
    return Repair(content, order[:count], floats, top1, steps, False)


def format_layer_errors(errors: Sequence[LayerError], *, top: int = 10) -> str:
    """The layers adding most error, as a Markdown table."""
    lines = [f"Per-layer int8 error (TFLite quantization debugger), largest {top}:", "",
             "| layer | op | channel NSR | rmse/scale |", "|---|---|---:|---:|"]
    lines += [f"| {e.layer} | {e.op} | {e.channel_nsr:.4g} | {e.rmse_scale:.3f} |"
              for e in errors[:top]]
    return "\n".join(lines)


def parse_keep_float(value) -> str | list[str] | None:
    """``keep_float`` as given (None, "auto", "a,b" or a list) -> None, "auto" or names."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    names = [v.strip() for v in value if v.strip()]
    if names == [AUTO]:
        return AUTO
    if AUTO in names:
        raise ExportError("keep_float takes auto or layer names, not both")
    return names or None
