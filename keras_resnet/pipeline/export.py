"""TFLite conversion, op audit and verification with the LiteRT runtime.

Every file is converted with TFLite builtin ops only: TF fallback ("Flex") ops need a
runtime Android apps do not ship. :func:`audit` reads the flatbuffer and fails on any custom
or Flex op, and for int8 files on any CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED whose
input, weights or output is not int8. :class:`LiteRTModel` runs a file with
``ai_edge_litert`` (the runtime Android uses) and quantizes/dequantizes int8 I/O.

Example:
    >>> content = convert(model, "ptq_int8", representative=images[:200])
    >>> audit(content, int8=True)
    >>> logits = LiteRTModel(content).predict(images)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io as io_lib
import json
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from keras_resnet.pipeline.data import UserError

# mode -> output file in the run folder. "qat_int8" is the Android hand-off model.
FILES = {
    "float32": "model_float32.tflite",
    "float16": "model_float16.tflite",
    "dynamic": "model_dynamic.tflite",
    "ptq_int8": "model_ptq_int8.tflite",
    "qat_int8": "model_int8.tflite",
}
MODES = tuple(FILES)
INT8_MODES = ("ptq_int8", "qat_int8")
IO_TYPES = ("float32", "int8", "uint8")
# Ops that carry the multiply-accumulates; in an int8 file all of them must run in int8.
MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


class ExportError(UserError):
    """A conversion request or exported file that cannot be used, in one sentence."""


# ----------------------------------------------------------------------------------------
# Conversion.


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
    import tensorflow as tf

    if mode not in MODES:
        raise ExportError(f"mode={mode!r} is not valid; choose one of {', '.join(MODES)}")
    if io not in IO_TYPES:
        raise ExportError(f"io={io!r} is not valid; choose one of {', '.join(IO_TYPES)}")
    if io != "float32" and mode not in INT8_MODES:
        raise ExportError(f"io={io} needs an int8 model; mode {mode} has float32 I/O")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "ptq_int8":
        if representative is None or len(representative) == 0:
            raise ExportError("full-integer quantization needs representative images from "
                              "the training data, and none were given")
        images = np.asarray(representative, dtype="float32")

        def samples():
            for image in images:
                yield [image[None]]

        converter.representative_dataset = samples
        # Fail instead of silently keeping float kernels for ops without an int8 version.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if io != "float32":
        converter.inference_input_type = converter.inference_output_type = getattr(tf, io)
    try:
        # Keras 3 prints the exported signature to stdout; the converter warns that a QAT
        # model's float input has no statistics, which is expected (the model quantizes it).
        with contextlib.redirect_stdout(io_lib.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Statistics for quantized inputs")
            return converter.convert()
    except Exception as e:  # noqa: BLE001 - the converter raises ConverterError and others
        raise ExportError(f"TFLite conversion ({mode}) failed with builtin ops only: "
                          f"{_first_line(e)}") from None


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
    """

    ops: collections.Counter
    mac_types: list
    input_type: str
    output_type: str

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


def inspect(content: bytes) -> Audit:
    """Reads the ops and the types of the MAC ops of a ``.tflite`` flatbuffer."""
    from tensorflow.lite.python import schema_py_generated as schema

    try:
        model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    except Exception as e:  # noqa: BLE001 - a corrupt buffer raises anything
        raise ExportError(f"not a TFLite flatbuffer ({_first_line(e)})") from None
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
    ops = collections.Counter()
    mac = []
    first = model.subgraphs[0]
    for subgraph in model.subgraphs:
        tensors = subgraph.tensors
        for op in subgraph.operators or []:
            name = codes[op.opcodeIndex]
            ops[name] += 1
            if name in MAC_OPS:
                inputs = [tensors[i] for i in op.inputs if i >= 0]
                kinds = [type_names[t.type] for t in inputs[:2]]
                mac.append((name, *kinds, type_names[tensors[op.outputs[0]].type]))
    return Audit(ops=ops, mac_types=mac,
                 input_type=type_names[first.tensors[first.inputs[0]].type],
                 output_type=type_names[first.tensors[first.outputs[0]].type])


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


# ----------------------------------------------------------------------------------------
# Running with LiteRT.


class LiteRTModel:
    """A ``.tflite`` model on the LiteRT interpreter, taking float32 raw pixels.

    int8/uint8 inputs are quantized and outputs dequantized with the file's own scale and
    zero point, exactly as an app would.

    Args:
        content: the flatbuffer.
        num_threads: interpreter threads.
    """

    def __init__(self, content: bytes, *, num_threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        try:
            self.interpreter = Interpreter(model_content=bytes(content),
                                           num_threads=num_threads)
            self.interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as e:
            raise ExportError(f"LiteRT cannot load the model ({_first_line(e)})") from None
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self._batch = int(self.input["shape"][0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.input["shape"][1:])

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            self.interpreter.resize_tensor_input(self.input["index"],
                                                 [batch, *self.input_shape])
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]
            self._batch = batch

    def quantize_input(self, images: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return images.astype("float32")
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        q = np.round(images / scale + zero)
        return np.clip(q, info.min, info.max).astype(dtype)

    def dequantize_output(self, values: np.ndarray) -> np.ndarray:
        if self.output["dtype"] == np.float32:
            return values.astype("float32")
        scale, zero = self.output["quantization"]
        return ((values.astype("float32") - zero) * scale).astype("float32")

    def predict(self, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Float logits for float32 raw-pixel images of shape (n, h, w, 3)."""
        images = np.asarray(images, dtype="float32")
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            self._resize(len(chunk))
            self.interpreter.set_tensor(self.input["index"], self.quantize_input(chunk))
            self.interpreter.invoke()
            out.append(self.dequantize_output(self.interpreter.get_tensor(self.output["index"])))
        return np.concatenate(out)

    def latency_ms(self, image: np.ndarray, *, runs: int = 50, warmup: int = 5) -> float:
        """Median single-image latency in milliseconds."""
        self._resize(1)
        x = self.quantize_input(np.asarray(image, dtype="float32")[None])
        times = []
        for i in range(warmup + runs):
            self.interpreter.set_tensor(self.input["index"], x)
            start = time.perf_counter()
            self.interpreter.invoke()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


# ----------------------------------------------------------------------------------------
# Verification table and Android hand-off.


@dataclasses.dataclass
class Row:
    """One line of the verification table (accuracies in %, logit differences absolute)."""

    name: str
    size: int
    top1: float
    top1_change: float
    max_diff: float
    mean_diff: float
    latency_1: float
    latency_2: float
    int8: bool = False


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels) * 100.0)


def verify(content: bytes, *, name: str, images: np.ndarray, labels: np.ndarray,
           reference_logits: np.ndarray, reference_top1: float, int8: bool,
           parity_samples: int = 100, latency_runs: int = 50) -> Row:
    """Audits a file and measures it on the LiteRT runtime against the Keras float model.

    Args:
        content: the flatbuffer.
        name: its label in the table.
        images: validation images (float32 raw pixels).
        labels: their integer labels.
        reference_logits: the Keras float model's logits on ``images``.
        reference_top1: the Keras float model's top-1 (%) on ``images``.
        int8: audit as an int8 file.
        parity_samples: images on which logit differences are measured.
        latency_runs: timed single-image invocations per thread count.
    """
    audit(content, int8=int8, name=name)
    runtime = LiteRTModel(content, num_threads=2)
    logits = runtime.predict(images)
    accuracy = top1(logits, labels)
    n = min(parity_samples, len(images))
    diff = np.abs(logits[:n] - reference_logits[:n])
    latencies = [LiteRTModel(content, num_threads=t).latency_ms(images[0], runs=latency_runs)
                 for t in (1, 2)]
    return Row(name=name, size=len(content), top1=accuracy,
               top1_change=accuracy - reference_top1, max_diff=float(diff.max()),
               mean_diff=float(diff.mean()), latency_1=latencies[0], latency_2=latencies[1],
               int8=int8)


def format_table(rows: Sequence[Row], *, keras_top1: float, keras_size: int | None = None,
                 samples: int, parity_samples: int) -> str:
    """The verification table as Markdown."""
    head = [f"LiteRT on {samples} validation images; logit differences vs Keras float on "
            f"the first {min(parity_samples, samples)}; latency: median, batch 1.",
            "",
            "| format | size | size ratio | top-1 % | vs Keras | max logit diff "
            "| mean logit diff | latency 1 thr (ms) | latency 2 thr (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| Keras float | {_size(keras_size)} | | {keras_top1:.2f} | | | | | |"]
    base = next((r.size for r in rows if r.name.startswith("float32")), None)
    lines = []
    for r in rows:
        ratio = f"{r.size / base:.3f}x" if base else ""
        lines.append(f"| {r.name} | {_size(r.size)} | {ratio} | {r.top1:.2f} | "
                     f"{r.top1_change:+.2f} | {r.max_diff:.4g} | {r.mean_diff:.4g} | "
                     f"{r.latency_1:.2f} | {r.latency_2:.2f} |")
    return "\n".join(head + lines)


def _size(size: int | None) -> str:
    if size is None:
        return ""
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def handoff(content: bytes, *, model_file: str, labels_file: str = "labels.txt",
            variant: str | None = None, top1: float | None = None) -> dict:
    """The Android sidecar for a model: input/output layout, dtypes and quantization.

    Normalisation is inside the model, so the app feeds raw 0..255 RGB pixels.
    """
    runtime = LiteRTModel(content)

    def tensor(details, kind):
        entry = {"shape": [int(d) for d in details["shape"]],
                 "dtype": np.dtype(details["dtype"]).name}
        if details["dtype"] != np.float32:
            scale, zero = details["quantization"]
            entry["quantization"] = {"scale": float(scale), "zero_point": int(zero)}
        entry.update(kind)
        return entry

    data = {
        "model": model_file,
        "labels": labels_file,
        "input": tensor(runtime.input, {
            "layout": "NHWC", "color": "RGB", "range": [0, 255],
            "normalization": "inside the model: feed raw 0..255 RGB pixels, no mean/std",
        }),
        "output": tensor(runtime.output, {
            "meaning": "logits in labels.txt order (apply softmax for probabilities)",
        }),
    }
    if variant:
        data["architecture"] = variant
    if top1 is not None and not math.isnan(top1):
        data["validation_top1"] = round(top1, 2)
    return data


def write_handoff(path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    # Converter errors start with a location line; the op that failed is the useful part.
    useful = [line for line in lines if "error:" in line or "not supported" in line]
    line = (useful or lines or [type(error).__name__])[0]
    return line if len(line) <= 300 else line[:297] + "..."
