"""What every model file of a run folder was made from, and whether it still is current.

Training, QAT and export record each file they write in the run folder's ``lineage.json``:
its sha256, the sha256 of each file it was made from (its parents: labels.txt and
model.keras for the QAT model, the QAT model for the int8 file, the file for its
``.json`` hand-off, ...), the digest of the data it saw, and the step that wrote it::

    {"format": 1, "files": {
      "labels.txt":        {"sha256": "...", "made_from": {}, "by": "train",
                            "classes": ["airplane", ...]},
      "model.keras":       {"sha256": "...", "made_from": {"labels.txt": "..."},
                            "data": "<data digest>", "by": "train"},
      "model_qat.h5":      {"sha256": "...", "made_from": {"model.keras": "...",
                            "labels.txt": "..."}, "data": "...", "by": "qat"},
      "model_int8.tflite": {"sha256": "...", "made_from": {"model_qat.h5": "..."}, ...}}}

A file is *stale* when one of its parents is no longer the file it was made from (a
resumed run wrote a new model.keras; labels.txt was edited) or is stale itself, as Make
rebuilds what is older than its inputs. Every step checks what it reads with
:func:`check_current` and names the command that rebuilds a stale file; a run whose
model.keras changes reports the files that became stale (:func:`stale_files`).

Files a step writes are recorded when the step ends, all together: a file present in the
folder but absent from ``lineage.json`` was left by a step that was killed before it ended
(:func:`leftovers`), and the next run of that step removes it. The first step that keeps
lineage in a folder written before lineage existed records the files it finds as they are
(:func:`adopt`).

Example:
    >>> check_current("runs/r20", ["model.keras", "labels.txt"])   # or RunDirError
    >>> record("runs/r20", ["model_float32.tflite"], by="export")
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from keras_resnet.pipeline.data import sources
from keras_resnet.pipeline.errors import RunDirError
from keras_resnet.pipeline.run import layout, preemption
from keras_resnet.pipeline.run.safe_writes import write_json

FORMAT = 1


def parents_of(name: str) -> tuple[str, ...]:
    """The run-folder files a file of this name is made from (the one definition).

    Raises:
        ValueError: a name that no step of the pipeline writes.
    """
    if name == layout.LABELS:
        return ()
    if name in (layout.MODEL, layout.BEST):
        return (layout.LABELS,)
    if name == layout.QAT_MODEL:
        return (layout.MODEL, layout.LABELS)
    if name == layout.INT8_MODEL:
        return (layout.QAT_MODEL, layout.LABELS)
    if name == layout.QAT_REPORT:
        return (layout.INT8_MODEL,)
    if name == layout.EXPORT_REPORT:
        return (layout.MODEL,)
    if name in layout.EXPORTED.values() or name == layout.ONNX_MODEL:
        return (layout.MODEL, layout.LABELS)
    exported = {layout.sidecar(f): f for f in layout.EXPORTED.values()}
    if name in exported:
        return (exported[name],)
    raise ValueError(f"{name} is not a file lineage knows")


def step_of(name: str) -> str:
    """The step that writes a file of this name."""
    if name in (layout.LABELS, layout.MODEL, layout.BEST):
        return "train"
    return "qat" if name in layout.QAT_FILES else "export"


def tracked(name: str) -> bool:
    """Whether lineage records a file of this name."""
    try:
        parents_of(name)
    except ValueError:
        return False
    return True


class Digests:
    """sha256 of files, each read once per (path, size, modification time)."""

    def __init__(self):
        self._seen: dict[tuple, str] = {}

    def __call__(self, path) -> str | None:
        path = os.fspath(path)
        try:
            stat = os.stat(path)
        except OSError:
            return None
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._seen:
            self._seen[key] = layout.sha256_of(path)
        return self._seen[key]


_DIGESTS = Digests()


def read(run_dir) -> dict[str, dict[str, Any]] | None:
    """The records of ``lineage.json`` by file name, or None where the folder has none.

    Raises:
        RunDirError: lineage.json is not readable JSON.
    """
    path = os.path.join(run_dir, layout.LINEAGE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it to "
                          "use the run without lineage checks") from None
    return files


def _write(run_dir, files: dict[str, dict[str, Any]]) -> None:
    write_json(os.path.join(run_dir, layout.LINEAGE), {"format": FORMAT, "files": files},
               sort_keys=True)


def _entry(run_dir, name: str, *, by: str, data: str | None) -> dict[str, Any]:
    folder = Path(run_dir)
    entry = {"sha256": _DIGESTS(folder / name),
             "made_from": {p: _DIGESTS(folder / p) for p in parents_of(name)
                           if (folder / p).is_file()},
             "by": by,
             "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    if data is not None:
        entry["data"] = data
    if name == layout.LABELS:
        entry["classes"] = list(layout.read_labels(folder / name))
    return entry


def record(run_dir, names: Iterable[str], *, by: str, data: str | None = None,
           previous: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Records ``names`` (files of the run folder that step ``by`` just wrote) with their
    parents as they are now; files that no longer exist are dropped from the record.

    Args:
        data: the digest of the data the step saw (see
            :func:`keras_resnet.pipeline.data.sources.fingerprint`), where it saw any.
        previous: parent name -> sha256 to record instead of the current file, for files
            known to have been made from an earlier version of it.

    Returns:
        The records written.
    """
    files = read(run_dir) or {}
    for name in names:
        if not (Path(run_dir) / name).is_file():
            files.pop(name, None)
            continue
        entry = _entry(run_dir, name, by=by, data=data)
        for parent, digest in (previous or {}).items():
            if parent in entry["made_from"]:
                entry["made_from"][parent] = digest
        files[name] = entry
    _write(run_dir, files)
    return files


def present(run_dir) -> list[str]:
    """The files of the run folder that lineage tracks, in name order."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(n for n in os.listdir(run_dir)
                  if tracked(n) and os.path.isfile(os.path.join(run_dir, n)))


def adopt(run_dir) -> None:
    """Starts lineage in a folder written before it existed: every tracked file found is
    recorded as it is, made from its parents as they are now. Does nothing where the
    folder already keeps lineage."""
    found = present(run_dir)
    if not found or read(run_dir) is not None:
        return
    files = {}
    for name in found:
        files[name] = {**_entry(run_dir, name, by=step_of(name), data=None),
                       "note": "recorded as found, in a folder written before lineage"}
    _write(run_dir, files)


def forget(run_dir, names: Iterable[str]) -> None:
    """Drops the records of ``names`` (files that were removed)."""
    files = read(run_dir)
    if files is None:
        return
    kept = {k: v for k, v in files.items() if k not in set(names)}
    if kept != files:
        _write(run_dir, kept)


def leftovers(run_dir, names: Iterable[str]) -> list[str]:
    """Of ``names``, the files present but not recorded in a folder that keeps lineage:
    files a step wrote before it was killed, which the next run of that step replaces."""
    files = read(run_dir)
    if files is None:
        return []
    return [n for n in names if n not in files and (Path(run_dir) / n).is_file()]


def why_stale(run_dir, name: str, files: dict[str, dict[str, Any]] | None = None,
              _seen: frozenset = frozenset()) -> tuple[str, str] | None:
    """Why ``name`` is stale, as ``(parent, reason)``, or None when it is current (or not
    recorded, so unknown). ``parent`` is the file at the root of the change."""
    files = read(run_dir) if files is None else files
    if not files or name not in files or name in _seen:
        return None
    for parent, digest in files[name].get("made_from", {}).items():
        current = _DIGESTS(Path(run_dir) / parent)
        if current is None:
            return parent, f"{parent}, which it was made from, is missing"
        if current != digest:
            return parent, f"{parent} changed after {name} was made"
        deeper = why_stale(run_dir, parent, files, _seen | {name})
        if deeper is not None:
            return deeper[0], f"it was made from {parent}, which is stale: {deeper[1]}"
    return None


def stale_files(run_dir) -> list[str]:
    """Every recorded file of the run folder that is stale, in name order."""
    files = read(run_dir) or {}
    return [n for n in sorted(files) if (Path(run_dir) / n).is_file()
            and why_stale(run_dir, n, files) is not None]


def rebuild_commands(run_dir, names: Iterable[str]) -> list[str]:
    """The commands that write ``names`` again from the current files, in the order to
    run them (QAT before export, whose qat_int8 mode reads the QAT model)."""
    run_dir = os.fspath(run_dir)
    steps = {step_of(n) for n in names}
    by_file = {f: m for m, f in layout.EXPORTED.items()}
    by_file.update({layout.sidecar(f): m for f, m in list(by_file.items())})
    by_file[layout.ONNX_MODEL] = "onnx"
    modes = [by_file[n] for n in names if n in by_file and step_of(n) == "export"]
    commands = []
    if "train" in steps:
        commands.append(f"python tools/train.py ... --model_dir={run_dir} --overwrite")
    if "qat" in steps:
        commands.append(f"python tools/qat.py --model_dir={run_dir} --overwrite")
    if "export" in steps:
        chosen = f" --modes={','.join(dict.fromkeys(modes))}" if modes else ""
        commands.append(f"python tools/export_tflite.py --model_dir={run_dir}{chosen} "
                        "--overwrite")
    return commands


def labels_fix(run_dir, files: dict[str, dict[str, Any]]) -> str:
    """How to restore a labels.txt that was edited after training wrote it."""
    classes = files.get(layout.LABELS, {}).get("classes") or []
    if classes and len(classes) <= 12:
        return ("restore it: the run's classes in label order are "
                + ", ".join(repr(c) for c in classes))
    return (f"restore it: the run's {len(classes)} classes in label order are listed in "
            f"{layout.LINEAGE}" if classes else "restore the file training wrote")


def check_current(run_dir, names: Sequence[str]) -> None:
    """Refuses to read a stale file: raises for the first of ``names`` that is stale.

    Files the folder does not record (a folder written before lineage existed) pass.

    Raises:
        RunDirError: naming the file, what changed, and the command that rebuilds it.
    """
    files = read(run_dir)
    if not files:
        return
    path = Path(run_dir)
    if layout.LABELS in names and layout.LABELS in files:
        if _DIGESTS(path / layout.LABELS) != files[layout.LABELS]["sha256"]:
            raise RunDirError(f"{path / layout.LABELS} is not the file training wrote (it was "
                              f"edited since); {labels_fix(path, files)}")
    for name in names:
        reason = why_stale(path, name, files)
        if reason is None:
            continue
        root, why = reason
        if root == layout.LABELS:
            raise RunDirError(f"{path / name} is stale: {why}; {path / layout.LABELS} was "
                              f"edited after training wrote it; {labels_fix(path, files)}")
        raise RunDirError(f"{path / name} is stale: {why}; rebuild it with "
                          f"`{rebuild_commands(path, [name])[0]}`")


def made_from(run_dir, name: str) -> dict[str, str]:
    """``{parent: sha256}`` of a file about to be written from the current files, for the
    reports and hand-off files that carry their own lineage."""
    folder = Path(run_dir)
    return {p: _DIGESTS(folder / p) for p in parents_of(name) if (folder / p).is_file()}


def digest_of(path) -> str | None:
    """The sha256 of a file (cached), or None when it does not exist."""
    return _DIGESTS(path)


# ----------------------------------------------------------------------------- data


def data_change(run_dir, recorded: dict | None, dataset: str, data_dir: str | None
                ) -> str | None:
    """What changed in the data since a run recorded its fingerprint (``config.json``'s
    ``data``), in a few words, or None when it is the same (or the run predates
    fingerprints)."""
    if not recorded:
        return None
    current = sources.fingerprint(dataset, data_dir)
    if current.digest == recorded.get("digest"):
        return None
    files = layout.read_data_files(run_dir) if current.summary["kind"] == "folder" else None
    return sources.describe_change(recorded, files, current)


def check_data(run_dir, config: dict, *, dataset: str | None, data_dir: str | None,
               what: str) -> None:
    """Refuses to measure a run on its validation (or training) images when the data they
    are carved from is not the data the run trained on: the carve would have moved and
    images the run trained on would count as validation images.

    Data other than the run's own (another dataset or folder) is the caller's choice and
    passes.

    Raises:
        RunDirError: naming what changed and what to do.
    """
    dataset = dataset or config.get("dataset")
    data_dir = data_dir or config.get("data_dir")
    same_dir = _same_folder(data_dir, config.get("data_dir"))
    if dataset != config.get("dataset") or not same_dir:
        return
    change = data_change(run_dir, config.get("data"), dataset, data_dir)
    if change:
        where = f" in {data_dir}" if data_dir else ""
        raise RunDirError(f"the {dataset} data{where} changed since the run trained on it "
                          f"({change}), so {what} would include images it trained on; "
                          "restore the data, or train a new run on it (overwrite=True or "
                          "another model_dir)")


def _same_folder(a, b) -> bool:
    if not a or not b:
        return a == b
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


# ----------------------------------------------------------------------------- steps


@contextlib.contextmanager
def step(run_dir, what: str, outputs: Sequence[str], *, replace: Sequence[str] = ()
         ) -> Iterator[preemption.StopNow]:
    """Runs a step that writes ``outputs`` into a run folder so that it ends with all of
    them recorded or with none of the files it wrote.

    Before: lineage starts in a folder written before it existed (:func:`adopt`), files a
    killed earlier run of the step left behind (:func:`leftovers`) are removed, and so are
    ``replace`` (outputs to write again). Inside, SIGTERM/SIGINT stop the step at once
    (:class:`~keras_resnet.pipeline.run.preemption.StopNow`). On any failure or stop, every
    output the step wrote (not yet recorded) is removed. The step records its outputs last
    (``stop.check()``, then :func:`record`), inside the block.

    Yields:
        The StopNow of the step.
    """
    adopt(run_dir)
    for name in leftovers(run_dir, outputs):
        os.remove(os.path.join(run_dir, name))
        print(f"removed {name}, left by an earlier {what} that was stopped before it ended",
              flush=True)
    for name in replace:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, name))
    forget(run_dir, replace)
    then = "the files it had written were removed; run the same command again"
    with preemption.StopNow(what, then=then) as stop:
        try:
            yield stop
        except BaseException:
            for name in leftovers(run_dir, outputs):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(run_dir, name))
            if stop.signum is not None:
                # The signal's exception may arrive wrapped by the library it interrupted
                # (Keras turns it into a RuntimeError inside a layer call): stop as the
                # signal asked, with its one line and exit status.
                raise stop.interrupted() from None
            raise
