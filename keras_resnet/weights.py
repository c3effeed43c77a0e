"""Loading weights: keras.applications' published ImageNet files and local files.

keras.applications stores its ResNet weights as legacy HDF5 files keyed by layer name.
Our layers carry the same names, so one name-based mapping serves the published files,
a keras.applications model in memory and a Keras 2 (tf_keras) twin of a model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
# variant -> (md5 of the file with top, md5 of the file without top), as keras.applications.
IMAGENET_WEIGHTS = {
    "resnet50": ("2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"),
    "resnet101": ("f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21"),
    "resnet152": ("100835be76be38e30d865e96f2aaae62", "ee4c566cf9a93f14d82f913c2dc6dd0c"),
    "resnet50v2": ("3ef43a0b657b3be2300d5770ece849e0", "fac2f116257151a9d068a22e544a4917"),
    "resnet101v2": ("6343647c601c52e1368623803854d971", "c0ed64b8031c3730f411d2eb4eea35b5"),
    "resnet152v2": ("a49b44d1979771252814e80f8ec446f9", "ed17cf2e0169df9d443503ef94b23b33"),
}


def check_imagenet(variant: str, *, include_top: bool, classes: int | None) -> None:
    """Validates a weights="imagenet" request before anything is built."""
    if variant not in IMAGENET_WEIGHTS:
        raise ValueError(
            f"weights='imagenet' is not available for {variant}; it exists for "
            f"{', '.join(IMAGENET_WEIGHTS)} (use weights=None or a file path)"
        )
    if include_top and classes not in (None, 1000):
        raise ValueError(
            f"weights='imagenet' with include_top=True needs classes=1000, got {classes}; "
            "pass include_top=False to put a new head on the ImageNet backbone"
        )


def check_path(weights) -> None:
    if not isinstance(weights, str | os.PathLike) or not os.path.isfile(weights):
        raise ValueError(
            f"weights={weights!r} is neither None, 'imagenet' nor an existing weights file"
        )


def imagenet_file(variant: str, *, include_top: bool, cache_dir: str | None = None) -> str:
    """Downloads (once, then cached under ~/.keras/models) and md5-checks a weights file."""
    import keras

    top_hash, notop_hash = IMAGENET_WEIGHTS[variant]
    suffix = "" if include_top else "_notop"
    fname = f"{variant}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
    return keras.utils.get_file(fname, BASE_URL + fname, cache_subdir="models",
                                cache_dir=cache_dir,
                                file_hash=top_hash if include_top else notop_hash)


def load_imagenet(model, variant: str, *, include_top: bool) -> None:
    load_h5_by_name(model, imagenet_file(variant, include_top=include_top))


def load_file(model, path) -> None:
    """Loads a local weights file.

    ``.keras`` and ``.weights.h5`` files (Keras 3, matched by layer order) go through
    Keras; any other ``.h5`` is a legacy file matched by layer name.
    """
    path = os.fspath(path)
    if path.endswith((".keras", ".weights.h5")):
        model.load_weights(path)
    elif path.endswith((".h5", ".hdf5")):
        load_h5_by_name(model, path)
    else:
        raise ValueError(f"weights={path!r}: expected a .keras, .weights.h5 or .h5 file")


# Frozen layers whose values the builder sets (input normalisation): a source without them,
# such as keras.applications' files, leaves them as built.
BUILDER_CONSTANTS = ("preprocess",)


def assign_by_name(model, lookup: Callable[[str], Sequence[np.ndarray] | None], *,
                   source: str) -> int:
    """Sets every weighted layer of ``model`` from ``lookup(layer_name)``.

    Raises if a layer is missing from the source or a shape differs, naming the layer:
    a silently half-loaded network is worse than an error. Returns the layers set.
    """
    count = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        arrays = lookup(layer.name)
        if arrays is None and layer.name in BUILDER_CONSTANTS:
            continue
        if arrays is None:
            raise ValueError(f"{source} has no weights for layer {layer.name!r}")
        arrays = list(arrays)
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(a.shape) for a in arrays]
        if expected != got:
            raise ValueError(
                f"{source}: layer {layer.name!r} expects weight shapes {expected}, "
                f"the source has {got}"
            )
        layer.set_weights(arrays)
        count += 1
    return count


def transfer_weights(source_model, target_model) -> int:
    """Copies weights layer by layer by name (Keras 3 <-> keras.applications <-> tf_keras)."""
    by_name = {layer.name: layer for layer in source_model.layers}

    def lookup(name):
        layer = by_name.get(name)
        return None if layer is None else layer.get_weights()

    return assign_by_name(target_model, lookup, source=f"model {source_model.name!r}")


def load_h5_by_name(model, path) -> int:
    """Loads a legacy (Keras 2 / keras.applications) HDF5 file by layer name."""
    import h5py

    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f

        def lookup(name):
            if name not in root:
                return None
            group = root[name]
            names = [n.decode() if isinstance(n, bytes) else n
                     for n in group.attrs.get("weight_names", [])]
            return [np.asarray(group[n]) for n in names]

        return assign_by_name(model, lookup, source=f"weights file {os.fspath(path)!r}")
