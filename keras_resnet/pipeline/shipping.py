"""Packages a finished run's weights as weights shipped inside keras_resnet.

:func:`ship` writes ``<variant>_<name>.h5`` (name-keyed HDF5, float16 by default) and a
JSON model card next to it, after checking that the stored weights reach the validation
top-1 of the run's own float32 model, and returns the card. Registering
the file in ``keras_resnet.weights.PRETRAINED`` (with the sha256 from the card) makes
``resnet(variant=..., weights=name)`` load it.

Example:
    >>> card = ship("runs/r20_fast30", name="cifar10", out_dir="keras_resnet/pretrained")
    >>> card["sha256"], card["validation"]["top1_stored"]
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

from keras_resnet.pipeline import data, rundir
from keras_resnet.pipeline.errors import UserError

DTYPES = ("float16", "float32")


def ship(run_dir, *, name: str, out_dir, dtype: str = "float16",
         command: str | None = None) -> dict:
    """Writes the run's weights and model card into ``out_dir``; returns the card.

    Args:
        run_dir: a finished training run (model.keras, config.json, labels.txt).
        name: the weights name users pass, e.g. "cifar10".
        out_dir: where the files go (``keras_resnet/pretrained`` to ship them).
        dtype: storage type; float16 halves the file and is refused when it lowers the
            validation top-1 of float32.
        command: the training command, recorded in the card.

    Raises:
        UserError: an incomplete run, or stored weights that lower validation top-1.
    """
    import keras

    import keras_resnet
    from keras_resnet import weights as weights_lib

    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
    run = rundir.read_run(run_dir)
    model = rundir.load_model(run)
    size = run.image_size

    def build():
        return keras_resnet.resnet(**run.architecture, classes=run.num_classes,
                                   input_shape=(size, size, 3), include_preprocessing=True,
                                   **run.model_options)

    net = build()
    weights_lib.transfer_weights(model, net)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{run.variant}_{name}.h5"
    # Written under a temporary name: a refused file never replaces a shipped one.
    tmp = out_dir / f".{path.name}.tmp"
    sha256 = weights_lib.save_by_name(net, tmp, dtype=dtype)
    stored = build()
    weights_lib.load_h5_by_name(stored, tmp)

    settings = run.data_settings()
    val = data.eval_data(settings["dataset"], settings["data_dir"], "val", size, 250,
                         val_fraction=settings["val_fraction"], seed=settings["seed"],
                         num_classes=settings["num_classes"])
    images, labels = data.take(val.dataset, val.size)
    want = np.asarray(net.predict(images, verbose=0)).argmax(-1)
    got = np.asarray(stored.predict(images, verbose=0)).argmax(-1)
    changed = int(np.sum(want != got))
    top1 = float(np.mean(want == labels)), float(np.mean(got == labels))
    if top1[1] < top1[0]:
        tmp.unlink()
        raise UserError(f"{dtype} storage lowers validation top-1 from {top1[0]:.4f} to "
                        f"{top1[1]:.4f}; use dtype=float32")
    os.replace(tmp, path)
    export = _read_optional(run.path / rundir.EXPORT_REPORT)
    card = {
        "variant": run.variant, "weights": name, "file": path.name, "sha256": sha256,
        "bytes": path.stat().st_size, "dtype": dtype, "classes": list(run.labels),
        "image_size": size,
        "input": "raw RGB pixels 0..255, normalisation inside the model",
        "output": "softmax over the classes (classifier_activation=None gives logits)",
        "training": {k: run.config.get(k) for k in (
            "recipe", "recipe_reference", "epochs", "batch_size", "learning_rate",
            "weight_decay", "label_smoothing", "nesterov", "lr_schedule", "warmup_epochs",
            "dataset", "val_fraction", "seed", "train_images", "val_images")},
        "command": command,
        "validation": {"images": len(images), "top1_float32": top1[0],
                       "top1_stored": top1[1], "predictions_changed_by_storage": changed},
        "tflite": [{k: row[k] for k in ("name", "size", "top1")}
                   for row in (export or {}).get("rows", [])],
        "metrics": _read_optional(run.path / rundir.METRICS),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "versions": run.config.get("versions"), "keras": keras.__version__,
    }
    rundir.write_json(out_dir / f"{run.variant}_{name}.json", card)
    return card


def _read_optional(path):
    try:
        return rundir.read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
