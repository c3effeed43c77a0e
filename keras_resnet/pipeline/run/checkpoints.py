"""A run's checkpoints: writing them, resuming from the newest intact one, and what a
resumed run must match.

``checkpoints/checkpoint.json`` lists every kept checkpoint with its size and sha256 and
the run's state when it was written (epoch, step within the next epoch, best score,
history length); :func:`read_checkpoint_state` resumes from the newest intact one, and
rebuilds that record from the checkpoint files themselves when it is missing or
unreadable. :func:`check_resume` refuses to continue a run with other options or on other
data.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from keras_resnet.pipeline.errors import ResumeMismatch, RunDirError
from keras_resnet.pipeline.run import lineage
from keras_resnet.pipeline.run.config import ResolvedConfig, resume_conflicts
from keras_resnet.pipeline.run.layout import (
    CHECKPOINT_STATE,
    CHECKPOINTS,
    HISTORY,
    checkpoint_files,
    checkpoint_name,
    read_config,
    read_json,
    sha256_of,
)
from keras_resnet.pipeline.run.safe_writes import save_atomic, write_atomic, write_json

# What a checkpoint entry records of the run's state when it was written: a resume from an
# older checkpoint takes these values (and the history up to ``history`` rows) back.
CHECKPOINT_STATE_KEYS = ("epoch", "step", "phase", "best_val_accuracy", "best_epoch",
                         "wall_time_s")


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


def write_history(run_dir, history: list[dict[str, float]]) -> None:
    """Rewrites history.csv from the checkpointed history (so no epoch appears twice)."""
    if not history:
        return
    keys = ["epoch"] + sorted({k for row in history for k in row} - {"epoch"})
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    write_atomic(os.path.join(run_dir, HISTORY), text.getvalue())


# ----------------------------------------------------------------------------- resuming


def check_resume(run_dir: str, resolved: ResolvedConfig) -> None:
    """Refuses to continue a run that was started with other options.

    Raises:
        ResumeMismatch: naming each option with its recorded and its new value.
    """
    checkpoints = os.path.join(run_dir, CHECKPOINTS)
    if resolved.overwrite or not (os.path.isfile(os.path.join(
            checkpoints, CHECKPOINT_STATE)) or checkpoint_files(checkpoints)):
        return
    old = read_config(run_dir)
    conflicts = resume_conflicts(old or {}, resolved)
    if conflicts:
        raise ResumeMismatch(
            f"model_dir {run_dir} holds a run started with other options "
            f"({'; '.join(conflicts)}); pass the options it was started with to resume it "
            "(only epochs may change), overwrite=True to start again, or another model_dir")


def check_data_unchanged(run_dir: str, previous: dict, resolved: ResolvedConfig) -> None:
    """Refuses to resume a run on data other than the data it started on: the validation
    images carved from it would move, and images it trained on would become validation
    images.

    Raises:
        ResumeMismatch: naming what changed (images added, removed, changed per class).
    """
    change = lineage.data_change(run_dir, previous.get("data"), resolved.dataset,
                                 resolved.data_dir)
    if change:
        raise ResumeMismatch(
            f"the {resolved.dataset} data changed since the run in {run_dir} started "
            f"({change}); restore it to resume, or pass overwrite=True to start again on it, "
            "or choose another model_dir")
