"""ONNX export of a run's float model, and the ONNX Runtime runner that verifies it.

:func:`convert` writes the Keras 3 model with ``model.export(format="onnx")`` (on the
TensorFlow backend Keras converts through tf2onnx) and then makes the file self-describing
for an app: the input is named ``image`` (NHWC float32, raw 0..255 RGB, normalisation
inside the graph), the output ``probabilities`` (softmax in label order), the batch axis
``batch``, and ``metadata_props`` carry the class names, the input convention, the
architecture and a description. :class:`OnnxModel` runs a file on ONNX Runtime's CPU
provider with a given number of threads, as a server or desktop app would.

Example:
    >>> content = convert(model, labels=["cat", "dog"], variant="resnet20",
    ...                   description="CIFAR ResNet-20")
    >>> OnnxModel(content, num_threads=1).predict(images)   # (n, classes) probabilities
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence

import numpy as np

from keras_resnet.pipeline.errors import ExportError, first_line

INPUT = "image"
OUTPUT = "probabilities"
INPUT_CONVENTION = ("NHWC float32 RGB pixels in 0..255 (raw, no mean/std: normalisation is "
                    "inside the model)")
OUTPUT_MEANING = "class probabilities (softmax) in the order of metadata 'labels'"
INSTALL = "pip install -c constraints.txt onnx onnxruntime tf2onnx (the train extra)"


def unavailable() -> str | None:
    """Why ONNX export cannot run here, in one line with the fix, or None when it can."""
    for module in ("onnx", "onnxruntime", "tf2onnx"):
        try:
            __import__(module)
        except ImportError as e:
            return f"ONNX export needs {module} ({first_line(e)}); {INSTALL}"
    return None


def convert(model, *, labels: Sequence[str], variant: str, description: str,
            opset: int | None = None) -> bytes:
    """The ONNX file of a float Keras 3 model (ending in its softmax).

    Args:
        model: the Keras model, raw-pixel input, probabilities out.
        labels: class names in output order.
        variant: architecture name, e.g. "resnet20".
        description: one line for ``doc_string`` and ``metadata_props``.
        opset: ONNX opset (default: the converter's).

    Raises:
        ExportError: onnx/tf2onnx missing, or the conversion fails.
    """
    problem = unavailable()
    if problem:
        raise ExportError(problem)
    import onnx

    if len(labels) != int(model.output_shape[-1]):
        raise ExportError(f"labels has {len(labels)} class names but the model has "
                          f"{model.output_shape[-1]} outputs")
    quiet = logging.getLogger("tf2onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # Keras warns about the input structure of the tracing call, tf2onnx about
        # NumPy 2's np.object; neither concerns the file.
        with tempfile.TemporaryDirectory() as folder, \
                contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = os.path.join(folder, "converted.onnx")
            # Keras exports only a model that has been called (traced) once.
            model(np.zeros((1, *model.input_shape[1:]), np.float32))
            model.export(path, format="onnx", verbose=False, opset_version=opset)
            proto = onnx.load(path)
    except Exception as e:  # noqa: BLE001 - tf2onnx raises many types
        raise ExportError(f"ONNX conversion failed ({first_line(e)})") from None
    finally:
        quiet.setLevel(level)
    _rename(proto)
    proto.doc_string = description
    proto.producer_name = "keras_resnet"
    onnx.helper.set_model_props(proto, {
        "labels": json.dumps(list(labels)),
        "input": INPUT_CONVENTION,
        "output": OUTPUT_MEANING,
        "architecture": variant,
        "description": description,
    })
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _rename(proto) -> None:
    """Input ``image``, output ``probabilities``, batch axis ``batch``."""
    graph = proto.graph
    renames = {graph.input[0].name: INPUT, graph.output[0].name: OUTPUT}
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in (graph.input[0], graph.output[0]):
        value.name = renames[value.name]
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_param = "batch"


def read_metadata(content: bytes) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    import onnx

    return {p.key: p.value for p in onnx.load_from_string(bytes(content)).metadata_props}


class OnnxModel:
    """An ONNX image classifier on ONNX Runtime's CPU provider.

    Args:
        content: the file content (or give ``path``).
        path: an ``.onnx`` file.
        num_threads: intra-op threads (default: ONNX Runtime's).

    Raises:
        ExportError: onnxruntime missing, or the file does not load.
    """

    format = "onnx"

    def __init__(self, content: bytes | None = None, *, path=None,
                 num_threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError(f"ONNX Runtime is not installed ({first_line(e)}); "
                              f"{INSTALL}") from None
        if (content is None) == (path is None):
            raise ValueError("pass exactly one of content= or path=")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        source = bytes(content) if content is not None else os.fspath(path)
        try:
            self.session = ort.InferenceSession(source, options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            raise ExportError(f"ONNX Runtime cannot load {path or 'the model'} "
                              f"({first_line(e)})") from None
        self.input = self.session.get_inputs()[0]
        self.num_outputs = int(self.session.get_outputs()[0].shape[-1])
        self.image_size = self.input.shape[1] if isinstance(self.input.shape[1], int) else None

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Outputs (n, classes) for float32 raw-pixel images (n, h, w, 3)."""
        images = np.asarray(images, np.float32)
        return self.session.run(None, {self.input.name: images})[0].astype(np.float32)

    __call__ = predict

    def latency_ms(self, image: np.ndarray, *, runs: int = 50, warmup: int = 5) -> float:
        """Median single-image latency in milliseconds."""
        x = {self.input.name: np.asarray(image, np.float32)[None]}
        times = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            self.session.run(None, x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
