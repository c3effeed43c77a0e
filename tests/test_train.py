"""Training: recipes, run directory, resume, strategies, fine-tuning and bad input.

Heavier checks run tools/train.py in subprocesses (real CIFAR-10 accuracy, resume after
SIGKILL, two replicas on two logical CPUs, two workers on 127.0.0.1) so device settings
and distribution state never leak between tests.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TEST_ENV as ENV
from conftest import history_rows as rows
from conftest import saved_layers, tool, tool_error, tool_subprocess

import keras_resnet
from keras_resnet import pipeline
from keras_resnet.pipeline.run import checkpoints, lock, safe_writes
from keras_resnet.pipeline.run import config as config_lib
from keras_resnet.pipeline.training import distribute, machine, network, optimization

REPO = Path(__file__).resolve().parents[1]
TINY = ["--depth=8", "--dataset=digits", "--batch_size=32", "--verbose=false"]


def cli(capsys, *args):
    """Runs tools/train.py in this process; returns (status, stdout, stderr)."""
    return tool(capsys, "train", *args)


def run_cli(*args, timeout=600):
    return tool_subprocess("train", *args, timeout=timeout)


def history(run_dir):
    return [int(row["epoch"]) for row in rows(run_dir)]


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One tiny finished run (ResNet-8 on digits, 1 epoch of 3 steps)."""
    run_dir = tmp_path_factory.mktemp("digits_run")
    pipeline.train(pipeline.TrainConfig(depth=8, dataset="digits", epochs=1, batch_size=32,
                                        steps_per_epoch=3, model_dir=str(run_dir),
                                        verbose="false"))
    return run_dir


# --------------------------------------------------------------------------- options


def test_recipes():
    cifar = pipeline.resolve(pipeline.TrainConfig(depth=20))
    assert (cifar.model, cifar.recipe, cifar.dataset) == ("resnet20", "he2015", "cifar10")
    assert (cifar.epochs, cifar.batch_size, cifar.learning_rate) == (164, 128, 0.1)
    assert (cifar.lr_schedule, cifar.warmup_epochs, cifar.weight_decay,
            cifar.label_smoothing, cifar.image_size, cifar.nesterov) == (
        "step", 0, 1e-4, 0.0, 32, False)
    assert cifar.model_options == {}
    net = pipeline.resolve(pipeline.TrainConfig(depth=50, batch_size=512))
    assert (net.recipe, net.dataset, net.epochs) == ("imagenet", "imagenet2012", 90)
    assert net.learning_rate == pytest.approx(0.2)  # 0.1 x 512/256
    assert (net.lr_schedule, net.warmup_epochs, net.label_smoothing,
            net.image_size) == ("cosine", 5, 0.1, 224)
    wrn = pipeline.resolve(pipeline.TrainConfig(model="wrn_16_8",
                                                model_options={"se_ratio": 0.25}))
    assert wrn.recipe == "he2015" and wrn.model_options == {"se_ratio": 0.25}
    assert pipeline.resolve(pipeline.TrainConfig(depth=50, initial_weights="imagenet")
                            ).model_options == {"keras_applications": True}
    assert pipeline.resolve(pipeline.TrainConfig(depth=20)).model_dir == os.path.join(
        "runs", "resnet20_default")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cifar.epochs = 3


def test_fast_recipe_resolves_as_documented():
    fast = pipeline.RECIPES["fast"]
    r30 = pipeline.resolve(pipeline.TrainConfig(depth=20, recipe="fast"))
    assert (r30.recipe, r30.epochs, r30.batch_size, r30.lr_schedule, r30.nesterov) == (
        "fast", fast.epochs, fast.batch_size, "cosine", True)
    assert r30.learning_rate == pytest.approx(fast.base_lr * fast.batch_size
                                              / fast.reference_batch)
    assert (r30.weight_decay, r30.label_smoothing) == (fast.weight_decay,
                                                       fast.label_smoothing)
    # budget-aware: the warm-up is a fixed share of whatever epochs are asked for
    for epochs in (8, 15, 30):
        r = pipeline.resolve(pipeline.TrainConfig(depth=20, recipe="fast", epochs=epochs))
        assert r.warmup_epochs == pytest.approx(fast.warmup_fraction * epochs, abs=1e-3)
    # learning rate scales with the batch; explicit options win over the recipe
    big = pipeline.resolve(pipeline.TrainConfig(depth=20, recipe="fast", batch_size=512,
                                                nesterov=False, label_smoothing=0.2))
    assert big.learning_rate == pytest.approx(r30.learning_rate * 512 / r30.batch_size)
    assert (big.nesterov, big.label_smoothing) == (False, 0.2)
    # the fast recipe's schedule reaches its peak after the warm-up and ends at zero
    schedule = optimization.run_schedule(r30, steps_per_epoch=100)
    warm = int(round(r30.warmup_epochs * 100))
    assert float(schedule(warm)) == pytest.approx(r30.learning_rate)
    assert float(schedule(30 * 100)) == pytest.approx(0.0, abs=1e-7)
    sgd = optimization.make_optimizer(r30, schedule)
    assert sgd.nesterov and sgd.momentum == 0.9


def test_recipe_changes_name_what_a_run_changed_from_its_recipe():
    def changes(**options):
        return pipeline.recipe_changes(dataclasses.asdict(pipeline.resolve(
            pipeline.TrainConfig(depth=20, recipe="fast", epochs=60, **options))))

    assert changes() == {}  # the recipe at another length: its warm-up scales along
    assert changes(label_smoothing=0.1) == {"label_smoothing": 0.1}
    assert changes(label_smoothing=0.0, weight_decay=5e-4, nesterov=True) == {}  # as given
    # a batch size is a change; the learning rate only where it leaves the scaling rule
    assert changes(batch_size=128) == {"batch_size": 128}
    assert changes(batch_size=128, learning_rate=0.1) == {"batch_size": 128,
                                                          "learning_rate": 0.1}
    assert changes(warmup_epochs=1, optimizer="adam", augment=False) == {
        "warmup_epochs": 1, "optimizer": "adam", "augment": False}
    assert changes(cutout=16) == {"cutout": 16} and changes(cutout=0) == {}
    # the average's BN batches count only when the run keeps an average
    assert changes(ema_bn_batches=10) == {}
    assert changes(ema_decay=0.999, ema_bn_batches=10) == {"ema_decay": 0.999,
                                                           "ema_bn_batches": 10}
    imagenet = pipeline.resolve(pipeline.TrainConfig(model="resnet50", epochs=10,
                                                     label_smoothing=0.0))
    assert pipeline.recipe_changes(dataclasses.asdict(imagenet)) == {"label_smoothing": 0.0}
    assert pipeline.recipe_changes({"model": "resnet8", "batch_size": 64}) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=51), "depth=51 is not a ResNet depth"),
    (dict(depth=20, model="resnet56"), "exactly one of depth"),
    (dict(), "exactly one of depth"),
    (dict(model="resnet7"), "is not a known ResNet"),
    (dict(depth=20, optimizer="lamb"), "optimizer='lamb' is not valid; choose one of sgd"),
    (dict(depth=20, lr_schedule="poly"), "lr_schedule='poly' is not valid"),
    (dict(depth=20, strategy="tpu"), "strategy='tpu' is not valid"),
    (dict(depth=20, model_options={"blocks": 3}), r"unknown ResNet option\(s\) \['blocks'\]"),
    (dict(depth=20, epochs=0), "epochs must be at least 1"),
    (dict(depth=20, warmup_epochs=200), "warmup_epochs must be below epochs"),
    (dict(depth=20, freeze_backbone_epochs=2), "freeze_backbone_epochs needs initial_weights"),
    (dict(depth=20, initial_weights="imagenet"),
     "initial_weights='imagenet' is not available for resnet20"),
    (dict(depth=20, initial_weights="weights.bin"),
     "must be one of 'imagenet', 'cifar10', a .keras file or a .weights.h5 file"),
    (dict(depth=110, initial_weights="cifar10"),
     r"initial_weights='cifar10' is not available for resnet110 \(it exists for resnet20, "
     r"resnet32, resnet44, resnet56\); for resnet110 choose a .keras file, a .weights.h5 "
     r"file$"),
    (dict(depth=50, initial_weights="cifar10"),
     "not available for resnet50 .*; for resnet50 choose 'imagenet', a .keras file"),
    (dict(depth=20, initial_weights="/no/such.keras"), "does not exist"),
    (dict(depth=50, image_size=16), "image_size=16 is too small for resnet50"),
    (dict(depth=20, recipe="paper"), "recipe='paper' is not valid; choose one of he2015, fast"),
    (dict(depth=20, ema_decay=1.0), r"ema_decay must be in \[0, 1\) \(0: no average\)"),
    (dict(depth=20, ema_bn_batches=-1), "ema_bn_batches must be at least 0"),
    (dict(depth=20, cutout=-1), r"cutout must be from 0 \(none\) to image_size=32"),
    (dict(depth=20, cutout=33), r"cutout must be from 0 \(none\) to image_size=32"),
    (dict(depth=20, cutout=16, augment=False), "cutout works on augmented images only"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(pipeline.UserError, match=message):
        pipeline.resolve(pipeline.TrainConfig(**kwargs))


def test_schedules():
    step = optimization.make_schedule("step", 0.1, total_steps=100, warmup_steps=0)
    assert [float(step(s)) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    warm = optimization.make_schedule("step", 0.1, total_steps=100, warmup_steps=5)
    assert [float(warm(s)) for s in (0, 4, 5, 60)] == pytest.approx([0.01, 0.01, 0.1, 0.01])
    cosine = optimization.make_schedule("cosine", 0.4, total_steps=110, warmup_steps=10)
    assert float(cosine(5)) == pytest.approx(0.2)
    assert float(cosine(10)) == pytest.approx(0.4)
    assert float(cosine(60)) == pytest.approx(0.2, rel=1e-3)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-6)
    assert optimization.make_schedule("constant", 0.05, total_steps=10, warmup_steps=0) == 0.05


def test_a_tiny_fast_recipe_run_trains(tmp_path, capsys):
    status, out, err = cli(capsys, "--depth=8", "--dataset=digits", "--recipe=fast",
                           "--epochs=3", "--batch_size=32", "--steps_per_epoch=8",
                           "--verbose=false", f"--model_dir={tmp_path / 'run'}")
    assert status == 0, err
    config = read_json(tmp_path / "run" / "config.json")
    assert (config["recipe"], config["nesterov"], config["lr_schedule"]) == (
        "fast", True, "cosine")
    logged = rows(tmp_path / "run")
    losses = [row["loss"] for row in logged]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert out.count("images/s") == 3
    # Each epoch logs the rate it ended with: after the warm-up from zero, never 0 at first.
    schedule = optimization.run_schedule(pipeline.resolve(pipeline.TrainConfig(
        depth=8, dataset="digits", recipe="fast", epochs=3, batch_size=32,
        steps_per_epoch=8)), 8)
    assert [row["learning_rate"] for row in logged] == pytest.approx(
        [float(schedule(8 * epoch)) for epoch in (1, 2, 3)], abs=1e-7)
    assert logged[0]["learning_rate"] > logged[1]["learning_rate"] > 0


def test_weight_decay_never_touches_batch_norm_or_biases():
    model = keras_resnet.resnet(depth=8, classes=10, include_preprocessing=True,
                                classifier_activation=None)
    optimization.add_weight_decay(model, 1e-4)
    decayed = {v.path for v in model.trainable_weights if v.regularizer is not None}
    kernels = {v.path for v in model.trainable_weights if v.path.endswith("/kernel")}
    assert decayed == kernels and decayed  # every trainable kernel, nothing else
    assert not any("_bn/" in p or p.endswith("/bias") for p in decayed)
    assert len(model.losses) == len(kernels)
    # frozen layers (input normalisation, option-A shortcuts) are not decayed
    assert not any(v.regularizer for v in model.non_trainable_weights)
    adamw = optimization.make_optimizer(pipeline.resolve(pipeline.TrainConfig(
        depth=8, optimizer="adamw", weight_decay=0.05)), 1e-3)
    adamw.build(model.trainable_variables)
    by_name = {v.path: adamw._use_weight_decay(v) for v in model.trainable_variables}
    assert by_name["conv1_conv/kernel"] and by_name["predictions/kernel"]
    assert not by_name["conv1_bn/gamma"] and not by_name["predictions/bias"]


# --------------------------------------------------------------------------- a run


def test_run_directory(digits_run):
    config = read_json(digits_run / "config.json")
    for key in ("model", "model_options", "num_classes", "image_size", "dataset", "data_dir",
                "val_fraction", "seed", "batch_size", "versions", "learning_rate",
                "architecture", "replicas"):
        assert key in config, key
    assert (config["model"], config["model_options"], config["num_classes"],
            config["image_size"], config["dataset"]) == ("resnet8", {}, 10, 32, "digits")
    assert (digits_run / "labels.txt").read_text().split() == [str(d) for d in range(10)]
    assert history(digits_run) == [1]
    state = read_json(digits_run / "checkpoints" / "checkpoint.json")
    assert state["epoch"] == 1 and (digits_run / "checkpoints" / state["weights"]).is_file()
    assert list((digits_run / "logs" / "train").glob("events.out.tfevents.*"))
    metrics = read_json(digits_run / "metrics.json")
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epochs",
                "wall_time_s", "images_per_sec"):
        assert metrics[key] is not None, key
    assert (digits_run / "curves.png").stat().st_size > 1000
    model = keras.saving.load_model(digits_run / "model.keras", compile=False, safe_mode=True)
    best = keras.saving.load_model(digits_run / "best.keras", compile=False, safe_mode=True)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    assert model.get_layer("preprocess") is not None  # takes raw 0..255 pixels
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    logits = model.predict_on_batch(x)
    assert not np.allclose(logits.sum(axis=-1), 1.0)  # logits, not probabilities
    np.testing.assert_allclose(best.predict_on_batch(x), logits, atol=1e-5)


def test_model_dir_of_another_model_is_refused(digits_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(digits_run, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    status, _, err = cli(capsys, "--depth=14", "--dataset=digits", "--epochs=1",
                         f"--model_dir={run_dir}")
    assert status == 2
    assert err.strip().splitlines() == [
        f"error: --model_dir {run_dir} holds a run of resnet8 (10 classes, 32px), not resnet14 "
        "(10 classes, 32px); choose another --model_dir or pass --overwrite to replace it"]
    assert before == {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    status, _, err = cli(capsys, *TINY, "--image_size=40", "--epochs=1",
                         f"--model_dir={run_dir}")
    assert status == 2 and "not resnet8 (10 classes, 40px)" in err


def test_a_run_recorded_before_an_option_existed_resumes_only_with_its_old_value():
    """config.json of a run made before ``cutout`` (or ``ema_decay``) existed lacks it: the
    run ran without it, so it resumes with the option's old value and is refused another."""
    resolved = pipeline.resolve(pipeline.TrainConfig(depth=20, recipe="fast"))
    old = json.loads(json.dumps(resolved.to_dict()))
    for key in config_lib.ADDED_OPTIONS:
        del old[key]
    assert config_lib.resume_conflicts(old, resolved) == []
    changed = pipeline.resolve(pipeline.TrainConfig(depth=20, recipe="fast", cutout=16,
                                                    ema_decay=0.999))
    assert config_lib.resume_conflicts(old, changed) == ["ema_decay=0.0 -> 0.999",
                                                         "cutout=0 -> 16"]


def test_finished_run_is_not_repeated(digits_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(digits_run, run_dir)
    status, out, _ = cli(capsys, *TINY, "--epochs=1", "--steps_per_epoch=3",
                         f"--model_dir={run_dir}")
    assert status == 0 and "resuming" in out
    assert not [line for line in out.splitlines() if line.startswith("epoch ")]
    assert history(run_dir) == [1]


def test_resume_with_other_options_is_refused(digits_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(digits_run, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    status, _, err = cli(capsys, *TINY[:-2], "--batch_size=64", "--learning_rate=0.5",
                         "--epochs=2", "--steps_per_epoch=3", "--verbose=false",
                         f"--model_dir={run_dir}")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert ("holds a run started with other options (--batch_size=32 -> 64; "
            "--learning_rate=0.025 -> 0.5)") in err
    status, _, err = cli(capsys, "--depth=8", "--dataset=synthetic", "--batch_size=32",
                         "--epochs=2", "--steps_per_epoch=3", f"--model_dir={run_dir}")
    assert status == 2 and "--dataset='digits' -> 'synthetic'" in err
    assert before == {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    # --epochs (and options that cannot change results) may change: the run goes on
    status, out, _ = cli(capsys, *TINY, "--epochs=2", "--steps_per_epoch=3",
                         "--keep_checkpoints=1", f"--model_dir={run_dir}")
    assert status == 0 and "resuming" in out and history(run_dir) == [1, 2]


def test_a_run_folder_in_use_is_refused(digits_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(digits_run, run_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from keras_resnet.pipeline.run import lock\n"
         "with lock.RunLock(sys.argv[1]):\n print('locked', flush=True); time.sleep(60)",
         str(run_dir)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, _, err = cli(capsys, *TINY, "--epochs=2", "--steps_per_epoch=3",
                             f"--model_dir={run_dir}")
        assert status == 2 and len(err.strip().splitlines()) == 1
        assert f"{run_dir} is in use by process {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: the run resumes
    status, out, _ = cli(capsys, *TINY, "--epochs=2", "--steps_per_epoch=3",
                         f"--model_dir={run_dir}")
    assert status == 0 and "resuming" in out
    # a lock that created its folder and nothing else leaves no folder behind
    with lock.RunLock(tmp_path / "fresh"):
        assert (tmp_path / "fresh" / ".lock").exists()
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("every", [0, 1])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(digits_run, tmp_path, capsys,
                                                           every):
    """The guard reads each step's loss one step late, yet never lets a step whose loss is
    not finite into a checkpoint, and a checkpoint of the weights that gave such a loss
    (written after the step before, with ``--checkpoint_every_steps=1``) is deleted."""
    run_dir = tmp_path / "run"
    shutil.copytree(digits_run, run_dir)
    model_bytes = (run_dir / "model.keras").read_bytes()
    # A run started with a learning rate whose first epoch survived.
    config = read_json(run_dir / "config.json")
    (run_dir / "config.json").write_text(json.dumps({**config, "learning_rate": 1e30}))
    status, _, err = cli(capsys, *TINY, "--epochs=3", "--steps_per_epoch=3",
                         "--learning_rate=1e30", f"--checkpoint_every_steps={every}",
                         f"--model_dir={run_dir}")
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    # The first step's loss is that of the weights before its update, still finite.
    assert "the loss became NaN or infinite at epoch 2, step 2," in err
    assert err.strip().endswith(
        f"the last good checkpoint (epoch_0001.weights.h5) is kept in {run_dir}/checkpoints; "
        "start again with a lower --learning_rate (--overwrite or another --model_dir) or "
        "check the data")
    state = read_json(run_dir / "checkpoints" / "checkpoint.json")
    assert (state["epoch"], state["step"], state["weights"]) == (1, 0, "epoch_0001.weights.h5")
    assert [c["weights"] for c in state["checkpoints"]] == ["epoch_0001.weights.h5"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "checkpoint.json", "epoch_0001.weights.h5"]
    assert history(run_dir) == [1]
    assert (run_dir / "model.keras").read_bytes() == model_bytes


def test_nan_with_no_good_checkpoint_left_starts_the_run_again(digits_run, tmp_path, capsys):
    """Keeping one checkpoint, the only one left holds the weights that gave the bad loss:
    it goes, with the record of it. A run that had not finished before then starts again
    when run next, with other options too; a finished run extended this way keeps its
    model.keras until told to start again."""
    for finished in (False, True):
        run_dir = tmp_path / f"run_{finished}"
        shutil.copytree(digits_run, run_dir)
        if not finished:
            for name in ("model.keras", "best.keras"):
                (run_dir / name).unlink()
        config = read_json(run_dir / "config.json")
        (run_dir / "config.json").write_text(json.dumps({**config, "learning_rate": 1e30}))
        status, _, err = cli(capsys, *TINY, "--epochs=3", "--steps_per_epoch=3",
                             "--learning_rate=1e30", "--checkpoint_every_steps=1",
                             "--keep_checkpoints=1", f"--model_dir={run_dir}")
        assert status == 2 and len(err.strip().splitlines()) == 1
        kept = ("the finished model.keras stays, so start again with --overwrite and a lower "
                "--learning_rate, or check the data" if finished else
                "so the run starts again when run next; lower --learning_rate or check the data")
        assert ("the loss became NaN or infinite at epoch 2, step 2, so training stopped; the "
                "only checkpoint kept held the weights that gave it and was deleted" in err)
        assert err.strip().endswith(kept), err
        assert list((run_dir / "checkpoints").iterdir()) == []
        assert not (run_dir / "history.csv").exists()
        again = ["--overwrite"] if finished else []
        status, out, err = cli(capsys, *TINY, "--epochs=1", "--steps_per_epoch=3",
                               f"--model_dir={run_dir}", *again)
        assert status == 0, err
        assert "resuming" not in out and history(run_dir) == [1]


def test_weights_diverged_in_the_last_step_are_never_saved(tmp_path, capsys):
    """A step whose own loss is finite can leave diverged weights: the validation loss
    after the epoch shows it, and neither a checkpoint nor a model is written."""
    run_dir = tmp_path / "run"
    status, _, err = cli(capsys, *TINY, "--epochs=2", "--steps_per_epoch=1",
                         "--learning_rate=1e30", f"--model_dir={run_dir}")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert ("the validation loss became NaN or infinite after epoch 1, so training stopped; "
            "no checkpoint had been written; lower --learning_rate or check the data") in err
    assert not (run_dir / "checkpoints" / "checkpoint.json").exists()
    assert not (run_dir / "model.keras").exists() and not (run_dir / "best.keras").exists()


@pytest.mark.parametrize("args, message", [
    (["--depth=51"], "depth=51 is not a ResNet depth"),
    (["--depth=abc"], "flag --depth=abc"),
    (["--depth=20", "--no_such_flag=1"], "no_such_flag"),
    (["--depth=20", "extra"], "unexpected arguments ['extra']"),
    (["--depth=20", "--model_options={bad"], "--model_options is not valid JSON"),
    (["--depth=20", "--dataset=folder"], "--dataset=folder needs --data_dir"),
    (["--depth=20", "--dataset=folder", "--data_dir=/no/such/dir"], "does not exist"),
    (["--depth=20", "--dataset=digits", "--batch_size=5000"],
     "fewer than one batch of 5000; lower --batch_size"),
])
def test_cli_bad_input(args, message, tmp_path, capsys):
    status, _, err = cli(capsys, *args, f"--model_dir={tmp_path / 'run'}")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
    assert not (tmp_path / "run" / "config.json").exists()  # nothing written


def test_cli_bad_data(tmp_path, capsys):
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    tf.io.write_file(str(root / "cat" / "1.png"),
                     tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)))
    status, _, err = cli(capsys, "--depth=20", "--dataset=folder", f"--data_dir={root}",
                         f"--model_dir={tmp_path / 'run'}")
    assert status == 2 and f"class folder {root / 'dog'} holds no images" in err
    status, _, err = cli(capsys, "--depth=20", "--dataset=cifar10",
                         f"--data_dir={tmp_path / 'tfds'}", f"--model_dir={tmp_path / 'run'}")
    assert status == 2 and "TFDS dataset 'cifar10' is not prepared" in err



def test_mixed_precision_true_without_native_bfloat16_is_refused(tmp_path, capsys,
                                                                 monkeypatch):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("with a GPU, mixed_precision=true is float16")
    monkeypatch.setattr(machine, "host_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    status, _, err = cli(capsys, *TINY, "--mixed_precision=true",
                         f"--model_dir={tmp_path / 'run'}")
    assert status == 2 and err.strip() == (
        "error: --mixed_precision=true needs a GPU or a CPU with native bfloat16 (amx_bf16 "
        "or avx512_bf16), which this CPU lacks; use --mixed_precision=auto")
    assert not (tmp_path / "run").exists()


def test_a_bfloat16_run_saves_stock_float32_models(tmp_path, monkeypatch, caplog):
    """auto picks bfloat16 where the CPU has it; every saved .keras file is float32 and
    holds stock layers; the checkpoint loads into a stock float32 model; the run resumed
    on a CPU without bfloat16 keeps its policy, with a warning."""
    monkeypatch.setattr(machine, "host_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    run = tmp_path / "run"
    metrics = pipeline.train(pipeline.TrainConfig(
        depth=8, dataset="digits", epochs=2, batch_size=32, steps_per_epoch=4,
        model_dir=str(run), verbose="false"))
    config = read_json(run / "config.json")
    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert config["dtype_policy"] == ("mixed_float16" if gpu else "mixed_bfloat16")
    assert config["fused_batch_norm_resolved"] and config["cpu_bf16_flags"] == ["avx512_bf16"]
    assert np.isfinite(metrics["train_loss"])
    for name in ("model.keras", "best.keras"):
        classes, policies = saved_layers(run / name)
        assert ("BatchNormalization", "keras.layers") in classes
        assert all(module.startswith("keras") for _, module in classes), classes
        assert not any("float16" in p for p in policies), policies
        model = keras.saving.load_model(run / name, safe_mode=True)
        assert model.dtype_policy.name == "float32" and model.optimizer is not None
    stock = network.build_model(pipeline.resolve(pipeline.TrainConfig(depth=8)), 10)
    state = read_json(run / "checkpoints" / "checkpoint.json")
    stock.load_weights(run / "checkpoints" / state["weights"])
    saved = keras.saving.load_model(run / "model.keras", compile=False)
    for a, b in zip(stock.get_weights(), saved.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    if gpu:
        return
    # Resumed on a CPU without native bfloat16, the run keeps the policy it started with.
    monkeypatch.setattr(machine, "host_cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level(logging.WARNING, logger="keras_resnet"):
        pipeline.train(pipeline.TrainConfig(
            depth=8, dataset="digits", epochs=3, batch_size=32, steps_per_epoch=4,
            model_dir=str(run), verbose="false"))
    assert read_json(run / "config.json")["dtype_policy"] == "mixed_bfloat16"
    assert history(run) == [1, 2, 3]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "resuming in mixed_bfloat16, the dtype policy this run started with, although this "
        "machine would choose float32, where bfloat16 is emulated and slower; start a new "
        "run to train in float32"]


# --------------------------------------------------------------------------- weight average


def test_the_weight_average_is_scored_every_epoch_and_saved_where_it_scores_higher(
        tmp_path, monkeypatch):
    options = dict(depth=8, dataset="digits", batch_size=32, steps_per_epoch=10,
                   ema_decay=0.9, ema_bn_batches=4, mixed_precision="false",
                   lr_schedule="constant", warmup_epochs=0, verbose="false")
    run = tmp_path / "run"
    estimates = []
    estimate = optimization.estimate_bn_statistics
    monkeypatch.setattr(optimization, "estimate_bn_statistics",
                        lambda model, batches: estimates.append(1) or estimate(model, batches))
    metrics = pipeline.train(pipeline.TrainConfig(epochs=2, model_dir=str(run), **options))
    assert metrics["ema_bn_batches"] == 4
    # The average's BN statistics are estimated once an epoch, where it is scored; the best
    # and the final model reuse that estimate.
    assert len(estimates) == 2
    history_rows = rows(run)
    assert all(0 <= row["ema_val_accuracy"] <= 1 for row in history_rows)
    last = history_rows[-1]
    average = last["ema_val_accuracy"] > last["val_accuracy"]
    assert metrics["weights"] == ("average" if average else "trained")
    assert metrics["trained_val_accuracy"] == pytest.approx(last["val_accuracy"])
    assert metrics["ema_val_accuracy"] == pytest.approx(last["ema_val_accuracy"])
    assert metrics["val_accuracy"] == pytest.approx(max(last["val_accuracy"],
                                                        last["ema_val_accuracy"]))
    # The saved files are the weights that were scored: evaluated again, the same top-1.
    assert pipeline.evaluate(run / "model.keras", split="val")["top1"] == pytest.approx(
        metrics["val_accuracy"], abs=1e-6)
    assert pipeline.evaluate(run / "best.keras", split="val")["top1"] == pytest.approx(
        metrics["best_val_accuracy"], abs=1e-6)
    # The average lives in the checkpoints: a run resumed after epoch 1 ends as this one
    # (a constant rate, so that stopping at 1 epoch does not change the schedule).
    resumed = tmp_path / "resumed"
    pipeline.train(pipeline.TrainConfig(epochs=1, model_dir=str(resumed), **options))
    again = pipeline.train(pipeline.TrainConfig(epochs=2, model_dir=str(resumed), **options))
    assert again["weights"] == metrics["weights"]
    for key in ("val_accuracy", "ema_val_accuracy"):
        assert [r[key] for r in rows(resumed)] == pytest.approx(
            [r[key] for r in history_rows], abs=1e-6)
    a, b = (keras.saving.load_model(r / "model.keras", compile=False) for r in (run, resumed))
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_fit_leaves_the_trained_weights_and_the_average_swaps_in_and_out():
    resolved = pipeline.resolve(pipeline.TrainConfig(depth=8, ema_decay=0.5))
    model = network.build_model(resolved, 10)
    optimizer = optimization.prepare_for_training(model, resolved, 10, steps_per_epoch=4)
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(8) % 10, 10)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert optimizer.use_ema and optimization.has_average(model)
    trained = [v.numpy() for v in model.trainable_variables]
    with optimization.swapped_average(model):
        average = [v.numpy() for v in model.trainable_variables]
    assert any(not np.allclose(t, a) for t, a in zip(trained, average, strict=True))
    for variable, value in zip(model.trainable_variables, trained, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
    optimization.start_average(model)
    with optimization.swapped_average(model):
        restarted = [v.numpy() for v in model.trainable_variables]
    for t, r in zip(trained, restarted, strict=True):
        np.testing.assert_array_equal(t, r)
    plain = network.build_model(pipeline.resolve(pipeline.TrainConfig(depth=8)), 10)
    optimization.prepare_for_training(plain, pipeline.resolve(pipeline.TrainConfig(depth=8)),
                                      10, steps_per_epoch=4)
    assert not optimization.has_average(plain)


def test_bn_statistics_of_the_average_are_estimated_and_swapped_back():
    """precise BN: each BN layer's moving statistics become the mean over the batches of its
    input's training-mode batch mean and variance; swapped_average puts back the trained
    weights' statistics afterwards."""
    resolved = pipeline.resolve(pipeline.TrainConfig(depth=8, ema_decay=0.5))
    model = network.build_model(resolved, 10)
    optimization.prepare_for_training(model, resolved, 10, steps_per_epoch=4)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.fit(x, keras.utils.to_categorical(np.arange(8) % 10, 10), batch_size=4, epochs=2,
              verbose=0)
    batches = [(rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32"), None)
               for _ in range(3)]
    first_bn = model.get_layer("conv1_bn")
    running = [v.numpy() for v in (first_bn.moving_mean, first_bn.moving_variance)]
    stem = keras.Model(model.input, first_bn.input)
    with optimization.swapped_average(model, batches):
        # the stem conv's output under the average, batch by batch
        outputs = [stem(images).numpy().astype("float64") for images, _ in batches]
        np.testing.assert_allclose(first_bn.moving_mean.numpy(),
                                   np.mean([o.mean(axis=(0, 1, 2)) for o in outputs], axis=0),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(first_bn.moving_variance.numpy(),
                                   np.mean([o.var(axis=(0, 1, 2)) for o in outputs], axis=0),
                                   rtol=1e-4, atol=1e-4)
        estimated = [layer.moving_mean.numpy() for layer in model.layers
                     if isinstance(layer, keras.layers.BatchNormalization)]
    for value, variable in zip(running, (first_bn.moving_mean, first_bn.moving_variance),
                               strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
    assert not np.allclose(running[0], estimated[0])
    # the same batches give the same statistics
    with optimization.swapped_average(model, batches):
        again = [layer.moving_mean.numpy() for layer in model.layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
    for a, b in zip(estimated, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # AverageBNStatistics runs the batches once per step of the average and sets the same
    # statistics again at that step; after a training step it estimates them anew.
    shared = optimization.AverageBNStatistics(batches)
    for _ in range(2):
        with optimization.swapped_average(model, shared):
            cached = [layer.moving_mean.numpy() for layer in model.layers
                      if isinstance(layer, keras.layers.BatchNormalization)]
        for a, b in zip(estimated, cached, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(first_bn.moving_mean.numpy(), running[0])
    assert shared.estimates == 1
    model.fit(x, keras.utils.to_categorical(np.arange(8) % 10, 10), batch_size=4, epochs=1,
              verbose=0)
    with optimization.swapped_average(model, shared):
        stepped = first_bn.moving_mean.numpy()
    assert shared.estimates == 2 and not np.allclose(stepped, estimated[0])


# --------------------------------------------------------------------------- fine-tuning


def _three_classes(root):
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            tf.io.write_file(str(root / c / f"{i}.png"), tf.io.encode_png(
                rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    return root


def test_initial_weights_new_head_flat_graph(digits_run, tmp_path):
    source = keras.saving.load_model(digits_run / "model.keras", compile=False)
    for path in (digits_run / "model.keras", tmp_path / "source.weights.h5"):
        if path.suffix == ".h5":
            source.save_weights(path)
        resolved = pipeline.resolve(pipeline.TrainConfig(depth=8, initial_weights=str(path)))
        model = network.build_model(resolved, num_classes=3)
        assert model.output_shape == (None, 3)
        assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # flat
        for name in ("conv1_conv", "conv4_block1_2_conv", "conv4_block1_2_bn"):
            for a, b in zip(model.get_layer(name).get_weights(),
                            source.get_layer(name).get_weights(), strict=True):
                np.testing.assert_array_equal(a, b)
    other = keras_resnet.resnet(depth=14, classes=10)
    other.save(tmp_path / "other.keras")
    with pytest.raises(pipeline.UserError, match="has layer.* that resnet8 lacks, so it is not"):
        network.build_model(pipeline.resolve(pipeline.TrainConfig(
            depth=8, initial_weights=str(tmp_path / "other.keras"))), num_classes=3)


def test_initial_weights_shipped_cifar10_new_head(tmp_path, capsys):
    """initial_weights="cifar10" loads the weights shipped in the package (no download)
    into every layer but the new head, as "imagenet" does."""
    shipped = keras_resnet.ResNet20(weights="cifar10")
    resolved = pipeline.resolve(pipeline.TrainConfig(depth=20, initial_weights="cifar10"))
    assert resolved.model_options == {}
    model = network.build_model(resolved, num_classes=3)
    assert model.output_shape == (None, 3)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # flat
    for layer in model.layers:
        if layer.weights and layer.name != "predictions":
            for a, b in zip(layer.get_weights(), shipped.get_layer(layer.name).get_weights(),
                            strict=True):
                np.testing.assert_array_equal(a, b)
    fresh = network.build_model(resolved, num_classes=3, initial_weights=False)
    assert not np.array_equal(model.get_layer("conv1_conv").get_weights()[0],
                              fresh.get_layer("conv1_conv").get_weights()[0])
    data_dir = _three_classes(tmp_path / "images")
    status, out, _ = tool(capsys, "train", "--depth=20", "--initial_weights=cifar10",
                          "--dataset=folder", f"--data_dir={data_dir}", "--epochs=2",
                          "--batch_size=8", "--freeze_backbone_epochs=1",
                          "--val_fraction=0.25", f"--model_dir={tmp_path / 'run'}",
                          "--verbose=false")
    assert status == 0, out
    assert history(tmp_path / "run") == [1, 2]
    changed = pipeline.resolve(pipeline.TrainConfig(
        depth=32, model_options={"se_ratio": 0.25}, initial_weights="cifar10"))
    with pytest.raises(pipeline.UserError,
                       match="shipped cifar10 weights of resnet32 lacks layer.*so it is not"):
        network.build_model(changed, num_classes=3)


def test_fine_tune_with_frozen_backbone_then_resume(digits_run, tmp_path):
    data_dir = _three_classes(tmp_path / "images")
    config = pipeline.TrainConfig(depth=8, dataset="folder", data_dir=str(data_dir), epochs=1,
                               batch_size=8, initial_weights=str(digits_run / "model.keras"),
                               freeze_bn=True, model_dir=str(tmp_path / "run"),
                               verbose="false", val_fraction=0.25)
    with pytest.raises(pipeline.UserError, match="freeze_backbone_epochs must be below"):
        pipeline.train(pipeline.TrainConfig(**{**config.__dict__, "freeze_backbone_epochs": 1}))
    source = keras.saving.load_model(digits_run / "model.keras", compile=False)
    pipeline.train(pipeline.TrainConfig(**{**config.__dict__, "epochs": 2,
                                     "freeze_backbone_epochs": 1}))
    assert history(tmp_path / "run") == [1, 2]
    assert read_json(tmp_path / "run" / "checkpoints" / "checkpoint.json")["phase"] == 1
    tuned = keras.saving.load_model(tmp_path / "run" / "model.keras", compile=False)
    # the backbone moved in phase 2, BN statistics never (freeze_bn)
    assert not np.array_equal(tuned.get_layer("conv1_conv").get_weights()[0],
                              source.get_layer("conv1_conv").get_weights()[0])
    for a, b in zip(tuned.get_layer("conv1_bn").get_weights(),
                    source.get_layer("conv1_bn").get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(layer.trainable for layer in tuned.layers
               if layer.name not in ("preprocess",) and not layer.name.endswith("_0_conv")
               and not isinstance(layer, keras.layers.BatchNormalization))
    # one more epoch resumes in the unfrozen phase
    pipeline.train(pipeline.TrainConfig(**{**config.__dict__, "epochs": 3,
                                     "freeze_backbone_epochs": 1}))
    assert history(tmp_path / "run") == [1, 2, 3]


def test_the_weight_average_starts_again_at_the_weights_of_the_unfrozen_phase(digits_run,
                                                                             tmp_path):
    """The whole-network phase gets a new optimizer part-way (its step count not 0), whose
    average Keras would start from zeros: a near-zero average gives all-zero logits, a
    validation loss of exactly ln 3 on three classes. Started at the phase's weights it
    scores like them."""
    data_dir = _three_classes(tmp_path / "images")
    pipeline.train(pipeline.TrainConfig(
        depth=8, dataset="folder", data_dir=str(data_dir), epochs=2, batch_size=8,
        initial_weights=str(digits_run / "model.keras"), freeze_backbone_epochs=1,
        ema_decay=0.999, model_dir=str(tmp_path / "run"), verbose="false",
        val_fraction=0.25))
    epochs = rows(tmp_path / "run")
    assert [int(e["epoch"]) for e in epochs] == [1, 2]
    for epoch in epochs:
        assert abs(epoch["ema_val_loss"] - np.log(3)) > 1e-3, epoch


def test_tfds_training_through_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path / "tfds")
    builder = tfds.builder("cifar10", data_dir=data_dir)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=n, shard_lengths=[k], num_bytes=0, filename_template=None)
        for n, k in (("train", 64), ("test", 16))]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=data_dir):
        metrics = pipeline.train(pipeline.TrainConfig(
            depth=8, dataset="cifar10", data_dir=data_dir, epochs=1, batch_size=16,
            steps_per_epoch=2, model_dir=str(tmp_path / "run"), verbose="false"))
    assert metrics["epochs"] == 1 and metrics["val_images"] == 6  # 10% of train carved
    config = read_json(tmp_path / "run" / "config.json")
    assert config["dataset"] == "cifar10"
    # the data fingerprint of a TFDS dataset: its name, version and split sizes
    assert config["data"]["kind"] == "tfds" and config["data"]["name"] == "cifar10"
    assert config["data"]["splits"] == {"test": 16, "train": 64}


# --------------------------------------------------------------------------- subprocesses


def test_real_cifar10_accuracy(cifar_small, tmp_path, capsys):
    """ResNet-8 on 2,000 real CIFAR-10 training images reaches well above chance (10%)."""
    run_dir = tmp_path / "cifar"
    status, out, err = cli(capsys, "--depth=8", "--dataset=folder", f"--data_dir={cifar_small}",
                           "--epochs=5", "--batch_size=64", f"--model_dir={run_dir}")
    assert status == 0, err[-3000:]
    metrics = read_json(run_dir / "metrics.json")
    # 500 validation images: chance is 0.10 (sd 0.013); 5 epochs reach about 0.35-0.40.
    assert metrics["val_accuracy"] > 0.25, metrics
    assert metrics["epochs"] == 5 and history(run_dir) == [1, 2, 3, 4, 5]
    assert out.count("images/s") >= 5  # one progress line per epoch


def test_resume_after_sigkill(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["tools/train.py", *TINY, "--epochs=4", "--batch_size=64", f"--model_dir={run_dir}"]
    state_file = run_dir / "checkpoints" / "checkpoint.json"
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if state_file.exists() and read_json(state_file)["epoch"] >= 1:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    done = read_json(state_file)["epoch"]
    assert 1 <= done < 4 and not (run_dir / "model.keras").exists()
    assert history(run_dir) == list(range(1, done + 1))

    status, out, err = cli(capsys, *args[1:])  # the same command, resumed
    assert status == 0, err[-3000:]
    assert f"resuming {run_dir} after epoch {done}/4" in out
    ran = [int(line.split()[1].split("/")[0]) for line in out.splitlines()
           if line.startswith("epoch ")]
    assert ran == list(range(done + 1, 5))  # no finished epoch repeated
    assert history(run_dir) == [1, 2, 3, 4]
    assert read_json(run_dir / "metrics.json")["epochs"] == 4


def _start(args):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_mid_epoch(process, run_dir, signum, *, after_epochs=1):
    """Sends ``signum`` once ``after_epochs`` epochs are checkpointed (so mid-epoch)."""
    state_file = Path(run_dir) / "checkpoints" / "checkpoint.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if state_file.exists() and read_json(state_file)["epoch"] >= after_epochs:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before the signal"
    process.send_signal(signum)
    return process.communicate(timeout=300)


def _final_weights(run_dir):
    model = keras.saving.load_model(Path(run_dir) / "model.keras", compile=False)
    return np.concatenate([w.ravel() for w in model.get_weights()])


# Both signals take the same path; the fast tier sends SIGTERM (preemption).
@pytest.mark.parametrize("signum, status", [
    pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
    pytest.param(signal.SIGINT, 130, id="SIGINT", marks=pytest.mark.slow)])
def test_a_signal_checkpoints_the_step_and_the_resumed_run_ends_as_an_uninterrupted_one(
        tmp_path, capsys, signum, status):
    """SIGTERM (preemption) or SIGINT stops after the running step with a mid-epoch
    checkpoint, one line and status 143 / 130; after SIGTERM (the resume is the same after
    either) the same command resumes from that step and ends with the weights of a run
    never stopped. Measured here: identical to the last bit
    (the epoch stream, the optimizer state and the schedule all continue exactly); the
    bound allows 1e-6 for machines whose kernels are not bitwise reproducible."""
    run_dir = tmp_path / "run"
    args = ["tools/train.py", *TINY, "--epochs=2", "--batch_size=16", f"--model_dir={run_dir}"]
    process = _start(args)
    out, err = _signal_mid_epoch(process, run_dir, signum)
    assert process.returncode == status, err[-2000:]
    name = signal.Signals(signum).name
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"training stopped by {name} at epoch 2, step "), err[-2000:]
    assert lines[-1].endswith("written; run the same command to resume")
    state = read_json(run_dir / "checkpoints" / "checkpoint.json")
    assert state["epoch"] == 1 and 0 < state["step"] < 80
    assert state["weights"] == f"epoch_0001_step_{state['step']:06d}.weights.h5"
    assert not (run_dir / "model.keras").exists()
    if signum != signal.SIGTERM:
        return  # the resume from a step checkpoint is the same after either signal

    # The same command resumes (here in the test's process), and a run never stopped.
    resumed, out, err = cli(capsys, *args[1:])
    assert resumed == 0, err[-3000:]
    assert (f"resuming {run_dir} after epoch 1/2, step {state['step']}/80 from "
            f"checkpoints/{state['weights']}") in out
    assert history(run_dir) == [1, 2]
    whole = tmp_path / "whole"
    full, _, err = cli(capsys, *args[1:-1], f"--model_dir={whole}")
    assert full == 0, err[-3000:]
    np.testing.assert_allclose(_final_weights(run_dir), _final_weights(whole), rtol=0,
                               atol=1e-6)


def test_a_truncated_newest_checkpoint_resumes_from_the_one_before(tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = [*TINY, "--steps_per_epoch=3", f"--model_dir={run_dir}"]
    assert cli(capsys, *common, "--epochs=2")[0] == 0
    newest = run_dir / "checkpoints" / "epoch_0002.weights.h5"
    size = newest.stat().st_size
    os.truncate(newest, 300_000)
    status, out, err = cli(capsys, *common, "--epochs=3")
    assert status == 0, err
    assert (f"checkpoint epoch_0002.weights.h5 (300,000 bytes, {size:,} recorded) is "
            "damaged: passed over") in out
    assert f"resuming {run_dir} after epoch 1/3 from checkpoints/epoch_0001.weights.h5" in out
    assert history(run_dir) == [1, 2, 3]
    for f in (run_dir / "checkpoints").glob("epoch_*.weights.h5"):
        os.truncate(f, 1000)
    err = tool_error(capsys, "train", *common, "--epochs=4")
    assert err.startswith(f"error: no checkpoint in {run_dir}/checkpoints is intact (")
    assert err.endswith("; pass --overwrite to start the run again")


def test_a_failed_checkpoint_write_is_one_line_and_the_rerun_completes(tmp_path, capsys,
                                                                      monkeypatch):
    run_dir = tmp_path / "run"
    common = [*TINY, "--steps_per_epoch=3", f"--model_dir={run_dir}"]
    real = checkpoints.save_checkpoint

    def disk_full(model_dir, save_weights, state, **kw):
        if state["epoch"] == 2:
            raise safe_writes.write_failure(os.path.join(model_dir, "checkpoints",
                                                         "epoch_0002.weights.h5"), errno.ENOSPC)
        return real(model_dir, save_weights, state, **kw)

    monkeypatch.setattr(checkpoints, "save_checkpoint", disk_full)
    err = tool_error(capsys, "train", *common, "--epochs=3")
    assert "could not write" in err and "no space left on device" in err
    assert err.endswith("then run the same command to resume (from "
                        "checkpoints/epoch_0001.weights.h5, which is intact)")
    monkeypatch.setattr(checkpoints, "save_checkpoint", real)
    status, out, err = cli(capsys, *common, "--epochs=3")
    assert status == 0, err
    assert f"resuming {run_dir} after epoch 1/3" in out and history(run_dir) == [1, 2, 3]


def test_checkpoint_every_steps_writes_mid_epoch_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    pipeline.train(pipeline.TrainConfig(depth=8, dataset="digits", epochs=1, batch_size=32,
                                        steps_per_epoch=7, checkpoint_every_steps=3,
                                        keep_checkpoints=5, model_dir=str(run_dir),
                                        verbose="false"))
    state = read_json(run_dir / "checkpoints" / "checkpoint.json")
    assert [c["weights"] for c in state["checkpoints"]] == [
        "epoch_0000_step_000003.weights.h5", "epoch_0000_step_000006.weights.h5",
        "epoch_0001.weights.h5"]
    resolved = pipeline.resolve(pipeline.TrainConfig(depth=50, dataset="synthetic"))
    assert config_lib.checkpoint_interval(resolved, 5004) == 500  # ImageNet at batch 256
    assert config_lib.checkpoint_interval(resolved, 703) == 0  # CIFAR at batch 64


MIRRORED_SCRIPT = """
import json, os, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from keras_resnet import pipeline

out = sys.argv[1]
common = dict(depth=8, dataset="digits", epochs=2, batch_size=64, steps_per_epoch=4,
              learning_rate=0.05, freeze_bn=True, mixed_precision="false", verbose="false")
result = {}
for name in ("default", "mirrored"):
    run = os.path.join(out, name)
    metrics = pipeline.train(pipeline.TrainConfig(model_dir=run, strategy=name, **common))
    model = keras.saving.load_model(os.path.join(run, "model.keras"), compile=False)
    np.save(os.path.join(out, name + ".npy"),
            np.concatenate([w.ravel() for w in model.get_weights()]))
    config = json.load(open(os.path.join(run, "config.json")))
    result[name] = dict(loss=metrics["train_loss"], val_loss=metrics["val_loss"],
                        replicas=config["replicas"],
                        per_replica=config["per_replica_batch_size"])
try:
    pipeline.train(pipeline.TrainConfig(model_dir=os.path.join(out, "odd"), strategy="mirrored",
                                  **{**common, "batch_size": 63}))
except pipeline.UserError as e:
    result["odd_batch_error"] = str(e)
print("RESULT " + json.dumps(result))
"""


def test_mirrored_two_replicas_match_one_device(tmp_path):
    """Two logical CPUs really run two replicas and match one device.

    With BatchNormalization frozen, each replica's gradient is an exact share of the
    single-device gradient, so the runs agree up to float summation order (tolerance
    1e-4 on every weight after 8 steps). With BN training, statistics are per replica (32
    images instead of 64), a documented difference of non-synchronised BN.
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(MIRRORED_SCRIPT),
                             str(tmp_path)], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert (out["default"]["replicas"], out["mirrored"]["replicas"]) == (1, 2)
    assert out["mirrored"]["per_replica"] == 32
    assert out["mirrored"]["loss"] == pytest.approx(out["default"]["loss"], abs=1e-4)
    assert out["mirrored"]["val_loss"] == pytest.approx(out["default"]["val_loss"], abs=1e-4)
    single, mirrored = np.load(tmp_path / "default.npy"), np.load(tmp_path / "mirrored.npy")
    np.testing.assert_allclose(mirrored, single, atol=1e-4)
    assert out["odd_batch_error"] == ("batch_size=63 does not divide evenly over 2 replicas; "
                                      "use a multiple of 2")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_two_processes(tmp_path):
    workers = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    run_dir = tmp_path / "run"
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(
            [sys.executable, "tools/train.py", *TINY, "--epochs=1", "--steps_per_epoch=3",
             f"--model_dir={run_dir}"], cwd=REPO, env={**ENV, "TF_CONFIG": json.dumps(tf_config)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    config = read_json(run_dir / "config.json")
    assert (config["strategy_resolved"], config["replicas"]) == (
        "MultiWorkerMirroredStrategy", 2)
    assert read_json(run_dir / "metrics.json")["epochs"] == 1
    lines = [[x for x in out.splitlines() if x.startswith("epoch 1/1")] for out, _ in outputs]
    # both workers report the same globally averaged metrics
    strip = [[x.rsplit(" - ", 2)[0] for x in ls] for ls in lines]
    assert strip[0] == strip[1] and len(strip[0]) == 1


@pytest.mark.parametrize("tf_config, cluster_task", [
    (None, False),
    ("not json", False),
    ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, False),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, True),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}},
     True),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}},
     True),
    ({"cluster": {"worker": ["a:1", "b:1"]}}, False),
])
def test_cluster_tasks_are_the_tasks_of_two_or_more_workers(monkeypatch, tf_config,
                                                            cluster_task):
    """Such a task leaves with the others, after an exit barrier (tools/_cli.finish)."""
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config if isinstance(tf_config, str)
                           else json.dumps(tf_config))
    assert distribute.is_cluster_task() is cluster_task


def test_leaving_outside_a_cluster_returns(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.leave_cluster(0) is None


def _workers(run_dir, args, ports):
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": ports}, "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(
            [sys.executable, "tools/train.py", *TINY, *args, f"--model_dir={run_dir}"],
            cwd=REPO, env={**ENV, "TF_CONFIG": json.dumps(tf_config)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def _wait(processes):
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    return outputs


@pytest.mark.slow  # three processes; the fast tier signals one process and runs two workers
def test_sigterm_to_one_worker_stops_every_worker_at_the_same_step(tmp_path):
    """Multi-worker: the chief alone gets SIGTERM; both workers stop after the same step
    (the stop request is all-reduced every step), the chief writes the checkpoint, both exit
    143, and the same two commands resume and finish."""
    run_dir = tmp_path / "run"
    args = ["--epochs=2", "--steps_per_epoch=40"]
    ports = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    processes = _workers(run_dir, args, ports)
    state_file = run_dir / "checkpoints" / "checkpoint.json"
    deadline = time.time() + 300
    while time.time() < deadline and processes[0].poll() is None:
        if state_file.exists() and read_json(state_file)["epoch"] >= 1:
            break
        time.sleep(0.05)
    processes[0].send_signal(signal.SIGTERM)
    outputs = _wait(processes)
    assert [p.returncode for p in processes] == [143, 143], [e[-2000:] for _, e in outputs]
    chief_line, worker_line = (err.strip().splitlines()[-1] for _, err in outputs)
    assert chief_line.startswith("training stopped by SIGTERM at epoch 2, step ")
    assert worker_line.startswith("training stopped by ")
    assert worker_line.endswith("the chief wrote the checkpoint; run the same command to "
                                "resume")
    state = read_json(state_file)
    assert state["epoch"] == 1 and 0 < state["step"] < 40
    # both stopped at the step the chief's checkpoint records
    assert f"step {state['step']}/40" in chief_line and f"step {state['step']}/40" in \
        worker_line
    # the chief left without teardown, its TensorBoard files closed: epoch 1 is in them
    tags = {value.tag for events in (run_dir / "logs").rglob("events.out.tfevents.*")
            for event in tf.compat.v1.train.summary_iterator(str(events))
            for value in event.summary.value}
    assert {"epoch_loss", "epoch_accuracy"} <= tags, tags

    outputs = _wait(_workers(run_dir, args, ports))
    assert read_json(run_dir / "metrics.json")["epochs"] == 2, [e[-2000:] for _, e in outputs]
