"""One runner for ``.tflite`` files: the LiteRT interpreter (``ai_edge_litert``), the runtime
Android apps use.

:class:`LiteRTModel` takes float32 raw 0..255 pixels, as every model of this package does,
and quantizes int8/uint8 inputs and dequantizes outputs with the file's own scale and zero
point, exactly as an app would (a zero scale means the tensor is not quantized). A file
whose batch dimension cannot be resized runs one image at a time.

Example:
    >>> runner = LiteRTModel(path="runs/r20/model_int8.tflite")
    >>> scores = runner.predict(images)          # (n, classes) float32
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from keras_resnet.pipeline import native_logs
from keras_resnet.pipeline.errors import ExportError, first_line
from keras_resnet.pipeline.run import formats


class LiteRTModel:
    """A ``.tflite`` image classifier on the LiteRT interpreter.

    Args:
        content: the flatbuffer (or give ``path``).
        path: a ``.tflite`` file.
        num_threads: interpreter threads (default: LiteRT's).

    Raises:
        ExportError: the file is not a TFLite flatbuffer or does not load, or does not
            take [batch, height, width, 3] images.
    """

    format = "tflite"

    def __init__(self, content: bytes | None = None, *, path=None,
                 num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        if (content is None) == (path is None):
            raise ValueError("pass exactly one of content= or path=")
        name = os.fspath(path) if path is not None else "the model"
        if path is not None:
            formats.check_file_format(name, error=ExportError)
        try:
            with native_logs.filtered_stderr(native_logs.XNNPACK_NOTICE):
                if content is not None:
                    self.interpreter = Interpreter(model_content=bytes(content),
                                                   num_threads=num_threads)
                else:
                    self.interpreter = Interpreter(model_path=name, num_threads=num_threads)
                self.interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as e:
            raise ExportError(f"LiteRT cannot load {name} ({first_line(e)})") from None
        self._details()
        shape = self.input["shape"]
        if len(shape) != 4 or shape[-1] != 3:
            raise ExportError(f"{name} takes input of shape {list(shape)}, not images "
                              "[batch, height, width, 3]")
        self._batch = int(shape[0])

    def _details(self):
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(height, width, channels)."""
        return tuple(int(d) for d in self.input["shape"][1:])

    @property
    def image_size(self) -> int:
        return self.input_shape[0]

    @property
    def num_outputs(self) -> int:
        return int(self.output["shape"][-1])

    def _resize(self, batch: int) -> bool:
        if batch == self._batch:
            return True
        try:
            self.interpreter.resize_tensor_input(self.input["index"],
                                                 [batch, *self.input_shape])
            self.interpreter.allocate_tensors()
        except (RuntimeError, ValueError):  # a file with a fixed batch
            return False
        self._details()
        self._batch = batch
        return True

    def quantize_input(self, images: np.ndarray) -> np.ndarray:
        """Float raw pixels -> the input tensor's dtype (quantized with its parameters)."""
        dtype = self.input["dtype"]
        if np.issubdtype(dtype, np.floating):
            return np.asarray(images).astype(dtype)
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        q = np.round(images / scale + zero) if scale else np.round(images)
        return np.clip(q, info.min, info.max).astype(dtype)

    def dequantize_output(self, values: np.ndarray) -> np.ndarray:
        """Output tensor values -> float32 (dequantized with its parameters)."""
        values = values.astype(np.float32)
        if np.issubdtype(self.output["dtype"], np.floating):
            return values
        scale, zero = self.output["quantization"]
        return (values - zero) * scale if scale else values

    def _run(self, images):
        self.interpreter.set_tensor(self.input["index"], self.quantize_input(images))
        self.interpreter.invoke()
        return self.dequantize_output(self.interpreter.get_tensor(self.output["index"]))

    def predict(self, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Float outputs for float32 raw-pixel images of shape (n, h, w, 3)."""
        images = np.asarray(images, dtype="float32")
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            if self._resize(len(chunk)):
                out.append(self._run(chunk))
            else:
                self._resize(1)
                out.extend(self._run(chunk[i:i + 1]) for i in range(len(chunk)))
        if not out:
            return np.zeros((0, self.num_outputs), np.float32)
        return np.concatenate(out)

    __call__ = predict

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
