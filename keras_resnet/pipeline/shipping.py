"""Packages a finished run's weights as weights shipped inside keras_resnet.

:func:`ship` writes ``<variant>_<name>.h5`` (name-keyed HDF5, float16 by default) and a
JSON model card next to it, after checking that the stored weights reach the validation
top-1 of the run's own float32 model, and returns the card. The card holds the recipe,
the command, the training images, time and CPU, and the validation top-1 (with and without
flip test-time augmentation) of the float model and of the run's QAT int8 and PTQ int8
``.tflite`` files (made by tools/qat.py and tools/export_tflite.py before shipping), with
their sizes. Registering the file in ``keras_resnet.weights.PRETRAINED`` (with the sha256
from the card) makes ``resnet(variant=..., weights=name)`` load it and
``keras_resnet.shipped_weights()`` list it.

Example:
    >>> card = ship("runs/r20_fast30", name="cifar10", out_dir="keras_resnet/pretrained")
    >>> card["sha256"], card["validation"]["top1_stored"]
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from keras_resnet.pipeline import data, evaluation
from keras_resnet.pipeline.deploy import scoring
from keras_resnet.pipeline.errors import UserError, choose
from keras_resnet.pipeline.run import config as config_lib
from keras_resnet.pipeline.run import layout, lineage, reader, safe_writes
from keras_resnet.pipeline.training import machine

DTYPES = ("auto", "float16", "float32")
# Storage may move validation top-1 by at most this much (0.05 point): float16 halves the
# file, and "auto" keeps float32 where float16 would move top-1 further.
MAX_STORAGE_CHANGE = 0.0005


def ship(run_dir, *, name: str, out_dir, dtype: str = "auto",
         command: str | None = None) -> dict:
    """Writes the run's weights and model card into ``out_dir``; returns the card.

    Args:
        run_dir: a finished training run (model.keras, config.json, labels.txt).
        name: the weights name users pass, e.g. "cifar10".
        out_dir: where the files go (``keras_resnet/pretrained`` to ship them).
        dtype: storage type: "auto" (float16 unless it moves validation top-1 by more than
            0.05 point, then float32), or float16/float32; refused when it moves the
            validation top-1 of float32.
        command: the training command, recorded in the card.

    Raises:
        UserError: an incomplete run, or stored weights that lower validation top-1.
    """
    import keras

    from keras_resnet import weights as weights_lib

    choose("dtype", dtype, DTYPES)
    if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", name or ""):
        raise UserError(f"name={name!r} must be lower-case letters, digits and underscores, "
                        "e.g. cifar10 (users pass it as weights=)")
    run = reader.read_run(run_dir)
    int8_files = [f for f in INT8_FILES.values() if (run.path / f).is_file()]
    lineage.check_current(run.path, [layout.MODEL, layout.LABELS, *int8_files])
    lineage.check_data(run.path, run.config, dataset=None, data_dir=None,
                       what="scoring the weights on its validation images")
    for suffix in (".h5", ".json"):
        layout.check_output(Path(out_dir) / f"{run.variant}_{name}{suffix}",
                            inputs=[run.config.get("data_dir")], what="out_dir")
    model = reader.load_model(run)
    size = run.image_size

    def build():
        return config_lib.build_network(run.config, classes=run.num_classes,
                                        classifier_activation="softmax")

    net = build()
    weights_lib.transfer_weights(model, net)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{run.variant}_{name}.h5"
    # Written under a temporary name: a refused file never replaces a shipped one.
    tmp = out_dir / f".{path.name}.tmp"
    settings = run.data_settings()
    val = data.eval_data(settings["dataset"], settings["data_dir"], "val", size, 250,
                         val_fraction=settings["val_fraction"], seed=settings["seed"],
                         num_classes=settings["num_classes"])
    first = scoring.predict_batches(val.dataset, None, net.predict_on_batch)
    labels, want = first.labels, first.classes[0]
    for candidate in (("float16", "float32") if dtype == "auto" else (dtype,)):
        sha256 = weights_lib.save_by_name(net, tmp, dtype=candidate)
        stored = build()
        weights_lib.load_h5_by_name(stored, tmp)
        got = scoring.predict_batches(val.dataset, None, stored.predict_on_batch).classes[0]
        changed = int(np.sum(want != got))
        top1 = float(np.mean(want == labels)), float(np.mean(got == labels))
        if abs(top1[1] - top1[0]) <= MAX_STORAGE_CHANGE:
            break
    else:
        tmp.unlink()
        raise UserError(f"{dtype} storage changes validation top-1 from {top1[0]:.4f} to "
                        f"{top1[1]:.4f}; use dtype=float32")
    dtype = candidate
    os.replace(tmp, path)
    export = _read_optional(run.path / layout.EXPORT_REPORT)
    config = run.config
    metrics = _read_optional(run.path / layout.METRICS) or {}
    card = {
        "variant": run.variant, "weights": name, "file": path.name, "sha256": sha256,
        "bytes": path.stat().st_size, "dtype": dtype, "classes": list(run.labels),
        "image_size": size,
        "input": "raw RGB pixels 0..255, normalisation inside the model",
        "output": "softmax over the classes (classifier_activation=None gives logits)",
        "training": {**{k: config.get(k) for k in (
            "recipe", "recipe_reference", "epochs", "batch_size", "learning_rate",
            "weight_decay", "label_smoothing", "cutout", "nesterov", "lr_schedule",
            "warmup_epochs",
            "dataset", "val_fraction", "seed", "train_images", "val_images", "dtype_policy",
            "fused_batch_norm_resolved", "accelerator", "cpu", "cpus", "cpu_bf16_flags",
            "machines")},
            "recipe_changes": config_lib.recipe_changes(config),
            "wall_time_s": metrics.get("wall_time_s")},
        "command": command,
        "made_from": {f: lineage.digest_of(run.path / f) for f in (layout.MODEL, layout.LABELS)},
        "data": config.get("data"),
        "validation": {"images": len(labels), "top1_float32": top1[0],
                       "top1_stored": top1[1], "predictions_changed_by_storage": changed},
        "accuracy": {"float": _stored_accuracy(stored, val, path), **accuracy(run)},
        "tflite": export_rows(export),
        "metrics": metrics or None,
        "machine": machine.host_description(),
        "versions": config.get("versions"), "keras": keras.__version__,
    }
    safe_writes.write_json(out_dir / f"{run.variant}_{name}.json", card)
    return card


def export_rows(export: dict | None) -> list[dict]:
    """tools/export_tflite.py's files in the card's units: bytes and top-1 as a fraction.

    The export report gives top-1 in percent; ``images`` is how many validation images
    scored it (all of them unless the export ran with --eval_samples).
    """
    if not export:
        return []
    return [{"name": row["name"], "bytes": row["size"], "top1": round(row["top1"] / 100, 6),
             "images": export.get("eval_images")} for row in export.get("rows", [])]


# The int8 files the normal tools write, which the card measures beside the shipped weights.
INT8_FILES = {mode: layout.EXPORTED[mode] for mode in ("qat_int8", "ptq_int8")}


def _stored_accuracy(stored, val, path) -> dict:
    """Validation top-1 (plain and with flip TTA) of the shipped weights themselves."""
    predictor = scoring.KerasPredictor(model=stored)
    return {"file": path.name, "bytes": path.stat().st_size,
            **{key: evaluation.score(predictor, val, tta=tta)["top1"]
               for key, tta in (("top1", "none"), ("top1_flip", "flip"))}}


def accuracy(run: reader.Run) -> dict:
    """Validation top-1 (plain and with flip TTA) and size of each of the run's int8 files.

    Files the run lacks are left out (run tools/qat.py and tools/export_tflite.py
    --modes=ptq_int8 first to have them measured).
    """
    out = {}
    for key, name in INT8_FILES.items():
        path = run.path / name
        if not path.is_file():
            continue
        scores = {tta: evaluation.evaluate(path, split="val", tta=tta)["top1"]
                  for tta in ("none", "flip")}
        out[key] = {"file": name, "bytes": path.stat().st_size, "top1": scores["none"],
                    "top1_flip": scores["flip"]}
    return out


def _read_optional(path):
    try:
        return layout.read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
