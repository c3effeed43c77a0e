"""Weights: keras.applications' published ImageNet files, the weights shipped inside this
package (``weights="cifar10"``), and local files.

keras.applications stores its ResNet weights as legacy HDF5 files keyed by layer name.
Our layers carry the same names, so one name-based mapping serves the published files,
the shipped files (written by :func:`save_by_name`), a keras.applications model in memory
and a Keras 2 (tf_keras) twin of a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# The usual CIFAR-10 label order (label ids 0..9).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Weights shipped inside the package (``keras_resnet/pretrained/``).

    Attributes:
        file: the name-keyed HDF5 file (see :func:`save_by_name`).
        sha256: its checksum, checked on every load.
        classes: class names of the top, in output order.
        image_size: the side of the square images it was trained on.
        card: the JSON model card next to it (recipe, command, accuracy, machine).
    """

    file: str
    sha256: str
    classes: tuple[str, ...]
    image_size: int
    card: str

    @property
    def path(self) -> Path:
        return PRETRAINED_DIR / self.file


# variant -> weights name -> shipped weights. Models take raw 0..255 RGB pixels
# (include_preprocessing=True) and were trained by tools/train.py; see README.md.
PRETRAINED: dict[str, dict[str, Pretrained]] = {
    "resnet20": {"cifar10": Pretrained(
        file="resnet20_cifar10.h5",
        sha256="417f0d9b63f8f78ecae92d58caee66b19d17fb38596791100d99c7b42c90aa34",
        classes=CIFAR10_CLASSES, image_size=32, card="resnet20_cifar10.json")},
    "resnet32": {"cifar10": Pretrained(
        file="resnet32_cifar10.h5",
        sha256="824b09f662ae910fd50f504c4a2eb393065e8acdbbc89a4cf12fb4f1c8c31158",
        classes=CIFAR10_CLASSES, image_size=32, card="resnet32_cifar10.json")},
    "resnet44": {"cifar10": Pretrained(
        file="resnet44_cifar10.h5",
        sha256="198aaf2893f536a7d40806cdc342df2bab4057c91d34d6e566bdb9f352b5a736",
        classes=CIFAR10_CLASSES, image_size=32, card="resnet44_cifar10.json")},
    "resnet56": {"cifar10": Pretrained(
        file="resnet56_cifar10.h5",
        sha256="341d04a0b14204a8661011da11c39e1da17631724dfa1a1113e281b1fcfa07e0",
        classes=CIFAR10_CLASSES, image_size=32, card="resnet56_cifar10.json")},
}

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


def check_imagenet(variant: str, *, include_top: bool, classes: int | None,
                   argument: str = "weights") -> None:
    """Validates a weights="imagenet" request (``argument`` names it) before any build."""
    if variant not in IMAGENET_WEIGHTS:
        raise ValueError(
            f"{argument}='imagenet' is not available for {variant}; it exists for "
            f"{', '.join(IMAGENET_WEIGHTS)} (use {argument}=None or a file path)"
        )
    if include_top and classes not in (None, 1000):
        raise ValueError(
            f"{argument}='imagenet' with include_top=True needs classes=1000, got {classes}; "
            "pass include_top=False to put a new head on the ImageNet backbone"
        )


def pretrained(variant: str, name: str) -> Pretrained | None:
    """The shipped weights ``name`` of ``variant``, or None."""
    return PRETRAINED.get(variant, {}).get(name)


def pretrained_names() -> tuple[str, ...]:
    return tuple(sorted({name for entries in PRETRAINED.values() for name in entries}))


def check_pretrained(variant: str, name: str, *, include_top: bool, classes: int | None,
                     include_preprocessing: bool | None) -> Pretrained:
    """Validates a request for shipped weights before anything is built."""
    entry = pretrained(variant, name)
    if entry is None:
        have = [v for v, entries in PRETRAINED.items() if name in entries]
        raise ValueError(f"weights={name!r} is not available for {variant}; it exists for "
                         f"{', '.join(have) or 'no variant'}")
    if include_top and classes not in (None, len(entry.classes)):
        raise ValueError(f"weights={name!r} with include_top=True needs classes="
                         f"{len(entry.classes)}, got {classes}; pass include_top=False to "
                         "put a new head on the pretrained backbone")
    if include_preprocessing is False:
        raise ValueError(f"weights={name!r} were trained on raw 0..255 pixels with the "
                         "normalisation inside the model; leave include_preprocessing unset "
                         "(or True)")
    return entry


def load_pretrained(model, entry: Pretrained) -> int:
    """Loads shipped weights after checking their sha256; returns the layers set."""
    try:
        content = entry.path.read_bytes()
    except OSError as e:
        raise ValueError(f"shipped weights {entry.path} cannot be read ({e.strerror}); "
                         "reinstall keras_resnet") from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != entry.sha256:
        raise ValueError(f"shipped weights {entry.path} have sha256 {digest[:12]}..., "
                         f"expected {entry.sha256[:12]}...; the file is damaged: reinstall "
                         "keras_resnet")
    return load_h5_by_name(model, entry.path)


def save_by_name(model, path, *, dtype: str = "float16") -> str:
    """Writes a model's weights as an HDF5 file keyed by layer name; returns its sha256.

    The layout is keras.applications' (``/<layer>/<weight>``, ``weight_names`` attributes),
    so :func:`load_h5_by_name` reads it into any model with the same layer names, with or
    without the top. Weights are stored as ``dtype`` (float16 halves the file).
    """
    import h5py

    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers
                                  if layer.weights]
        for layer in model.layers:
            if not layer.weights:
                continue
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{w.path.split('/')[-1]}:{i}"
                     for i, w in enumerate(layer.weights)]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, value in zip(names, layer.get_weights(), strict=True):
                group.create_dataset(name, data=np.asarray(value).astype(dtype))
    os.replace(tmp, path)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_card(entry: Pretrained) -> dict:
    """The model card of shipped weights (how they were trained and what they reach)."""
    return json.loads((PRETRAINED_DIR / entry.card).read_text())


def shipped_weights() -> list[dict]:
    """Every set of weights shipped in this package, one record each, from the model cards.

    Each record names the ``variant`` and the ``weights`` value that loads it, the
    dataset and classes, the file (name, sha256, bytes, storage dtype), how it was trained
    (recipe, ``recipe_changes``: the options that differ from the recipe, epochs, training
    images, the command, seconds, the CPU and the ``accelerator``, None without a GPU, and
    ``machines``: each machine a resumed run moved to, with its first epoch) and
    ``top1``: the validation top-1 of the float model and of its QAT and PTQ int8
    ``.tflite`` files, each plain and with flip test-time augmentation (``"float"``,
    ``"float_flip"``, ``"qat_int8"``, ...; None where not measured).

    Examples:
        >>> [(w["variant"], w["top1"]["float"]) for w in keras_resnet.shipped_weights()]
    """
    records = []
    for variant, entries in PRETRAINED.items():
        for name, entry in entries.items():
            card = read_card(entry)
            training = card.get("training", {})
            scores = card.get("accuracy", {})
            top1 = {}
            for key in ("float", "qat_int8", "ptq_int8"):
                top1[key] = scores.get(key, {}).get("top1")
                top1[f"{key}_flip"] = scores.get(key, {}).get("top1_flip")
            records.append({
                "variant": variant, "weights": name, "dataset": name,
                "classes": entry.classes, "image_size": entry.image_size,
                "file": entry.file, "sha256": entry.sha256, "bytes": card.get("bytes"),
                "dtype": card.get("dtype"), "recipe": training.get("recipe"),
                "recipe_changes": training.get("recipe_changes"),
                "epochs": training.get("epochs"), "train_images": training.get(
                    "train_images"), "command": card.get("command"),
                "training_time_s": training.get("wall_time_s"), "cpu": training.get("cpu"),
                "accelerator": training.get("accelerator"),
                "machines": training.get("machines"),
                "top1": top1, "sizes": {k: v.get("bytes") for k, v in scores.items()},
            })
    return records


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
    try:
        return keras.utils.get_file(fname, BASE_URL + fname, cache_subdir="models",
                                    cache_dir=cache_dir,
                                    file_hash=top_hash if include_top else notop_hash)
    except Exception as e:  # noqa: BLE001 - urllib, OS and hash errors: one sentence each
        cache = (os.path.join(cache_dir, "models") if cache_dir
                 else "~/.keras/models ($KERAS_HOME/models where KERAS_HOME is set)")
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not download the ImageNet weights of {variant} from "
                         f"{BASE_URL + fname} ({reason[:200]}); check the network "
                         f"connection, or put {fname} in {cache}") from None


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
                   source: str, skip: Sequence[str] = ()) -> int:
    """Sets every weighted layer of ``model`` (but those named in ``skip``) from
    ``lookup(layer_name)``.

    Raises if a layer is missing from the source or a shape differs, naming the layer:
    a silently half-loaded network is worse than an error. Returns the layers set.
    """
    count = 0
    for layer in model.layers:
        if not layer.weights or layer.name in skip:
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


def transfer_weights(source_model, target_model, *, skip: Sequence[str] = ()) -> int:
    """Copies weights layer by layer by name (Keras 3 <-> keras.applications <-> tf_keras).

    Layers of the target named in ``skip`` (e.g. a new head, "predictions") keep theirs.
    """
    by_name = {layer.name: layer for layer in source_model.layers}

    def lookup(name):
        layer = by_name.get(name)
        return None if layer is None else layer.get_weights()

    return assign_by_name(target_model, lookup, source=f"model {source_model.name!r}",
                          skip=skip)


def weight_shapes(model) -> dict[str, list[tuple[int, ...]]]:
    """Layer name -> weight shapes, for every layer that has weights."""
    return {layer.name: [tuple(w.shape) for w in layer.weights]
            for layer in model.layers if layer.weights}


def mismatch(model, reference, *, ignore: Sequence[str] = ()) -> str | None:
    """How ``model``'s weighted layers differ from ``reference``'s, or None when they agree.

    Names and weight shapes are compared (layers named in ``ignore`` are left out); the
    answer completes a sentence about ``model``: "has layer(s) ... that <reference> lacks",
    "lacks layer(s) ..." or "layer ... has weight shapes ..., expected ...".
    """
    got = {k: v for k, v in weight_shapes(model).items() if k not in ignore}
    want = {k: v for k, v in weight_shapes(reference).items() if k not in ignore}
    extra = sorted(set(got) - set(want))
    if extra:
        return f"has layer(s) {', '.join(extra[:3])} that {reference.name} lacks"
    missing = sorted(set(want) - set(got))
    if missing:
        return f"lacks layer(s) {', '.join(missing[:3])}"
    for name in want:
        if got[name] != want[name]:
            return f"layer {name!r} has weight shapes {got[name]}, expected {want[name]}"
    return None


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
            # Stored in float16 or float32; layers take their own dtype.
            return [np.asarray(group[n]).astype("float32") for n in names]

        return assign_by_name(model, lookup, source=f"weights file {os.fspath(path)!r}")
