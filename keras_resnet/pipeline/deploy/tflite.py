"""TFLite conversion with builtin ops only, and the op audit of a ``.tflite`` flatbuffer.

TF fallback ("Flex") ops need a runtime Android apps do not ship, so every file is
converted with TFLite builtin ops only. :func:`audit` reads the flatbuffer and fails on any
custom or Flex op, and for int8 files on any CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED or
TRANSPOSE_CONV whose input, weights or output is not int8.

Example:
    >>> content = convert(model, "ptq_int8", representative=images[:200])
    >>> audit(content, int8=True).summary()
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io as io_lib
import warnings

import numpy as np

from keras_resnet.pipeline.errors import ExportError, choose, first_line
from keras_resnet.pipeline.run import layout

# mode -> output file in the run folder. "qat_int8" is the Android hand-off model.
FILES = layout.EXPORTED
MODES = tuple(FILES)
INT8_MODES = ("ptq_int8", "qat_int8")
IO_TYPES = ("float32", "int8", "uint8")
# Ops that carry the multiply-accumulates; in an int8 file all of them must run in int8.
MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


# ----------------------------------------------------------------------------------------
# Conversion.


def converter(model, mode: str, *, io: str = "float32",
              representative: np.ndarray | None = None):
    """The ``tf.lite.TFLiteConverter`` :func:`convert` runs, configured for ``mode``.

    Builtin ops only; ``optimizations=[DEFAULT]`` for every mode but float32; float16
    weights for float16; for ptq_int8 int8 kernels only, calibrated on ``representative``.
    Arguments and errors are those of :func:`convert`.
    """
    import tensorflow as tf

    choose("mode", mode, MODES, error=ExportError)
    choose("io", io, IO_TYPES, error=ExportError)
    if io != "float32" and mode not in INT8_MODES:
        raise ExportError(f"io={io} needs an int8 model; mode {mode} has float32 I/O")
    result = tf.lite.TFLiteConverter.from_keras_model(model)
    result.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if mode != "float32":
        result.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        result.target_spec.supported_types = [tf.float16]
    elif mode == "ptq_int8":
        if representative is None or len(representative) == 0:
            raise ExportError("full-integer quantization needs representative images from "
                              "the training data, and none were given")
        images = np.asarray(representative, dtype="float32")

        def samples():
            for image in images:
                yield [image[None]]

        result.representative_dataset = samples
        # Fail instead of silently keeping float kernels for ops without an int8 version.
        result.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if io != "float32":
        result.inference_input_type = result.inference_output_type = getattr(tf, io)
    return result


@contextlib.contextmanager
def quiet_conversion():
    """Keras 3 prints the exported signature to stdout; the converter warns that a QAT
    model's float input has no statistics, which is expected (the model quantizes it)."""
    with contextlib.redirect_stdout(io_lib.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Statistics for quantized inputs")
        yield


def convert(model, mode: str, *, io: str = "float32",
            representative: np.ndarray | None = None) -> bytes:
    """Converts a Keras model to a TFLite flatbuffer with builtin ops only.

    Args:
        model: the float Keras 3 model for "float32", "float16", "dynamic" and "ptq_int8";
            the ``tf_keras`` QAT model for "qat_int8".
        mode: one of :data:`MODES`. "dynamic" is dynamic-range quantization (int8 weights,
            float activations); "ptq_int8" is full-integer post-training quantization
            calibrated on ``representative``.
        io: input/output type, "float32" or, for int8 modes, "int8" or "uint8".
        representative: float32 raw-pixel images for "ptq_int8" calibration.

    Returns:
        The ``.tflite`` file content.

    Raises:
        ExportError: a bad mode/io combination, no representative data, or the converter
            needs an op outside the TFLite builtins.
    """
    configured = converter(model, mode, io=io, representative=representative)
    try:
        with quiet_conversion():
            return configured.convert()
    except Exception as e:  # noqa: BLE001 - the converter raises ConverterError and others
        raise ExportError(f"TFLite conversion ({mode}) failed with builtin ops only: "
                          f"{first_line(e)}") from None


# ----------------------------------------------------------------------------------------
# Op audit.


@dataclasses.dataclass
class Audit:
    """What a flatbuffer contains.

    Attributes:
        ops: op name -> count (custom ops as ``CUSTOM:<name>``).
        mac_types: for each MAC op, ``(op, input type, weight type, output type)``.
        input_type: type name of the first model input.
        output_type: type name of the first model output.
        num_outputs: width of the first model output (classes).
        ends_in_softmax: whether the output comes from a SOFTMAX (through any
            QUANTIZE/DEQUANTIZE after it).
        input_shape: shape of the first model input.
        metadata: names of the metadata entries (``TFLITE_METADATA`` when the file
            carries model metadata).
        activation_types: type name -> count of the tensors the ops compute (op outputs).
    """

    ops: collections.Counter
    mac_types: list
    input_type: str
    output_type: str
    num_outputs: int = 0
    ends_in_softmax: bool = False
    input_shape: tuple[int, ...] = ()
    metadata: tuple[str, ...] = ()
    activation_types: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)

    def problems(self, *, int8: bool) -> list[str]:
        """Violations of the export rules, empty when the file is fine."""
        found = [f"{op} ({n}x)" for op, n in sorted(self.ops.items())
                 if op.startswith("CUSTOM")]
        if found:
            found = [f"non-builtin op(s) {', '.join(found)}"]
        if int8:
            bad = collections.Counter(
                f"{op} with {i}/{w}/{o} input/weights/output"
                for op, i, w, o in self.mac_types if (i, w, o) != ("INT8", "INT8", "INT8"))
            found += [f"{text} ({n}x)" for text, n in sorted(bad.items())]
            if not self.mac_types:
                found.append("no int8 CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED at all")
        return found

    def summary(self) -> str:
        return ", ".join(f"{op} {n}" for op, n in self.ops.most_common())


def _unpack(content: bytes):
    """The flatbuffer as schema objects, the op name of each operator code and the names
    of the tensor types."""
    from tensorflow.lite.python import schema_py_generated as schema

    try:
        model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    except Exception as e:  # noqa: BLE001 - a corrupt buffer raises anything
        raise ExportError(f"not a TFLite flatbuffer ({first_line(e)})") from None
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    codes = []
    for code in model.operatorCodes:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        name = op_names.get(builtin, str(builtin))
        if name == "CUSTOM":
            custom = code.customCode
            custom = custom.decode() if isinstance(custom, bytes) else str(custom)
            name = f"CUSTOM:{custom}"
        codes.append(name)
    return model, codes, type_names


@dataclasses.dataclass(frozen=True)
class Op:
    """One operator of a flatbuffer's main graph (tensors by index)."""

    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


def graph(content: bytes) -> tuple[list[Op], list[str]]:
    """The operators of the main subgraph in execution order, and its tensor names."""
    model, codes, _ = _unpack(content)
    first = model.subgraphs[0]
    names = [t.name.decode() if isinstance(t.name, bytes) else str(t.name)
             for t in first.tensors]
    ops = [Op(codes[op.opcodeIndex], tuple(int(i) for i in op.inputs if i >= 0),
              tuple(int(i) for i in op.outputs if i >= 0)) for op in first.operators or []]
    return ops, names


def inspect(content: bytes) -> Audit:
    """Reads the ops and the types of the MAC ops of a ``.tflite`` flatbuffer."""
    model, codes, type_names = _unpack(content)
    ops = collections.Counter()
    activations = collections.Counter()
    mac = []
    first = model.subgraphs[0]
    for subgraph in model.subgraphs:
        tensors = subgraph.tensors
        for op in subgraph.operators or []:
            name = codes[op.opcodeIndex]
            ops[name] += 1
            activations.update(type_names[tensors[i].type] for i in op.outputs if i >= 0)
            if name in MAC_OPS:
                inputs = [tensors[i] for i in op.inputs if i >= 0]
                kinds = [type_names[t.type] for t in inputs[:2]]
                mac.append((name, *kinds, type_names[tensors[op.outputs[0]].type]))
    output = first.outputs[0]
    producer = {int(t): op for op in first.operators or [] for t in op.outputs}
    op = producer.get(int(output))
    while op is not None and codes[op.opcodeIndex] in ("QUANTIZE", "DEQUANTIZE"):
        op = producer.get(int(op.inputs[0]))
    shape = first.tensors[output].shape
    names = tuple((m.name.decode() if isinstance(m.name, bytes) else str(m.name))
                  for m in model.metadata or [])
    return Audit(ops=ops, mac_types=mac,
                 input_type=type_names[first.tensors[first.inputs[0]].type],
                 output_type=type_names[first.tensors[output].type],
                 num_outputs=int(shape[-1]) if shape is not None and len(shape) else 0,
                 ends_in_softmax=op is not None and codes[op.opcodeIndex] == "SOFTMAX",
                 input_shape=tuple(int(d) for d in first.tensors[first.inputs[0]].shape),
                 metadata=names, activation_types=activations)


def audit(content: bytes, *, int8: bool, name: str = "the model") -> Audit:
    """Checks a flatbuffer: builtin ops only; for ``int8`` every MAC op runs in int8.

    Raises:
        ExportError: naming what is wrong.
    """
    result = inspect(content)
    problems = result.problems(int8=int8)
    if problems:
        raise ExportError(f"{name} fails the op audit: {'; '.join(problems)}")
    return result
