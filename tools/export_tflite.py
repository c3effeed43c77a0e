"""Exports a run to TFLite and verifies every file.

Usage: ``python tools/export_tflite.py --model_dir=RUN``.

Modes (``--modes``, comma-separated; default ``all``):

    float32    RUN/model_float32.tflite   the float model
    float16    RUN/model_float16.tflite   float16 weights, float32 compute
    dynamic    RUN/model_dynamic.tflite   dynamic-range: int8 weights, float activations
    ptq_int8   RUN/model_ptq_int8.tflite  full-integer post-training quantization,
                                          calibrated on images of the training data
    qat_int8   RUN/model_int8.tflite      the QAT int8 model: the file tools/qat.py wrote,
                                          or converted from RUN/model_qat.h5 when absent
                                          (or with --overwrite)

``all`` includes qat_int8 only when tools/qat.py has run. Every file is converted with
TFLite builtin ops only and audited (no Flex/custom ops; in int8 files every CONV_2D,
DEPTHWISE_CONV_2D and FULLY_CONNECTED runs in int8), then run with the LiteRT interpreter on
the run's validation split. One table compares size, top-1, logits against the Keras float
model and latency with 1 and 2 threads. A ``<file>.json`` next to each file is the Android
hand-off (input size, dtype, int8 scale/zero point; the app feeds raw 0..255 RGB).

Exit status: 0 when every int8 file is within --max_accuracy_drop points of the Keras
float top-1, 1 when one is not, 2 for bad input (one line ``error: ...``).

Examples:
    python tools/export_tflite.py --model_dir=runs/r20
    python tools/export_tflite.py --model_dir=runs/r20 --modes=ptq_int8 --io=uint8 \\
        --overwrite
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN kernels: 1.6x faster ResNet training on CPUs where TensorFlow leaves them off by
# default (AMD, AVX2-only); see BUILD.md "Performance".
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import _cli  # noqa: E402
from absl import flags  # noqa: E402

# Own flag registry: several tools can then be imported in one process (tests).
FLAGS = flags.FlagValues()

flags.DEFINE_string("model_dir", None, "run folder of tools/train.py (model.keras, "
                    "config.json, labels.txt).", flag_values=FLAGS)
flags.DEFINE_list("modes", ["all"], "comma-separated: float32, float16, dynamic, ptq_int8, "
                  "qat_int8, or all.", flag_values=FLAGS)
flags.DEFINE_enum("io", "float32", ["float32", "int8", "uint8"], "input/output type of the "
                  "int8 files (uint8: camera frames go in as they are).", flag_values=FLAGS)
flags.DEFINE_string("dataset", None, "dataset (default: the run's).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "data directory (default: the run's).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", None, "batch size of the input pipeline (default: the "
                     "run's).", flag_values=FLAGS)
flags.DEFINE_integer("representative_samples", 200, "training images calibrating ptq_int8.",
                     flag_values=FLAGS)
flags.DEFINE_integer("eval_samples", 0, "validation images to evaluate on (0: all).",
                     flag_values=FLAGS)
flags.DEFINE_integer("parity_samples", 100, "validation images on which logits are compared "
                     "with the Keras float model.", flag_values=FLAGS)
flags.DEFINE_integer("latency_runs", 50, "timed single-image runs per thread count.",
                     flag_values=FLAGS)
flags.DEFINE_float("max_accuracy_drop", 1.0, "largest allowed top-1 drop (points) of an int8 "
                   "file below the Keras float model.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace existing output files.", flag_values=FLAGS)


def _log(message: str) -> None:
    print(message, flush=True)


def _modes(run, export, quantize) -> tuple[list[str], list[str]]:
    """The modes to run, and notes on modes that ``all`` leaves out."""
    requested = [m.strip() for m in FLAGS.modes if m.strip()]
    unknown = [m for m in requested if m != "all" and m not in export.MODES]
    if unknown or not requested:
        raise export.ExportError(f"--modes={','.join(FLAGS.modes)} is not valid; choose from "
                                 f"{', '.join(export.MODES)} or all")
    notes = []
    if "all" in requested:
        modes = list(export.MODES)
        qat_ready = any((run.path / f).is_file() for f in ("model_int8.tflite",
                                                           quantize.QAT_FILE))
        if not qat_ready:
            modes.remove("qat_int8")
            notes.append("qat_int8 left out: run tools/qat.py first")
        return modes, notes
    return list(dict.fromkeys(requested)), notes


def export_run() -> int:
    """Converts, audits and verifies; returns the exit status."""
    import numpy as np

    from keras_resnet.pipeline import data, export, quantize

    run = quantize.read_run(FLAGS.model_dir)
    modes, notes = _modes(run, export, quantize)
    for name in ("eval_samples", "parity_samples", "latency_runs"):
        if FLAGS[name].value < 0 or (name == "latency_runs" and FLAGS[name].value < 1):
            raise export.ExportError(f"--{name}={FLAGS[name].value} is out of range")
    # Which files are written, and whether qat_int8 reuses the file tools/qat.py wrote.
    reuse_qat = ("qat_int8" in modes and (run.path / "model_int8.tflite").is_file()
                 and not FLAGS.overwrite)
    if "qat_int8" in modes and not reuse_qat and not (run.path / quantize.QAT_FILE).is_file():
        raise export.ExportError(f"mode qat_int8 needs {run.path / quantize.QAT_FILE}; run "
                                 "tools/qat.py first")
    writes = [m for m in modes if not (m == "qat_int8" and reuse_qat)]
    if FLAGS.io != "float32" and not any(m in export.INT8_MODES for m in writes):
        raise export.ExportError(f"--io={FLAGS.io} applies to int8 files only; add ptq_int8 "
                                 "or qat_int8 to --modes")
    for mode in writes:
        path = run.path / export.FILES[mode]
        if path.exists() and not FLAGS.overwrite:
            raise export.ExportError(f"{path} already exists; pass --overwrite to replace it")
    settings = quantize.data_settings(run, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
                                      batch_size=FLAGS.batch_size)

    model = quantize.load_keras_model(run)
    quantize.check_architecture(run, model)
    common = {k: settings[k] for k in ("val_fraction", "seed", "num_classes")}
    representative = None
    if "ptq_int8" in writes:
        if FLAGS.representative_samples < 1:
            raise export.ExportError("--representative_samples must be at least 1: "
                                     "full-integer quantization needs calibration images")
        try:
            train = data.eval_data(settings["dataset"], settings["data_dir"], "train",
                                   settings["image_size"], settings["batch_size"], **common)
        except data.UserError as e:
            raise export.ExportError(f"no training images for the representative dataset "
                                     f"({e})") from None
        representative = quantize.representative_images(train.dataset,
                                                        FLAGS.representative_samples)
    val = data.eval_data(settings["dataset"], settings["data_dir"], "val",
                         settings["image_size"], settings["batch_size"], **common)
    images, labels = quantize.take(val.dataset, FLAGS.eval_samples or val.size)
    if not len(images):
        raise export.ExportError(f"the validation split of {settings['dataset']} is empty")
    keras_logits = np.asarray(model.predict(images, verbose=0), dtype="float32")
    keras_top1 = export.top1(keras_logits, labels)
    _log(f"Keras float top-1 on {len(images)} validation images: {keras_top1:.2f}%")
    for note in notes:
        _log(note)

    rows, sidecars = [], {}
    # qat_int8 last: loading a QAT model imports tfmot, which switches tf.keras to tf_keras.
    for mode in sorted(modes, key=lambda m: m == "qat_int8"):
        path = run.path / export.FILES[mode]
        int8 = mode in export.INT8_MODES
        io = FLAGS.io if int8 else "float32"
        start = time.perf_counter()
        if mode == "qat_int8" and reuse_qat:
            content = path.read_bytes()
            origin = "tools/qat.py"
        else:
            source = (quantize.load_qat(run.path / quantize.QAT_FILE) if mode == "qat_int8"
                      else model)
            content = export.convert(source, mode, io=io, representative=representative)
            export.audit(content, int8=int8, name=path.name)
            path.write_bytes(content)
            origin = f"converted in {time.perf_counter() - start:.0f} s"
        row = export.verify(content, name=f"{mode} ({path.name})", images=images,
                            labels=labels, reference_logits=keras_logits,
                            reference_top1=keras_top1, int8=int8,
                            parity_samples=FLAGS.parity_samples,
                            latency_runs=FLAGS.latency_runs)
        rows.append(row)
        _log(f"{path.name}: {origin}; audit passed ({export.inspect(content).summary()})")
        if not (mode == "qat_int8" and reuse_qat):
            sidecar = path.with_suffix(".json")
            export.write_handoff(sidecar, export.handoff(
                content, model_file=path.name, variant=run.variant, top1=row.top1))
            sidecars[mode] = sidecar.name

    keras_size = (run.path / "model.keras").stat().st_size
    table = export.format_table(rows, keras_top1=keras_top1, keras_size=keras_size,
                                samples=len(images), parity_samples=FLAGS.parity_samples)
    _log("")
    _log(table)
    summary = {"keras_top1": keras_top1, "eval_images": len(images), "io": FLAGS.io,
               "rows": [vars(r) for r in rows], "handoff": sidecars}
    (run.path / "export.json").write_text(json.dumps(summary, indent=1) + "\n")
    failed = [r for r in rows if r.int8 and -r.top1_change > FLAGS.max_accuracy_drop]
    for r in failed:
        print(f"fail: {r.name} top-1 is {-r.top1_change:.2f} points below Keras float, more "
              f"than --max_accuracy_drop={FLAGS.max_accuracy_drop}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    """Parses flags and exports; returns the exit status (2 for bad input)."""
    status, _ = _cli.parse(FLAGS, argv)
    if status is not None:
        return status
    if not FLAGS.model_dir:
        return _cli.error("--model_dir is required: the run folder tools/train.py wrote")
    from keras_resnet.pipeline.data import UserError

    try:
        return export_run()
    except UserError as e:
        return _cli.error(str(e))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
