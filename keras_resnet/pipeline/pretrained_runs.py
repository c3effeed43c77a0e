"""A run folder from weights shipped in the package, for the export and evaluation tools.

The shipped CIFAR-10 weights (``keras_resnet.PRETRAINED``) were trained by tools/train.py
on a folder of the CIFAR-10 training images, with a validation split carved from it
(``val_fraction`` and ``seed`` in their model card). :func:`run_from_weights` writes the
folder those tools read (model.keras, config.json, labels.txt) holding the shipped weights
and the card's data settings, so ``tools/export_tflite.py --model_dir=...`` and
``tools/evaluate.py --split=val`` measure the shipped model on exactly the images its card
was measured on, and checks that: the validation top-1 of the written model is returned
beside the card's.

Example:
    >>> from keras_resnet import pipeline
    >>> info = pipeline.run_from_weights("runs/r20_shipped", model="resnet20",
    ...                                  data_dir="/data/cifar10")
    >>> info["top1"], info["card_top1"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from keras_resnet.pipeline import data
from keras_resnet.pipeline.data import sources
from keras_resnet.pipeline.deploy import scoring
from keras_resnet.pipeline.errors import RunDirError, UserError
from keras_resnet.pipeline.run import layout, lineage, lock, safe_writes


def run_from_weights(model_dir, *, model: str = "resnet20", weights: str = "cifar10",
                     dataset: str | None = None, data_dir: str | None = None,
                     val_fraction: float | None = None, seed: int | None = None,
                     batch_size: int = 250, check: bool = True,
                     overwrite: bool = False) -> dict[str, Any]:
    """Writes a run folder holding shipped weights; returns what it holds and measured.

    Args:
        model_dir: the folder to write.
        model: the variant, e.g. "resnet20" or "resnet56".
        weights: the shipped weights name ("cifar10").
        dataset, val_fraction, seed: the data settings (default: the model card's, which
            reproduce the validation split the card was measured on).
        data_dir: the folder of the training images (``<class>/`` or ``train/<class>/``).
        batch_size: evaluation batch size recorded for the tools.
        check: measure the validation top-1 of the written model.
        overwrite: replace a run already in ``model_dir``.

    Returns:
        ``model_dir``, ``model``, ``weights``, ``card_top1`` (the card's validation top-1
        of the stored weights) and, with ``check``, ``top1`` and ``images``.

    Raises:
        UserError: weights that are not shipped, a model_dir holding another run, or data
            that cannot be read.
    """
    import keras_resnet
    from keras_resnet import weights as weights_lib

    entry = weights_lib.pretrained(model, weights)
    if entry is None:
        shipped = ", ".join(f"{w['variant']}/{w['weights']}"
                            for w in keras_resnet.shipped_weights())
        raise UserError(f"model={model} with weights={weights} is not shipped; choose one of "
                        f"{shipped}")
    card = weights_lib.read_card(entry)
    training = card.get("training", {})
    settings = {
        "dataset": dataset or training.get("dataset") or "folder",
        "data_dir": os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None,
        "val_fraction": float(val_fraction if val_fraction is not None
                              else training.get("val_fraction", 0.1)),
        "seed": int(seed if seed is not None else training.get("seed", 0)),
    }
    if settings["dataset"] == "folder" and not settings["data_dir"]:
        raise UserError("data_dir= is required: the folder of the training images the "
                        "weights' validation split is carved from")
    net = keras_resnet.resnet(variant=model, weights=weights, classifier_activation=None)
    config = {
        "model": model, "model_options": {},
        "num_classes": len(entry.classes), "image_size": entry.image_size,
        **settings, "batch_size": int(batch_size),
        "weights": weights, "weights_file": entry.file, "weights_sha256": entry.sha256,
        "command": card.get("command"), "recipe": training.get("recipe"),
        "epochs": training.get("epochs"),
    }
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(model_dir))))
    layout.check_folder(path)
    layout.check_apart(path, settings["data_dir"])
    with lock.RunLock(path):
        return _write(path, net, entry, card, config, settings, batch_size=batch_size,
                      check=check, overwrite=overwrite)


def _write(path: Path, net, entry, card, config, settings, *, batch_size, check, overwrite):
    if (path / layout.MODEL).exists() and not overwrite:
        raise RunDirError(f"{path / layout.MODEL} already exists; pass overwrite=True to "
                          "replace it")
    layout.check_model_dir(path, {"model": config["model"], "num_classes": len(entry.classes),
                                  "image_size": entry.image_size}, overwrite=overwrite)
    fingerprint = sources.fingerprint(settings["dataset"], settings["data_dir"])
    config["data"] = fingerprint.summary
    model, weights = config["model"], config["weights"]
    result = {"model_dir": str(path), "model": model, "weights": weights,
              "card_top1": card.get("validation", {}).get("top1_stored")}
    if check:
        val = data.eval_data(settings["dataset"], settings["data_dir"], "val",
                             entry.image_size, batch_size, val_fraction=settings["val_fraction"],
                             seed=settings["seed"], class_names=tuple(entry.classes))
        scored = scoring.predict_batches(val.dataset, None, net.predict_on_batch)
        result.update(top1=scored.top1() / 100, images=int(len(scored.labels)))
    safe_writes.save_atomic(path / layout.MODEL, net.save)
    safe_writes.write_json(path / layout.CONFIG, config, sort_keys=True)
    safe_writes.write_atomic(path / layout.LABELS, "\n".join(entry.classes) + "\n")
    if fingerprint.files:
        layout.write_data_files(path, fingerprint.files)
    lineage.record(path, [layout.LABELS, layout.MODEL], by="shipped weights",
                   data=fingerprint.digest)
    return result
