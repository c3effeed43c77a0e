"""Reading a finished run folder: :func:`read_run`, :func:`find_run` and :func:`load_model`."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from keras_resnet.pipeline.errors import RunDirError
from keras_resnet.pipeline.run import config as config_lib
from keras_resnet.pipeline.run.layout import (
    CONFIG,
    FINISHED_FILES,
    LABELS,
    MODEL,
    read_config,
    read_json,
    read_labels,
)


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run folder.

    Attributes:
        path: the folder.
        config: ``config.json`` as :func:`~keras_resnet.pipeline.run.config.recorded_config`.
        labels: class names in label order (``labels.txt``).
    """

    path: Path
    config: dict
    labels: tuple[str, ...]

    @property
    def variant(self) -> str:
        return self.config["model"]

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    def data_settings(self, *, dataset: str | None = None, data_dir: str | None = None,
                      batch_size: int | None = None) -> dict[str, Any]:
        """``load_data``/``eval_data`` arguments reproducing the run's data and validation.

        The run's ``val_fraction`` and ``seed`` carve exactly its validation images again.
        """
        dataset = dataset or self.config.get("dataset")
        if not dataset:
            raise RunDirError(f"{self.path / CONFIG} names no dataset; pass dataset=")
        batch_size = int(batch_size or self.config.get("batch_size") or 64)
        if batch_size < 1:
            raise RunDirError(f"batch_size={batch_size} must be a positive integer")
        return {
            "dataset": dataset,
            "data_dir": data_dir or self.config.get("data_dir"),
            "image_size": self.image_size,
            "batch_size": batch_size,
            "val_fraction": float(self.config.get("val_fraction", 0.1)),
            "seed": int(self.config.get("seed", 0)),
            "num_classes": self.num_classes if dataset == "synthetic" else None,
        }


def read_run(run_dir) -> Run:
    """Reads and validates a finished run folder (model.keras, config.json, labels.txt).

    Raises:
        RunDirError: the folder or one of its files is missing or incomplete.
    """
    path = Path(os.path.expanduser(os.fspath(run_dir)))
    if path.exists() and not path.is_dir():
        raise RunDirError(f"model_dir {path} is a file, not a run folder; pass the folder "
                          "training wrote")
    if not path.is_dir():
        raise RunDirError(f"run folder {path} does not exist; pass the model_dir that "
                          "training wrote")
    missing = [f for f in FINISHED_FILES if not (path / f).is_file()]
    if missing:
        raise RunDirError(f"run folder {path} is incomplete: {', '.join(missing)} missing "
                          "(training writes model.keras, config.json and labels.txt)")
    try:
        config = read_json(path / CONFIG)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path / CONFIG} is not valid JSON ({e})") from None
    absent = [k for k in ("model", "num_classes", "image_size")
              if not isinstance(config, dict) or k not in config]
    if absent:
        raise RunDirError(f"{path / CONFIG} lacks the key(s) {', '.join(absent)}")
    labels = read_labels(path / LABELS)
    if len(labels) != int(config["num_classes"]):
        raise RunDirError(f"{path / LABELS} has {len(labels)} names but config.json says "
                          f"num_classes={config['num_classes']}")
    return Run(path=path, config=config_lib.recorded_config(config), labels=labels)


@dataclasses.dataclass(frozen=True)
class FoundRun:
    """The run a model file belongs to, as far as found (each part may be None)."""

    folder: Path | None
    config: dict[str, Any] | None
    labels: tuple[str, ...] | None


def find_run(model_path) -> FoundRun:
    """The run a model file belongs to: the config.json and labels.txt of its folder or
    the folder above; a config.json that is not a training run's is ignored."""
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(os.fspath(model_path))))
    run_folder = config = labels = None
    for candidate in (folder, os.path.dirname(folder)):
        found = read_config(candidate)
        if config is None and found and "model" in found and "num_classes" in found:
            config, run_folder = found, Path(candidate)
        if labels is None and os.path.isfile(os.path.join(candidate, LABELS)):
            labels = read_labels(os.path.join(candidate, LABELS))
    return FoundRun(run_folder, config, labels)


def load_model(run: Run):
    """Loads the run's Keras 3 ``model.keras`` and checks it is the architecture that
    ``config.json`` describes (names and shapes of all weighted layers).

    Raises:
        RunDirError: the file does not load, the config names no buildable ResNet, or the
            model differs from it.
    """
    import keras

    from keras_resnet import weights as weights_lib
    from keras_resnet.pipeline.errors import first_line
    from keras_resnet.pipeline.run.formats import check_file_format

    path = run.path / MODEL
    check_file_format(path, error=RunDirError)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a bad archive
        raise RunDirError(f"{path} cannot be loaded as a Keras model ({first_line(e)})") \
            from None
    try:
        reference = config_lib.build_network(run.config, classes=run.num_classes,
                                             input_shape=tuple(model.input_shape[1:]))
    except (ValueError, TypeError) as e:
        raise RunDirError(f"{run.path / CONFIG} describes no ResNet this package builds "
                          f"({first_line(e)})") from None
    problem = weights_lib.mismatch(model, reference)
    if problem:
        raise RunDirError(f"{path} is not the {run.variant} that config.json describes: it "
                          f"{problem}")
    return model
