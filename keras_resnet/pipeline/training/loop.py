"""Training: one experiment from a :class:`~keras_resnet.pipeline.run.config.TrainConfig`.

:func:`train` builds and compiles the model inside the distribution strategy's scope,
fits it with the run's input pipeline and writes the run folder (see
:mod:`keras_resnet.pipeline.run.layout`). Models are built with ``include_preprocessing=True``
and ``classifier_activation=None``: they take raw 0..255 RGB pixels and return logits.
On the TensorFlow backend the input is tf.data and the strategy tf.distribute's; on
another Keras backend (JAX) a folder dataset is held in memory
(:mod:`keras_resnet.pipeline.data.arrays`) and the run uses one device
(:class:`~keras_resnet.pipeline.training.distribute.OneDevice`), without importing TensorFlow.

Running the same config again after an interruption resumes after the last completed
epoch (weights, optimizer state, epoch, best score and history are restored) and finishes
with the requested number of epochs. A folder holding a run of another model, or a run
started with other options (anything but ``epochs`` and options that cannot change results
such as ``verbose``), is refused, and so is a folder another process is writing.

Example:
    >>> from keras_resnet import pipeline
    >>> metrics = pipeline.train(pipeline.TrainConfig(depth=20, dataset="digits", epochs=3,
    ...                                               model_dir="/tmp/run"))
    >>> metrics["val_accuracy"]
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_resnet.pipeline.data import arrays, sources, transforms
from keras_resnet.pipeline.data.inputs import load_bundle, one_hot_labels
from keras_resnet.pipeline.errors import (
    TrainingStopped,
    UserError,
    WriteError,
    first_line,
)
from keras_resnet.pipeline.run import checkpoints, layout, lineage, lock, preemption, safe_writes
from keras_resnet.pipeline.run.config import (
    ResolvedConfig,
    TrainConfig,
    checkpoint_interval,
    resolve,
    truthy,
)
from keras_resnet.pipeline.training import (
    callbacks,
    distribute,
    machine,
    network,
    optimization,
    precision,
)

log = logging.getLogger(__name__)


def _set_trainable(model, head_only, original, freeze_bn):
    for layer in model.layers:
        trainable = original[layer.name]
        if head_only and layer.name != "predictions":
            trainable = False
        if freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
            trainable = False
        layer.trainable = trainable


def training_input(resolved: ResolvedConfig, replicas: int):
    """The run's input (:func:`~keras_resnet.pipeline.data.inputs.load_bundle`); on JAX,
    training images held in memory go to the device, where the compiled step augments them
    (:mod:`~keras_resnet.pipeline.training.device_data`), when they fit its budget."""
    bundle = load_bundle(resolved, replicas=replicas)
    if keras.config.backend() == "jax" and isinstance(bundle, arrays.ArrayBundle):
        from keras_resnet.pipeline.training import device_data

        if device_data.fits(bundle, resolved.cache_budget_mb * 2**20):
            return device_data.to_device(bundle)
    return bundle


# --------------------------------------------------------------------------- train


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) one experiment; returns the final metrics (also metrics.json).

    Raises:
        UserError: bad options, data or model_dir (RunLocked while another process
            writes it, ResumeMismatch for changed options); TrainingStopped when the loss
            became NaN or infinite (the last good checkpoint is kept); WriteError when
            the disk is full or read-only or a file may not be written (nothing half-written
            stays; the same call resumes); Interrupted after SIGTERM/SIGINT (a checkpoint of
            the last step was written; the same call resumes from it).
    """
    start = time.perf_counter()
    resolved = resolve(config)
    # A multi-worker strategy must exist before any other TensorFlow work.
    strategy = distribute.make_strategy(resolved.strategy)
    replicas = strategy.num_replicas_in_sync
    if resolved.batch_size % replicas:
        raise UserError(f"batch_size={resolved.batch_size} does not divide evenly over "
                        f"{replicas} replicas; use a multiple of {replicas}")
    # Only the chief writes the run folder; other workers read its checkpoints.
    chief = distribute.is_chief(strategy)
    run_dir = os.path.abspath(os.path.expanduser(resolved.model_dir))
    layout.check_folder(run_dir)
    layout.check_apart(run_dir, resolved.data_dir)
    with preemption.StopRequest() as stop:
        try:
            if not chief:
                return _train(resolved, strategy, run_dir, chief=False, start=start,
                              stop=stop)
            with lock.RunLock(run_dir):
                return _train(resolved, strategy, run_dir, chief=True, start=start,
                              stop=stop)
        except Exception as e:  # noqa: BLE001 - only failed writes are reworded
            failure = safe_writes.as_write_error(e, run_dir)
            if failure is None:
                raise
            raise WriteError(f"{failure}, then run the same command to resume "
                             f"({_resume_point(run_dir)})") from None


def _resume_point(run_dir: str) -> str:
    """Where the same command would resume the run (after a failed write)."""
    try:
        state = checkpoints.read_checkpoint_state(run_dir)
    except UserError:
        state = None
    if not state:
        return "no checkpoint was written yet, so it starts again"
    return f"from {layout.CHECKPOINTS}/{state['weights']}, which is intact"


def _train(resolved, strategy, run_dir, *, chief, start, stop):
    batch = resolved.batch_size
    replicas = strategy.num_replicas_in_sync
    if chief:
        partial = {"model": resolved.model, "model_options": resolved.model_options,
                   "image_size": resolved.image_size}
        layout.check_model_dir(run_dir, partial, overwrite=resolved.overwrite)
        checkpoints.check_resume(run_dir, resolved)

    machine.set_random_seed(resolved.seed)
    bundle = training_input(resolved, replicas)
    num_classes = bundle.num_classes
    record = resolved.to_dict()
    record["num_classes"] = num_classes
    if chief:
        layout.check_model_dir(run_dir, {k: record[k] for k in layout.IDENTITY_KEYS},
                               overwrite=False)
    state = checkpoints.read_checkpoint_state(run_dir)
    previous = layout.read_config(run_dir) if state is not None else None
    data = sources.fingerprint(resolved.dataset, resolved.data_dir)
    if previous is not None:
        checkpoints.check_data_unchanged(run_dir, previous, resolved)

    gpus = machine.accelerator()
    gpu = gpus is not None
    policy = precision.choose_policy(resolved.mixed_precision, gpu=gpu)
    if state is not None:
        policy = precision.resumed_policy((previous or {}).get("dtype_policy"), policy)
    jit = truthy(resolved.jit_compile,
                 machine.default_jit(keras.config.backend(), gpu=gpu, replicas=replicas))

    steps = resolved.steps_per_epoch or bundle.steps_per_epoch(batch)
    epochs = resolved.epochs
    record.update({
        "replicas": replicas, "per_replica_batch_size": batch // replicas,
        "strategy_resolved": distribute.strategy_name(strategy),
        "mixed_precision_resolved": policy != "float32", "dtype_policy": policy,
        "accelerator": gpus, "cpu": machine.cpu_model(), "cpus": os.cpu_count(),
        "cpu_bf16_flags": list(machine.bf16_flags(machine.host_cpu_flags())),
        "fused_batch_norm_resolved": resolved.fused_batch_norm and (
            keras.config.backend() == "tensorflow"),
        "jit_compile_resolved": jit,
        "steps_per_epoch_resolved": steps, "train_images": bundle.train_size,
        "val_images": bundle.val_size, "skipped_images": len(bundle.skipped),
        "cached_in_memory": bundle.cached,
        "train_input": getattr(bundle, "input_kind", "tf.data" if keras.config.backend() == (
            "tensorflow") else "host"),
        "augmentation": transforms.augmentation_style(resolved.image_size),
        "input": "raw RGB pixels 0..255 (float32); normalisation is inside the model",
        "output": "logits", "versions": machine.versions(), "data": data.summary,
    })
    record["machines"] = machine.machines(record, previous, state)
    schedule = optimization.run_schedule(resolved, steps)

    one_hot = one_hot_labels(num_classes)
    val_ds = one_hot(bundle.val) if bundle.val is not None else None
    # One estimate of the average's BN statistics per step, shared by its scoring, the
    # best model and the final model.
    average_bn = average_bn_batches(resolved, bundle)

    with strategy.scope():
        model = network.build_training_model(resolved, num_classes, policy=policy)
        original = {layer.name: layer.trainable for layer in model.layers}
        if distribute.is_multiworker(strategy):
            distribute.patch_for_multiworker(model, strategy)
        optimization.apply_weight_decay(model, resolved)
    # Saved models go through a stock float32 model (outside the strategy: only the chief
    # writes them).
    stock = network.build_stock_model(resolved, num_classes) if chief else None
    if chief:
        # Written once the model is known to build, so bad options leave no run behind.
        lineage.adopt(run_dir)
        safe_writes.write_json(os.path.join(run_dir, layout.CONFIG), record, sort_keys=True)
        safe_writes.write_atomic(os.path.join(run_dir, layout.LABELS),
                                 "\n".join(bundle.class_names) + "\n")
        if data.files:
            layout.write_data_files(run_dir, data.files)

    state = state or {"epoch": 0, "step": 0, "history": [], "best_val_accuracy": -1.0}
    state["wall_time_before_s"] = state.get("wall_time_s", 0.0)
    done, step = state["epoch"], state.get("step", 0)
    resumed = bool(state.get("weights"))
    if state.get("rebuilt"):
        print(state.pop("rebuilt"), flush=True)
    for damaged in state.pop("damaged", []):
        print(f"checkpoint {damaged} is damaged: passed over", flush=True)
    if resumed:
        at = f", step {step}/{steps}" if step else ""
        print(f"resuming {run_dir} after epoch {done}/{epochs}{at} from "
              f"{layout.CHECKPOINTS}/{state['weights']}", flush=True)
    freeze = resolved.freeze_backbone_epochs
    phases = [(0, freeze, True), (freeze, epochs, False)] if freeze else [(0, epochs, False)]
    # A checkpoint is restored into the phase (head-only or whole network) that saved it,
    # because its optimizer state covers that phase's trainable variables.
    ckpt_phase = min(state.get("phase", 0), len(phases) - 1) if resumed else -1
    verbose = 1 if truthy(resolved.verbose, sys.stdout.isatty()) else 0
    fit = Fit(model=model, resolved=resolved, bundle=bundle, val_ds=val_ds, one_hot=one_hot,
              verbose=verbose, run=callbacks.RunSettings(
                  run_dir=run_dir, chief=chief, batch_size=resolved.batch_size,
                  steps_per_epoch=steps, keep=resolved.keep_checkpoints,
                  total_epochs=resolved.epochs, start_time=start,
                  save_model=functools.partial(network.save_model, model, stock),
                  checkpoint_every=checkpoint_interval(resolved, steps), stop=stop,
                  agree=distribute.agreement(strategy), average_bn=average_bn))
    iterations = 0
    for index, (first, last, head_only) in enumerate(phases):
        loading = index == ckpt_phase
        if index < ckpt_phase or (last <= done and not loading):
            continue
        with strategy.scope():
            _set_trainable(model, head_only, original, resolved.freeze_bn)
            optimizer = optimization.make_optimizer(resolved, schedule)
            optimization.compile_model(model, resolved, optimizer, num_classes,
                                       jit_compile=jit)
            if loading:
                _restore(model, optimizer, run_dir, state)
            elif iterations:
                optimizer.iterations.assign(iterations)  # the schedule continues
                if resolved.ema_decay:
                    optimization.start_average(model)
        if stock is not None:
            _set_trainable(stock, head_only, original, resolved.freeze_bn)
            optimization.compile_model(stock, resolved,
                                       optimization.make_optimizer(resolved, schedule),
                                       num_classes)
            stock.optimizer.build(stock.trainable_variables)
        begin = max(first, done)
        if begin < last:
            _fit(fit, state, phase=index, begin=begin, last=last,
                 first_step=step if begin == done else 0)
        iterations = int(keras.ops.convert_to_numpy(optimizer.iterations))
        done = max(done, last)
    _set_trainable(model, False, original, resolved.freeze_bn)
    return _finish(model, stock, state, resolved, run_dir, start, bundle, chief=chief,
                   average_bn=average_bn)


@dataclasses.dataclass(frozen=True)
class Fit:
    """What every ``fit`` of a run uses: the model, its options and data, and the monitor's
    settings (:class:`~keras_resnet.pipeline.training.callbacks.RunSettings`)."""

    model: keras.Model
    resolved: ResolvedConfig
    bundle: Any
    val_ds: Any
    one_hot: Callable
    verbose: int
    run: callbacks.RunSettings


def _fit(fit: Fit, state, *, phase, begin, last, first_step):
    """Fits epochs ``begin`` to ``last``; a resumed mid-epoch checkpoint (``first_step``
    steps into epoch ``begin``) first finishes that epoch in a ``fit`` of its own."""
    segments = [(begin, begin + 1, first_step)] if first_step else []
    if begin + bool(first_step) < last:
        segments.append((begin + bool(first_step), last, 0))
    for seg_begin, seg_end, skip in segments:
        monitor = _fit_segment(fit, state, phase=phase, begin=seg_begin, last=seg_end,
                               first_step=skip)
        if monitor.bad_step is not None:
            break
    run_dir = fit.run.run_dir
    if monitor.bad_step is not None:
        bad_epoch, bad_batch = monitor.bad_step
        # A checkpoint of the very weights that gave the loss is no good to resume from.
        discarded = state.get("weights") == layout.checkpoint_name(bad_epoch, bad_batch)
        if discarded:
            checkpoints.discard_newest_checkpoint(run_dir, state, write=fit.run.chief)
        where = (f"the validation loss became NaN or infinite after epoch {bad_epoch + 1}"
                 if monitor.bad_in_validation else
                 f"the loss became NaN or infinite at epoch {bad_epoch + 1}, step "
                 f"{bad_batch + 1}")
        # A folder with a checkpoint resumes only with the options it was started with.
        if state.get("weights"):
            kept = (f"the last good checkpoint ({state['weights']}) is kept in "
                    f"{run_dir}/{layout.CHECKPOINTS}; start again with a lower learning_rate "
                    "(overwrite=True or another model_dir) or check the data")
        elif discarded and os.path.isfile(os.path.join(run_dir, layout.MODEL)):
            # A run that had finished before it was extended: its model is not trained over
            # unless asked.
            kept = (f"the only checkpoint kept held the weights that gave it and was deleted; "
                    f"the finished {layout.MODEL} stays, so start again with overwrite=True and "
                    "a lower learning_rate, or check the data")
        elif discarded:
            kept = ("the only checkpoint kept held the weights that gave it and was deleted, "
                    "so the run starts again when run next; lower learning_rate or check "
                    "the data")
        else:
            kept = "no checkpoint had been written; lower learning_rate or check the data"
        raise TrainingStopped(f"{where}, so training stopped; {kept}")


def average_bn_batches(resolved, bundle):
    """The weight average's BatchNormalization statistics, estimated over the first
    ``ema_bn_batches`` training batches of epoch 1's stream (the same every time) at most
    once per step (an :class:`optimization.AverageBNStatistics`); None without an average or
    with ``ema_bn_batches=0``."""
    if not (resolved.ema_decay and resolved.ema_bn_batches):
        return None
    return optimization.AverageBNStatistics(bundle.first_batches(resolved.ema_bn_batches))


def _fit_segment(fit: Fit, state, *, phase, begin, last, first_step):
    resolved, run, val_ds = fit.resolved, fit.run, fit.val_ds
    monitor = callbacks.RunMonitor(run, state=state, phase=phase, first_step=first_step)
    # The average's scores go into the epoch's logs before the monitor records them.
    fit_callbacks = [monitor]
    if resolved.ema_decay and val_ds is not None:
        fit_callbacks.insert(0, callbacks.AverageScore(val_ds, run.average_bn))
    tensorboard = None
    # Keras' TensorBoard callback writes through tf.summary: TensorFlow backend only.
    if run.chief and keras.config.backend() == "tensorflow":
        tensorboard = keras.callbacks.TensorBoard(
            os.path.join(run.run_dir, layout.LOGS), write_graph=False, profile_batch=0)
        fit_callbacks.append(tensorboard)
    # The training stream from ``begin`` continues exactly where earlier steps left it.
    steps = run.steps_per_epoch
    data_epoch, offset = divmod(begin * steps + first_step,
                                fit.bundle.steps_per_epoch(resolved.batch_size) or 1)
    train_ds = fit.one_hot(fit.bundle.epochs(data_epoch, skip_batches=offset))
    with warnings.catch_warnings():
        # Validation sets that skip undecodable files have no known length, and Keras
        # warns "ran out of data" at their (normal) end.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        try:
            arguments = dict(epochs=last, initial_epoch=begin,
                             steps_per_epoch=steps - first_step, validation_data=val_ds,
                             callbacks=fit_callbacks, verbose=fit.verbose, shuffle=False)
            if hasattr(train_ds, "fit"):
                # Device-resident data (JAX) runs its own loop of several steps per call,
                # each call ending where the monitor checkpoints.
                train_ds.fit(fit.model, first_step=first_step,
                             checkpoint_every=run.checkpoint_every, **arguments)
            else:
                fit.model.fit(train_ds, **arguments)
        except BaseException:
            # A stop (Interrupted) skips Keras' on_train_end: the event files are closed
            # here, so that a process leaving without teardown keeps their last epochs.
            if tensorboard is not None:
                tensorboard.on_train_end()
            raise
    return monitor


def report_stale(run_dir: str) -> list[str]:
    """Prints, in one line, the files of the run folder made from an earlier model.keras
    (QAT and exported files of the run before it was resumed) and the commands that
    rebuild them; returns their names."""
    stale = lineage.stale_files(run_dir)
    if stale:
        commands = lineage.rebuild_commands(run_dir, stale)
        were, them = ("was", "it") if len(stale) == 1 else ("were", "them")
        print(f"stale: {', '.join(stale)} {were} made from an earlier {layout.MODEL}; "
              f"rebuild {them} with `{'` and `'.join(commands)}`", flush=True)
    return stale


def _restore(model, optimizer, run_dir, state):
    path = checkpoints.checkpoint_path(run_dir, state)
    optimizer.build(model.trainable_variables)  # optimizer slots must exist to be loaded
    try:
        model.load_weights(path)
    except Exception as e:
        raise UserError(f"checkpoint {path} does not fit this run ({first_line(e)}); pass "
                        "the options it was started with, or overwrite=True") from e


def _finish(model, stock, state, resolved, run_dir, start, bundle, *, chief, average_bn):
    history = state["history"]
    last = history[-1] if history else {}
    # The final model is the weight average where it scored higher on the last epoch, or
    # where nothing scored either (no validation data).
    averaged = optimization.has_average(model)
    average = averaged and (callbacks.better_average(last) or last.get("val_accuracy") is None)
    if average:
        optimization.use_average(model, average_bn)
    chosen = "ema_" if average and "ema_val_accuracy" in last else ""
    rates = [row["images_per_sec"] for row in history]
    # The first epoch includes graph tracing; leave it out of the steady-state rate.
    steady = rates[1:] if len(rates) > 1 else rates
    metrics = {
        "model": resolved.model, "dataset": resolved.dataset,
        "epochs": state["epoch"], "epochs_requested": resolved.epochs,
        "train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"),
        "val_loss": last.get(f"{chosen}val_loss"),
        "val_accuracy": last.get(f"{chosen}val_accuracy"),
        "val_top5": last.get(f"{chosen}val_top5"),
        "best_val_accuracy": state.get("best_val_accuracy") if state.get(
            "best_epoch") else None,
        "best_epoch": state.get("best_epoch"),
        "weights": "average" if average else "trained",
        "best_weights": state.get("best_weights"),
        "wall_time_s": state.get("wall_time_s", time.perf_counter() - start),
        "images_per_sec": float(np.median(steady)) if steady else None,
        "train_images": bundle.train_size, "val_images": bundle.val_size,
        "skipped_images": len(bundle.skipped),
        "note": "train_* are running means over the last epoch, with augmentation",
    }
    if averaged:
        metrics.update(ema_decay=resolved.ema_decay, ema_bn_batches=resolved.ema_bn_batches,
                       trained_val_accuracy=last.get("val_accuracy"),
                       ema_val_accuracy=last.get("ema_val_accuracy"))
    if not chief:
        return metrics
    network.save_model(model, stock, os.path.join(run_dir, layout.MODEL))
    safe_writes.write_json(os.path.join(run_dir, layout.METRICS), metrics)
    checkpoints.write_history(run_dir, history)
    digest = (layout.read_config(run_dir) or {}).get("data", {}).get("digest")
    lineage.record(run_dir, [layout.LABELS, layout.MODEL, layout.BEST], by="train",
                   data=digest)
    report_stale(run_dir)
    if history:
        callbacks.plot_curves(history, os.path.join(run_dir, layout.CURVES),
                              f"{resolved.model} on {resolved.dataset}")
    return metrics
