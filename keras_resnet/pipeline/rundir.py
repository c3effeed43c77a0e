"""The run folder: its file names, atomic writes, identity, checkpoints, lock and reading.

A run folder (``model_dir``) is written by :func:`keras_resnet.pipeline.train` and then
extended by :func:`~keras_resnet.pipeline.qat` and :func:`~keras_resnet.pipeline.export`:

    config.json       every option, resolved defaults, library versions
    labels.txt        class names in label order, one per line
    checkpoints/      epoch_NNNN.weights.h5 (weights + optimizer state), checkpoint.json
    logs/             TensorBoard event files
    history.csv       one row per completed epoch
    best.keras        the model of the best validation top-1 so far
    model.keras       the final model
    metrics.json      final losses and top-1, epochs, wall time, images/s
    curves.png        loss and accuracy curves
    model_qat.h5, model_int8.tflite, model_int8.json, qat.json          (qat)
    model_<mode>.tflite, model_<mode>.json, export.json                 (export)

Every file is written through :mod:`keras_resnet.pipeline.safe_writes` (a temporary file
and a rename; a full or read-only disk is one WriteError). One process at a time writes a
run folder: :class:`RunLock`.

``checkpoints/checkpoint.json`` lists every kept checkpoint with its size and sha256 and
the run's state when it was written (epoch, step within the next epoch, best score,
history length); :func:`read_checkpoint_state` resumes from the newest intact one.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from keras_resnet.pipeline import config as config_lib
from keras_resnet.pipeline.errors import RunDirError, RunLocked
from keras_resnet.pipeline.safe_writes import guarded_write, save_atomic, write_json

CONFIG = "config.json"
LABELS = "labels.txt"
MODEL = "model.keras"
BEST = "best.keras"
METRICS = "metrics.json"
HISTORY = "history.csv"
CURVES = "curves.png"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
CHECKPOINT_STATE = "checkpoint.json"
LOCK = ".lock"
QAT_MODEL = "model_qat.h5"
INT8_MODEL = "model_int8.tflite"
QAT_REPORT = "qat.json"
EXPORT_REPORT = "export.json"
TRAIN_FILES = (CONFIG, LABELS, MODEL, BEST, METRICS, HISTORY, CURVES)
TRAIN_DIRS = (CHECKPOINTS, LOGS)
# What qat and export read from a finished run.
FINISHED_FILES = (MODEL, CONFIG, LABELS)
# config.json keys that fix the architecture: a run folder only continues a run whose
# values match.
IDENTITY_KEYS = ("model", "model_options", "num_classes", "image_size")


def read_json(path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_history(run_dir, history: list[dict[str, float]]) -> None:
    """Rewrites history.csv from the checkpointed history (so no epoch appears twice)."""
    if not history:
        return
    keys = ["epoch"] + sorted({k for row in history for k in row} - {"epoch"})
    path = os.path.join(run_dir, HISTORY)
    tmp = path + ".tmp"
    with guarded_write(path, tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for row in history:
                writer.writerow(row)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- lock


class RunLock:
    """An exclusive lock on a run folder for the lifetime of one process's job.

    An advisory ``flock`` on ``<run>/.lock``, which holds the owner's pid: the kernel drops
    it when the process ends however it ends, so a killed run never blocks its resume. A
    folder the lock created and nothing else was written to is removed on release, so bad
    options leave no run behind.

    Raises:
        RunLocked: another live process holds the lock (its pid is named).
    """

    def __init__(self, run_dir):
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self._fd = None
        self._created = False

    def __enter__(self) -> RunLock:
        self._created = not os.path.isdir(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            try:
                owner = Path(path).read_text().strip() or "unknown"
            except OSError:
                owner = "unknown"
            raise RunLocked(f"{self.run_dir} is in use by process {owner}; wait for it to "
                            "finish (or stop it) before starting another job there") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        path = os.path.join(self.run_dir, LOCK)
        if self._created and os.listdir(self.run_dir) == [LOCK]:
            os.remove(path)
            os.rmdir(self.run_dir)
        os.close(self._fd)  # releases the flock
        self._fd = None


# ----------------------------------------------------------------------------- identity


def describe(cfg: dict[str, Any]) -> str:
    options = cfg.get("model_options") or {}
    extra = f" {options}" if options else ""
    return (f"{cfg.get('model')}{extra} ({cfg.get('num_classes')} classes, "
            f"{cfg.get('image_size')}px)")


def read_config(run_dir) -> dict[str, Any] | None:
    """A run folder's config.json, or None when there is none (or it is unreadable)."""
    try:
        config = read_json(os.path.join(run_dir, CONFIG))
    except (OSError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def check_model_dir(model_dir, identity: dict[str, Any], *, overwrite: bool) -> None:
    """Refuses a model_dir that holds a run of another model, or clears it on overwrite."""
    model_dir = os.fspath(model_dir)
    config_path = os.path.join(model_dir, CONFIG)
    if os.path.isfile(config_path) and not overwrite:
        old = read_config(model_dir) or {}
        mismatch = [k for k in identity if k in old and old.get(k) != identity[k]]
        if not old or mismatch:
            raise RunDirError(
                f"model_dir {model_dir} holds a run of {describe(old)}, not "
                f"{describe({**old, **identity})}; choose another model_dir or pass "
                "overwrite=True to replace it")
    elif (not overwrite and not os.path.isfile(config_path)
          and os.path.isdir(os.path.join(model_dir, CHECKPOINTS))):
        raise RunDirError(f"model_dir {model_dir} holds checkpoints but no config.json; "
                          "choose another model_dir or pass overwrite=True to replace them")
    if overwrite:
        clear(model_dir)


def clear(model_dir) -> None:
    """Removes every file a run, its QAT and its exports wrote (nothing else)."""
    if not os.path.isdir(model_dir):
        return
    for name in os.listdir(model_dir):
        path = os.path.join(model_dir, name)
        written = name in TRAIN_FILES or name in (QAT_MODEL, QAT_REPORT, EXPORT_REPORT) or (
            name.startswith("model_") and name.endswith((".tflite", ".json")))
        if written and os.path.isfile(path):
            os.remove(path)
    for name in TRAIN_DIRS:
        shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)


# ----------------------------------------------------------------------------- checkpoints

# What a checkpoint entry records of the run's state when it was written: a resume from an
# older checkpoint takes these values (and the history up to ``history`` rows) back.
CHECKPOINT_STATE_KEYS = ("epoch", "step", "phase", "best_val_accuracy", "best_epoch",
                         "wall_time_s")


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """``epoch_NNNN.weights.h5`` after epoch N, ``epoch_NNNN_step_SSSSSS.weights.h5``
    S steps into epoch N + 1 (written mid-epoch)."""
    return (f"epoch_{epoch:04d}_step_{step:06d}.weights.h5" if step
            else f"epoch_{epoch:04d}.weights.h5")


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(folder, entry: dict[str, Any]) -> str | None:
    """What is wrong with a recorded checkpoint file (missing, cut short, altered), or None.

    Entries written before sizes and hashes were recorded are checked for existence only.
    """
    path = os.path.join(folder, entry["weights"])
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if "size" in entry and size != entry["size"]:
        return f"{size:,} bytes, {entry['size']:,} recorded"
    if "sha256" in entry and sha256_of(path) != entry["sha256"]:
        return "its sha256 differs from the recorded one"
    return None


def read_checkpoint_state(model_dir) -> dict[str, Any] | None:
    """The run state to resume from, or None for a fresh run.

    That is the state recorded with the newest intact checkpoint: a newer one that is
    missing, cut short or altered is passed over (the returned state's ``"damaged"`` lists
    each as ``"name (what is wrong)"``), and the state goes back to the intact one's epoch,
    step, best score and history.

    Raises:
        RunDirError: checkpoint.json is unreadable, or no recorded checkpoint is intact
            (each is named with what is wrong with it).
    """
    folder = os.path.join(model_dir, CHECKPOINTS)
    path = os.path.join(folder, CHECKPOINT_STATE)
    if not os.path.isfile(path):
        return None
    try:
        state = read_json(path)
        entries = state.get("checkpoints") or [
            {"weights": state["weights"], **{k: state[k] for k in CHECKPOINT_STATE_KEYS
                                             if k in state}}]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RunDirError(f"{path} is unreadable ({type(e).__name__}: {e}); pass "
                          "overwrite=True to start the run again") from None
    damaged = []
    for index in range(len(entries) - 1, -1, -1):
        entry = entries[index]
        problem = checkpoint_problem(folder, entry)
        if problem:
            damaged.append(f"{entry['weights']} ({problem})")
            continue
        resumed = dict(state)
        _go_back(resumed, entries[:index + 1])
        resumed["damaged"] = damaged
        return resumed
    raise RunDirError(f"no checkpoint in {folder} is intact ({'; '.join(damaged)}); pass "
                      "overwrite=True to start the run again")


def _go_back(state: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Sets ``state`` to the run's state when the last of ``entries`` was written (its
    epoch, step, best score and history), with ``entries`` as the kept checkpoints."""
    entry = entries[-1]
    state.update({k: entry[k] for k in CHECKPOINT_STATE_KEYS if k in entry})
    state.setdefault("step", 0)
    if "history" in entry:
        state["history"] = state.get("history", [])[:entry["history"]]
    state.update(weights=entry["weights"], checkpoints=entries)


def discard_newest_checkpoint(model_dir, state: dict[str, Any], *, write: bool = True) -> None:
    """Forgets the newest checkpoint of ``state``, whose weights proved bad (a loss computed
    with them was not finite).

    ``state`` goes back to the checkpoint kept before it, which checkpoint.json and
    history.csv then record, and the file is deleted; with none kept before it, the
    folder's checkpoint.json and history.csv go too, so the run starts again (with any
    options) when it is run next. ``write=False`` changes ``state`` only (a worker that
    writes nothing).
    """
    bad = state.pop("weights")
    entries = [e for e in state.pop("checkpoints", []) if e["weights"] != bad]
    if entries:
        _go_back(state, entries)
    if not write:
        return
    folder = os.path.join(model_dir, CHECKPOINTS)
    if entries:
        _write_state(model_dir, state)
    else:
        for path in (os.path.join(folder, CHECKPOINT_STATE), os.path.join(model_dir, HISTORY)):
            if os.path.exists(path):
                os.remove(path)
    os.remove(os.path.join(folder, bad))


def _write_state(model_dir, state: dict[str, Any]) -> None:
    """Writes checkpoint.json (the kept checkpoints and the run's state) and history.csv."""
    write_json(os.path.join(model_dir, CHECKPOINTS, CHECKPOINT_STATE),
               {k: v for k, v in state.items() if k != "damaged"})
    write_history(model_dir, state["history"])


def checkpoint_path(model_dir, state: dict[str, Any]) -> str:
    return os.path.join(model_dir, CHECKPOINTS, state["weights"])


def save_checkpoint(model_dir, save_weights, state: dict[str, Any], *, keep: int,
                    needed: int | None = None) -> None:
    """Writes the checkpoint of ``state`` (after ``state["epoch"]`` epochs and
    ``state["step"]`` steps), then checkpoint.json and history.csv.

    The file's size and sha256 and the state go into checkpoint.json's list of kept
    checkpoints; only the newest ``keep`` files stay. An interrupted or failed write
    leaves the previous checkpoint intact and recorded.

    Args:
        needed: the bytes the file will take (refused up front when the disk lacks them).
    """
    folder = os.path.join(model_dir, CHECKPOINTS)
    os.makedirs(folder, exist_ok=True)
    name = checkpoint_name(state["epoch"], state.get("step", 0))
    path = os.path.join(folder, name)
    save_atomic(path, save_weights, needed=needed)
    entry = {"weights": name, "size": os.path.getsize(path), "sha256": sha256_of(path),
             "history": len(state["history"]),
             **{k: state[k] for k in CHECKPOINT_STATE_KEYS if k in state}}
    entries = [e for e in state.get("checkpoints", []) if e["weights"] != name] + [entry]
    state["checkpoints"] = entries[-keep:]
    state["weights"] = name
    _write_state(model_dir, state)
    kept = {e["weights"] for e in state["checkpoints"]}
    for old in os.listdir(folder):
        if (old.startswith("epoch_") and old.endswith(".weights.h5") and ".tmp" not in old
                and old not in kept):
            os.remove(os.path.join(folder, old))


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run folder.

    Attributes:
        path: the folder.
        config: ``config.json`` as :func:`~keras_resnet.pipeline.config.recorded_config` gives it.
        labels: class names in label order (``labels.txt``).
    """

    path: Path
    config: dict
    labels: tuple[str, ...]

    @property
    def variant(self) -> str:
        return self.config["model"]

    @property
    def architecture(self) -> dict:
        """The ``resnet()`` argument naming the architecture, as the run built it."""
        depth = self.config.get("depth")
        return {"depth": int(depth)} if depth is not None else {"variant": self.variant}

    @property
    def model_options(self) -> dict:
        options = dict(self.config.get("model_options") or {})
        # JSON has no tuples; ResNetConfig fields such as depths are tuples.
        return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    def data_settings(self, *, dataset: str | None = None, data_dir: str | None = None,
                      batch_size: int | None = None) -> dict[str, Any]:
        """``load_data``/``eval_data`` arguments reproducing the run's data and validation.

        The run's ``val_fraction`` and ``seed`` carve exactly its validation images again.
        """
        dataset = dataset or self.config.get("dataset")
        if not dataset:
            raise RunDirError(f"{self.path / CONFIG} names no dataset; pass dataset=")
        batch_size = int(batch_size or self.config.get("batch_size") or 64)
        if batch_size < 1:
            raise RunDirError(f"batch_size={batch_size} must be a positive integer")
        return {
            "dataset": dataset,
            "data_dir": data_dir or self.config.get("data_dir"),
            "image_size": self.image_size,
            "batch_size": batch_size,
            "val_fraction": float(self.config.get("val_fraction", 0.1)),
            "seed": int(self.config.get("seed", 0)),
            "num_classes": self.num_classes if dataset == "synthetic" else None,
        }


def read_labels(path) -> tuple[str, ...]:
    return tuple(line.strip() for line in Path(path).read_text().splitlines()
                 if line.strip())


def read_run(run_dir) -> Run:
    """Reads and validates a finished run folder (model.keras, config.json, labels.txt).

    Raises:
        RunDirError: the folder or one of its files is missing or incomplete.
    """
    path = Path(os.path.expanduser(os.fspath(run_dir)))
    if not path.is_dir():
        raise RunDirError(f"run folder {path} does not exist; pass the model_dir that "
                          "training wrote")
    missing = [f for f in FINISHED_FILES if not (path / f).is_file()]
    if missing:
        raise RunDirError(f"run folder {path} is incomplete: {', '.join(missing)} missing "
                          "(training writes model.keras, config.json and labels.txt)")
    try:
        config = read_json(path / CONFIG)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path / CONFIG} is not valid JSON ({e})") from None
    absent = [k for k in ("model", "num_classes", "image_size")
              if not isinstance(config, dict) or k not in config]
    if absent:
        raise RunDirError(f"{path / CONFIG} lacks the key(s) {', '.join(absent)}")
    labels = read_labels(path / LABELS)
    if len(labels) != int(config["num_classes"]):
        raise RunDirError(f"{path / LABELS} has {len(labels)} names but config.json says "
                          f"num_classes={config['num_classes']}")
    return Run(path=path, config=config_lib.recorded_config(config), labels=labels)


def find_run(model_path) -> tuple[dict[str, Any] | None, tuple[str, ...] | None]:
    """``(config, labels)`` of the run a model file belongs to (its folder or the parent).

    Either is None when not found; a config.json that is not a training run's is ignored.
    """
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(os.fspath(model_path))))
    config = labels = None
    for candidate in (folder, os.path.dirname(folder)):
        found = read_config(candidate)
        if config is None and found and "model" in found and "num_classes" in found:
            config = found
        if labels is None and os.path.isfile(os.path.join(candidate, LABELS)):
            labels = read_labels(os.path.join(candidate, LABELS))
    return config, labels


def load_model(run: Run):
    """Loads the run's Keras 3 ``model.keras`` and checks it is the architecture that
    ``config.json`` describes (names and shapes of all weighted layers).

    Raises:
        RunDirError: the file does not load, the config names no buildable ResNet, or the
            model differs from it.
    """
    import keras

    import keras_resnet
    from keras_resnet import weights as weights_lib
    from keras_resnet.pipeline.errors import first_line
    from keras_resnet.pipeline.files import check_file_format

    path = run.path / MODEL
    check_file_format(path, error=RunDirError)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a bad archive
        raise RunDirError(f"{path} cannot be loaded as a Keras model ({first_line(e)})") \
            from None
    try:
        reference = keras_resnet.resnet(
            **run.architecture, classes=run.num_classes,
            input_shape=tuple(model.input_shape[1:]), include_preprocessing=True,
            classifier_activation=None, **run.model_options)
    except (ValueError, TypeError) as e:
        raise RunDirError(f"{run.path / CONFIG} describes no ResNet this package builds "
                          f"({first_line(e)})") from None
    problem = weights_lib.mismatch(model, reference)
    if problem:
        raise RunDirError(f"{path} is not the {run.variant} that config.json describes: it "
                          f"{problem}")
    return model
