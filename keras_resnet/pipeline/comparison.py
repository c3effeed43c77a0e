"""Two classifiers on the same images: top-1 of each, per class side by side, agreement.

The question after an int8 file loses accuracy is *where*: :func:`compare` runs a model
(e.g. the float ``model.keras``) and another (e.g. ``model_ptq_int8.tflite``, or two
``.tflite`` files) on the same pixels of one split, batch by batch, and reports each one's
top-1, the per-class top-1 of both by class name with the classes that lose most first,
how often the two predict the same class, and how many images each gets right that the
other gets wrong. Options left unset come from the first model's training run, as in
:func:`~keras_resnet.pipeline.evaluation.evaluate`.

Example:
    >>> from keras_resnet import pipeline
    >>> report = pipeline.compare("runs/r20/model.keras", "runs/r20/model_ptq_int8.tflite",
    ...                           split="val")
    >>> report["top1"], report["other_top1"], report["agreement"]
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from keras_resnet.pipeline.deploy.scoring import load_predictor, predict_batches
from keras_resnet.pipeline.errors import UserError
from keras_resnet.pipeline.evaluation import data_for
from keras_resnet.pipeline.run import safe_writes


def compare(model_path, other_path, *, split: str = "test", dataset: str | None = None,
            data_dir: str | None = None, image_size: int | None = None,
            batch_size: int = 64, val_fraction: float | None = None,
            seed: int | None = None, num_threads: int | None = None,
            runtime: str = "litert", output_json=None) -> dict[str, Any]:
    """Scores two .keras/.tflite/.onnx classifiers on the same images of one split.

    Args:
        model_path: the reference model (e.g. the float ``model.keras``).
        other_path: the model compared with it (e.g. an int8 ``.tflite``).
        split, dataset, data_dir, image_size, batch_size, val_fraction, seed: the data, as
            in :func:`~keras_resnet.pipeline.evaluation.evaluate` (default: the first
            model's run).
        num_threads: interpreter threads for .tflite/.onnx files.
        runtime: "litert" or "mediapipe" for the .tflite files.
        output_json: also write the result here.

    Returns:
        ``images``, ``top1`` and ``other_top1`` (fractions), ``agreement`` (share of images
        on which both predict the same class), ``only_model_right`` and
        ``only_other_right`` (image counts), ``per_class`` ({name: {"count", "top1",
        "other_top1", "change"}}), ``losing`` (class names, largest drop first) and
        ``table`` (Markdown).

    Raises:
        UserError: a model that does not load, or two models that predict different
            numbers of classes.
    """
    first = load_predictor(model_path, num_threads=num_threads, runtime=runtime)
    second = load_predictor(other_path, num_threads=num_threads, runtime=runtime)
    try:
        if first.num_outputs != second.num_outputs:
            raise UserError(f"{model_path} predicts {first.num_outputs} classes and "
                            f"{other_path} {second.num_outputs}; compare two models of the "
                            "same classes")
        setup = data_for(model_path, first, split=split, dataset=dataset, data_dir=data_dir,
                         image_size=image_size, batch_size=batch_size,
                         val_fraction=val_fraction, seed=seed)
        passed = predict_batches(setup.data.dataset, None, first, second)
    finally:
        for predictor in (first, second):
            if hasattr(predictor, "close"):
                predictor.close()
    names = list(setup.data.class_names)
    labels, (a, b) = passed.labels, passed.classes
    if not len(labels):
        raise UserError(f"split {split} of {setup.dataset} holds no images")
    right_a, right_b = a == labels, b == labels
    per_class = {}
    for i, name in enumerate(names):
        mask = labels == i
        count = int(mask.sum())
        top_a = float(right_a[mask].mean()) if count else None
        top_b = float(right_b[mask].mean()) if count else None
        per_class[name] = {"count": count, "top1": top_a, "other_top1": top_b,
                           "change": None if count == 0 else top_b - top_a}
    losing = sorted((n for n in names if per_class[n]["count"]),
                    key=lambda n: per_class[n]["change"])
    result = {
        "model": os.path.abspath(os.fspath(model_path)),
        "other": os.path.abspath(os.fspath(other_path)),
        "dataset": setup.dataset, "data_dir": setup.data_dir, "split": split,
        "images": int(len(labels)),
        "top1": float(right_a.mean()), "other_top1": float(right_b.mean()),
        "agreement": float(np.mean(a == b)),
        "only_model_right": int(np.sum(right_a & ~right_b)),
        "only_other_right": int(np.sum(right_b & ~right_a)),
        "per_class": per_class,
        "losing": [n for n in losing if per_class[n]["change"] < 0],
    }
    result["table"] = format_comparison(result)
    if output_json:
        folder = os.path.dirname(os.path.abspath(os.fspath(output_json)))
        os.makedirs(folder, exist_ok=True)
        safe_writes.write_json(output_json, {k: v for k, v in result.items() if k != "table"})
    return result


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as text: both top-1 figures, agreement, the per-class table."""
    a, b = os.path.basename(result["model"]), os.path.basename(result["other"])
    lines = [
        f"{result['dataset']} {result['split']} ({result['images']} images):",
        f"  {a}: top-1 {result['top1']:.4f}",
        f"  {b}: top-1 {result['other_top1']:.4f} "
        f"({(result['other_top1'] - result['top1']) * 100:+.2f} points)",
        f"  same class predicted on {result['agreement']:.2%} of the images; only {a} "
        f"right on {result['only_model_right']}, only {b} right on "
        f"{result['only_other_right']}",
        "",
        f"| class | images | {a} | {b} | change (points) |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = sorted(result["per_class"].items(),
                  key=lambda kv: (kv[1]["change"] is None, kv[1]["change"] or 0))
    for name, c in rows:
        if not c["count"]:
            lines.append(f"| {name} | 0 | | | |")
            continue
        lines.append(f"| {name} | {c['count']} | {c['top1']:.4f} | {c['other_top1']:.4f} | "
                     f"{c['change'] * 100:+.2f} |")
    if result["losing"]:
        lines += ["", f"Classes losing most: {', '.join(result['losing'][:3])}"]
    return "\n".join(lines)
