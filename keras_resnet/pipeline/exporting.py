"""Exports a run to TFLite and verifies every file on the LiteRT runtime.

Modes (``modes=``; default ``all``):

    float32    model_float32.tflite   the float model
    float16    model_float16.tflite   float16 weights, float32 compute
    dynamic    model_dynamic.tflite   dynamic-range: int8 weights, float activations
    ptq_int8   model_ptq_int8.tflite  full-integer post-training quantization, calibrated
                                      on images of the training data
    qat_int8   model_int8.tflite      the QAT int8 model: the file qat() wrote, or
                                      converted from model_qat.h5 when absent (or with
                                      overwrite=True)
    onnx       model.onnx             the float model for ONNX Runtime
                                      (:mod:`~keras_resnet.pipeline.deploy.onnx_export`)

``all`` is every TFLite mode (qat_int8 only when qat() has run); onnx is written when
named. Every graph ends in a softmax, so its scores are probabilities an app can threshold
(MediaPipe's ``score_threshold``, a "top results above 50%" list), and carries TFLite
metadata (:mod:`~keras_resnet.pipeline.deploy.metadata`): labels, input normalisation and
description, so MediaPipe Tasks' ImageClassifier runs it as it is. Every file is audited
(builtin ops only; int8 convs in int8 files) and run with LiteRT on the run's validation
split; one table compares size, top-1, scores against the Keras float model, latency with
1 and 2 threads and whether LiteRT's GPU delegate takes every op
(:mod:`~keras_resnet.pipeline.deploy.delegates`, naming the ops that would fall back to the
CPU). A ``<file>.json`` next to each file is the hand-off for apps that do not read
metadata. Each run of export records what its files were made from
(:mod:`~keras_resnet.pipeline.run.lineage`) and ends with all of them or none.

An int8 file that loses more than ``max_accuracy_drop`` (or any, with
``layer_errors=True``) comes with the per-layer quantization error of TFLite's
quantization debugger; ``keep_float="auto"`` re-exports the ptq_int8 file with the layers
adding most error kept in float until it is within the limit, ``keep_float=[names]`` keeps
the named ones (:mod:`~keras_resnet.pipeline.quantization.selective`).

Example:
    >>> from keras_resnet import pipeline
    >>> report = pipeline.export("runs/r20", modes=["float32", "ptq_int8"])
    >>> [(row["name"], row["top1"]) for row in report["rows"]]
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from keras_resnet.pipeline import data
from keras_resnet.pipeline.deploy import metadata, tflite
from keras_resnet.pipeline.deploy.litert import LiteRTModel
from keras_resnet.pipeline.deploy.scoring import (
    Predictions,
    predict_batches,
    softmax,
    with_softmax,
)
from keras_resnet.pipeline.errors import DataError, ExportError, at_least, choose
from keras_resnet.pipeline.run import layout, lineage, lock, reader, safe_writes


@dataclasses.dataclass
class Row:
    """One line of the verification table (accuracies in %, score differences absolute)."""

    name: str
    size: int
    top1: float
    top1_change: float
    max_diff: float
    mean_diff: float
    latency_1: float
    latency_2: float
    int8: bool = False
    runtime: str = "LiteRT"
    gpu_delegate: str = ""  # the GPU-delegate verdict (delegates.GpuVerdict.summary)
    gpu_fallback: list[str] = dataclasses.field(default_factory=list)
    float_layers: list[str] = dataclasses.field(default_factory=list)


def verify(content: bytes, *, name: str, dataset, reference: Predictions, int8: bool,
           latency_image: np.ndarray, limit: int | None = None, parity_samples: int = 100,
           latency_runs: int = 50, float_layers: Sequence[str] = ()) -> Row:
    """Audits a file and measures it on the LiteRT runtime against the Keras float model.

    Args:
        content: the flatbuffer.
        name: its label in the table.
        dataset: batched ``(images, labels)`` validation data (float32 raw pixels), read
            batch by batch.
        reference: the Keras float model's :class:`~keras_resnet.pipeline.evaluation.
            Predictions` on the same images, keeping the probabilities of the first
            ``parity_samples``.
        int8: audit as an int8 file.
        latency_image: the image (float32 raw pixels) timed for latency.
        limit: images of ``dataset`` to score (None: all).
        parity_samples: images on which score differences are measured.
        latency_runs: timed single-image invocations per thread count.
        float_layers: layers an int8 file keeps in float on purpose (audited for builtin
            ops only).
    """
    from keras_resnet.pipeline.deploy import delegates

    tflite.audit(content, int8=int8 and not float_layers, name=name)
    row = measure(lambda threads: LiteRTModel(content, num_threads=threads), name=name,
                  size=len(content), dataset=dataset, reference=reference,
                  latency_image=latency_image, limit=limit, parity_samples=parity_samples,
                  latency_runs=latency_runs)
    gpu = delegates.gpu_compatibility(content)
    return dataclasses.replace(row, int8=int8, gpu_delegate=gpu.summary(),
                               gpu_fallback=gpu.fallback, float_layers=list(float_layers))


def measure(runner, *, name: str, size: int, dataset, reference: Predictions,
            latency_image: np.ndarray, limit: int | None = None, parity_samples: int = 100,
            latency_runs: int = 50, runtime: str = "LiteRT") -> Row:
    """Top-1, score differences against Keras and latency of one file on one runtime.

    ``runner(threads)`` returns an object with ``predict(images)`` and
    ``latency_ms(image, runs=...)``; the other arguments are those of :func:`verify`.
    """
    got = predict_batches(dataset, limit, runner(2).predict, keep=parity_samples)
    if not np.array_equal(got.labels, reference.labels):
        raise ExportError("the validation data changed between two passes; export needs a "
                          "deterministic validation pipeline")
    n = min(parity_samples, len(got.labels))
    diff = np.abs(got.scores[0][:n] - reference.scores[0][:n])
    latencies = [runner(t).latency_ms(latency_image, runs=latency_runs) for t in (1, 2)]
    accuracy = got.top1()
    return Row(name=name, size=size, top1=accuracy,
               top1_change=accuracy - reference.top1(), max_diff=float(diff.max()),
               mean_diff=float(diff.mean()), latency_1=latencies[0], latency_2=latencies[1],
               runtime=runtime)


def format_table(rows: Sequence[Row], *, keras_top1: float, keras_size: int | None = None,
                 samples: int, parity_samples: int) -> str:
    """The verification table as Markdown."""
    head = [f"LiteRT on {samples} validation images (model.onnx: ONNX Runtime); score "
            f"(softmax) differences vs Keras float on the first "
            f"{min(parity_samples, samples)}; latency: median, batch 1; GPU delegate: "
            "whether LiteRT's GPU delegate takes every op.",
            "",
            "| format | size | size ratio | top-1 % | vs Keras | max score diff "
            "| mean score diff | latency 1 thr (ms) | latency 2 thr (ms) | GPU delegate |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| Keras float | {_size(keras_size)} | | {keras_top1:.2f} | | | | | | |"]
    base = next((r.size for r in rows if r.name.startswith("float32")), None)
    lines = []
    for r in rows:
        ratio = f"{r.size / base:.3f}x" if base else ""
        lines.append(f"| {r.name} | {_size(r.size)} | {ratio} | {r.top1:.2f} | "
                     f"{r.top1_change:+.2f} | {r.max_diff:.4g} | {r.mean_diff:.4g} | "
                     f"{r.latency_1:.2f} | {r.latency_2:.2f} | "
                     f"{r.gpu_delegate or 'n/a (' + r.runtime + ')'} |")
    return "\n".join(head + lines)


def _size(size: int | None) -> str:
    if size is None:
        return ""
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


ONNX_MODE = "onnx"
MODES = (*tflite.MODES, ONNX_MODE)


def output_file(mode: str) -> str:
    """The file a mode writes in the run folder."""
    return layout.ONNX_MODEL if mode == ONNX_MODE else tflite.FILES[mode]


def _modes(run: reader.Run, modes: Sequence[str]) -> tuple[list[str], list[str]]:
    """The modes to run, and notes on modes that ``all`` leaves out."""
    requested = [m.strip() for m in modes if m.strip()]
    unknown = [m for m in requested if m != "all" and m not in MODES]
    if unknown or not requested:
        raise ExportError(f"modes={','.join(modes)} is not valid; choose from "
                          f"{', '.join(MODES)} or all")
    if "all" not in requested:
        return list(dict.fromkeys(requested)), []
    result = list(dict.fromkeys([*tflite.MODES, *requested]))
    result.remove("all")
    if not any((run.path / f).is_file() for f in (layout.INT8_MODEL, layout.QAT_MODEL)):
        result.remove("qat_int8")
        return result, ["qat_int8 left out: run qat first"]
    return result, []


def export(run_dir, modes: Sequence[str] = ("all",), *, io: str = "float32",
           dataset: str | None = None, data_dir: str | None = None,
           batch_size: int | None = None, representative_samples: int = 200,
           eval_samples: int = 0, parity_samples: int = 100, latency_runs: int = 50,
           max_accuracy_drop: float = 1.0, keep_float=None, layer_errors: bool = False,
           overwrite: bool = False) -> dict:
    """Converts a run to TFLite (and ONNX) files, audits them and verifies them on LiteRT
    (ONNX Runtime).

    Args:
        run_dir: the run folder training wrote.
        modes: float32, float16, dynamic, ptq_int8, qat_int8, onnx, or all (the TFLite
            modes).
        io: input/output type of the int8 files: float32, int8 or uint8.
        dataset, data_dir, batch_size: the data (default: the run's).
        representative_samples: training images calibrating ptq_int8.
        eval_samples: validation images to evaluate on (0: all).
        parity_samples: validation images on which scores are compared with Keras.
        latency_runs: timed single-image runs per thread count.
        max_accuracy_drop: largest allowed top-1 drop (points) of an int8 file below the
            Keras float model; ``report["failed"]`` lists the files beyond it.
        keep_float: for ptq_int8: "auto" keeps the layers adding most quantization error
            in float, two at a time, until the file is within ``max_accuracy_drop``; a
            list (or comma-separated string) of Keras layer names keeps those float.
        layer_errors: report the per-layer quantization error of ptq_int8 even when it is
            within the limit (it is reported whenever it is not).
        overwrite: replace existing files.

    Returns:
        The report also written to export.json: Keras top-1, one row per file (with its
        GPU-delegate verdict), the sidecar names, the rows that failed
        ``max_accuracy_drop``, the per-layer error when measured (``layer_errors``) and
        what ``keep_float`` did (``keep_float``); ``report["table"]`` is the Markdown
        table.

    Raises:
        UserError: bad arguments, an incomplete run, missing data, a failed conversion or
            audit, or an existing file without ``overwrite``.
    """
    from keras_resnet.pipeline.quantization import selective

    choose("io", io, tflite.IO_TYPES, error=ExportError)
    keep_float = selective.parse_keep_float(keep_float)
    run = reader.read_run(run_dir)
    modes, notes = _modes(run, modes)
    if keep_float and "ptq_int8" not in modes:
        raise ExportError("keep_float applies to the ptq_int8 file; add ptq_int8 to modes")
    if keep_float and io != "float32":
        raise ExportError(f"keep_float needs io=float32 (the quantization debugger writes "
                          f"float input/output), not io={io}")
    if ONNX_MODE in modes:
        from keras_resnet.pipeline.deploy import onnx_export

        problem = onnx_export.unavailable()
        if problem:
            raise ExportError(problem)
    at_least(ExportError, minimum=0, eval_samples=eval_samples,
             max_accuracy_drop=max_accuracy_drop)
    at_least(ExportError, parity_samples=parity_samples, latency_runs=latency_runs,
             batch_size=batch_size)
    with lock.RunLock(run.path):
        lineage.adopt(run.path)
        plan = _plan(run, modes, io=io, overwrite=overwrite)
        lineage.check_current(run.path, plan.reads)
        lineage.check_data(run.path, run.config, dataset=dataset, data_dir=data_dir,
                           what="scoring the files on its validation images")
        with lineage.step(run.path, "export", OUTPUTS, replace=plan.replace) as stop:
            report = _export(run, modes, notes, plan=plan, io=io,
                             settings=run.data_settings(dataset=dataset, data_dir=data_dir,
                                                        batch_size=batch_size),
                             representative_samples=representative_samples,
                             eval_samples=eval_samples, parity_samples=parity_samples,
                             latency_runs=latency_runs, max_accuracy_drop=max_accuracy_drop,
                             keep_float=keep_float, layer_errors=layer_errors)
            stop.check()
            lineage.record(run.path, plan.writes, by="export",
                           data=(run.config.get("data") or {}).get("digest"))
        return report


# Every file an export may write in the run folder (qat_int8 rewrites the QAT int8 file).
OUTPUTS = (*layout.EXPORT_FILES, layout.INT8_MODEL)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one export reads and writes in the run folder.

    Attributes:
        reuse_qat: qat_int8 re-verifies the int8 file qat() wrote instead of converting.
        convert: the modes converted now.
        reads: the run's files the export is made from.
        writes: every file it writes (converted files, hand-off files, export.json).
        replace: existing files it writes again (overwrite=True).
    """

    reuse_qat: bool
    convert: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    replace: tuple[str, ...]


def _plan(run, modes, *, io, overwrite) -> Plan:
    """The files an export reads and writes; refuses what it cannot do."""
    leftovers = set(lineage.leftovers(run.path, OUTPUTS))

    def exists(name):
        return (run.path / name).is_file() and name not in leftovers

    reuse_qat = "qat_int8" in modes and exists(layout.INT8_MODEL) and not overwrite
    if "qat_int8" in modes and not reuse_qat and not exists(layout.QAT_MODEL):
        raise ExportError(f"mode qat_int8 needs {run.path / layout.QAT_MODEL}; run qat first")
    convert = tuple(m for m in modes if not (m == "qat_int8" and reuse_qat))
    if io != "float32" and not any(m in tflite.INT8_MODES for m in convert):
        raise ExportError(f"io={io} applies to int8 files only; add ptq_int8 or qat_int8 to "
                          "modes")
    for mode in convert:
        path = run.path / output_file(mode)
        if exists(path.name) and not overwrite:
            raise ExportError(f"{path} already exists; pass overwrite=True to replace it")
    writes = [output_file(m) for m in convert]
    writes += [layout.sidecar(tflite.FILES[m]) for m in modes if m in tflite.FILES]
    writes.append(layout.EXPORT_REPORT)
    reads = [layout.MODEL, layout.LABELS]
    if "qat_int8" in modes:
        reads.append(layout.INT8_MODEL if reuse_qat else layout.QAT_MODEL)
    return Plan(reuse_qat=reuse_qat, convert=convert, reads=tuple(reads), writes=tuple(writes),
                replace=tuple(n for n in writes if exists(n)))


def _export(run, modes, notes, *, plan, io, settings, representative_samples,
            eval_samples, parity_samples, latency_runs, max_accuracy_drop, keep_float,
            layer_errors):
    from keras_resnet.pipeline.quantization import calibration

    reuse_qat, writes = plan.reuse_qat, plan.convert
    model = reader.load_model(run)
    common = {k: settings[k] for k in ("val_fraction", "seed", "num_classes")}
    representative = None
    if "ptq_int8" in writes:
        if representative_samples < 1:
            raise ExportError("representative_samples must be at least 1: full-integer "
                              "quantization needs calibration images")
        try:
            train = data.eval_data(settings["dataset"], settings["data_dir"], "train",
                                   settings["image_size"], settings["batch_size"], **common)
        except DataError as e:
            raise ExportError(f"no training images for the representative dataset ({e})") \
                from None
        representative = data.take(train.dataset, representative_samples)[0]
    val = data.eval_data(settings["dataset"], settings["data_dir"], "val",
                         settings["image_size"], settings["batch_size"], **common)
    limit = eval_samples or None
    reference = predict_batches(val.dataset, limit,
                                lambda x: softmax(model.predict_on_batch(x)),
                                keep=parity_samples)
    images = len(reference.labels)
    if not images:
        raise ExportError(f"the validation split of {settings['dataset']} is empty")
    keras_top1 = reference.top1()
    latency_image = data.take(val.dataset, 1)[0][0]
    _log(f"Keras float top-1 on {images} validation images: {keras_top1:.2f}%")
    for note in notes:
        _log(note)

    rows, sidecars, extra = [], {}, {}
    measuring = dict(dataset=val.dataset, reference=reference, latency_image=latency_image,
                     limit=limit, parity_samples=parity_samples, latency_runs=latency_runs)
    # qat_int8 last: loading a QAT model imports tfmot, which switches tf.keras to tf_keras.
    for mode in sorted(modes, key=lambda m: m == "qat_int8"):
        path = run.path / output_file(mode)
        if mode == ONNX_MODE:
            rows.append(_export_onnx(run, model, path, measuring))
            continue
        int8 = mode in tflite.INT8_MODES
        start = time.perf_counter()
        reused = mode == "qat_int8" and reuse_qat
        float_layers = []
        if reused:
            content = path.read_bytes()
            origin = "written by qat"
        else:
            source = (calibration.load_qat(run.path / layout.QAT_MODEL) if mode == "qat_int8"
                      else with_softmax(model))
            content = tflite.convert(source, mode, io=io if int8 else "float32",
                                     representative=representative)
            if mode == "ptq_int8" and keep_float:
                content, float_layers = _keep_float(
                    source, content, keep_float, representative=representative,
                    target=keras_top1 - max_accuracy_drop, measuring=measuring,
                    report=extra)
            tflite.audit(content, int8=int8 and not float_layers, name=path.name)
            content = metadata.attach(content, labels=run.labels, variant=run.variant,
                                      description=metadata.describe_run(run, mode))
            safe_writes.write_atomic(path, content)
            origin = f"converted in {time.perf_counter() - start:.0f} s"
        row = verify(content, name=f"{mode} ({path.name})", int8=int8,
                     float_layers=float_layers, **measuring)
        rows.append(row)
        _log(f"{path.name}: {origin}; audit passed ({tflite.inspect(content).summary()}); "
             f"GPU delegate: {row.gpu_delegate}")
        if mode == "ptq_int8" and (layer_errors or -row.top1_change > max_accuracy_drop) \
                and "layer_errors" not in extra:
            extra["layer_errors"] = _layer_errors(source, representative, row,
                                                  max_accuracy_drop, keep_float)
        sidecar = run.path / layout.sidecar(path.name)
        made_from = {path.name: lineage.digest_of(path), **lineage.made_from(run.path,
                                                                             path.name)}
        handed = metadata.handoff(content, model_file=path.name, variant=run.variant, top1=row.top1,
                         images=images, made_from=made_from)
        if float_layers:
            handed["float_layers"] = float_layers
        safe_writes.write_json(sidecar, handed)
        sidecars[mode] = sidecar.name

    keras_size = (run.path / layout.MODEL).stat().st_size
    table = format_table(rows, keras_top1=keras_top1, keras_size=keras_size,
                         samples=images, parity_samples=parity_samples)
    _log("")
    _log(table)
    failed = [r.name for r in rows if r.int8 and -r.top1_change > max_accuracy_drop]
    report = {"keras_top1": keras_top1, "eval_images": images, "io": io,
              "rows": [dataclasses.asdict(r) for r in rows], "handoff": sidecars,
              "max_accuracy_drop": max_accuracy_drop, "failed": failed, **extra,
              "made_from": lineage.made_from(run.path, layout.EXPORT_REPORT)}
    safe_writes.write_json(run.path / layout.EXPORT_REPORT, report)
    return {**report, "table": table}


def _ptq_score(measuring: dict):
    """File content -> top-1 (%) on the export's validation images."""
    def score(content: bytes) -> float:
        return predict_batches(measuring["dataset"], measuring["limit"],
                               LiteRTModel(content, num_threads=2).predict).top1()
    return score


def _layer_table(errors) -> list[dict]:
    return [dataclasses.asdict(e) for e in errors]


def _keep_float(model, plain: bytes, keep_float, *, representative, target: float,
                measuring: dict, report: dict) -> tuple[bytes, list[str]]:
    """The ptq_int8 file with layers kept float; fills ``report`` with the layer errors
    and what it cost (size, latency) against the all-int8 file."""
    from keras_resnet.pipeline.quantization import selective as sq

    _log("ptq_int8: measuring the per-layer quantization error (TFLite quantization "
         "debugger) ...")
    session = sq.Debugger(model, representative)
    errors = session.layer_errors()
    _log(sq.format_layer_errors(errors))
    report["layer_errors"] = _layer_table(errors)
    if keep_float == sq.AUTO:
        repaired = sq.repair(session, _ptq_score(measuring), target=target, plain=plain,
                             log=_log)
        content, named, floats = repaired.content, repaired.kept, repaired.float_layers
        steps, within = repaired.steps, repaired.within
    else:
        content, floats = session.convert_keep_float(keep_float)
        named, steps, within = list(keep_float), [], None
    image = measuring["latency_image"]
    runs = measuring["latency_runs"]
    cost = {"mode": "auto" if keep_float == sq.AUTO else "named", "named": named,
            "float_layers": floats, "steps": [list(s) for s in steps],
            "within_limit": within, "int8_size": len(plain), "size": len(content),
            **{f"int8_latency_{t}": LiteRTModel(plain, num_threads=t).latency_ms(image,
                                                                                 runs=runs)
               for t in (1, 2)},
            **{f"latency_{t}": LiteRTModel(content, num_threads=t).latency_ms(image,
                                                                              runs=runs)
               for t in (1, 2)}}
    report["keep_float"] = cost
    if floats:
        _log(f"keep_float: {len(floats)} layer(s) run in float ({', '.join(floats)}); size "
             f"{_size(len(plain))} -> {_size(len(content))} "
             f"({len(content) / len(plain) - 1:+.1%}, before metadata); latency 1 thread "
             f"{cost['int8_latency_1']:.2f} -> {cost['latency_1']:.2f} ms, 2 threads "
             f"{cost['int8_latency_2']:.2f} -> {cost['latency_2']:.2f} ms")
    else:
        _log("keep_float: the all-int8 file is within the limit; no layer kept float")
    if within is False:
        _log(f"keep_float=auto: still below the limit with {len(named)} layers float")
    return content, floats


def _layer_errors(model, representative, row: Row, max_accuracy_drop: float,
                  keep_float) -> list[dict]:
    """The per-layer error of a ptq_int8 file, printed with what to do."""
    from keras_resnet.pipeline.quantization import selective as sq

    _log(f"ptq_int8: top-1 {row.top1_change:+.2f} points against Keras float (limit "
         f"{max_accuracy_drop}); per-layer quantization error (TFLite quantization "
         "debugger, on training images):")
    errors = sq.Debugger(model, representative).layer_errors()
    _log(sq.format_layer_errors(errors))
    if -row.top1_change > max_accuracy_drop and not keep_float:
        _log("Re-export with keep_float=auto to keep the layers adding most error in float "
             "(or keep_float=NAME,... to name them), or calibrate on more images "
             "(representative_samples).")
    return _layer_table(errors)


def _export_onnx(run, model, path, measuring: dict) -> Row:
    """Writes model.onnx and measures it on ONNX Runtime."""
    from keras_resnet.pipeline.deploy import onnx_export

    start = time.perf_counter()
    content = onnx_export.convert(
        with_softmax(model), labels=run.labels, variant=run.variant,
        description=metadata.describe_run(run, ONNX_MODE))
    safe_writes.write_atomic(path, content)
    _log(f"{path.name}: converted in {time.perf_counter() - start:.0f} s")
    row = measure(lambda threads: onnx_export.OnnxModel(content, num_threads=threads),
                  name=f"{ONNX_MODE} ({path.name})", size=len(content),
                  runtime="ONNX Runtime", **measuring)
    return row


def _log(message: str) -> None:
    print(message, flush=True)
