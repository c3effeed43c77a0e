"""The run folder across tools: lineage of every file, the data a run trained on, outputs
that may not replace inputs, restarts only when told, interrupts of QAT and export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TEST_ENV, tool, tool_error

from keras_resnet import pipeline
from keras_resnet.pipeline.data import sources
from keras_resnet.pipeline.run import checkpoints, layout, lineage

TINY = ["--depth=8", "--batch_size=8", "--verbose=false"]


def make_folder(root: Path, counts: dict[str, int], *, seed: int = 0) -> Path:
    """An image folder of random 32x32 PNGs: ``counts`` images per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def train_folder(capsys, data: Path, run: Path, *extra: str):
    return tool(capsys, "train", *TINY, "--dataset=folder", f"--data_dir={data}",
                f"--model_dir={run}", "--epochs=1", *extra)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A finished 1-epoch run on a 3-class folder of 20 images per class."""
    root = tmp_path_factory.mktemp("lineage")
    data = make_folder(root / "data", {"cat": 20, "dog": 20, "owl": 20})
    run = root / "run"
    pipeline.train(pipeline.TrainConfig(depth=8, dataset="folder", data_dir=str(data),
                                        epochs=1, batch_size=8, model_dir=str(run),
                                        verbose="false"))
    return data, run


@pytest.fixture
def copied(folder_run, tmp_path):
    """A private copy of the folder run and its data (config.json pointed at the copy)."""
    data, run = folder_run
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(run, tmp_path / "run")
    config = json.loads((tmp_path / "run/config.json").read_text())
    config["data_dir"] = str(tmp_path / "data")
    (tmp_path / "run/config.json").write_text(json.dumps(config))
    return tmp_path / "data", tmp_path / "run"


def test_training_records_every_file_with_its_parents_and_the_data(folder_run):
    data, run = folder_run
    files = lineage.read(run)
    assert set(files) == {"labels.txt", "model.keras", "best.keras"}
    labels = layout.sha256_of(run / "labels.txt")
    assert files["labels.txt"]["classes"] == ["cat", "dog", "owl"]
    assert files["model.keras"]["sha256"] == layout.sha256_of(run / "model.keras")
    assert files["model.keras"]["made_from"] == {"labels.txt": labels}
    fingerprint = sources.fingerprint("folder", str(data))
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == fingerprint.summary
    assert config["data"]["classes"] == {"cat": 20, "dog": 20, "owl": 20}
    assert files["model.keras"]["data"] == fingerprint.digest
    assert layout.read_data_files(run) == list(fingerprint.files)
    assert lineage.stale_files(run) == []


def test_the_fingerprint_sees_added_removed_and_changed_images(tmp_path):
    data = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    before = sources.fingerprint("folder", str(data))
    make_folder(tmp_path / "extra", {"a": 2}, seed=1)
    for i, png in enumerate(sorted((tmp_path / "extra/a").iterdir())):
        shutil.copy(png, data / "a" / f"new{i}.png")
    (data / "b" / "000.png").unlink()
    with open(data / "b" / "001.png", "ab") as f:
        f.write(b"\0")
    after = sources.fingerprint("folder", str(data))
    assert after.digest != before.digest
    assert sources.describe_change(before.summary, before.files, after) == (
        "2 image(s) added (a 2); 1 image(s) removed (b 1); 1 image(s) changed (b 1)")
    # without the recorded file list, the counts per class still say what moved
    assert sources.describe_change(before.summary, None, after) == (
        "images per class a 3 -> 5, b 3 -> 2")


# --------------------------------------------------------------------------- stale files


def test_extending_a_run_marks_what_was_made_from_the_old_model_stale(copied, capsys):
    data, run = copied
    status, out, err = tool(capsys, "export_tflite", f"--model_dir={run}", "--modes=float32",
                            "--latency_runs=2")
    assert status == 0, err
    assert lineage.read(run)["model_float32.tflite"]["made_from"]["model.keras"] == \
        layout.sha256_of(run / "model.keras")
    status, out, err = train_folder(capsys, data, run, "--epochs=2")
    assert status == 0, err
    stale = [line for line in out.splitlines() if line.startswith("stale:")]
    assert stale == [
        f"stale: export.json, model_float32.json, model_float32.tflite were made from an "
        f"earlier model.keras; rebuild them with `python tools/export_tflite.py "
        f"--model_dir={run} --modes=float32 --overwrite`"]
    assert lineage.stale_files(run) == ["export.json", "model_float32.json",
                                        "model_float32.tflite"]
    # every tool refuses the stale file, naming the command that rebuilds it
    err = tool_error(capsys, "evaluate", f"--model={run}/model_float32.tflite", "--split=val")
    assert err == (f"error: {run}/model_float32.tflite is stale: model.keras changed after "
                   "model_float32.tflite was made; rebuild it with `python tools/"
                   f"export_tflite.py --model_dir={run} --modes=float32 --overwrite`")
    status, _, err = tool(capsys, "export_tflite", f"--model_dir={run}", "--modes=float32",
                          "--overwrite", "--latency_runs=2")
    assert status == 0, err
    assert lineage.stale_files(run) == []


def test_a_stale_qat_model_is_not_exported(copied, capsys):
    """export --modes=qat_int8 --overwrite converts model_qat.h5: made from an older
    model.keras, it is refused instead of blamed on quantization."""
    data, run = copied
    (run / "model_qat.h5").write_bytes(b"\x89HDF\r\n\x1a\nnot the QAT model of this run")
    lineage.record(run, ["model_qat.h5"], by="qat",
                   previous={"model.keras": "0" * 64})  # made from another model.keras
    err = tool_error(capsys, "export_tflite", f"--model_dir={run}", "--modes=qat_int8",
                     "--overwrite")
    assert err == (f"error: {run}/model_qat.h5 is stale: model.keras changed after "
                   "model_qat.h5 was made; rebuild it with `python tools/qat.py "
                   f"--model_dir={run} --overwrite`")


def test_an_edited_labels_txt_is_refused_everywhere(copied, capsys):
    data, run = copied
    (run / "labels.txt").write_text("dog\ncat\nowl\n")  # reordered: every figure would be wrong
    fix = "restore it: the run's classes in label order are 'cat', 'dog', 'owl'"
    for args in (("evaluate", f"--model={run}/model.keras", "--split=val"),
                 ("qat", f"--model_dir={run}"),
                 ("export_tflite", f"--model_dir={run}", "--modes=float32")):
        err = tool_error(capsys, *args)
        assert err == (f"error: {run}/labels.txt is not the file training wrote (it was edited "
                       f"since); {fix}"), args


def test_a_folder_written_before_lineage_is_adopted_as_found(copied, capsys):
    data, run = copied
    (run / "lineage.json").unlink()
    status, _, err = tool(capsys, "export_tflite", f"--model_dir={run}", "--modes=float32",
                          "--latency_runs=2")
    assert status == 0, err
    files = lineage.read(run)
    assert files["model.keras"]["note"].startswith("recorded as found")
    assert files["model_float32.tflite"]["by"] == "export"


def test_a_run_folder_of_the_previous_release_resumes_and_exports(copied, capsys):
    """A folder written before lineage and data fingerprints existed (no lineage.json, no
    data_files.txt.gz, no "data" in config.json) resumes, and files exported before the
    resume are then known to be stale."""
    data, run = copied
    for name in ("lineage.json", "data_files.txt.gz"):
        (run / name).unlink()
    config = json.loads((run / "config.json").read_text())
    del config["data"]
    (run / "config.json").write_text(json.dumps(config))
    (run / "model_float32.tflite").write_bytes(b"an export of the 1-epoch model")
    status, out, err = train_folder(capsys, data, run, "--epochs=2")
    assert status == 0, err
    assert f"resuming {run} after epoch 1/2" in out
    assert ("stale: model_float32.tflite was made from an earlier model.keras; rebuild it "
            "with") in out
    assert json.loads((run / "config.json").read_text())["data"]["images"] == 60
    status, _, err = tool(capsys, "export_tflite", f"--model_dir={run}", "--modes=float32",
                          "--overwrite", "--latency_runs=2")
    assert status == 0, err
    assert lineage.stale_files(run) == []


# --------------------------------------------------------------------------- data


def test_resume_on_changed_data_is_refused_naming_what_changed(copied, capsys):
    data, run = copied
    config_before = (run / "config.json").read_text()
    make_folder(data / "new", {"cat": 4}, seed=3)
    for png in (data / "new/cat").iterdir():
        png.rename(data / "cat" / f"x{png.name}")
    shutil.rmtree(data / "new")
    (data / "dog" / "000.png").unlink()
    err = tool_error(capsys, "train", *TINY, "--dataset=folder", f"--data_dir={data}",
                     f"--model_dir={run}", "--epochs=2")
    assert err == (f"error: the folder data changed since the run in {run} started (4 image(s) "
                   "added (cat 4); 1 image(s) removed (dog 1)); restore it to resume, or pass "
                   "--overwrite to start again on it, or choose another --model_dir")
    assert (run / "config.json").read_text() == config_before
    # scoring the run's validation split on the changed data is refused the same way
    err = tool_error(capsys, "evaluate", f"--model={run}/model.keras", "--split=val")
    assert err.startswith(f"error: the folder data in {data} changed since the run trained on "
                          "it (4 image(s) added (cat 4); 1 image(s) removed (dog 1)), so "
                          "--split=val would include images it trained on;")
    for args in (("qat", f"--model_dir={run}"),
                 ("export_tflite", f"--model_dir={run}", "--modes=float32")):
        assert "changed since the run trained on it" in tool_error(capsys, *args)


def test_a_validation_split_carved_another_way_is_refused(copied, capsys):
    data, run = copied
    err = tool_error(capsys, "evaluate", f"--model={run}/model.keras", "--split=val",
                     "--val_fraction=0.5")
    assert err == ("error: --val_fraction=0.5 is not the 0.1 the run carved its validation "
                   "images with, so --split=val would mix images it trained on into them; leave "
                   "--val_fraction out")
    assert tool_error(capsys, "evaluate", f"--model={run}/model.keras", "--split=val",
                      "--val_fraction=2") == (
        "error: --val_fraction=2.0 must be at least 0 and below 1")


# --------------------------------------------------------------------------- paths


def test_an_output_may_not_replace_the_model_or_a_run_file(copied, capsys):
    data, run = copied
    model = run / "model.keras"
    before = model.read_bytes()
    err = tool_error(capsys, "evaluate", f"--model={model}", "--split=val",
                     f"--output_json={model}")
    assert err == f"error: --output_json {model} would overwrite the input {model}; choose " \
                  "another path"
    err = tool_error(capsys, "evaluate", f"--model={model}", "--split=val",
                     f"--output_json={run}/labels.txt")
    assert err == (f"error: --output_json {run}/labels.txt would overwrite a file of the run "
                   f"in {run}; choose another name")
    err = tool_error(capsys, "evaluate", f"--model={model}", "--split=val",
                     f"--confusion_png={data}/cat/000.png")
    assert err.startswith(f"error: --confusion_png {data}/cat/000.png would overwrite the "
                          f"input {data}")
    (run / "notes.txt").write_text("mine")
    err = tool_error(capsys, "evaluate", f"--model={model}", "--split=val",
                     f"--output_json={run}/notes.txt")
    assert err == (f"error: --output_json {run}/notes.txt exists and is not a json file this "
                   "tool wrote; choose another path")
    assert model.read_bytes() == before and (run / "notes.txt").read_text() == "mine"
    status, _, err = tool(capsys, "evaluate", f"--model={model}", "--split=val",
                          f"--output_json={run}/eval_val.json")
    assert status == 0, err  # a new file beside the run's files is fine


@pytest.mark.parametrize("where", ["same", "inside", "holding"])
def test_a_run_folder_apart_from_the_data(tmp_path, capsys, where):
    data = make_folder(tmp_path / "data", {"a": 4, "b": 4})
    run = {"same": data, "inside": data / "runs/r", "holding": tmp_path}[where]
    relation = {"same": "is", "inside": "is inside", "holding": "holds"}[where]
    err = tool_error(capsys, "train", *TINY, "--dataset=folder", f"--data_dir={data}",
                     f"--model_dir={run}", "--epochs=1")
    assert err == (f"error: --model_dir {run} {relation} the data folder {data}; keep runs "
                   "apart from the data, e.g. --model_dir=runs/<name>")
    assert sorted(p.name for p in data.iterdir()) == ["a", "b"]


def test_a_model_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("x")
    err = tool_error(capsys, "train", *TINY, "--dataset=digits", f"--model_dir={path}")
    assert err == f"error: --model_dir {path} is a file, not a folder; choose a folder for the run"
    err = tool_error(capsys, "train", *TINY, "--dataset=digits", f"--model_dir={path}/run")
    assert err == (f"error: --model_dir {path}/run lies inside the file {path}, not a folder; "
                   "choose a folder for the run")
    with pytest.raises(pipeline.UserError, match="is a file, not a run folder"):
        pipeline.export(path, modes=["float32"])
    assert path.read_text() == "x"


def test_a_truncated_config_is_one_line(copied, capsys):
    data, run = copied
    (run / "config.json").write_text('{"model": "resnet8", "num_cl')
    err = tool_error(capsys, "train", *TINY, "--dataset=folder", f"--data_dir={data}",
                     f"--model_dir={run}", "--epochs=2")
    assert err == (f"error: {run}/config.json is unreadable (cut short or not JSON), so the run "
                   "it belongs to is unknown; choose another --model_dir or pass --overwrite "
                   "to replace the run")


# --------------------------------------------------------------------------- restarts


def test_a_lost_checkpoint_record_is_rebuilt_from_the_files(copied, capsys):
    data, run = copied
    (run / "checkpoints/checkpoint.json").unlink()
    status, out, err = train_folder(capsys, data, run, "--epochs=2")
    assert status == 0, err
    assert ("checkpoints/checkpoint.json is missing: rebuilt from the checkpoint files, "
            "newest intact epoch_0001.weights.h5") in out
    assert f"resuming {run} after epoch 1/2" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["2/2"]
    # a garbage record is rebuilt the same way
    (run / "checkpoints/checkpoint.json").write_text("{garbage")
    status, out, err = train_folder(capsys, data, run, "--epochs=3")
    assert status == 0, err
    assert "checkpoint.json is unreadable (JSONDecodeError): rebuilt" in out
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3


def test_a_rebuilt_record_passes_over_a_checkpoint_that_does_not_read_whole(copied):
    data, run = copied
    folder = run / "checkpoints"
    shutil.copy(folder / "epoch_0001.weights.h5", folder / "epoch_0002.weights.h5")
    os.truncate(folder / "epoch_0002.weights.h5", 2000)
    (folder / "checkpoint.json").unlink()
    state = checkpoints.read_checkpoint_state(run)
    assert state["weights"] == "epoch_0001.weights.h5" and state["epoch"] == 1
    assert state["damaged"][0].startswith("epoch_0002.weights.h5 (")
    assert state["best_epoch"] == 1 and len(state["history"]) == 1


def test_a_finished_model_without_checkpoints_is_never_trained_over(copied, capsys):
    data, run = copied
    shutil.rmtree(run / "checkpoints")
    before = (run / "model.keras").read_bytes()
    err = tool_error(capsys, "train", *TINY, "--dataset=folder", f"--data_dir={data}",
                     f"--model_dir={run}", "--epochs=2")
    assert err == (f"error: --model_dir {run} holds a trained model (model.keras) but no "
                   "checkpoint to resume from (checkpoints/ is empty or missing); pass "
                   "--overwrite to train again from the start, or choose another --model_dir")
    assert (run / "model.keras").read_bytes() == before


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("args, message", [
    (["--learning_rate=-1"], "--learning_rate=-1.0 must be positive"),
    (["--learning_rate=0"], "--learning_rate=0.0 must be positive"),
    (["--batch_size=0"], "--batch_size=0 must be at least 1"),
    (["--steps_per_epoch=0"], "--steps_per_epoch=0 must be at least 1"),
    (["--verbose=maybe"], "--verbose='maybe' is not valid; choose one of auto, true, false"),
])
def test_qat_options_are_checked_where_they_enter(copied, capsys, args, message):
    data, run = copied
    assert tool_error(capsys, "qat", f"--model_dir={run}", *args) == f"error: {message}"


def test_export_options_are_checked_where_they_enter(copied, capsys):
    data, run = copied
    assert tool_error(capsys, "export_tflite", f"--model_dir={run}", "--batch_size=0") == (
        "error: --batch_size=0 must be at least 1")
    assert tool_error(capsys, "export_tflite", f"--model_dir={run}",
                      "--max_accuracy_drop=-1") == (
        "error: --max_accuracy_drop=-1.0 must be at least 0")


def test_api_options_are_checked_where_they_enter():
    import keras_resnet

    with pytest.raises(pipeline.UserError, match="^momentum must be at least 0 and below 1$"):
        pipeline.resolve(pipeline.TrainConfig(depth=20, momentum=2))
    with pytest.raises(ValueError, match='^groups=32 shape a bottleneck.s grouped 3x3 '
                                         'convolution, which a net of block="basic"'):
        keras_resnet.resnet(variant="resnet18", groups=32)


@pytest.mark.parametrize("name", ["cat\nfood", " cat", "cat ", "c\tat"])
def test_class_names_that_cannot_round_trip_are_refused_at_listing(tmp_path, capsys, name):
    data = make_folder(tmp_path / "data", {name: 3, "dog": 3})
    err = tool_error(capsys, "train", *TINY, "--dataset=folder", f"--data_dir={data}",
                     f"--model_dir={tmp_path}/run", "--epochs=1")
    assert err == (f"error: class folder {str(data / name)!r} has a name with leading or "
                   "trailing spaces or a control character, which labels.txt and the TFLite "
                   "metadata cannot hold; rename it")
    assert not (tmp_path / "run").exists()


def test_an_empty_validation_split_is_a_warning(tmp_path, caplog):
    data = make_folder(tmp_path / "data", {"a": 3, "b": 3})
    with caplog.at_level("WARNING"):
        _, val, _, _ = sources.folder_files(str(data), 0.1, 0)
    assert val is None
    assert f"val_fraction=0.1 carves no validation image from {data} (too few images per " \
           "class)" in caplog.text


def test_offline_imagenet_weights_are_one_sentence(monkeypatch, tmp_path):
    from keras_resnet import weights

    monkeypatch.setattr(weights, "BASE_URL", "http://127.0.0.1:9/")  # nothing listens there
    with pytest.raises(ValueError) as e:
        weights.imagenet_file("resnet50", include_top=True, cache_dir=str(tmp_path))
    message = str(e.value)
    assert message.startswith("could not download the ImageNet weights of resnet50 from "
                              "http://127.0.0.1:9/resnet50_weights_tf_dim_ordering_tf_kernels.h5 (")
    assert message.endswith("); check the network connection, or put "
                            "resnet50_weights_tf_dim_ordering_tf_kernels.h5 in "
                            f"{tmp_path}/models")
    assert "\n" not in message


@pytest.mark.parametrize("name, words", [("quickstart", "Quick start: train, quantize"),
                                         ("model_table", "Prints the documentation tables")])
def test_help_describes_the_tool(name, words):
    result = subprocess.run([sys.executable, f"tools/{name}.py", "--help"], cwd=REPO,
                            env=TEST_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(words) and "--" in result.stdout


# --------------------------------------------------------------------------- interrupts


def _interrupt(args, when: str, signum: int, env=None):
    """Starts a tool, sends ``signum`` once its output shows ``when``; returns the
    finished process and its output."""
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env or TEST_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    deadline = time.time() + 300
    for line in process.stdout:
        out.append(line)
        if when in line or time.time() > deadline:
            break
    assert process.poll() is None, "".join(out)
    process.send_signal(signum)
    rest, err = process.communicate(timeout=300)
    return process, "".join(out) + rest, err


# Both steps stop through lineage.step; the fast tier interrupts export (QAT runs twice
# here, a minute on two CPU cores: the slow tier's).
@pytest.mark.parametrize("tool_name, when, signum, status", [
    pytest.param("qat", "tf_keras twin of", signal.SIGINT, 130, marks=pytest.mark.slow),
    ("export_tflite", "Keras float top-1", signal.SIGTERM, 143),
])
def test_an_interrupted_step_leaves_no_partial_set_and_reruns(copied, capsys, tool_name,
                                                              when, signum, status):
    data, run = copied
    before = sorted(p.name for p in run.iterdir())
    args = [f"tools/{tool_name}.py", f"--model_dir={run}", "--latency_runs=2"
            if tool_name == "export_tflite" else "--steps_per_epoch=2"]
    process, out, err = _interrupt(args, when, signum)
    what = "QAT" if tool_name == "qat" else "export"
    assert process.returncode == status, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"{what} stopped by {signal.Signals(signum).name}; the files it had written were "
        "removed; run the same command again")
    assert "Traceback" not in err
    assert sorted(p.name for p in run.iterdir() if p.name != "lineage.json") == \
        [n for n in before if n != "lineage.json"]
    # The same command again, in a fresh interpreter for QAT (tfmot switches tf.keras).
    if tool_name == "qat":
        again = subprocess.run([sys.executable, *args], cwd=REPO, env=TEST_ENV,
                               capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
    else:
        status, _, err = tool(capsys, tool_name, *args[1:])
        assert status == 0, err[-2000:]


def test_a_signal_inside_a_keras_call_stops_the_step_in_one_line(copied):
    """Keras wraps an exception raised inside a layer call in a RuntimeError; the step
    still ends as the signal asked, with nothing it wrote left behind."""
    import keras

    from keras_resnet.pipeline.errors import Interrupted

    def signal_now(x):
        os.kill(os.getpid(), signal.SIGTERM)
        return x

    data, run = copied
    with pytest.raises(Interrupted) as stopped:
        with lineage.step(str(run), "export", ["model_float32.tflite"]):
            (run / "model_float32.tflite").write_bytes(b"half a file")
            keras.layers.Lambda(signal_now)(keras.Input((3,)))
    assert stopped.value.status == 143
    assert str(stopped.value) == ("export stopped by SIGTERM; the files it had written "
                                  "were removed; run the same command again")
    assert not (run / "model_float32.tflite").exists()


def test_files_left_by_a_killed_step_are_removed_by_the_next_run(copied, capsys):
    data, run = copied
    (run / "model_float32.tflite").write_bytes(b"half a file")  # written, never recorded
    status, out, err = tool(capsys, "export_tflite", f"--model_dir={run}", "--modes=float32",
                            "--latency_runs=2")
    assert status == 0, err
    assert ("removed model_float32.tflite, left by an earlier export that was stopped "
            "before it ended") in out


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                    reason="a read-only mount needs root")
def test_a_read_only_run_folder_is_one_line(copied, capsys):
    data, run = copied
    mount = run.parent / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(run), str(mount)],
                      capture_output=True).returncode:
        pytest.skip("this machine does not allow a bind mount")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], capture_output=True)
        if os.access(mount, os.W_OK) and not _read_only(mount):
            pytest.skip("the bind mount is writable here")
        for args in (("qat", f"--model_dir={mount}"),
                     ("export_tflite", f"--model_dir={mount}", "--modes=float32")):
            err = tool_error(capsys, *args)
            assert err == (f"error: could not write {mount}/.lock: read-only file system; use "
                           "a writable folder"), args
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def _read_only(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False
