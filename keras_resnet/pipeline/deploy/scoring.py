"""Any model file as a predictor, and scoring batches of images with several at once.

A ``.keras`` file runs on Keras, a ``.tflite`` file on the LiteRT interpreter (or through
MediaPipe Tasks' ImageClassifier, as an Android app runs it), a ``.onnx`` file on ONNX
Runtime: :func:`load_predictor` gives each as a callable from float32 raw 0..255 pixels to
class scores. :func:`predict_batches` runs predictors over a dataset batch by batch,
keeping only what it needs, so a whole validation split is scored in the memory of one
batch.

Example:
    >>> predict = load_predictor("runs/r20/model_int8.tflite")
    >>> scored = predict_batches(val.dataset, None, predict)
    >>> scored.top1()
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from keras_resnet.pipeline.errors import UserError, choose, first_line
from keras_resnet.pipeline.run import formats

FORMATS = (".keras", ".tflite", ".onnx")
RUNTIMES = ("litert", "mediapipe")


# The softmax layer every exported graph (and every QAT twin) ends in, after "predictions".
SOFTMAX_LAYER = "probabilities"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def with_softmax(model):
    """The Keras 3 logits model with a softmax on top (the graph every export ends in)."""
    import keras

    if model.layers[-1].get_config().get("activation") == "softmax":
        return model
    probabilities = keras.layers.Activation("softmax", name=SOFTMAX_LAYER)(model.outputs[0])
    return keras.Model(model.inputs, probabilities, name=model.name)


class KerasPredictor:
    """Scores batches with a .keras model (loaded with safe_mode on, not compiled)."""

    format = "keras"

    def __init__(self, path: str | None = None, *, model=None):
        """Loads ``path``, or wraps a ``model`` in memory."""
        import keras

        if model is None:
            try:
                model = keras.saving.load_model(path, compile=False, safe_mode=True)
            except Exception as e:
                raise UserError(f"could not load the Keras model {path} "
                                f"({first_line(e)})") from e
        self.model = model
        shape = self.model.input_shape
        self.image_size = shape[1] if isinstance(shape, tuple) else None
        self.num_outputs = int(self.model.output_shape[-1])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(images), dtype=np.float32)


def load_predictor(path, *, num_threads: int | None = None, runtime: str = "litert"):
    """Loads a .keras, .tflite or .onnx classifier as a callable: float raw pixels -> scores.

    Args:
        path: the model file.
        num_threads: interpreter threads (.tflite and .onnx).
        runtime: "litert" or "mediapipe" (.tflite only).

    Raises:
        UserError: not a .keras or .tflite name, no such file, a file that is not what
            its name says (:func:`keras_resnet.pipeline.run.formats.check_file_format`), or a
            model that does not load.
    """
    choose("runtime", runtime, RUNTIMES)
    path = check_model_file(path)
    if path.endswith(".onnx"):
        if runtime != "litert":
            raise UserError(f"runtime={runtime} runs .tflite files; {path} is an ONNX model")
        from keras_resnet.pipeline.deploy.onnx_export import OnnxModel

        return OnnxModel(path=path, num_threads=num_threads)
    if path.endswith(".keras"):
        if runtime != "litert":
            raise UserError(f"runtime={runtime} runs .tflite files; {path} is a Keras model")
        return KerasPredictor(path)
    if runtime == "mediapipe":
        from keras_resnet.pipeline.deploy.mediapipe_tasks import MediaPipeClassifier

        return MediaPipeClassifier(path)
    from keras_resnet.pipeline.deploy.litert import LiteRTModel

    return LiteRTModel(path=path, num_threads=num_threads)


def check_model_file(path) -> str:
    """The path of a model file :func:`load_predictor` can load, checked without loading it.

    Raises:
        UserError: not a .keras or .tflite name, no such file, or a file that is not what
            its name says.
    """
    path = os.path.expanduser(os.fspath(path))
    if not path.endswith(FORMATS):
        raise UserError(f"model {path} must be a .keras, .tflite or .onnx file")
    if not os.path.isfile(path):
        raise UserError(f"model file {path} does not exist")
    formats.check_file_format(path)
    return path


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Scores as probabilities: rows that already are (softmax outputs) stay as they are."""
    scores = np.asarray(scores, np.float32)
    if scores.size and scores.min() >= 0 and np.allclose(scores.sum(-1), 1, atol=0.02):
        return scores
    return softmax(scores)


@dataclasses.dataclass
class Predictions:
    """What :func:`predict_batches` keeps of one pass over a dataset."""

    labels: np.ndarray  # (n,) the images' labels, in dataset order
    classes: list[np.ndarray]  # per predictor: (n,) the top-1 class of each image
    scores: list[np.ndarray]  # per predictor: the scores of the first ``keep`` images

    def top1(self, index: int = 0) -> float:
        """Top-1 accuracy (%) of predictor ``index``; 0.0 on no images."""
        if not len(self.labels):
            return 0.0
        return float(np.mean(self.classes[index] == self.labels) * 100.0)


def predict_batches(dataset, limit: int | None, *predict, keep: int = 0) -> Predictions:
    """Runs each ``predict`` (float32 images -> scores) over the first ``limit`` images of a
    batched ``(images, labels)`` dataset (None: all of them).

    The images go through batch by batch and are not kept, so a whole validation split
    (ImageNet's too) is scored in the memory of one batch. Only the classes, and the score
    rows of the first ``keep`` images, stay.
    """
    labels, count = [], 0
    classes = [[] for _ in predict]
    kept = [[] for _ in predict]
    for images, y in dataset:
        take = len(y) if limit is None else min(len(y), limit - count)
        if take <= 0:
            break
        images = np.asarray(images, dtype="float32")[:take]
        labels.append(np.asarray(y)[:take])
        for fn, out, rows in zip(predict, classes, kept, strict=True):
            scores = np.asarray(fn(images), dtype="float32")
            out.append(np.argmax(scores, axis=-1))
            if count < keep:
                rows.append(scores[:keep - count])
        count += take
    if not labels:
        empty = np.zeros((0,), "int64")
        return Predictions(empty, [empty for _ in predict],
                           [np.zeros((0, 0), "float32") for _ in predict])
    return Predictions(np.concatenate(labels), [np.concatenate(c) for c in classes],
                       [np.concatenate(r) if r else np.zeros((0, 0), "float32")
                        for r in kept])
