"""Evaluation of .keras and .tflite classifiers: top-1/top-5, per-class accuracy, confusion.

Every runtime is fed the same pixels: the deterministic evaluation pipeline of
:func:`keras_resnet.pipeline.data.eval_data` (raw 0..255 RGB; models built with
``include_preprocessing=True`` normalise inside). A ``.keras`` file runs on Keras; a
``.tflite`` file on the LiteRT interpreter (``runtime="litert"``) or, as an Android app
using MediaPipe Tasks runs it, through MediaPipe's ImageClassifier with the file's own
metadata (``runtime="mediapipe"``).

``tta="flip"`` averages the class probabilities of each image and its mirror image
(test-time augmentation; e.g. Simonyan & Zisserman 2015, §3.2).

Example:
    >>> from keras_resnet import pipeline
    >>> report = pipeline.evaluate("runs/r20/model_int8.tflite", split="val")
    >>> report["top1"], report["per_class"]["cat"]
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from keras_resnet.pipeline import data
from keras_resnet.pipeline.deploy.scoring import check_model_file, load_predictor, probabilities
from keras_resnet.pipeline.errors import UserError, at_least, choose, fraction
from keras_resnet.pipeline.run import layout, lineage, reader, safe_writes

TTA = ("none", "flip")


def score(predictor, split: data.EvalData, *, labels=None, tta: str = "none") -> dict[str, Any]:
    """Scores every image of a split.

    Args:
        predictor: a callable from :func:`load_predictor`.
        split: the data, from :func:`keras_resnet.pipeline.data.eval_data`.
        labels: the model's class names (its labels.txt), checked against the data's.
        tta: "none", or "flip" to average the probabilities of each image and its mirror.

    Returns:
        A dict with ``images``, ``top1``, ``top5`` (None with 5 classes or fewer),
        ``per_class`` ({name: {"accuracy", "count"}}), ``confusion_matrix`` (rows: true
        class, columns: predicted), ``class_names`` and ``images_per_sec``.

    Raises:
        UserError: the model's class count or labels do not match the data.
    """
    choose("tta", tta, TTA)
    names = list(split.class_names)
    if predictor.num_outputs != len(names):
        raise UserError(f"the model predicts {predictor.num_outputs} classes, the data has "
                        f"{len(names)}")
    if labels is not None and list(labels) != names:
        raise UserError(f"the model's labels.txt lists classes {list(labels)[:5]}..., the "
                        f"data's classes are {names[:5]}... (a different order or dataset)")
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    top5_hits = 0
    seconds = 0.0
    for images, y in split.dataset:
        images = np.asarray(images, np.float32)
        y = np.asarray(y)
        start = time.perf_counter()
        scores = predictor(images)
        if tta == "flip":
            scores = (probabilities(scores) + probabilities(predictor(images[:, :, ::-1]))) / 2
        seconds += time.perf_counter() - start
        np.add.at(confusion, (y, scores.argmax(axis=-1)), 1)
        if k > 5:
            top = np.argpartition(-scores, 5, axis=-1)[:, :5]
            top5_hits += int((top == y[:, None]).any(axis=-1).sum())
    total = int(confusion.sum())
    counts = confusion.sum(axis=1)
    per_class = {
        name: {"accuracy": float(confusion[i, i] / counts[i]) if counts[i] else None,
               "count": int(counts[i])}
        for i, name in enumerate(names)
    }
    return {
        "images": total,
        "top1": float(np.trace(confusion) / total) if total else None,
        "top5": float(top5_hits / total) if total and k > 5 else None,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "class_names": names,
        "images_per_sec": total / seconds if seconds else None,
    }


def evaluate(model_path, *, split: str = "test", dataset: str | None = None,
             data_dir: str | None = None, image_size: int | None = None,
             batch_size: int = 64, val_fraction: float | None = None, seed: int | None = None,
             num_threads: int | None = None, runtime: str = "litert", tta: str = "none",
             output_json=None, confusion_png=None) -> dict[str, Any]:
    """Evaluates a .keras or .tflite classifier on one split of a dataset.

    Options left unset come from the training run's config.json next to the model
    (dataset, data_dir, image size, val_fraction, seed), so evaluating a run needs only
    its model; ``split="val"`` then reproduces the run's validation images. The run's
    labels.txt fixes the class order (a folder holding only ``test/<class>/`` is fine).

    Args:
        model_path: the .keras or .tflite file.
        split: train, val or test (or a TFDS split such as "test[:1000]").
        dataset, data_dir: the data (default: the run's).
        image_size: input side (default: the model's).
        batch_size: evaluation batch size.
        val_fraction, seed: as in training (default: the run's).
        num_threads: LiteRT interpreter threads (.tflite only).
        runtime: "litert" or "mediapipe" (.tflite only).
        tta: "none", or "flip" (average over each image and its mirror).
        output_json: also write the result here.
        confusion_png: the confusion-matrix image (default: next to ``output_json``,
            else next to the model).

    Returns:
        The result of :func:`score` plus the model, data and split it was measured on.
    """
    choose("tta", tta, TTA)
    at_least(batch_size=batch_size, num_threads=num_threads, image_size=image_size)
    if val_fraction is not None:
        fraction("val_fraction", val_fraction)
    check_model_file(model_path)
    source = data_source(model_path, split=split, dataset=dataset, data_dir=data_dir,
                         val_fraction=val_fraction, seed=seed)
    _check_outputs(model_path, source.data_dir, output_json=output_json,
                   confusion_png=confusion_png)
    predictor = load_predictor(model_path, num_threads=num_threads, runtime=runtime)
    setup = data_for(model_path, predictor, split=split, image_size=image_size,
                     batch_size=batch_size, val_fraction=val_fraction, seed=seed,
                     source=source)
    try:
        results = score(predictor, setup.data, labels=setup.labels if setup.same_data else None,
                        tta=tta)
    finally:
        if hasattr(predictor, "close"):
            predictor.close()
    dataset, data_dir, image_size = setup.dataset, setup.data_dir, setup.image_size
    evaluated = setup.data
    model_path = os.path.abspath(os.path.expanduser(os.fspath(model_path)))
    if confusion_png is None:
        tag = "".join(c if c.isalnum() else "_" for c in split)
        base = os.fspath(output_json) if output_json else model_path
        confusion_png = os.path.splitext(base)[0] + f"_confusion_{tag}.png"
    plot_confusion(results["confusion_matrix"], results["class_names"], confusion_png,
                   title=f"{os.path.basename(model_path)} on {dataset} {split}: top-1 "
                         f"{results['top1']:.4f}")
    results = {"model": model_path, "format": predictor.format,
               "runtime": _runtime_name(predictor.format, runtime), "tta": tta,
               "dataset": dataset,
               "data_dir": data_dir, "split": split, "image_size": int(image_size),
               "skipped_images": len(evaluated.skipped), **results,
               "confusion_png": os.path.abspath(confusion_png)}
    if output_json:
        folder = os.path.dirname(os.path.abspath(os.fspath(output_json)))
        os.makedirs(folder, exist_ok=True)
        safe_writes.write_json(output_json, results)
    return results


def _runtime_name(model_format: str, runtime: str) -> str:
    return {"tflite": runtime, "onnx": "onnxruntime"}.get(model_format, "keras")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """The data a model is scored on, resolved from the options and the model's run.

    Attributes:
        run: the run the model belongs to (its folder, config.json and labels.txt).
        dataset, data_dir: the data (the run's where not given).
        same_data: the data is the model's training dataset.
    """

    run: reader.FoundRun
    dataset: str
    data_dir: str | None
    same_data: bool


def data_source(model_path, *, split: str = "test", dataset: str | None = None,
                data_dir: str | None = None, val_fraction: float | None = None,
                seed: int | None = None) -> DataSource:
    """The data a model is scored on: options left unset come from the training run's
    config.json next to the model. A file of that run is refused when it is stale, its
    labels.txt when edited, and a split carved from the run's data when that data changed
    or is carved another way.

    Raises:
        UserError: no dataset can be found, or one of the refusals above.
    """
    found = reader.find_run(model_path)
    run = found.config or {}
    dataset = dataset or run.get("dataset")
    if not dataset:
        raise UserError("dataset= is required (the model has no training run's config.json "
                        "next to it)")
    same_data = dataset == run.get("dataset")
    data_dir = data_dir or (run.get("data_dir") if same_data else None)
    if found.folder is not None:
        _check_run_files(found, model_path, split=split, dataset=dataset, data_dir=data_dir,
                         val_fraction=val_fraction, seed=seed)
    return DataSource(found, dataset, data_dir, same_data)


@dataclasses.dataclass
class DataSetup:
    """The images a model is evaluated on, with the options they were resolved from."""

    data: data.EvalData
    labels: tuple[str, ...] | None  # the model's class names (its run's labels.txt)
    same_data: bool  # the data is the model's training dataset
    dataset: str
    data_dir: str | None
    image_size: int


def data_for(model_path, predictor, *, split: str = "test", dataset: str | None = None,
             data_dir: str | None = None, image_size: int | None = None,
             batch_size: int = 64, val_fraction: float | None = None,
             seed: int | None = None, source: DataSource | None = None) -> DataSetup:
    """The split a model is evaluated on (see :func:`data_source`, whose result
    ``source`` is, where already resolved); the run's labels.txt fixes the class order.

    Raises:
        UserError: no dataset or image size can be found, or the data cannot be read.
    """
    if source is None:
        source = data_source(model_path, split=split, dataset=dataset, data_dir=data_dir,
                             val_fraction=val_fraction, seed=seed)
    run = source.run.config or {}
    dataset, data_dir = source.dataset, source.data_dir
    image_size = image_size or predictor.image_size or run.get("image_size")
    if not image_size:
        raise UserError("image_size= is required (the model's input size is not fixed)")
    labels = getattr(predictor, "labels", None) or source.run.labels
    evaluated = data.eval_data(
        dataset, data_dir, split, int(image_size), batch_size,
        val_fraction=val_fraction if val_fraction is not None else run.get("val_fraction", 0.1),
        seed=seed if seed is not None else run.get("seed", 0),
        num_classes=predictor.num_outputs,
        class_names=tuple(labels) if labels and dataset == "folder" else None)
    return DataSetup(evaluated, tuple(labels) if labels else None, source.same_data, dataset,
                     data_dir, int(image_size))


# Splits carved from the data a run trained on: scoring them needs the run's own carve.
CARVED_SPLITS = ("train", "val", "validation")


def _check_outputs(model_path, data_dir, *, output_json, confusion_png) -> None:
    """Refuses output paths that would replace the model, the data or a run's file, or an
    existing file of another kind."""
    for path, what, valid in ((output_json, "output_json", _is_json),
                              (confusion_png, "confusion_png", _is_png)):
        if not path:
            continue
        layout.check_output(path, inputs=[model_path, data_dir], what=what)
        path = os.path.expanduser(os.fspath(path))
        if os.path.isdir(path):
            raise UserError(f"{what} {path} is a folder; name a file")
        if os.path.isfile(path) and not valid(path):
            raise UserError(f"{what} {path} exists and is not a {what.split('_')[-1]} file "
                            "this tool wrote; choose another path")
    if output_json and confusion_png and os.path.realpath(os.fspath(output_json)) == \
            os.path.realpath(os.fspath(confusion_png)):
        raise UserError("output_json and confusion_png name the same file; give each its own")


def _is_json(path) -> bool:
    try:
        with open(path) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _check_run_files(found: reader.FoundRun, model_path, *, split, dataset, data_dir,
                     val_fraction, seed) -> None:
    """Refuses to score a stale file of a run, with a labels.txt edited after training, or
    on a carved split that is not the run's own (other data, val_fraction or seed)."""
    name = os.path.basename(os.fspath(model_path))
    in_folder = os.path.dirname(os.path.abspath(os.path.expanduser(os.fspath(model_path))))
    names = [layout.LABELS]
    if os.path.realpath(in_folder) == os.path.realpath(found.folder) and lineage.tracked(name):
        names.append(name)
    lineage.check_current(found.folder, names)
    run = found.config
    if split not in CARVED_SPLITS or dataset != run.get("dataset"):
        return
    for option, value in (("val_fraction", val_fraction), ("seed", seed)):
        if value is not None and value != run.get(option, value):
            raise UserError(f"{option}={value} is not the {run.get(option)} the run carved its "
                            f"validation images with, so split={split} would mix images it "
                            f"trained on into them; leave {option} out")
    lineage.check_data(found.folder, run, dataset=dataset, data_dir=data_dir,
                       what=f"split={split}")


def plot_confusion(confusion, class_names, path, *, title: str = "") -> None:
    """Writes the confusion matrix (rows normalised to recall) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion, dtype=np.float64)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    k = len(class_names)
    side = min(4 + 0.35 * k, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= 40:  # beyond that, tick labels are unreadable
        ax.set_xticks(range(k), class_names, rotation=90)
        ax.set_yticks(range(k), class_names)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                            color="white" if share[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    try:
        safe_writes.save_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
