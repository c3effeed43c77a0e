"""Quantization-aware training of a run of tools/train.py: ``python tools/qat.py --model_dir=RUN``.

Builds the tf_keras twin of RUN/model.keras from the same architecture definition, copies
the weights by layer name and checks that the float logits match, wraps it for 8-bit QAT
(tfmot), calibrates the quantization ranges on training images, fine-tunes with the run's
input pipeline at a low learning rate, and writes:

    RUN/model_qat.h5        the QAT model (tf_keras; load inside quantize.quantize_scope())
    RUN/model_int8.tflite   the int8 TFLite model (builtin ops only, audited)
    RUN/model_int8.json     Android hand-off: input size, dtype, int8 scale/zero point
    RUN/qat.json            twin difference, top-1 of the float, QAT and int8 models

Examples:
    python tools/qat.py --model_dir=runs/r20 --epochs=2
    python tools/qat.py --model_dir=runs/pets --dataset=folder --data_dir=/data/pets \\
        --io=uint8 --overwrite

Bad input ends with one line ``error: ...`` and exit status 2.
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
flags.DEFINE_string("dataset", None, "dataset (default: the run's).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "data directory (default: the run's).", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 2, "fine-tuning epochs.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", None, "batch size (default: the run's).", flag_values=FLAGS)
flags.DEFINE_float("learning_rate", None, "initial learning rate, cosine-decayed to 0 "
                   "(default: 1% of the run's).", flag_values=FLAGS)
flags.DEFINE_integer("steps_per_epoch", None, "steps per epoch (default: one pass over the "
                     "training data).", flag_values=FLAGS)
flags.DEFINE_integer("calibration_steps", 32, "training batches that set the quantization "
                     "ranges before fine-tuning.", flag_values=FLAGS)
flags.DEFINE_bool("freeze_bn", True, "keep the float run's BN statistics and affine "
                  "parameters during fine-tuning.", flag_values=FLAGS)
flags.DEFINE_enum("io", "float32", ["float32", "int8", "uint8"], "input/output type of "
                  "model_int8.tflite (uint8: camera frames go in as they are).", flag_values=FLAGS)
flags.DEFINE_integer("agreement_samples", 500, "validation images on which the int8 file "
                     "is compared with the QAT model.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace existing model_qat.h5 / model_int8.tflite.",
                  flag_values=FLAGS)
flags.DEFINE_string("verbose", "auto", "Keras progress bar: auto (on a terminal), true or "
                    "false.", flag_values=FLAGS)

OUTPUTS = ("model_qat.h5", "model_int8.tflite", "model_int8.json", "qat.json")


def _log(message: str) -> None:
    print(message, flush=True)


def run_qat() -> dict:
    """Runs the whole job on the parsed flags; returns the figures written to qat.json."""
    import numpy as np

    from keras_resnet.pipeline import data, export, quantize

    run = quantize.read_run(FLAGS.model_dir)
    quantize.check_variant(run)
    existing = [f for f in OUTPUTS if (run.path / f).exists()]
    if existing and not FLAGS.overwrite:
        raise quantize.QuantizeError(f"{run.path / existing[0]} already exists; pass "
                                     "--overwrite to replace it")
    settings = quantize.data_settings(run, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
                                      batch_size=FLAGS.batch_size)
    for name in ("epochs", "calibration_steps"):
        if FLAGS[name].value < 1:
            raise quantize.QuantizeError(f"--{name}={FLAGS[name].value} must be at least 1")
    start = time.perf_counter()
    model = quantize.load_keras_model(run)
    quantize.check_architecture(run, model)
    bundle = data.load_data(**settings, augment=True)
    if bundle.val is None:
        raise quantize.QuantizeError("the run has no validation split (val_fraction=0), so "
                                     "the quantized model cannot be checked")
    if tuple(bundle.class_names) != run.labels:
        raise quantize.QuantizeError(f"the classes of {settings['dataset']} differ from the "
                                     f"run's labels.txt; pass the run's dataset")
    val_images, val_labels = quantize.take(bundle.val, FLAGS.agreement_samples)
    twin, diff = quantize.build_twin(run, model, sample=val_images[:32])
    _log(f"tf_keras twin of {run.variant}: weights copied by layer name; max |logit "
         f"difference| vs Keras 3 = {diff:.3g} on {min(32, len(val_images))} images")

    learning_rate = FLAGS.learning_rate
    if learning_rate is None:
        learning_rate = 0.01 * float(run.config.get("learning_rate") or 0.1)
    qat = quantize.quantize_model(twin, variant=run.variant)
    used = quantize.calibrate(qat, bundle.train, steps=FLAGS.calibration_steps)
    float_top1 = export.top1(np.asarray(model.predict(val_images, verbose=0)), val_labels)
    before = export.top1(qat.predict(val_images, verbose=0), val_labels)
    _log(f"calibrated quantization ranges on {used} batches; top-1 on {len(val_images)} "
         f"validation images: float {float_top1:.2f}%, QAT before fine-tuning {before:.2f}%")
    verbose = {"auto": 1 if sys.stdout.isatty() else 2, "true": 1, "false": 2}.get(
        FLAGS.verbose, 2)
    quantize.fine_tune(qat, bundle.train, bundle.val, epochs=FLAGS.epochs,
                       learning_rate=learning_rate, freeze_bn=FLAGS.freeze_bn,
                       steps_per_epoch=FLAGS.steps_per_epoch, verbose=verbose)
    qat_logits = qat.predict(val_images, verbose=0)
    after = export.top1(qat_logits, val_labels)

    quantize.save_qat(qat, run.path / "model_qat.h5")
    content = export.convert(qat, "qat_int8", io=FLAGS.io)
    report = export.audit(content, int8=True, name="model_int8.tflite")
    (run.path / "model_int8.tflite").write_bytes(content)
    int8_logits = export.LiteRTModel(content, num_threads=2).predict(val_images)
    int8_top1 = export.top1(int8_logits, val_labels)
    agreement = float(np.mean(int8_logits.argmax(-1) == qat_logits.argmax(-1)) * 100)
    handoff = export.handoff(content, model_file="model_int8.tflite",
                             variant=run.variant, top1=int8_top1)
    export.write_handoff(run.path / "model_int8.json", handoff)
    figures = {
        "variant": run.variant, "twin_max_abs_logit_diff": diff,
        "calibration_batches": used, "epochs": FLAGS.epochs, "learning_rate": learning_rate,
        "freeze_bn": FLAGS.freeze_bn, "io": FLAGS.io, "eval_images": len(val_images),
        "float_top1": float_top1, "qat_top1_before_fine_tuning": before,
        "qat_top1": after, "int8_top1": int8_top1,
        "int8_vs_qat_top1_agreement": agreement,
        "int8_ops": dict(report.ops), "int8_bytes": len(content),
        "wall_time_s": time.perf_counter() - start,
    }
    (run.path / "qat.json").write_text(json.dumps(figures, indent=1) + "\n")
    _log(f"top-1 on {len(val_images)} validation images: float {float_top1:.2f}%, QAT "
         f"{after:.2f}%, int8 TFLite {int8_top1:.2f}% (int8 agrees with QAT on "
         f"{agreement:.1f}%)")
    _log(f"op audit: builtin ops only, every conv/FC in int8 ({report.summary()})")
    _log(f"wrote {run.path / 'model_qat.h5'}, {run.path / 'model_int8.tflite'} "
         f"({len(content) / 1024:.1f} KiB), model_int8.json, qat.json")
    return figures


def main(argv: list[str]) -> int:
    """Parses flags and runs QAT; returns the exit status (2 for bad input)."""
    status, _ = _cli.parse(FLAGS, argv)
    if status is not None:
        return status
    if not FLAGS.model_dir:
        return _cli.error("--model_dir is required: the run folder tools/train.py wrote")
    from keras_resnet.pipeline.data import UserError

    try:
        run_qat()
    except UserError as e:
        return _cli.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
