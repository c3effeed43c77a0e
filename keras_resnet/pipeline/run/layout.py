"""The run folder's layout: the name of every file, which folder a run may use, and
which run a folder holds.

A run folder (``model_dir``) is written by :func:`keras_resnet.pipeline.train` and then
extended by :func:`~keras_resnet.pipeline.qat` and :func:`~keras_resnet.pipeline.export`:

    config.json        every option, resolved defaults, library versions, data fingerprint
    labels.txt         class names in label order, one per line
    lineage.json       what each model file was made from (:mod:`.lineage`)
    data_files.txt.gz  the image files (and sizes) of a folder dataset the run trained on
    checkpoints/       epoch_NNNN.weights.h5 (weights + optimizer state), checkpoint.json
    logs/              TensorBoard event files
    history.csv        one row per completed epoch
    best.keras         the model of the best validation top-1 so far
    model.keras        the final model
    metrics.json       final losses and top-1, epochs, wall time, images/s
    curves.png         loss and accuracy curves
    model_qat.h5, model_int8.tflite, model_int8.json, qat.json          (qat)
    model_<mode>.tflite, model_<mode>.json, model.onnx, export.json     (export)

Every name is defined here once. Every file is written through
:mod:`~keras_resnet.pipeline.run.safe_writes`; one process at a time writes a run folder
(:mod:`~keras_resnet.pipeline.run.lock`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from keras_resnet.pipeline.errors import RunDirError
from keras_resnet.pipeline.run.safe_writes import write_atomic

CONFIG = "config.json"
LABELS = "labels.txt"
MODEL = "model.keras"
BEST = "best.keras"
METRICS = "metrics.json"
HISTORY = "history.csv"
CURVES = "curves.png"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
CHECKPOINT_STATE = "checkpoint.json"
LOCK = ".lock"
QAT_MODEL = "model_qat.h5"
INT8_MODEL = "model_int8.tflite"
QAT_REPORT = "qat.json"
EXPORT_REPORT = "export.json"
LINEAGE = "lineage.json"
DATA_FILES = "data_files.txt.gz"
# export mode -> the file it writes. "qat_int8" is the QAT int8 model, the Android hand-off.
EXPORTED = {
    "float32": "model_float32.tflite",
    "float16": "model_float16.tflite",
    "dynamic": "model_dynamic.tflite",
    "ptq_int8": "model_ptq_int8.tflite",
    "qat_int8": INT8_MODEL,
}
TRAIN_FILES = (CONFIG, LABELS, MODEL, BEST, METRICS, HISTORY, CURVES, LINEAGE, DATA_FILES)


def sidecar(name: str) -> str:
    """The hand-off ``.json`` written next to an exported file."""
    return os.path.splitext(name)[0] + ".json"


ONNX_MODEL = "model.onnx"  # export mode onnx; its metadata is inside, no hand-off file
INT8_SIDECAR = sidecar(INT8_MODEL)
QAT_FILES = (QAT_MODEL, INT8_MODEL, INT8_SIDECAR, QAT_REPORT)
EXPORT_FILES = (*EXPORTED.values(), ONNX_MODEL, *(sidecar(f) for f in EXPORTED.values()),
                EXPORT_REPORT)
# Every file a run, its QAT and its exports write in the run folder.
RUN_FILES = tuple(dict.fromkeys(TRAIN_FILES + QAT_FILES + EXPORT_FILES))
TRAIN_DIRS = (CHECKPOINTS, LOGS)
# What qat and export read from a finished run.
FINISHED_FILES = (MODEL, CONFIG, LABELS)
# config.json keys that fix the architecture: a run folder only continues a run whose
# values match.
IDENTITY_KEYS = ("model", "model_options", "num_classes", "image_size")


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """``epoch_NNNN.weights.h5`` after epoch N, ``epoch_NNNN_step_SSSSSS.weights.h5``
    S steps into epoch N + 1 (written mid-epoch)."""
    return (f"epoch_{epoch:04d}_step_{step:06d}.weights.h5" if step
            else f"epoch_{epoch:04d}.weights.h5")


_CHECKPOINT_NAME = re.compile(r"epoch_(\d{4,})(?:_step_(\d{6,}))?\.weights\.h5")


def checkpoint_files(folder) -> list[tuple[int, int, str]]:
    """``(epoch, step, name)`` of every checkpoint file in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_NAME.fullmatch(name)
        if match:
            found.append((int(match[1]), int(match[2] or 0), name))
    return sorted(found)





def read_json(path) -> Any:
    with open(path) as f:
        return json.load(f)


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_labels(path) -> tuple[str, ...]:
    return tuple(line.strip() for line in Path(path).read_text().splitlines()
                 if line.strip())


def write_data_files(run_dir, lines) -> None:
    """Writes the data fingerprint's file list (gzip, one line per image) when it changed."""
    content = gzip.compress(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"),
                            mtime=0)
    path = os.path.join(run_dir, DATA_FILES)
    if os.path.isfile(path) and Path(path).read_bytes() == content:
        return
    write_atomic(path, content)


def read_data_files(run_dir) -> list[str] | None:
    """The file list :func:`write_data_files` wrote, or None."""
    try:
        text = gzip.decompress(Path(run_dir, DATA_FILES).read_bytes()).decode(
            "utf-8", "surrogateescape")
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return [line for line in text.splitlines() if line]


# ----------------------------------------------------------------------------- paths


def check_folder(path) -> None:
    """Refuses a run folder path that names a file (or lies inside one).

    Raises:
        RunDirError: one sentence naming the file.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        where = "is a file" if probe == path else f"lies inside the file {probe}"
        raise RunDirError(f"model_dir {path} {where}, not a folder; choose a folder for the "
                          "run")


def check_apart(model_dir, data_dir) -> None:
    """Refuses a run folder that is the data folder, lies inside it or holds it: the run's
    files would count as data (checkpoints/ as a class) or its data as run files.

    Raises:
        RunDirError: one sentence naming both folders.
    """
    if not data_dir:
        return
    run = os.path.realpath(os.path.expanduser(os.fspath(model_dir)))
    data = os.path.realpath(os.path.expanduser(os.fspath(data_dir)))
    if run == data:
        relation = "is"
    elif run.startswith(data.rstrip(os.sep) + os.sep):
        relation = "is inside"
    elif data.startswith(run.rstrip(os.sep) + os.sep):
        relation = "holds"
    else:
        return
    raise RunDirError(f"model_dir {run} {relation} the data folder {data}; keep runs apart "
                      "from the data, e.g. model_dir=runs/<name>")


def check_output(path, *, inputs=(), what: str = "output") -> None:
    """Refuses an output path that would replace an input or a run's file.

    ``path`` may not be one of ``inputs`` (files or folders; a path inside an input folder
    is refused too), nor a file that a run folder tracks (a model, labels.txt,
    config.json, a checkpoint, ...).

    Raises:
        RunDirError: naming the path and what it would replace.
    """
    target = os.path.realpath(os.path.expanduser(os.fspath(path)))
    for source in inputs:
        if not source:
            continue
        source = os.path.realpath(os.path.expanduser(os.fspath(source)))
        if target == source or target.startswith(source.rstrip(os.sep) + os.sep):
            raise RunDirError(f"{what} {target} would overwrite the input {source}; choose "
                              "another path")
    folder, name = os.path.split(target)
    run_folder = os.path.isfile(os.path.join(folder, CONFIG))
    inside = os.path.basename(folder) in TRAIN_DIRS and os.path.isfile(
        os.path.join(os.path.dirname(folder), CONFIG))
    if inside or (run_folder and name in (*RUN_FILES, LOCK)):
        raise RunDirError(f"{what} {target} would overwrite a file of the run in {folder}; "
                          "choose another name")


# ----------------------------------------------------------------------------- identity


def describe(cfg: dict[str, Any]) -> str:
    options = cfg.get("model_options") or {}
    extra = f" {options}" if options else ""
    return (f"{cfg.get('model')}{extra} ({cfg.get('num_classes')} classes, "
            f"{cfg.get('image_size')}px)")


def read_config(run_dir) -> dict[str, Any] | None:
    """A run folder's config.json, or None when there is none (or it is unreadable)."""
    try:
        config = read_json(os.path.join(run_dir, CONFIG))
    except (OSError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def check_model_dir(model_dir, identity: dict[str, Any], *, overwrite: bool) -> None:
    """Refuses a model_dir that holds a run of another model, or clears it on overwrite."""
    model_dir = os.fspath(model_dir)
    config_path = os.path.join(model_dir, CONFIG)
    if os.path.isfile(config_path) and not overwrite:
        old = read_config(model_dir)
        if old is None:
            raise RunDirError(f"{config_path} is unreadable (cut short or not JSON), so the "
                              "run it belongs to is unknown; choose another model_dir or pass "
                              "overwrite=True to replace the run")
        mismatch = [k for k in identity if k in old and old.get(k) != identity[k]]
        if mismatch:
            raise RunDirError(
                f"model_dir {model_dir} holds a run of {describe(old)}, not "
                f"{describe({**old, **identity})}; choose another model_dir or pass "
                "overwrite=True to replace it")
        checkpoints = os.path.join(model_dir, CHECKPOINTS)
        trained = [f for f in (MODEL, BEST) if os.path.isfile(os.path.join(model_dir, f))]
        if trained and not (os.path.isfile(os.path.join(checkpoints, CHECKPOINT_STATE))
                            or checkpoint_files(checkpoints)):
            raise RunDirError(f"model_dir {model_dir} holds a trained model ({trained[0]}) but "
                              f"no checkpoint to resume from ({CHECKPOINTS}/ is empty or "
                              "missing); pass overwrite=True to train again from the start, "
                              "or choose another model_dir")
    elif (not overwrite and not os.path.isfile(config_path)
          and os.path.isdir(os.path.join(model_dir, CHECKPOINTS))):
        raise RunDirError(f"model_dir {model_dir} holds checkpoints but no config.json; "
                          "choose another model_dir or pass overwrite=True to replace them")
    if overwrite:
        clear(model_dir)


def clear(model_dir) -> None:
    """Removes every file a run, its QAT and its exports wrote (nothing else)."""
    if not os.path.isdir(model_dir):
        return
    for name in os.listdir(model_dir):
        path = os.path.join(model_dir, name)
        if name in RUN_FILES and os.path.isfile(path):
            os.remove(path)
    for name in TRAIN_DIRS:
        shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)


