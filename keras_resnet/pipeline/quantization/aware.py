"""Quantization-aware training (QAT) of a trained run, ending in an int8 ``.tflite`` file.

tensorflow-model-optimization (tfmot) quantizes only Keras 2 (``tf_keras``) models, so QAT
works on a ``tf_keras`` twin built from the same architecture definition as the run's
Keras 3 model, with the weights copied by layer name. :func:`qat` then wraps the twin
(:mod:`~keras_resnet.pipeline.quantization.quantize_configs`), calibrates and fine-tunes it
(:mod:`~keras_resnet.pipeline.quantization.calibration`), converts it to an audited int8 file with
metadata and checks that file on the LiteRT runtime. It writes into the run folder:

    model_qat.h5        the QAT model (tf_keras; load with :func:`calibration.load_qat`)
    model_int8.tflite   the int8 TFLite model (builtin ops only, audited, with metadata)
    model_int8.json     Android hand-off: input size, dtype, int8 scale/zero point
    qat.json            twin difference, top-1 of the float, QAT and int8 models

Example:
    >>> from keras_resnet import pipeline
    >>> report = pipeline.qat("runs/r20", epochs=1)
    >>> report["int8_top1"]
"""

from __future__ import annotations

import sys
import time

import numpy as np

from keras_resnet.pipeline import data
from keras_resnet.pipeline.deploy import metadata, scoring, tflite
from keras_resnet.pipeline.deploy.litert import LiteRTModel
from keras_resnet.pipeline.errors import QuantizeError, at_least, choose, first_line, positive
from keras_resnet.pipeline.quantization import calibration
from keras_resnet.pipeline.quantization.quantize_configs import check_variant, quantize_model
from keras_resnet.pipeline.run import layout, lineage, lock, reader, safe_writes
from keras_resnet.pipeline.run.config import AUTO_BOOL, build_network

# Probabilities of the twin must match the Keras 3 model's up to float32 rounding through
# ~100 layers; a wrong weight or layer order shows up as differences of order 0.1.
TWIN_TOLERANCE = 1e-3
# Fine-tuning learning rate as a share of the run's peak rate (measured, BUILD.md "Results").
QAT_LR_SHARE = 0.001
OUTPUTS = layout.QAT_FILES


def build_twin(run: reader.Run, model, *, sample: np.ndarray | None = None):
    """Builds the ``tf_keras`` twin of ``model`` and copies its weights by layer name.

    The twin is built from the architecture in ``config.json`` by the same code as the
    Keras 3 model, always in float32 (QAT fails under mixed precision), and ends in a
    softmax layer after the logits: the quantized file then outputs probabilities (int8
    softmax), as every exported file does.

    Args:
        run: the run, for the architecture (``model``, ``model_options``, ``num_classes``).
        model: the trained Keras 3 model.
        sample: images to compare float outputs on (default: 4 random images).

    Returns:
        ``(twin, max_abs_diff)``: the twin and the largest difference of its probabilities
        from the softmax of ``model``'s logits.

    Raises:
        QuantizeError: the variant is unknown, or ``model`` is not that architecture.
    """
    import tf_keras

    import keras_resnet
    from keras_resnet import weights as weights_lib

    input_shape = tuple(model.input_shape[1:])
    source = run.path / layout.MODEL
    try:
        with keras_resnet.layer_library(tf_keras):
            logits = build_network(run.config, classes=run.num_classes,
                                   input_shape=input_shape)
        # A separate softmax layer: fine-tuning trains on the logits before it, where the
        # int8 output's 1/256 steps do not cut the gradient of confident mistakes.
        twin = tf_keras.Model(logits.inputs, tf_keras.layers.Activation(
            "softmax", name=scoring.SOFTMAX_LAYER)(logits.outputs[0]), name=logits.name)
        problem = weights_lib.mismatch(model, twin)
        if problem:
            raise ValueError(f"it {problem}")
        weights_lib.transfer_weights(model, twin)
    except (ValueError, TypeError) as e:
        raise QuantizeError(f"{source} is not the {run.variant} that config.json describes "
                            f"({first_line(e)})") from None
    if sample is None:
        sample = np.random.default_rng(0).uniform(0, 255, (4, *input_shape)).astype("float32")
    want = scoring.softmax(model(sample, training=False))
    got = np.asarray(twin(sample, training=False), dtype="float32")
    diff = float(np.max(np.abs(want - got)))
    if not diff <= TWIN_TOLERANCE:
        raise QuantizeError(f"the tf_keras twin of {source} differs from it by {diff:.3g} in "
                            "the probabilities; the saved model does not match its "
                            "architecture")
    return twin, diff


def _log(message: str) -> None:
    print(message, flush=True)


def _data_digest(run: reader.Run) -> str | None:
    return (run.config.get("data") or {}).get("digest")


def qat(run_dir, *, epochs: int = 1, dataset: str | None = None, data_dir: str | None = None,
        batch_size: int | None = None, learning_rate: float | None = None,
        steps_per_epoch: int | None = None, calibration_steps: int = 32,
        freeze_bn: bool = True, io: str = "float32", agreement_samples: int | None = None,
        overwrite: bool = False, verbose: str = "auto") -> dict:
    """Quantization-aware training of a run folder, ending in ``model_int8.tflite``.

    Args:
        run_dir: the run folder training wrote (model.keras, config.json, labels.txt).
        epochs: fine-tuning epochs.
        dataset: dataset (default: the run's).
        data_dir: data directory (default: the run's).
        batch_size: batch size (default: the run's).
        learning_rate: initial learning rate, cosine-decayed to 0 (default: 0.1% of the
            run's peak: a converged run fine-tuned longer or faster loses validation
            accuracy, see BUILD.md "Results").
        steps_per_epoch: steps per epoch (default: one pass over the training data).
        calibration_steps: training batches that set the quantization ranges first.
        freeze_bn: keep the float run's BN statistics and affine parameters.
        io: input/output type of model_int8.tflite: float32, int8 or uint8 (camera frames
            go in as they are).
        agreement_samples: validation images on which the float, QAT and int8 models are
            scored and the int8 file is compared with the QAT model (default: the whole
            validation split, as tools/export_tflite.py scores it).
        overwrite: replace existing outputs.
        verbose: Keras progress bar: auto (on a terminal), true or false.

    Returns:
        The figures also written to qat.json (top-1 of the float, QAT and int8 models, the
        int8 file's ops and size, wall time).

    Raises:
        UserError: a bad argument, an incomplete run folder, data that differs from the
            run's, a variant QAT cannot handle, a failed conversion or audit.
    """
    choose("io", io, tflite.IO_TYPES, error=QuantizeError)
    choose("verbose", verbose, AUTO_BOOL, error=QuantizeError)
    at_least(QuantizeError, epochs=epochs, calibration_steps=calibration_steps,
             agreement_samples=agreement_samples, batch_size=batch_size,
             steps_per_epoch=steps_per_epoch)
    positive(QuantizeError, learning_rate=learning_rate)
    run = reader.read_run(run_dir)
    check_variant(run.variant)
    with lock.RunLock(run.path):
        lineage.adopt(run.path)
        existing = [f for f in OUTPUTS if (run.path / f).exists()
                    and f not in lineage.leftovers(run.path, OUTPUTS)]
        if existing and not overwrite:
            raise QuantizeError(f"{run.path / existing[0]} already exists; pass "
                                "overwrite=True to replace it")
        lineage.check_current(run.path, [layout.MODEL, layout.LABELS])
        lineage.check_data(run.path, run.config, dataset=dataset, data_dir=data_dir,
                           what="scoring its validation images")
        with lineage.step(run.path, "QAT", OUTPUTS, replace=existing) as stop:
            figures = _qat(run, epochs=epochs, dataset=dataset, data_dir=data_dir,
                           batch_size=batch_size, learning_rate=learning_rate,
                           steps_per_epoch=steps_per_epoch,
                           calibration_steps=calibration_steps, freeze_bn=freeze_bn, io=io,
                           agreement_samples=agreement_samples, verbose=verbose)
            stop.check()
            lineage.record(run.path, OUTPUTS, by="qat", data=_data_digest(run))
        return figures


def _qat(run, *, epochs, dataset, data_dir, batch_size, learning_rate, steps_per_epoch,
         calibration_steps, freeze_bn, io, agreement_samples, verbose):
    settings = run.data_settings(dataset=dataset, data_dir=data_dir, batch_size=batch_size)
    start = time.perf_counter()
    model = reader.load_model(run)
    # Fine-tuning sees the run's own augmentation (Cutout too), as it takes its smoothing.
    cutout = int(run.config["cutout"])
    bundle = data.load_data(**settings, augment=True, cutout=cutout)
    if bundle.val is None:
        raise QuantizeError(f"the run has no validation images (val_fraction="
                            f"{settings['val_fraction']:g} carves none from "
                            f"{settings['dataset']}), so the quantized model cannot be "
                            "checked")
    if tuple(bundle.class_names) != run.labels:
        raise QuantizeError(f"the classes of {settings['dataset']} differ from the run's "
                            "labels.txt; pass the run's dataset")
    sample = data.take(bundle.val, 32)[0]
    twin, diff = build_twin(run, model, sample=sample)
    _log(f"tf_keras twin of {run.variant}: weights copied by layer name; max |probability "
         f"difference| vs Keras 3 = {diff:.3g} on {len(sample)} images")

    if learning_rate is None:
        learning_rate = QAT_LR_SHARE * float(run.config.get("learning_rate") or 0.1)
    label_smoothing = float(run.config.get("label_smoothing") or 0.0)
    qat_model = quantize_model(twin, variant=run.variant)
    used = calibration.calibrate(qat_model, bundle.train, steps=calibration_steps)
    scored = scoring.predict_batches(bundle.val, agreement_samples,
                                        model.predict_on_batch, qat_model.predict_on_batch)
    labels, float_top1, before = scored.labels, scored.top1(0), scored.top1(1)
    _log(f"calibrated quantization ranges on {used} batches; top-1 on {len(labels)} "
         f"validation images: float {float_top1:.2f}%, QAT before fine-tuning {before:.2f}%")
    fit_verbose = {"auto": 1 if sys.stdout.isatty() else 2, "true": 1, "false": 2}.get(
        verbose, 2)
    calibration.fine_tune(qat_model, bundle.train, bundle.val, epochs=epochs,
                          learning_rate=learning_rate, freeze_bn=freeze_bn,
                          steps_per_epoch=steps_per_epoch, label_smoothing=label_smoothing,
                          verbose=fit_verbose)

    calibration.save_qat(qat_model, run.path / layout.QAT_MODEL)
    content = tflite.convert(qat_model, "qat_int8", io=io)
    report = tflite.audit(content, int8=True, name=layout.INT8_MODEL)
    content = metadata.attach(content, labels=run.labels, variant=run.variant,
                              description=metadata.describe_run(run, "qat_int8"))
    safe_writes.write_atomic(run.path / layout.INT8_MODEL, content)
    scored = scoring.predict_batches(bundle.val, agreement_samples,
                                        qat_model.predict_on_batch,
                                        LiteRTModel(content, num_threads=2).predict)
    labels, after, int8_top1 = scored.labels, scored.top1(0), scored.top1(1)
    qat_classes, int8_classes = scored.classes
    agreement = float(np.mean(int8_classes == qat_classes) * 100)
    made_from = {layout.INT8_MODEL: lineage.digest_of(run.path / layout.INT8_MODEL),
                 **lineage.made_from(run.path, layout.QAT_MODEL)}
    handoff = metadata.handoff(content, model_file=layout.INT8_MODEL, variant=run.variant,
                                top1=int8_top1, images=len(labels), made_from=made_from)
    safe_writes.write_json(run.path / layout.INT8_SIDECAR, handoff)
    figures = {
        "variant": run.variant, "twin_max_abs_probability_diff": diff,
        "calibration_batches": used, "epochs": epochs, "learning_rate": learning_rate,
        "label_smoothing": label_smoothing, "cutout": cutout,
        "freeze_bn": freeze_bn, "io": io, "eval_images": len(labels),
        "float_top1": float_top1, "qat_top1_before_fine_tuning": before,
        "qat_top1": after, "int8_top1": int8_top1,
        "int8_vs_qat_top1_agreement": agreement,
        "int8_ops": dict(report.ops), "int8_bytes": len(content),
        "wall_time_s": time.perf_counter() - start,
        "made_from": lineage.made_from(run.path, layout.QAT_MODEL),
    }
    safe_writes.write_json(run.path / layout.QAT_REPORT, figures)
    _log(f"top-1 on {len(labels)} validation images: float {float_top1:.2f}%, QAT "
         f"{after:.2f}%, int8 TFLite {int8_top1:.2f}% (int8 agrees with QAT on "
         f"{agreement:.1f}%)")
    _log(f"op audit: builtin ops only, every conv/FC in int8 ({report.summary()})")
    _log(f"wrote {run.path / layout.QAT_MODEL}, {run.path / layout.INT8_MODEL} "
         f"({len(content) / 1024:.1f} KiB, with metadata), {layout.INT8_SIDECAR}, "
         f"{layout.QAT_REPORT}")
    return figures
