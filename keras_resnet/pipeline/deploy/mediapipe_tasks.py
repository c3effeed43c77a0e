"""A ``.tflite`` file run as an Android app runs it: MediaPipe Tasks' ImageClassifier.

MediaPipe's Python package runs the same C++ task graph as its Android library. The
classifier is created from the file alone, with no options: it takes the input
normalisation and the class names from the file's metadata
(:mod:`~keras_resnet.pipeline.deploy.metadata`), so a file that works here works in the app's
``ImageClassifier.createFromFile(context, "model.tflite")``.

MediaPipe feeds uint8 input tensors the image's pixels as they are and float32 input
tensors ``(pixel - mean) / std`` from the metadata; it rejects int8 input and int8 output
tensors (``--io=int8`` files are for the LiteRT interpreter only). An image of another
size is stretched to the model's input size.

MediaPipe's native library links against libEGL.so.1 and libGLESv2.so.2, which slim
Debian images (python:3.11-slim) lack; :func:`unavailable` says so in one line with the
``apt-get`` command, and tools and tests skip the MediaPipe steps there. Writing metadata
(:mod:`~keras_resnet.pipeline.deploy.metadata`) needs no native code and works everywhere.

Example:
    >>> classifier = MediaPipeClassifier("runs/r20/model_int8.tflite")
    >>> scores = classifier(images)            # (n, classes), in labels order
"""

from __future__ import annotations

import os
import re

import numpy as np

from keras_resnet.pipeline import native_logs
from keras_resnet.pipeline.deploy import metadata, tflite
from keras_resnet.pipeline.errors import ExportError, first_line

# The system libraries libmediapipe.so needs beyond glibc, and their Debian 12 packages
# (libGLdispatch.so.0 comes with libegl1 as its dependency libglvnd0).
SYSTEM_LIBRARIES = {"libEGL.so.1": "libegl1", "libGLESv2.so.2": "libgles2",
                    "libGLdispatch.so.0": "libglvnd0"}
INSTALL_LIBRARIES = "apt-get install -y libegl1 libgles2"
INSTALL_MEDIAPIPE = "pip install --no-deps -c constraints.txt mediapipe"


def describe_load_failure(error: BaseException | str) -> str:
    """The one line to show when MediaPipe's native library does not load.

    Args:
        error: what loading raised (an OSError from ctypes, or an ImportError from a
            compiled module), or its message.

    Returns:
        e.g. "MediaPipe Tasks cannot load its native library (libEGL.so.1 missing);
        apt-get install -y libegl1 libgles2".
    """
    message = first_line(error) if isinstance(error, BaseException) else str(error)
    found = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", message)
    if found is None:
        return (f"MediaPipe Tasks cannot load its native library ({message}); "
                f"{INSTALL_LIBRARIES} provides the system libraries it needs")
    library = found.group(1)
    if library in SYSTEM_LIBRARIES:
        return (f"MediaPipe Tasks cannot load its native library ({library} missing); "
                f"{INSTALL_LIBRARIES}")
    return (f"MediaPipe Tasks cannot load its native library ({library} missing); install "
            f"the system package that provides {library}")


def unavailable() -> str | None:
    """Why MediaPipe Tasks cannot run here, in one line with the fix, or None when it can.

    Loads MediaPipe's native library (once per process), without creating a task.
    """
    try:
        import mediapipe  # noqa: F401
    except ImportError as e:
        if "cannot open shared object file" in str(e):  # wheels with compiled modules
            return describe_load_failure(e)
        return f"runtime=mediapipe needs MediaPipe ({first_line(e)}); {INSTALL_MEDIAPIPE}"
    try:
        from mediapipe.tasks.python.core import mediapipe_c_bindings
    except ImportError:
        return None  # another MediaPipe layout: creating the task reports any problem
    try:
        mediapipe_c_bindings.load_raw_library()
    except OSError as e:
        return describe_load_failure(e)
    return None


class MediaPipeClassifier:
    """Scores batches of raw-pixel images with MediaPipe Tasks' ImageClassifier.

    Args:
        path: a ``.tflite`` file with image-classifier metadata.

    Attributes:
        labels: the class names embedded in the file.
        image_size, num_outputs: input side and number of classes.

    Raises:
        ExportError: MediaPipe or its native library is missing (:func:`unavailable`),
            or it refuses the file (the reason is its own).
    """

    format = "tflite"

    def __init__(self, path):
        problem = unavailable()
        if problem:
            raise ExportError(problem)
        path = os.fspath(path)
        with open(path, "rb") as f:
            content = f.read()
        audit = tflite.inspect(content)
        self.labels = metadata.read(content)["labels"]
        self.num_outputs = audit.num_outputs
        self.image_size = audit.input_shape[1] if len(audit.input_shape) == 4 else None
        from mediapipe.tasks.python import vision

        try:
            with native_logs.filtered_stderr(native_logs.XNNPACK_NOTICE):
                self._classifier = vision.ImageClassifier.create_from_model_path(path)
        except (RuntimeError, ValueError) as e:
            raise ExportError(f"MediaPipe's ImageClassifier refuses {path} "
                              f"({first_line(e)})") from None

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
