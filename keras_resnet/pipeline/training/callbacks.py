"""Per-epoch bookkeeping of a training run: progress line, NaN guard, checkpoints, curves."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import keras

from keras_resnet.pipeline.errors import Interrupted
from keras_resnet.pipeline.run import checkpoints, layout, safe_writes
from keras_resnet.pipeline.training import optimization


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What the monitor of a run knows of it, the same for every ``fit`` of the run.

    Attributes:
        run_dir: the run folder.
        chief: whether this process writes the run folder (one worker of a cluster does).
        batch_size: the global batch size.
        steps_per_epoch: steps in one epoch.
        keep: checkpoints kept.
        total_epochs: the epochs the run ends after.
        start_time: ``time.perf_counter()`` when this process started the run.
        save_model: writes the model to a path (the best model).
        checkpoint_every: steps between mid-epoch checkpoints (0: epoch ends only).
        stop: the run's :class:`~keras_resnet.pipeline.run.preemption.StopRequest`.
        agree: makes every worker of a cluster take the same decision (default: alone).
        average_bn: BatchNormalization statistics of the weight average, or None.
    """

    run_dir: str
    chief: bool
    batch_size: int
    steps_per_epoch: int
    keep: int
    total_epochs: int
    start_time: float
    save_model: Callable[[str], None]
    checkpoint_every: int = 0
    stop: Any = None
    agree: Callable[[int], int] | None = None
    average_bn: Any = None


class RunMonitor(keras.callbacks.Callback):
    """Per-step and per-epoch bookkeeping: NaN guard, stop requests, mid-epoch and epoch
    checkpoints, best model, history and the progress line.

    Checkpoints (weights and optimizer state, see
    :func:`~keras_resnet.pipeline.run.checkpoints.save_checkpoint`) are written at every
    epoch end, every ``checkpoint_every`` steps within an epoch (0: never), and when
    ``stop`` (a :class:`~keras_resnet.pipeline.run.preemption.StopRequest`) records a
    signal: then the step that ran finishes, the checkpoint is written and
    :class:`~keras_resnet.pipeline.errors.Interrupted` stops the run (at an epoch's last
    step, after that epoch's validation and checkpoint). ``agree(flag)`` makes every
    worker of a multi-worker run take the same decision (any worker's signal stops all).
    The best model is written by ``save_model(path)``; where the weight average scored
    higher, with the BatchNormalization statistics :class:`AverageScore` scored it with
    (``average_bn``: the same
    :class:`~keras_resnet.pipeline.training.optimization.AverageBNStatistics`, which reuses
    that estimate, or batches; None: the running ones). Those settings are the run's
    (:class:`RunSettings`); ``state`` is the run state the checkpoints record.

    ``first_step`` is the step the first epoch of this ``fit`` starts at (a resumed
    mid-epoch checkpoint); that epoch then runs ``steps_per_epoch - first_step`` steps.
    """

    def __init__(self, run: RunSettings, *, state, phase, first_step=0):
        super().__init__()
        self.save_model = run.save_model
        self.average_bn = run.average_bn
        self.run_dir = run.run_dir
        self.chief = run.chief
        self.state = state
        self.phase = phase
        self.batch_size = run.batch_size
        self.steps = run.steps_per_epoch
        self.keep = run.keep
        self.total_epochs = run.total_epochs
        self.start_time = run.start_time
        self.checkpoint_every = run.checkpoint_every
        self.first_step = first_step
        self.stop = run.stop
        self.agree = run.agree or (lambda signum: signum)
        # Where the weights stood whose loss was not finite: (epoch, steps into it); the
        # loss was the training loss of that step, or with ``bad_in_validation`` the
        # validation loss after the epoch's last step.
        self.bad_step = None
        self.bad_in_validation = False
        self.pending_loss = (None, None)  # (loss, (epoch, step index)) not yet checked
        self.signum = 0  # the signal that stops the run (0: none)
        self.offset = first_step

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.t0 = time.perf_counter()
        self.t_train = None

    def on_train_batch_end(self, batch, logs=None):
        # The NaN guard reads the previous step's loss: reading this step's would wait for
        # the step to finish before the next one is even prepared (with a GPU, an idle
        # device while the host makes the next batch); anything saved is checked first.
        if not self._loss_was_finite():
            return
        step = self.offset + batch + 1
        logs = logs if logs is not None else {}
        where = (self.epoch, step - 1)
        if "steps_run" in logs:
            # One call of several steps (keras_resnet.pipeline.training.device_data) stops after the
            # first non-finite loss: its loss is that step's, read when it is checked.
            run, asked, epoch = logs.pop("steps_run"), logs.pop("steps_asked"), self.epoch
            where = lambda: (epoch, step - 1 - int(asked) + int(run))  # noqa: E731
        self.pending_loss = (logs.get("loss"), where)
        self.signum = self.agree(int(self.stop.signum or 0) if self.stop else 0)
        if self.signum:
            # At the epoch's last step: its checkpoint, then the stop (on_epoch_end).
            if step < self.steps and self._loss_was_finite():
                self._save_checkpoint(epoch=self.epoch, step=step)
                raise self._interrupted(step)
            return
        if (self.checkpoint_every and step % self.checkpoint_every == 0 and step < self.steps
                and self._loss_was_finite()):
            self._save_checkpoint(epoch=self.epoch, step=step)

    def _loss_was_finite(self) -> bool:
        """Whether the loss of the last step not yet checked was finite (else the step is
        recorded as ``bad_step`` and training stops)."""
        loss, where = self.pending_loss
        self.pending_loss = (None, None)
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_step = where() if callable(where) else where
            self.model.stop_training = True
        return self.bad_step is None

    def on_test_begin(self, logs=None):
        if self.t_train is None:  # validation starts: the epoch's training part is over
            self.t_train = time.perf_counter() - self.t0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if not self._loss_was_finite():
            return  # never checkpoint a diverged model
        val_loss = logs.get("val_loss")
        if val_loss is not None and not math.isfinite(val_loss):
            # The weights the epoch ended with are diverged, though its training losses
            # (computed before each update) were finite.
            self.bad_step, self.bad_in_validation = (epoch, self.steps), True
            self.model.stop_training = True
            return
        steps = self.steps - self.offset
        self.offset = 0  # later epochs of this fit run whole
        train_time = self.t_train or (time.perf_counter() - self.t0)
        # The rate the epoch ended with, as Keras' own callbacks log it (the rate it started
        # with would read 0 for the first epoch of a warm-up from zero).
        logs["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()},
               "images_per_sec": steps * self.batch_size / max(train_time, 1e-9),
               "epoch_time_s": time.perf_counter() - self.t0}
        self.state["history"].append(row)
        average = better_average(logs)
        val = logs.get("ema_val_accuracy" if average else "val_accuracy")
        improved = val is not None and val > self.state.get("best_val_accuracy", -1.0)
        if improved:
            self.state["best_val_accuracy"] = float(val)
            self.state["best_epoch"] = epoch + 1
            self.state["best_weights"] = "average" if average else "trained"
            if self.chief:
                with (optimization.swapped_average(self.model, self.average_bn) if average
                      else contextlib.nullcontext()):
                    self.save_model(os.path.join(self.run_dir, layout.BEST))
        self._save_checkpoint(epoch=epoch + 1, step=0)
        print(epoch_line(row, self.total_epochs), flush=True)
        if self.signum:
            raise self._interrupted(self.steps)

    def _save_checkpoint(self, *, epoch, step):
        self.state.update(epoch=epoch, step=step, phase=self.phase, wall_time_s=self.state.get(
            "wall_time_before_s", 0.0) + (time.perf_counter() - self.start_time))
        if self.chief:
            checkpoints.save_checkpoint(self.run_dir, self.model.save_weights, self.state,
                                   keep=self.keep, needed=self._checkpoint_bytes())

    def _checkpoint_bytes(self):
        """About what a checkpoint takes: the last one's size, else 4 bytes per value of
        the model's and the optimizer's (float32) variables."""
        kept = self.state.get("checkpoints")
        if kept:
            return kept[-1]["size"]
        variables = list(self.model.weights) + list(self.model.optimizer.variables)
        return 4 * sum(math.prod(v.shape) for v in variables)

    def _interrupted(self, step):
        where = (f"after epoch {self.epoch + 1}" if step >= self.steps else
                 f"at epoch {self.epoch + 1}, step {step}/{self.steps}")
        written = (f"checkpoint {self.state['weights']} written" if self.chief else
                   "the chief wrote the checkpoint")
        name = signal.Signals(self.signum).name
        return Interrupted(f"training stopped by {name} {where}; {written}; run the same "
                           "command to resume", status=128 + self.signum)


class AverageScore(keras.callbacks.Callback):
    """Scores the weight average (``ema_decay``) on the validation data at every epoch end.

    It adds ``ema_val_loss``, ``ema_val_accuracy`` (and ``ema_val_top5``) to the epoch's
    logs, so it must come before :class:`RunMonitor`, which records them and saves the
    better of the two as best.keras. With ``bn_batches`` (training batches or an
    :class:`optimization.AverageBNStatistics`) the average is scored with BatchNormalization
    statistics estimated for it (:func:`optimization.estimate_bn_statistics`), else with the
    running ones.
    """

    def __init__(self, val_data, bn_batches=None):
        super().__init__()
        self.val_data = val_data
        self.bn_batches = bn_batches

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not optimization.has_average(self.model):
            return
        with optimization.swapped_average(self.model, self.bn_batches):
            scores = self.model.evaluate(self.val_data, verbose=0, return_dict=True)
        logs.update({f"ema_val_{key}": float(value) for key, value in scores.items()})


def better_average(logs: dict[str, float]) -> bool:
    """Whether the epoch's weight average scored a higher validation top-1 than the trained
    weights (False without an average or without validation data)."""
    average, trained = logs.get("ema_val_accuracy"), logs.get("val_accuracy")
    return average is not None and trained is not None and average > trained


def epoch_line(row: dict[str, float], total_epochs: int) -> str:
    """The one-line summary printed after every epoch."""
    parts = [f"epoch {row['epoch']}/{total_epochs}"]
    for key, label in (("loss", "loss"), ("accuracy", "top1"), ("val_loss", "val_loss"),
                       ("val_accuracy", "val_top1"), ("val_top5", "val_top5"),
                       ("ema_val_accuracy", "ema_val_top1")):
        if key in row:
            parts.append(f"{label} {row[key]:.4f}")
    parts.append(f"lr {row['learning_rate']:.3g}")
    parts.append(f"{row['images_per_sec']:.1f} images/s")
    parts.append(f"{row['epoch_time_s']:.1f}s")
    return " - ".join(parts)


def plot_curves(history: list[dict[str, float]], path: str, title: str) -> None:
    """Writes a PNG of loss and top-1 accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "top-1")):
        for prefix, name in (("", "train"), ("val_", "validation")):
            values = [row.get(prefix + key) for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        safe_writes.save_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
