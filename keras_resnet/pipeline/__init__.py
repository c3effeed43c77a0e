"""The training-to-Android pipeline as a Python API (needs the ``train`` extra).

Every step the command-line tools run is one call here, returning what it measured (the
same fields as the JSON the tools write)::

    from keras_resnet import pipeline

    metrics = pipeline.train(pipeline.TrainConfig(depth=20, dataset="digits", epochs=8,
                                                  model_dir="runs/a"))
    qat = pipeline.qat("runs/a", epochs=1)                   # writes model_int8.tflite
    exported = pipeline.export("runs/a", modes=["float32", "ptq_int8"])
    report = pipeline.evaluate("runs/a/model_int8.tflite", split="test")
    report["top1"]
    diff = pipeline.compare("runs/a/model.keras", "runs/a/model_ptq_int8.tflite",
                            split="val")                     # per class, side by side

Errors a caller can cause are :class:`UserError` (one sentence, naming the argument).

Stages, one folder each, in dependency order (a stage imports only stages below it):

    data/           where images come from (folders, TFDS, digits), the validation carve,
                    the data fingerprint, tf.data pipelines, in-memory arrays for JAX/PyTorch
    run/            TrainConfig and recipes; the run folder: names, lock, checkpoints,
                    reading a finished run, lineage, safe writes
    training/       train(): the loop, network, optimization, callbacks, distribution,
                    precision, fused BatchNormalization, machine facts
    deploy/         TFLite conversion and audit, metadata, LiteRT, MediaPipe Tasks, ONNX,
                    GPU-delegate verdicts, scoring any model file
    quantization/   qat() and its parts; per-layer int8 error and keep_float
    exporting, evaluation, comparison, pretrained_runs, shipping
                    export(), evaluate(), compare(), run_from_weights(), ship(): the steps
                    the tools run, on top of the stages
    errors, native_logs
                    UserError and its subclasses; C++ log lines of native libraries

BUILD.md ("Layout") draws the same order; an import contract in pyproject.toml checks it.

Submodules are imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib

from keras_resnet.pipeline.errors import UserError

# public name -> module that defines it
_EXPORTS = {
    "TrainConfig": "run.config",
    "ResolvedConfig": "run.config",
    "RECIPES": "run.config",
    "resolve": "run.config",
    "recipe_changes": "run.config",
    "train": "training.loop",
    "qat": "quantization.aware",
    "export": "exporting",
    "evaluate": "evaluation",
    "compare": "comparison",
    "run_from_weights": "pretrained_runs",
}

__all__ = ["UserError", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
