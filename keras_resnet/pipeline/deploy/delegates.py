"""Which accelerator delegates can run a ``.tflite`` file: the GPU-delegate verdict.

An app that picks LiteRT's GPU delegate learns on the phone which ops it could not take
("N operations will run on the CPU"). :func:`gpu_compatibility` says so before the file
ships: every op of the flatbuffer is checked against the builtin ops the GPU delegate
implements (the op list of TensorFlow's ``tensorflow/lite/tools/versioning/
gpu_compatibility.cc``, which the delegate itself consults), and the ops it lacks are named
as the ones that would fall back to the CPU.

TensorFlow's model analyzer (``tf.lite.experimental.Analyzer.analyze(...,
gpu_compatibility=True)``) is run as well and its warnings are kept, but on TF 2.21 (and in
ai-edge-litert 2.3) its GPU check passes every model: it prints "Your model looks
compatible with GPU delegate" for files holding TOPK_V2, LOG_SOFTMAX or REDUCE_ANY, which
the delegate does not implement. The verdict therefore comes from the op table here; the
analyzer's own line is reported beside it (``GpuVerdict.analyzer``).

Quantized files: the GPU delegate's default options (``TfLiteGpuDelegateOptionsV2Default``,
flag ``TFLITE_GPU_EXPERIMENTAL_FLAGS_ENABLE_QUANT``) accept int8/uint8 tensors and run the
graph dequantized, in float16/float32 on the GPU. Such a file runs on the GPU but gains
nothing over the float16 file there (and apps that build the delegate with quantized models
disallowed run it on the CPU); :attr:`GpuVerdict.quantized` says so.

Example:
    >>> verdict = gpu_compatibility(open("runs/r20/model_float16.tflite", "rb").read())
    >>> verdict.compatible, verdict.fallback, verdict.summary()
    (True, [], 'all ops')
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import re

# The builtin ops TFLite's GPU delegate implements (gpu_compatibility.cc, TF 2.21). Any
# other builtin or custom op stays on the CPU.
GPU_OPS = frozenset({
    "ABS", "ADD", "ADD_N", "AVERAGE_POOL_2D", "BATCH_MATMUL", "CAST", "CEIL",
    "CONCATENATION", "CONV_2D", "COS", "CUMSUM", "DENSIFY", "DEPTHWISE_CONV_2D",
    "DEPTH_TO_SPACE", "DEQUANTIZE", "DIV", "DYNAMIC_UPDATE_SLICE", "ELU", "EMBEDDING_LOOKUP",
    "EQUAL", "EXP", "FLOOR", "FLOOR_DIV", "FLOOR_MOD", "FULLY_CONNECTED", "GATHER", "GELU",
    "GREATER", "GREATER_EQUAL", "HARD_SWISH", "LEAKY_RELU", "LESS", "LESS_EQUAL", "LOG",
    "LOGICAL_AND", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM",
    "MIRROR_PAD", "MUL", "NEG", "NOT_EQUAL", "ONE_HOT", "PACK", "PAD", "PADV2", "POW",
    "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD", "RELU", "RELU6",
    "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT",
    "SELECT", "SELECT_V2", "SIGN", "SIN", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT",
    "SPLIT_V", "SQRT", "SQUARE", "SQUARED_DIFFERENCE", "STABLEHLO_CLAMP", "STRIDED_SLICE",
    "SUB", "SUM", "TANH", "TILE", "TRANSPOSE", "TRANSPOSE_CONV", "ATAN2",
})
# Custom ops the delegate implements (MediaPipe's).
GPU_CUSTOM_OPS = frozenset({"Convolution2DTransposeBias", "MaxPoolingWithArgmax2D",
                            "MaxUnpooling2D", "Resampler"})
QUANTIZED_TYPES = ("INT8", "UINT8")
_ANALYZER_WARNING = re.compile(r"GPU COMPATIBILITY WARNING: (.*)")


@dataclasses.dataclass
class GpuVerdict:
    """Whether LiteRT's GPU delegate takes every op of a file.

    Attributes:
        compatible: every op runs on the GPU delegate.
        fallback: the ops that would run on the CPU, as ``"NAME (count x)"``.
        quantized: the file holds int8/uint8 tensors or weights; the GPU delegate runs it
            dequantized (float on the GPU, no int8 speed-up).
        analyzer: what TensorFlow's model analyzer said: "compatible", its warnings, or
            why it could not run.
    """

    compatible: bool
    fallback: list[str]
    quantized: bool = False
    analyzer: str = ""

    def summary(self) -> str:
        """One cell of the export table: "all ops", "all ops, dequantized", or the
        fallback ops."""
        if not self.compatible:
            return "CPU fallback: " + ", ".join(self.fallback)
        return "all ops, runs dequantized" if self.quantized else "all ops"


def analyzer_report(content: bytes) -> str:
    """TensorFlow's model analyzer report with its GPU check (the text it prints)."""
    import tensorflow as tf

    out = io.StringIO()
    # The analyzer returns its report to Python and prints it there.
    with contextlib.redirect_stdout(out):
        tf.lite.experimental.Analyzer.analyze(model_content=bytes(content),
                                              gpu_compatibility=True)
    return out.getvalue()


def _analyzer_verdict(content: bytes) -> str:
    try:
        report = analyzer_report(content)
    except Exception as e:  # noqa: BLE001 - an experimental API; the table does not need it
        return f"not run ({type(e).__name__})"
    warnings = _ANALYZER_WARNING.findall(report)
    if warnings:
        return "; ".join(dict.fromkeys(w.strip() for w in warnings))
    return "compatible" if "looks compatible with GPU delegate" in report else "no verdict"


def _ops_and_types(content: bytes) -> tuple[collections.Counter, set[str]]:
    """Op names (custom ops as ``CUSTOM:<name>``), and the types of the tensors the ops
    compute and of the MAC ops' weights."""
    from keras_resnet.pipeline.deploy import tflite

    audit = tflite.inspect(content)
    return audit.ops, set(audit.activation_types) | {m[2] for m in audit.mac_types}


def gpu_compatibility(content: bytes, *, run_analyzer: bool = True) -> GpuVerdict:
    """The GPU-delegate verdict of a ``.tflite`` flatbuffer.

    Args:
        content: the flatbuffer.
        run_analyzer: also run TensorFlow's model analyzer and keep what it says.

    Returns:
        A :class:`GpuVerdict` naming the ops that would fall back to the CPU.

    Raises:
        ExportError: the content is not a TFLite flatbuffer.
    """
    ops, types = _ops_and_types(content)
    fallback = []
    for op, count in sorted(ops.items()):
        name = op.removeprefix("CUSTOM:")
        supported = name in GPU_CUSTOM_OPS if op.startswith("CUSTOM:") else op in GPU_OPS
        if not supported:
            fallback.append(f"{op} ({count}x)")
    return GpuVerdict(compatible=not fallback, fallback=fallback,
                      quantized=any(t in QUANTIZED_TYPES for t in types),
                      analyzer=_analyzer_verdict(content) if run_analyzer else "")
