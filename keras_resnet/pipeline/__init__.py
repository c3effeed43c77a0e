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

Modules, one concern each:
    config: TrainConfig, recipes, resolve() -> ResolvedConfig.
    rundir: the run folder (file names, atomic writes, identity, lock, reading a run).
    sources, transforms, data: where images come from, per-image transforms, tf.data.
    arrays: in-memory input for training on another Keras backend (JAX), without tf.data.
    distribute, optimization, callbacks, training: strategy; schedule, optimizer and
        compile; per-epoch bookkeeping; train().
    machine: the backend's GPUs, library versions and the machines a run trained on.
    quantize_configs, bn_folding, calibration, quantization: QAT and qat().
    tflite, litert, metadata, exporting: conversion and audit; the LiteRT runner; TFLite
        metadata; export().
    delegates: which ops LiteRT's GPU delegate takes (the export table's verdict).
    selective_quantization: per-layer int8 error and keeping layers float (keep_float).
    onnx_export: the ONNX file and its ONNX Runtime runner.
    mediapipe_tasks, evaluation, comparison: MediaPipe Tasks' ImageClassifier;
        evaluate(); compare() (two models on the same images).
    pretrained_runs: a run folder from weights shipped in the package (run_from_weights).
    errors: UserError and its subclasses.

Submodules are imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib

from keras_resnet.pipeline.errors import UserError

# public name -> module that defines it
_EXPORTS = {
    "TrainConfig": "config",
    "ResolvedConfig": "config",
    "RECIPES": "config",
    "resolve": "config",
    "recipe_changes": "config",
    "train": "training",
    "qat": "quantization",
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
