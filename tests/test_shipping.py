"""Shipping a run's weights: the file, the model card's figures, and the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import copy_run, tool_subprocess

import keras_resnet as kr
from keras_resnet import weights as weights_lib
from keras_resnet.pipeline import shipping
from keras_resnet.pipeline.errors import UserError


@pytest.fixture(scope="module")
def exported_run(cifar_run_template, tmp_path_factory):
    """The template run with its PTQ int8 file (what tools/export_tflite.py writes)."""
    run = copy_run(cifar_run_template, tmp_path_factory.mktemp("ship") / "run")
    result = tool_subprocess("export_tflite", f"--model_dir={run}", "--modes=ptq_int8",
                             "--eval_samples=100", "--latency_runs=1")
    assert result.returncode in (0, 1), result.stderr[-2000:]  # 1: an accuracy drop
    assert (run / "model_ptq_int8.tflite").is_file()
    return run


def test_ship_writes_the_file_and_a_card_with_every_figure(exported_run, tmp_path,
                                                           monkeypatch):
    # a run of the fast recipe at its own learning rate (the template's 0.05)
    run = copy_run(exported_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    assert "cutout" not in config  # as recorded before Cutout existed: it ran without
    (run / "config.json").write_text(json.dumps({**config, "recipe": "fast", "epochs": 1}))
    # This barely trained net's scores are near ties, so whether float16 moves its top-1
    # depends on the CPU's kernels: allow any change, so that "auto" keeps float16.
    monkeypatch.setattr(shipping, "MAX_STORAGE_CHANGE", 1.0)
    card = shipping.ship(run, name="cifar10", out_dir=tmp_path,
                         command="python tools/train.py --depth=8")
    assert card["training"]["recipe_changes"] == {"learning_rate": 0.05}
    assert card["training"]["cutout"] == 0
    path = tmp_path / "resnet8_cifar10.h5"
    assert card["file"] == path.name and card["bytes"] == path.stat().st_size
    assert card["dtype"] == "float16"
    v = card["validation"]
    assert abs(v["top1_stored"] - v["top1_float32"]) <= shipping.MAX_STORAGE_CHANGE
    accuracy = card["accuracy"]
    assert set(accuracy) == {"float", "ptq_int8"}  # no QAT file in this run
    assert accuracy["float"]["file"] == path.name
    assert accuracy["float"]["top1"] == pytest.approx(v["top1_stored"])
    for figures in accuracy.values():
        assert 0 <= figures["top1"] <= 1 and 0 <= figures["top1_flip"] <= 1
        assert figures["bytes"] > 0
    assert card["training"]["cpu"] is None or isinstance(card["training"]["cpu"], str)
    assert card["training"]["accelerator"] is None  # no GPU in the tests
    # the export's files in the card's units: the PTQ row is the same file, scored on the
    # export's --eval_samples=100 images, its top-1 a fraction of them (not percent)
    (row,) = card["tflite"]
    assert row["name"].startswith("ptq_int8")
    assert row["images"] == min(100, v["images"])
    assert row["bytes"] == accuracy["ptq_int8"]["bytes"]
    correct = row["top1"] * row["images"]
    assert 0 <= row["top1"] <= 1 and correct == pytest.approx(round(correct), abs=1e-4)
    assert json.loads((tmp_path / "resnet8_cifar10.json").read_text()) == card

    # registered, the file loads and the registry reads the card
    entry = weights_lib.Pretrained(file=path.name, sha256=card["sha256"],
                                   classes=kr.CIFAR10_CLASSES, image_size=32,
                                   card="resnet8_cifar10.json")
    monkeypatch.setattr(weights_lib, "PRETRAINED_DIR", tmp_path)
    monkeypatch.setattr(weights_lib, "PRETRAINED", {"resnet8": {"cifar10": entry}})
    (record,) = kr.shipped_weights()
    assert (record["variant"], record["weights"], record["sha256"]) == (
        "resnet8", "cifar10", card["sha256"])
    assert record["top1"]["float"] == accuracy["float"]["top1"]
    assert record["top1"]["qat_int8"] is None  # not measured, said so
    model = kr.resnet(depth=8, weights="cifar10")
    x = np.zeros((1, 32, 32, 3), "float32")
    assert np.isclose(model.predict_on_batch(x).sum(), 1.0, atol=1e-5)
    import model_table  # tools/model_table.py

    assert record["recipe_changes"] == {"learning_rate": 0.05}
    row = next(line for line in model_table.weights_table().splitlines()
               if line.startswith("| `resnet8` | `cifar10` |"))
    assert "| `fast` with learning_rate 0.05, 1 |" in row


def test_auto_storage_keeps_float32_where_float16_would_move_top1(exported_run, tmp_path,
                                                                 monkeypatch):
    save = weights_lib.save_by_name

    def float16_that_loses_everything(net, path, dtype):
        """Stores zeros as float16 (every image then gets the same class)."""
        if dtype != "float16":
            return save(net, path, dtype=dtype)
        trained = net.get_weights()
        net.set_weights([np.zeros_like(w) for w in trained])
        try:
            return save(net, path, dtype=dtype)
        finally:
            net.set_weights(trained)

    monkeypatch.setattr(weights_lib, "save_by_name", float16_that_loses_everything)
    card = shipping.ship(exported_run, name="cifar10", out_dir=tmp_path)
    assert card["dtype"] == "float32"
    assert card["validation"]["top1_stored"] == card["validation"]["top1_float32"]
    assert card["validation"]["predictions_changed_by_storage"] == 0


def test_storage_that_moves_top1_too_far_is_refused(exported_run, tmp_path, monkeypatch):
    monkeypatch.setattr(shipping, "MAX_STORAGE_CHANGE", -1.0)  # nothing is close enough
    with pytest.raises(UserError, match="storage changes validation top-1 .*; use "
                                        "dtype=float32"):
        shipping.ship(exported_run, name="cifar10", out_dir=tmp_path, dtype="float16")
    assert not list(tmp_path.glob("*.h5")) and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(UserError, match="dtype='int4' is not valid"):
        shipping.ship(exported_run, name="cifar10", out_dir=tmp_path, dtype="int4")
