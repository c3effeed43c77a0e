"""pipeline.run_from_weights and tools/run_from_weights.py: a run folder holding shipped
weights that the export and evaluation tools read as they read a training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tool, tool_error


def test_run_folder_holds_the_shipped_model(cifar_small, tmp_path, capsys):
    import keras_resnet
    from keras_resnet import pipeline
    from keras_resnet.pipeline import data
    from keras_resnet.pipeline.run import reader

    target = tmp_path / "r20"
    status, out, err = tool(capsys, "run_from_weights", "--model=resnet20",
                            f"--data_dir={cifar_small}", f"--model_dir={target}")
    assert status == 0, err
    run = reader.read_run(target)  # what export() and evaluate() read
    assert run.variant == "resnet20" and run.labels == keras_resnet.CIFAR10_CLASSES
    config = json.loads((target / "config.json").read_text())
    assert (config["dataset"], config["val_fraction"], config["seed"]) == ("folder", 0.1, 0)
    assert config["weights"] == "cifar10" and config["weights_sha256"]
    model = reader.load_model(run)  # the architecture config.json describes
    shipped = keras_resnet.ResNet20(weights="cifar10", classifier_activation=None)
    images = data.take(data.eval_data("folder", str(cifar_small), "val", 32, 50).dataset,
                       50)[0]
    np.testing.assert_allclose(model.predict(images, verbose=0),
                               shipped.predict(images, verbose=0), atol=1e-5)
    # The printed top-1 is the written model's on the run's validation images.
    top1 = pipeline.evaluate(target / "model.keras", split="val",
                             confusion_png=tmp_path / "c.png")["top1"]
    assert f"validation top-1 {top1:.4f} on 500 images (model card: 0.885)" in out

    err = tool_error(capsys, "run_from_weights", "--model=resnet20",
                     f"--data_dir={cifar_small}", f"--model_dir={target}", "--check=false")
    assert "model.keras already exists; pass --overwrite" in err
    status, out, _ = tool(capsys, "run_from_weights", "--model=resnet20",
                          f"--data_dir={cifar_small}", f"--model_dir={target}",
                          "--check=false", "--overwrite")
    assert status == 0 and "validation top-1" not in out


@pytest.mark.parametrize("flags,message", [
    (["--model=resnet18"], "model=resnet18 with weights=cifar10 is not shipped; choose one "
                           "of resnet20/cifar10"),
    ([], "data_dir= is required"),
])
def test_bad_requests_are_one_line(tmp_path, capsys, flags, message):
    err = tool_error(capsys, "run_from_weights", f"--model_dir={tmp_path / 'r'}", *flags)
    assert message.replace("model=", "--model=").replace("weights=", "--weights=").replace(
        "data_dir=", "--data_dir=") in err
    assert not (tmp_path / "r").exists()
