"""Evaluation of .keras and .tflite classifiers: top-1/top-5, per-class accuracy, confusion.

Both formats are fed the same pixels: the deterministic evaluation pipeline of
:func:`keras_resnet.pipeline.data.eval_data` (raw 0..255 RGB floats; models built with
``include_preprocessing=True`` normalise inside). A .tflite model runs on the LiteRT
runtime (``ai_edge_litert.interpreter``); int8/uint8 inputs and outputs are quantized and
dequantized with the model's own parameters.

Example:
    >>> from keras_resnet.pipeline import data, evaluate
    >>> predictor = evaluate.load_predictor("runs/r20/model.keras")
    >>> split = data.eval_data("digits", None, "test", 32, 128)
    >>> evaluate.evaluate(predictor, split)["top1"]
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from keras_resnet.pipeline.data import EvalData, UserError

FORMATS = (".keras", ".tflite")


class KerasPredictor:
    """Scores batches with a .keras model (loaded with safe_mode on, not compiled)."""

    format = "keras"

    def __init__(self, path: str):
        import keras

        try:
            self.model = keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load the Keras model {path} ({first})") from e
        shape = self.model.input_shape
        self.image_size = shape[1] if isinstance(shape, tuple) else None
        self.num_outputs = int(self.model.output_shape[-1])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(images), dtype=np.float32)


class TFLitePredictor:
    """Scores batches with a .tflite model on the LiteRT interpreter.

    The input is resized to the batch when the model allows it, otherwise images run one
    at a time.
    """

    format = "tflite"

    def __init__(self, path: str, *, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        try:
            self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
            self.interpreter.allocate_tensors()
        except Exception as e:
            raise UserError(f"could not load the TFLite model {path} ({e})") from e
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        shape = self.input["shape"]
        if len(shape) != 4 or shape[-1] != 3:
            raise UserError(f"{path} takes input of shape {list(shape)}, not images "
                            "[batch, height, width, 3]")
        self.image_size = int(shape[1])
        self.num_outputs = int(self.output["shape"][-1])
        self._batch = int(shape[0])

    def _resize(self, n):
        if n == self._batch:
            return True
        try:
            self.interpreter.resize_tensor_input(self.input["index"], [n, self.image_size,
                                                                       self.image_size, 3])
            self.interpreter.allocate_tensors()
        except Exception:  # a model with a fixed batch: fall back to single images
            return False
        self._batch = n
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        return True

    def _quantize(self, images):
        dtype = self.input["dtype"]
        if np.issubdtype(dtype, np.floating):
            return images.astype(dtype)
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        q = np.round(images / scale + zero) if scale else images
        return np.clip(q, info.min, info.max).astype(dtype)

    def _dequantize(self, values):
        scale, zero = self.output["quantization"]
        values = values.astype(np.float32)
        return (values - zero) * scale if scale else values

    def _run(self, images):
        self.interpreter.set_tensor(self.input["index"], self._quantize(images))
        self.interpreter.invoke()
        return self._dequantize(self.interpreter.get_tensor(self.output["index"]))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self._resize(len(images)):
            return self._run(images)
        self._resize(1)
        return np.concatenate([self._run(images[i:i + 1]) for i in range(len(images))])


def load_predictor(path: str, *, num_threads: int | None = None):
    """Loads a .keras or .tflite classifier as a callable: images -> scores."""
    path = os.path.expanduser(os.fspath(path))
    if not path.endswith(FORMATS):
        raise UserError(f"model {path} must be a .keras or .tflite file")
    if not os.path.isfile(path):
        raise UserError(f"model file {path} does not exist")
    if path.endswith(".tflite"):
        return TFLitePredictor(path, num_threads=num_threads)
    return KerasPredictor(path)


def run_config(model_path: str) -> dict[str, Any] | None:
    """The config.json of the training run a model came from (its folder or the parent)."""
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(model_path)))
    for candidate in (folder, os.path.dirname(folder)):
        path = os.path.join(candidate, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            if "model" in config and "num_classes" in config:
                return config
    return None


def run_labels(model_path: str) -> list[str] | None:
    """Class names from the labels.txt next to a model (or in the parent folder)."""
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(model_path)))
    for candidate in (folder, os.path.dirname(folder)):
        path = os.path.join(candidate, "labels.txt")
        if os.path.isfile(path):
            with open(path) as f:
                return [line.rstrip("\n") for line in f if line.strip()]
    return None


def evaluate(predictor, split: EvalData, *, labels: list[str] | None = None) -> dict[str, Any]:
    """Scores every image of a split.

    Args:
        predictor: a callable from :func:`load_predictor`.
        split: the data, from :func:`keras_resnet.pipeline.data.eval_data`.
        labels: the model's class names (its labels.txt), checked against the data's.

    Returns:
        A dict with ``images``, ``top1``, ``top5`` (None with 5 classes or fewer),
        ``per_class`` ({name: {"accuracy", "count"}}), ``confusion_matrix`` (rows: true
        class, columns: predicted), ``class_names`` and ``images_per_sec``.

    Raises:
        UserError: the model's class count or labels do not match the data.
    """
    names = list(split.class_names)
    if predictor.num_outputs != len(names):
        raise UserError(f"the model predicts {predictor.num_outputs} classes, the data has "
                        f"{len(names)}")
    if labels is not None and list(labels) != names:
        raise UserError(f"the model's labels.txt lists classes {labels[:5]}..., the data's "
                        f"classes are {names[:5]}... (a different order or dataset)")
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    top5_hits = 0
    seconds = 0.0
    for images, y in split.dataset:
        images = images.numpy()
        y = y.numpy()
        start = time.perf_counter()
        scores = predictor(images)
        seconds += time.perf_counter() - start
        predicted = scores.argmax(axis=-1)
        np.add.at(confusion, (y, predicted), 1)
        if k > 5:
            top = np.argpartition(-scores, 5, axis=-1)[:, :5]
            top5_hits += int((top == y[:, None]).any(axis=-1).sum())
    total = int(confusion.sum())
    counts = confusion.sum(axis=1)
    per_class = {
        name: {"accuracy": float(confusion[i, i] / counts[i]) if counts[i] else None,
               "count": int(counts[i])}
        for i, name in enumerate(names)
    }
    return {
        "images": total,
        "top1": float(np.trace(confusion) / total) if total else None,
        "top5": float(top5_hits / total) if total and k > 5 else None,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "class_names": names,
        "images_per_sec": total / seconds if seconds else None,
    }


def plot_confusion(confusion, class_names, path: str, *, title: str = "") -> None:
    """Writes the confusion matrix (rows normalised to recall) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion, dtype=np.float64)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    k = len(class_names)
    side = min(4 + 0.35 * k, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= 40:  # beyond that, tick labels are unreadable
        ax.set_xticks(range(k), class_names, rotation=90)
        ax.set_yticks(range(k), class_names)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                            color="white" if share[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
