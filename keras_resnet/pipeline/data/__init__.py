"""The data stage: where images come from and how they are fed to a model.

    sources        image folders, scikit-learn digits, TFDS (through tfds_sources); the
                   validation carve; the fingerprint of the data a run trained on
    tfds_sources   TFDS datasets read from an already prepared data_dir
    transforms     per-image decoding and augmentation for tf.data
    tfdata         tf.data training and evaluation pipelines (load_data, eval_data)
    arrays         in-memory input for another Keras backend (JAX, PyTorch), no tf.data
    inputs         a run's training input on the backend it runs on

The tf.data functions are reachable here (``data.load_data``, ``data.eval_data``,
``data.take``, ...); this package imports TensorFlow only when one of them is used.
"""

from __future__ import annotations

import importlib

# name -> module of this package that defines it (loaded on first use)
_EXPORTS = {name: "tfdata" for name in (
    "DataBundle", "EvalData", "load_data", "eval_data", "take", "synthetic_classes",
    "augmentation_style", "whole_batches", "DEFAULT_CACHE_BUDGET", "SYNTHETIC_TRAIN_SIZE",
    "SYNTHETIC_VAL_SIZE", "AUTOTUNE")}
_EXPORTS.update({"load_bundle": "inputs", "one_hot_labels": "inputs"})

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
