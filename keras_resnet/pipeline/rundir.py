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
import gzip
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from keras_resnet.pipeline import config as config_lib
from keras_resnet.pipeline.errors import RunDirError, RunLocked
from keras_resnet.pipeline.safe_writes import (
    guarded_write,
    save_atomic,
    write_bytes_atomic,
    write_errno,
    write_failure,
    write_json,
)

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
LINEAGE = "lineage.json"
DATA_FILES = "data_files.txt.gz"
# export mode -> the file it writes. "qat_int8" is the QAT int8 model, the Android hand-off.
EXPORTED = {
    "float32": "model_float32.tflite",
    "float16": "model_float16.tflite",
    "dynamic": "model_dynamic.tflite",
    "ptq_int8": "model_ptq_int8.tflite",
    "qat_int8": INT8_MODEL,
}
TRAIN_FILES = (CONFIG, LABELS, MODEL, BEST, METRICS, HISTORY, CURVES, LINEAGE, DATA_FILES)


def sidecar(name: str) -> str:
    """The hand-off ``.json`` written next to an exported file."""
    return os.path.splitext(name)[0] + ".json"


ONNX_MODEL = "model.onnx"  # export mode onnx; its metadata is inside, no hand-off file
INT8_SIDECAR = sidecar(INT8_MODEL)
QAT_FILES = (QAT_MODEL, INT8_MODEL, INT8_SIDECAR, QAT_REPORT)
EXPORT_FILES = (*EXPORTED.values(), ONNX_MODEL, *(sidecar(f) for f in EXPORTED.values()),
                EXPORT_REPORT)
# Every file a run, its QAT and its exports write in the run folder.
RUN_FILES = tuple(dict.fromkeys(TRAIN_FILES + QAT_FILES + EXPORT_FILES))
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


def write_data_files(run_dir, lines) -> None:
    """Writes the data fingerprint's file list (gzip, one line per image) when it changed."""
    content = gzip.compress(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"),
                            mtime=0)
    path = os.path.join(run_dir, DATA_FILES)
    if os.path.isfile(path) and Path(path).read_bytes() == content:
        return
    write_bytes_atomic(path, content)


def read_data_files(run_dir) -> list[str] | None:
    """The file list :func:`write_data_files` wrote, or None."""
    try:
        text = gzip.decompress(Path(run_dir, DATA_FILES).read_bytes()).decode(
            "utf-8", "surrogateescape")
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return [line for line in text.splitlines() if line]


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
        check_folder(self.run_dir)
        self._created = not os.path.isdir(self.run_dir)
        path = os.path.join(self.run_dir, LOCK)
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            code = write_errno(e)
            if code is None:
                raise
            raise write_failure(path, code) from None
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


# ----------------------------------------------------------------------------- paths


def check_folder(path) -> None:
    """Refuses a run folder path that names a file (or lies inside one).

    Raises:
        RunDirError: one sentence naming the file.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        where = "is a file" if probe == path else f"lies inside the file {probe}"
        raise RunDirError(f"model_dir {path} {where}, not a folder; choose a folder for the "
                          "run")


def check_apart(model_dir, data_dir) -> None:
    """Refuses a run folder that is the data folder, lies inside it or holds it: the run's
    files would count as data (checkpoints/ as a class) or its data as run files.

    Raises:
        RunDirError: one sentence naming both folders.
    """
    if not data_dir:
        return
    run = os.path.realpath(os.path.expanduser(os.fspath(model_dir)))
    data = os.path.realpath(os.path.expanduser(os.fspath(data_dir)))
    if run == data:
        relation = "is"
    elif run.startswith(data.rstrip(os.sep) + os.sep):
        relation = "is inside"
    elif data.startswith(run.rstrip(os.sep) + os.sep):
        relation = "holds"
    else:
        return
    raise RunDirError(f"model_dir {run} {relation} the data folder {data}; keep runs apart "
                      "from the data, e.g. model_dir=runs/<name>")


def check_output(path, *, inputs=(), what: str = "output") -> None:
    """Refuses an output path that would replace an input or a run's file.

    ``path`` may not be one of ``inputs`` (files or folders; a path inside an input folder
    is refused too), nor a file that a run folder tracks (a model, labels.txt,
    config.json, a checkpoint, ...).

    Raises:
        RunDirError: naming the path and what it would replace.
    """
    target = os.path.realpath(os.path.expanduser(os.fspath(path)))
    for source in inputs:
        if not source:
            continue
        source = os.path.realpath(os.path.expanduser(os.fspath(source)))
        if target == source or target.startswith(source.rstrip(os.sep) + os.sep):
            raise RunDirError(f"{what} {target} would overwrite the input {source}; choose "
                              "another path")
    folder, name = os.path.split(target)
    run_folder = os.path.isfile(os.path.join(folder, CONFIG))
    inside = os.path.basename(folder) in TRAIN_DIRS and os.path.isfile(
        os.path.join(os.path.dirname(folder), CONFIG))
    if inside or (run_folder and name in (*RUN_FILES, LOCK)):
        raise RunDirError(f"{what} {target} would overwrite a file of the run in {folder}; "
                          "choose another name")


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
        old = read_config(model_dir)
        if old is None:
            raise RunDirError(f"{config_path} is unreadable (cut short or not JSON), so the "
                              "run it belongs to is unknown; choose another model_dir or pass "
                              "overwrite=True to replace the run")
        mismatch = [k for k in identity if k in old and old.get(k) != identity[k]]
        if mismatch:
            raise RunDirError(
                f"model_dir {model_dir} holds a run of {describe(old)}, not "
                f"{describe({**old, **identity})}; choose another model_dir or pass "
                "overwrite=True to replace it")
        checkpoints = os.path.join(model_dir, CHECKPOINTS)
        trained = [f for f in (MODEL, BEST) if os.path.isfile(os.path.join(model_dir, f))]
        if trained and not (os.path.isfile(os.path.join(checkpoints, CHECKPOINT_STATE))
                            or checkpoint_files(checkpoints)):
            raise RunDirError(f"model_dir {model_dir} holds a trained model ({trained[0]}) but "
                              f"no checkpoint to resume from ({CHECKPOINTS}/ is empty or "
                              "missing); pass overwrite=True to train again from the start, "
                              "or choose another model_dir")
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
        if name in RUN_FILES and os.path.isfile(path):
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
        return _rebuilt_state(model_dir, "is missing") if checkpoint_files(folder) else None
    try:
        state = read_json(path)
        entries = state.get("checkpoints") or [
            {"weights": state["weights"], **{k: state[k] for k in CHECKPOINT_STATE_KEYS
                                             if k in state}}]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if checkpoint_files(folder):
            return _rebuilt_state(model_dir, f"is unreadable ({type(e).__name__})")
        raise RunDirError(f"{path} is unreadable ({type(e).__name__}: {e}) and no checkpoint "
                          "file is left; pass overwrite=True to start the run again") from None
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


_CHECKPOINT_NAME = re.compile(r"epoch_(\d{4,})(?:_step_(\d{6,}))?\.weights\.h5")


def checkpoint_files(folder) -> list[tuple[int, int, str]]:
    """``(epoch, step, name)`` of every checkpoint file in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_NAME.fullmatch(name)
        if match:
            found.append((int(match[1]), int(match[2] or 0), name))
    return sorted(found)


def h5_problem(path) -> str | None:
    """What is wrong with an HDF5 file whose size and hash were never recorded (it does
    not open, or a dataset in it cannot be read to its end), or None."""
    import h5py

    problems = []

    def read(name, item):
        if isinstance(item, h5py.Dataset) and not problems:
            try:
                item[()]
            except Exception as e:  # noqa: BLE001 - h5py raises several types for bad data
                problems.append(f"{name} is unreadable ({type(e).__name__})")
    try:
        with h5py.File(path, "r") as f:
            f.visititems(read)
    except Exception as e:  # noqa: BLE001
        return f"it does not open as HDF5 ({type(e).__name__})"
    return problems[0] if problems else None


def _rebuilt_state(model_dir, why: str) -> dict[str, Any]:
    """The run state rebuilt from the checkpoint files themselves (when checkpoint.json
    is missing or unreadable): the newest file that reads whole, the epochs of
    history.csv up to it, and the best score and wall time found there.

    Raises:
        RunDirError: no checkpoint file reads whole.
    """
    folder = os.path.join(model_dir, CHECKPOINTS)
    config = read_config(model_dir) or {}
    freeze = int(config.get("freeze_backbone_epochs") or 0)
    history = _read_history(model_dir)
    damaged, entries = [], []
    for epoch, step, name in checkpoint_files(folder):
        problem = h5_problem(os.path.join(folder, name))
        if problem:
            damaged.append(((epoch, step), f"{name} ({problem})"))
            continue
        rows = [row for row in history if row["epoch"] <= epoch]
        scores = [(max(r.get("val_accuracy", -1.0), r.get("ema_val_accuracy", -1.0)), r)
                  for r in rows if "val_accuracy" in r]
        best = max(scores, key=lambda s: s[0], default=None)
        entry = {"weights": name, "epoch": epoch, "step": step, "history": len(rows),
                 "phase": 0 if epoch < freeze or (epoch == freeze and not step) else 1,
                 "wall_time_s": sum(r.get("epoch_time_s", 0.0) for r in rows),
                 "best_val_accuracy": best[0] if best else -1.0,
                 **({"best_epoch": int(best[1]["epoch"])} if best else {})}
        path = os.path.join(folder, name)
        entries.append({**entry, "size": os.path.getsize(path), "sha256": sha256_of(path)})
    if not entries:
        raise RunDirError(f"{folder}/{CHECKPOINT_STATE} {why} and no checkpoint file reads "
                          f"whole ({'; '.join(d for _, d in damaged)}); pass overwrite=True to "
                          "start the run again")
    state = {"history": history}
    _go_back(state, entries)
    newest = (entries[-1]["epoch"], entries[-1]["step"])
    state["damaged"] = [d for at, d in reversed(damaged) if at > newest]
    state["rebuilt"] = (f"{CHECKPOINTS}/{CHECKPOINT_STATE} {why}: rebuilt from the checkpoint "
                        f"files, newest intact {entries[-1]['weights']}")
    return state


def _read_history(model_dir) -> list[dict[str, float]]:
    """history.csv as rows of floats (``epoch`` an int); [] when absent or unreadable."""
    try:
        with open(os.path.join(model_dir, HISTORY), newline="") as f:
            rows = [{k: float(v) for k, v in row.items() if v not in ("", None)}
                    for row in csv.DictReader(f)]
    except (OSError, ValueError):
        return []
    return [{**row, "epoch": int(row["epoch"])} for row in rows if "epoch" in row]


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
    if path.exists() and not path.is_dir():
        raise RunDirError(f"model_dir {path} is a file, not a run folder; pass the folder "
                          "training wrote")
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


@dataclasses.dataclass(frozen=True)
class FoundRun:
    """The run a model file belongs to, as far as found (each part may be None)."""

    folder: Path | None
    config: dict[str, Any] | None
    labels: tuple[str, ...] | None


def find_run(model_path) -> FoundRun:
    """The run a model file belongs to: the config.json and labels.txt of its folder or
    the folder above; a config.json that is not a training run's is ignored."""
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(os.fspath(model_path))))
    run_folder = config = labels = None
    for candidate in (folder, os.path.dirname(folder)):
        found = read_config(candidate)
        if config is None and found and "model" in found and "num_classes" in found:
            config, run_folder = found, Path(candidate)
        if labels is None and os.path.isfile(os.path.join(candidate, LABELS)):
            labels = read_labels(os.path.join(candidate, LABELS))
    return FoundRun(run_folder, config, labels)


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
