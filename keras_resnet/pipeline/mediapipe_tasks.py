"""A ``.tflite`` file run as an Android app runs it: MediaPipe Tasks' ImageClassifier.

MediaPipe's Python package runs the same C++ task graph as its Android library. The
classifier is created from the file alone, with no options: it takes the input
normalisation and the class names from the file's metadata
(:mod:`~keras_resnet.pipeline.metadata`), so a file that works here works in the app's
``ImageClassifier.createFromFile(context, "model.tflite")``.

MediaPipe feeds uint8 input tensors the image's pixels as they are and float32 input
tensors ``(pixel - mean) / std`` from the metadata; it rejects int8 input and int8 output
tensors (``--io=int8`` files are for the LiteRT interpreter only). An image of another
size is stretched to the model's input size.

Example:
    >>> classifier = MediaPipeClassifier("runs/r20/model_int8.tflite")
    >>> scores = classifier(images)            # (n, classes), in labels order
"""

from __future__ import annotations

import os

import numpy as np

from keras_resnet.pipeline import metadata, tflite
from keras_resnet.pipeline.errors import ExportError, first_line


class MediaPipeClassifier:
    """Scores batches of raw-pixel images with MediaPipe Tasks' ImageClassifier.

    Args:
        path: a ``.tflite`` file with image-classifier metadata.

    Attributes:
        labels: the class names embedded in the file.
        image_size, num_outputs: input side and number of classes.

    Raises:
        ExportError: MediaPipe is missing, or refuses the file (the reason is its own).
    """

    format = "tflite"

    def __init__(self, path):
        path = os.fspath(path)
        with open(path, "rb") as f:
            content = f.read()
        audit = tflite.inspect(content)
        self.labels = metadata.read(content)["labels"]
        self.num_outputs = audit.num_outputs
        self.image_size = audit.input_shape[1] if len(audit.input_shape) == 4 else None
        try:
            from mediapipe.tasks.python import vision

            self._classifier = vision.ImageClassifier.create_from_model_path(path)
        except (RuntimeError, ValueError) as e:
            raise ExportError(f"MediaPipe's ImageClassifier refuses {path} "
                              f"({first_line(e)})") from None
        except ImportError as e:
            raise ExportError(f"runtime=mediapipe needs MediaPipe ({first_line(e)}); pip "
                              "install --no-deps -c constraints.txt mediapipe") from None

    def classify(self, image: np.ndarray):
        """MediaPipe's ClassificationResult for one uint8 [h, w, 3] RGB image."""
        import mediapipe as mp

        frame = mp.Image(image_format=mp.ImageFormat.SRGB,
                         data=np.ascontiguousarray(image, dtype=np.uint8))
        return self._classifier.classify(frame)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Scores (n, classes) for raw-pixel images (n, h, w, 3), values 0..255."""
        images = np.clip(np.round(np.asarray(images, np.float32)), 0, 255).astype(np.uint8)
        scores = np.zeros((len(images), self.num_outputs), np.float32)
        for row, image in enumerate(images):
            for category in self.classify(image).classifications[0].categories:
                scores[row, category.index] = category.score
        return scores

    def close(self) -> None:
        self._classifier.close()
