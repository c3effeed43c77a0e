"""Per-epoch bookkeeping of a training run: progress line, NaN guard, checkpoints, curves."""

from __future__ import annotations

import math
import os
import time

import keras

from keras_resnet.pipeline import rundir


class RunMonitor(keras.callbacks.Callback):
    """Per-epoch bookkeeping: progress line, NaN guard, checkpoints, best model, history.

    Checkpoints are written as ``epoch_NNNN.weights.h5`` (weights and optimizer state)
    through a temporary file and a rename, then ``checkpoint.json`` is replaced the same
    way: an interrupted write leaves the previous epoch's checkpoint intact. The best
    model is written by ``save_model(path)`` (the run's stock float32 ``.keras`` writer).
    """

    def __init__(self, *, run_dir, chief, state, phase, batch_size, steps_per_epoch,
                 keep, total_epochs, start_time, save_model):
        super().__init__()
        self.save_model = save_model
        self.run_dir = run_dir
        self.chief = chief
        self.state = state
        self.phase = phase
        self.batch_size = batch_size
        self.steps = steps_per_epoch
        self.keep = keep
        self.total_epochs = total_epochs
        self.start_time = start_time
        self.bad_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        # The rate the epoch starts with (the schedule moves on during it).
        self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.t0 = time.perf_counter()
        self.t_train = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_step = (self.epoch, batch)
            self.model.stop_training = True

    def on_test_begin(self, logs=None):
        if self.t_train is None:  # validation starts: the epoch's training part is over
            self.t_train = time.perf_counter() - self.t0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if self.bad_step is not None:
            return  # never checkpoint a diverged model
        train_time = self.t_train or (time.perf_counter() - self.t0)
        logs["learning_rate"] = self.lr
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()},
               "images_per_sec": self.steps * self.batch_size / max(train_time, 1e-9),
               "epoch_time_s": time.perf_counter() - self.t0}
        self.state["history"].append(row)
        self.state["epoch"] = epoch + 1
        self.state["phase"] = self.phase
        self.state["wall_time_s"] = self.state.get("wall_time_before_s", 0.0) + (
            time.perf_counter() - self.start_time)
        val = logs.get("val_accuracy")
        improved = val is not None and val > self.state.get("best_val_accuracy", -1.0)
        if improved:
            self.state["best_val_accuracy"] = float(val)
            self.state["best_epoch"] = epoch + 1
        if self.chief:
            if improved:
                self.save_model(os.path.join(self.run_dir, rundir.BEST))
            rundir.save_checkpoint(self.run_dir, epoch + 1, self.model.save_weights,
                                   self.state, keep=self.keep)
        print(epoch_line(row, self.total_epochs), flush=True)



def epoch_line(row: dict[str, float], total_epochs: int) -> str:
    """The one-line summary printed after every epoch."""
    parts = [f"epoch {row['epoch']}/{total_epochs}"]
    for key, label in (("loss", "loss"), ("accuracy", "top1"), ("val_loss", "val_loss"),
                       ("val_accuracy", "val_top1"), ("val_top5", "val_top5")):
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
