"""Shared fixtures: real CIFAR-10 images from ../shared, extracted once per session."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The kernels the tools choose (tools/_cli.py), so that a run in this process and one in a
# fresh interpreter compute the same numbers.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
TEST_ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}

REPO = Path(__file__).resolve().parents[1]
# The tools are scripts, not a package: tests import them (and their _cli helper) by name.
sys.path.insert(0, str(REPO / "tools"))
CIFAR_TAR = Path(
    os.environ.get("KERAS_RESNET_CIFAR_TAR", REPO.parent / "shared/datasets/cifar10/train.tar.gz")
)
# The Keras backends other than TensorFlow that tests run where installed, and the extra
# that installs each (CI installs the dev extra: JAX only).
BACKEND_EXTRAS = {"jax": "dev", "torch": "torch"}


def skip_without_backend(backend: str, what: str) -> None:
    """Skips the calling test, naming the extra to install, where ``backend`` is absent."""
    pytest.importorskip(backend, reason=f"{what} needs {backend} "
                                        f"(pip install -e .[{BACKEND_EXTRAS[backend]}])")


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")


def extract_cifar(dest: Path, per_class: int, *, offset: int = 0) -> Path:
    """Extracts ``per_class`` images of every class into ``dest/<class>/``.

    Images ``offset .. offset+per_class-1`` of each class are taken, so callers can carve
    disjoint train/validation folders from the training archive.
    """
    if not CIFAR_TAR.is_file():
        pytest.skip(f"real CIFAR-10 images not found at {CIFAR_TAR} (../shared is absent)")
    wanted = {f"train/{c}/{i:04d}.jpg" for c in CIFAR_CLASSES
              for i in range(offset, offset + per_class)}
    with tarfile.open(CIFAR_TAR, "r:gz") as tar:
        for member in tar:
            if member.name in wanted:
                _, cls, fname = member.name.split("/")
                (dest / cls).mkdir(parents=True, exist_ok=True)
                (dest / cls / fname).write_bytes(tar.extractfile(member).read())
    return dest


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory) -> Path:
    """ROOT/train/<class>/ (200 per class) and ROOT/val/<class>/ (50 per class, disjoint)."""
    root = tmp_path_factory.mktemp("cifar_small")
    extract_cifar(root / "train", 200)
    extract_cifar(root / "val", 50, offset=4950)
    return root


# --------------------------------------------------------------------------- tools


def tool(capsys, name: str, *args: str) -> tuple[int, str, str]:
    """Runs ``tools/<name>.py`` in this process: ``(exit status, stdout, stderr)``."""
    import importlib

    module = importlib.import_module(name)
    status = module.main([f"{name}.py", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def tool_error(capsys, name: str, *args: str) -> str:
    """Runs a tool that must fail on bad input: exit status 2 and one ``error:`` line."""
    status, _, err = tool(capsys, name, *args)
    err = err.strip()
    assert status == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def tool_subprocess(name: str, *args: str, env: dict | None = None,
                    timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``tools/<name>.py`` in a fresh interpreter (device or tfmot state stays out)."""
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args],
                          cwd=REPO, env=env or TEST_ENV, capture_output=True, text=True,
                          timeout=timeout)


def python_subprocess(code: str, *args: str, timeout: int = 600) -> str:
    """Runs Python code in a fresh interpreter; returns its stdout (fails on an error)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO,
                            env=TEST_ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="session")
def cifar_run_template(tmp_path_factory, cifar_small) -> Path:
    """A run folder as training writes it: ResNet-8 trained one epoch on ``cifar_small``.

    model.keras (raw-pixel input, logits), config.json, labels.txt. Tests use
    :func:`copy_run` to get a private copy.
    """
    import keras

    import keras_resnet
    from keras_resnet.pipeline import data

    template = tmp_path_factory.mktemp("template_run")
    keras.utils.set_random_seed(0)
    bundle = data.load_data("folder", data_dir=str(cifar_small), image_size=32,
                            batch_size=64, seed=0)
    model = keras_resnet.resnet(depth=8, classes=bundle.num_classes, input_shape=(32, 32, 3),
                                include_preprocessing=True, classifier_activation=None)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(bundle.train, epochs=1, verbose=0, shuffle=False)
    model.save(template / "model.keras")
    config = {"model": "resnet8", "depth": 8, "model_options": {},
              "num_classes": bundle.num_classes, "image_size": 32, "dataset": "folder",
              "data_dir": str(cifar_small), "val_fraction": 0.1, "seed": 0,
              "batch_size": 64, "learning_rate": 0.05}
    (template / "config.json").write_text(json.dumps(config, indent=1))
    (template / "labels.txt").write_text("\n".join(bundle.class_names) + "\n")
    return template


def history_rows(run_dir) -> list[dict[str, float]]:
    """A run's history.csv, one dict of floats per epoch (columns it left empty left out)."""
    with open(Path(run_dir) / "history.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def saved_layers(path) -> tuple[set, set]:
    """``({(class_name, module)}, {dtype policy JSON})`` of every layer of a .keras file."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        layers = json.loads(z.read("config.json"))["config"]["layers"]
    return ({(x["class_name"], x["module"]) for x in layers},
            {json.dumps(x["config"].get("dtype")) for x in layers})


def copy_run(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


def require_mediapipe() -> None:
    """Skips the calling test where MediaPipe Tasks cannot run, with the one-line reason
    and fix: MediaPipe not installed (it goes in with --no-deps, README), or its native
    library not loading (a slim image without libEGL.so.1 / libGLESv2.so.2)."""
    from keras_resnet.pipeline.deploy.mediapipe_tasks import unavailable

    problem = unavailable()
    if problem:
        pytest.skip(problem)


def square_of_fill(image, size):
    """(rows, cols) of the pixels of ``image`` that hold the Cutout fill, checked to form
    one axis-aligned rectangle of at most ``size`` x ``size``."""
    from keras_resnet.pipeline.data.transforms import CUTOUT_FILL

    mask = np.all(image == np.asarray(CUTOUT_FILL, image.dtype), axis=-1)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert len(rows) and len(cols), "no square of the fill"
    assert rows[-1] - rows[0] + 1 == len(rows) <= size
    assert cols[-1] - cols[0] + 1 == len(cols) <= size
    assert mask.sum() == len(rows) * len(cols), "the filled pixels are not one rectangle"
    return rows, cols


def check_only_squares_changed(before, after, size: int) -> None:
    """Each image of batch ``after`` equals the same image of ``before`` but for one square
    of the Cutout fill."""
    assert before.shape == after.shape
    for plain, cut in zip(before, after, strict=True):
        rows, cols = square_of_fill(cut, size)
        changed = np.any(plain != cut, axis=-1)
        changed[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = False
        assert not changed.any()


def check_cutout_placement(outputs, background, size: int) -> None:
    """Cutout of many images of one ``background`` value: each keeps the background but for
    one square of the fill, and the squares fall anywhere (whole inside, clipped at edges)."""
    sides, corners = set(), set()
    for got in outputs:
        rows, cols = square_of_fill(got, size)
        keep = np.ones(got.shape[:2], bool)
        keep[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = False
        assert np.all(got[keep] == background)
        sides.update((len(rows), len(cols)))
        corners.add((rows[0], cols[0]))
    assert size in sides and min(sides) <= size * 5 // 8 and len(corners) > 100


def litert_scores(content: bytes, images) -> np.ndarray:
    """Float outputs of a .tflite flatbuffer on the LiteRT interpreter."""
    from keras_resnet.pipeline.deploy.litert import LiteRTModel

    return LiteRTModel(content).predict(images)
