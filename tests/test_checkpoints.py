"""The run folder's checkpoints (integrity, fallback) and failed writes (one line, nothing
half-written)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from keras_resnet.pipeline.errors import RunDirError, WriteError
from keras_resnet.pipeline.run import checkpoints, safe_writes
from keras_resnet.pipeline.run import layout as run_folder


def _write(path, size):
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def _run_with_checkpoints(tmp_path, epochs=3, keep=2):
    """A run folder whose checkpoints were written by save_checkpoint, one per epoch."""
    state = {"epoch": 0, "step": 0, "history": [], "best_val_accuracy": -1.0}
    for epoch in range(1, epochs + 1):
        state["history"].append({"epoch": epoch, "loss": 1.0 / epoch})
        state.update(epoch=epoch, best_val_accuracy=0.1 * epoch, best_epoch=epoch)
        checkpoints.save_checkpoint(tmp_path, lambda p: _write(p, 5000), state, keep=keep)
    return tmp_path / run_folder.CHECKPOINTS


def test_checkpoint_json_records_size_and_sha256_of_each_kept_file(tmp_path):
    folder = _run_with_checkpoints(tmp_path)
    record = json.loads((folder / run_folder.CHECKPOINT_STATE).read_text())
    assert [e["weights"] for e in record["checkpoints"]] == [
        "epoch_0002.weights.h5", "epoch_0003.weights.h5"]
    assert sorted(os.listdir(folder)) == [run_folder.CHECKPOINT_STATE, "epoch_0002.weights.h5",
                                          "epoch_0003.weights.h5"]  # keep=2
    for entry in record["checkpoints"]:
        path = folder / entry["weights"]
        assert entry["size"] == path.stat().st_size == 5000
        assert entry["sha256"] == run_folder.sha256_of(path)
    state = checkpoints.read_checkpoint_state(tmp_path)
    assert (state["epoch"], state["weights"], state["damaged"]) == (
        3, "epoch_0003.weights.h5", [])


@pytest.mark.parametrize("damage, problem", [
    (lambda p: os.truncate(p, 300), "300 bytes, 5,000 recorded"),
    (lambda p: os.remove(p), "missing"),
    (lambda p: _write(p, 5000), "its sha256 differs from the recorded one"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, damage, problem):
    folder = _run_with_checkpoints(tmp_path)
    damage(folder / "epoch_0003.weights.h5")
    state = checkpoints.read_checkpoint_state(tmp_path)
    assert state["weights"] == "epoch_0002.weights.h5"
    assert state["damaged"] == [f"epoch_0003.weights.h5 ({problem})"]
    # the state goes back with it: epoch, best score and history
    assert (state["epoch"], state["best_epoch"], len(state["history"])) == (2, 2, 2)
    assert state["best_val_accuracy"] == pytest.approx(0.2)
    assert [e["weights"] for e in state["checkpoints"]] == ["epoch_0002.weights.h5"]


def test_no_intact_checkpoint_is_one_line_naming_each(tmp_path):
    folder = _run_with_checkpoints(tmp_path)
    os.truncate(folder / "epoch_0003.weights.h5", 10)
    os.remove(folder / "epoch_0002.weights.h5")
    with pytest.raises(RunDirError) as e:
        checkpoints.read_checkpoint_state(tmp_path)
    assert str(e.value) == (
        f"no checkpoint in {folder} is intact (epoch_0003.weights.h5 (10 bytes, 5,000 "
        "recorded); epoch_0002.weights.h5 (missing)); pass overwrite=True to start the run "
        "again")
    (folder / run_folder.CHECKPOINT_STATE).write_text("{not json")
    with pytest.raises(RunDirError, match="checkpoint.json is unreadable"):
        checkpoints.read_checkpoint_state(tmp_path)


def test_checkpoint_json_of_older_runs_still_resumes(tmp_path):
    folder = tmp_path / run_folder.CHECKPOINTS
    folder.mkdir()
    _write(folder / "epoch_0004.weights.h5", 100)
    (folder / run_folder.CHECKPOINT_STATE).write_text(json.dumps(
        {"epoch": 4, "history": [{"epoch": i} for i in range(1, 5)], "phase": 0,
         "weights": "epoch_0004.weights.h5", "best_val_accuracy": 0.5}))
    state = checkpoints.read_checkpoint_state(tmp_path)
    assert (state["epoch"], state["step"], state["weights"]) == (4, 0, "epoch_0004.weights.h5")


def test_mid_epoch_checkpoints_are_named_by_step(tmp_path):
    assert run_folder.checkpoint_name(3) == "epoch_0003.weights.h5"
    assert run_folder.checkpoint_name(3, 120) == "epoch_0003_step_000120.weights.h5"
    state = {"epoch": 3, "step": 120, "history": [{"epoch": i} for i in (1, 2, 3)]}
    checkpoints.save_checkpoint(tmp_path, lambda p: _write(p, 10), state, keep=2)
    resumed = checkpoints.read_checkpoint_state(tmp_path)
    assert (resumed["epoch"], resumed["step"]) == (3, 120)


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left on device ("),
    (errno.EROFS, "read-only file system; use a writable folder"),
    (errno.EACCES, "permission denied; make its folder writable"),
])
def test_a_failed_write_is_one_line_and_leaves_nothing_half_written(tmp_path, code, words):
    folder = _run_with_checkpoints(tmp_path, epochs=1)
    before = sorted(os.listdir(folder))

    def fails(path):
        _write(path, 100)  # something was written before the failure
        raise OSError(code, os.strerror(code), path)

    state = checkpoints.read_checkpoint_state(tmp_path)
    state.update(epoch=2)
    with pytest.raises(WriteError) as e:
        checkpoints.save_checkpoint(tmp_path, fails, state, keep=2)
    message = str(e.value)
    assert message.startswith(f"could not write {folder}/epoch_0002.weights.h5: {words}")
    assert "\n" not in message
    assert sorted(os.listdir(folder)) == before  # no temporary file, old record kept
    assert checkpoints.read_checkpoint_state(tmp_path)["weights"] == "epoch_0001.weights.h5"


def test_write_failures_hidden_in_library_errors_are_recognised(tmp_path):
    # h5py and TensorFlow's file system put the errno's words in a message of their own
    h5 = RuntimeError("Can't decrement id ref count (file write failed: time = Mon, "
                      "errno = 28, error message = 'No space left on device')")
    assert safe_writes.write_errno(h5) == errno.ENOSPC
    tf_like = Exception(f"{tmp_path}/logs/events.out.tfevents.1; No space left on device")
    failure = safe_writes.as_write_error(tf_like, tmp_path)
    assert str(failure).startswith(f"could not write {tmp_path}/logs/events.out.tfevents.1: "
                                   "no space left on device")
    assert safe_writes.as_write_error(ValueError("shapes differ"), tmp_path) is None


def test_a_write_the_disk_cannot_hold_is_refused_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_writes, "free_bytes", lambda path: 3 * 2**20)
    called = []
    with pytest.raises(WriteError) as e:
        safe_writes.save_atomic(tmp_path / "m.keras", called.append, needed=5 * 2**20)
    assert not called and not list(tmp_path.iterdir())
    assert "no space left on device (3.0 MB free, about 6.0 MB needed); free some space" \
        in str(e.value)


TMPFS_TRAIN = """
import sys
sys.argv = ["train.py", "--depth=8", "--dataset=digits", "--batch_size=32", "--epochs=3",
            "--verbose=false", "--model_dir=" + sys.argv[1]]
sys.path.insert(0, "tools")
import train
sys.exit(train.main(sys.argv))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                    reason="mounting a small tmpfs needs root")
@pytest.mark.slow  # the fast tier fails a checkpoint write without a real disk
def test_a_real_full_disk_ends_in_one_line_and_the_run_resumes(tmp_path):
    """tools/train.py on a 3 MB tmpfs: one error line, the last good checkpoint stays and
    a resume once the disk has room finishes the run."""
    from conftest import REPO, TEST_ENV

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        run = str(mount / "run")
        first = subprocess.run([sys.executable, "-c", TMPFS_TRAIN, run], cwd=REPO,
                               env=TEST_ENV, capture_output=True, text=True, timeout=600)
        lines = first.stderr.strip().splitlines()
        assert first.returncode == 2, first.stderr[-2000:]
        assert lines[-1].startswith(f"error: could not write {run}/") and \
            "no space left on device" in lines[-1], lines[-1]
        assert "Traceback" not in first.stderr
        state = checkpoints.read_checkpoint_state(run)
        assert state["epoch"] >= 1 and not state["damaged"]
        assert not [f for f in os.listdir(f"{run}/checkpoints") if ".tmp" in f]
        subprocess.run(["mount", "-o", "remount,size=20m", str(mount)], check=True)
        again = subprocess.run([sys.executable, "-c", TMPFS_TRAIN, run], cwd=REPO,
                               env=TEST_ENV, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"resuming {run} after epoch {state['epoch']}/3" in again.stdout
        assert json.loads(open(f"{run}/metrics.json").read())["epochs"] == 3
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
