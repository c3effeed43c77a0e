"""Shared fixtures: real CIFAR-10 images from ../shared, extracted once per session."""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
# The tools are scripts, not a package: tests import them (and their _cli helper) by name.
sys.path.insert(0, str(REPO / "tools"))
CIFAR_TAR = Path(
    os.environ.get("KERAS_RESNET_CIFAR_TAR", REPO.parent / "shared/datasets/cifar10/train.tar.gz")
)
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
