"""Where images come from: image folders, scikit-learn digits and TFDS datasets.

A source yields unbatched :class:`Split` elements ``(x, label)``; the pipelines in
:mod:`keras_resnet.pipeline.data` decode, transform and batch them.

* ``folder``: ``data_dir/<class>/*.jpg``, or ``data_dir/{train,val,test}/<class>/*.jpg``
  (any of the three; an evaluation set alone, ``data_dir/test/<class>``, is fine). With no
  ``val/`` folder, ``val_fraction`` of every class of ``train`` is carved off (stratified,
  a fixed function of ``seed``). Files are checked up front; unreadable ones are skipped.
  Layouts that cannot be right are refused with what was found: images but no class
  folders, a single class to train on, an empty class folder. A training class with
  under a tenth of the median class's images is a warning.
* ``digits``: scikit-learn's bundled 1,797 8x8 digits, upscaled, 3-channel 0..255 pixels.
  Every fifth image is the fixed ``test`` split; validation is carved from the rest.
* any TFDS image-classification name, read from an already prepared ``data_dir``
  (:mod:`keras_resnet.pipeline.data.tfds_sources`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence

import numpy as np

from keras_resnet.pipeline.data.splits import Split
from keras_resnet.pipeline.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DIGITS_TEST_EVERY = 5


def training_splits(dataset, data_dir, val_fraction, seed):
    """Returns (train Split, val Split or None, class_names, skipped)."""
    if dataset == "folder":
        return _folder_splits(data_dir, val_fraction, seed)
    if dataset == "digits":
        return _digits_splits(val_fraction, seed)
    from keras_resnet.pipeline.data import tfds_sources

    return tfds_sources.training_splits(dataset, data_dir, val_fraction, seed)


def named_split(dataset, data_dir, split, val_fraction, seed, class_names=None):
    """Returns (Split, class_names, skipped) of one named split.

    ``class_names`` fixes the label order of a folder dataset (e.g. a run's labels.txt).
    """
    if dataset == "folder":
        return _folder_eval_split(data_dir, split, val_fraction, seed, class_names)
    if dataset == "digits":
        if split == "test":
            x, y, names = _digits_arrays(test=True)
            return _digits_split(x, y), names, ()
        train, val, names, _ = _digits_splits(val_fraction, seed)
        return _pick(dataset, split, {"train": train, "val": val}), names, ()
    from keras_resnet.pipeline.data import tfds_sources

    return tfds_sources.named_split(dataset, data_dir, split, val_fraction)


def _pick(dataset, split, available):
    if split not in available:
        raise DataError(
            f"split={split!r} is not available for {dataset}; choose one of "
            f"{', '.join(available)}"
        )
    return available[split]


# ---- image folders


def _folder_root(data_dir) -> str:
    if not data_dir:
        raise DataError("dataset=folder needs data_dir, the folder holding one "
                        "sub-folder per class")
    root = os.path.expanduser(os.fspath(data_dir))
    if not os.path.isdir(root):
        raise DataError(f"data_dir {root} does not exist or is not a folder")
    return root


def _split_dirs(root) -> dict[str, str] | None:
    """{"train": path, "val": path, "test": path} (those present), or None for a flat
    layout (class folders directly in ``root``)."""
    dirs = {}
    for split, names in (("train", ("train",)), ("val", ("val", "validation")),
                         ("test", ("test",))):
        for name in names:
            if os.path.isdir(os.path.join(root, name)):
                dirs[split] = os.path.join(root, name)
                break
    return dirs or None


def _folder_splits(data_dir, val_fraction, seed):
    (paths, labels), val, class_names, skipped = folder_files(data_dir, val_fraction, seed)
    val = _files_split(*val) if val else None
    return _files_split(paths, labels), val, class_names, skipped


def folder_files(data_dir, val_fraction: float, seed: int):
    """The training and validation files of a folder dataset, without TensorFlow.

    The validation files are ``data_dir/val/`` (or ``validation/``) where it exists, else
    :func:`carve` takes ``val_fraction`` of every class of the training files.

    Returns:
        ((train_paths, train_labels), (val_paths, val_labels) or None, class_names,
        skipped).
    """
    root = _folder_root(data_dir)
    dirs = _split_dirs(root)
    if dirs and "train" not in dirs:
        raise DataError(f"data_dir {root} has {'/, '.join(dirs)}/ but no train/ folder; "
                        f"training needs {root}/train/<class>/ images (or class folders "
                        f"directly in {root})")
    train_root = dirs["train"] if dirs else root
    check_class_folders(train_root, data_dir=root, training=True)
    paths, labels, class_names, skipped = list_image_folder(train_root)
    _warn_small_classes(labels, class_names, train_root)
    if dirs and "val" in dirs:
        check_class_folders(dirs["val"], data_dir=root, training=False)
        vpaths, vlabels, _, vskipped = list_image_folder(dirs["val"], class_names=class_names)
        skipped += vskipped
    else:
        (paths, labels), (vpaths, vlabels) = carve(paths, labels, val_fraction, seed)
        if val_fraction > 0 and not vpaths:
            log.warning("val_fraction=%g carves no validation image from %s (too few images "
                        "per class), so nothing will be validated; add images or raise "
                        "val_fraction", val_fraction, train_root)
    _warn_skipped(skipped)
    return (paths, labels), ((vpaths, vlabels) if vpaths else None), class_names, skipped


def _folder_eval_split(data_dir, split, val_fraction, seed, class_names=None):
    """One split of a folder dataset; ``class_names`` (e.g. a run's labels.txt) fixes the
    label order, else the train/ folders do, else the split's own folders."""
    root = _folder_root(data_dir)
    dirs = _split_dirs(root) or {}
    if split not in ("train", "val", "test"):
        raise DataError(f"split={split!r} is not valid for a folder dataset; choose one of "
                        "train, val, test")
    if split in dirs and split != "train":
        check_class_folders(dirs[split], data_dir=root, training=False)
        if class_names is None and "train" in dirs:
            class_names = folder_classes(dirs["train"])
        paths, labels, class_names, skipped = list_image_folder(dirs[split],
                                                                class_names=class_names)
    elif split == "test":
        raise DataError(f"data_dir {root} has no test/ folder, so there is no test split; "
                        f"put the test images in {root}/test/<class>/ or use split=val")
    elif dirs and "train" not in dirs:
        raise DataError(f"data_dir {root} has {'/, '.join(dirs)}/ but no train/ folder, so "
                        f"there is no {split} split; use split={next(iter(dirs))}")
    else:
        # Without the run's labels, these folders define the classes, as in training.
        check_class_folders(dirs.get("train", root), data_dir=root,
                            training=class_names is None)
        paths, labels, class_names, skipped = list_image_folder(dirs.get("train", root),
                                                                class_names=class_names)
        if "val" not in dirs:
            train, val = carve(paths, labels, val_fraction, seed)
            paths, labels = train if split == "train" else val
    _warn_skipped(skipped)
    return _files_split(paths, labels), class_names, skipped


def folder_classes(root: str) -> list[str]:
    """The class sub-folder names of ``root``, sorted (the label order of a folder).

    Raises:
        DataError: a name that labels.txt and the TFLite metadata cannot hold as it is
            (leading or trailing spaces, a line break or another control character).
    """
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    for name in names:
        if name != name.strip() or not name.isprintable():
            raise DataError(f"class folder {os.path.join(root, name)!r} has a name with "
                            "leading or trailing spaces or a control character, which "
                            "labels.txt and the TFLite metadata cannot hold; rename it")
    return names


def _holds_images(folder: str) -> bool:
    return any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
               and not e.name.startswith(".") for e in os.scandir(folder))


def check_class_folders(folder: str, *, data_dir: str, training: bool) -> None:
    """Refuses a folder of one of the layouts that cannot be what was meant.

    Args:
        folder: where the class folders should be: ``data_dir`` itself, or its train/,
            val/ or test/ folder.
        data_dir: the dataset root the user gave.
        training: whether these folders define the classes (one class cannot be trained;
            an evaluation folder may hold only some of the classes).

    Raises:
        DataError: images but no class folders (``data_dir`` one level too deep, or a
            split folder without class folders), or a single class folder to train on.
    """
    classes = folder_classes(folder)
    if not classes and _holds_images(folder):
        if folder != data_dir:
            raise DataError(f"{folder} holds images but no class folders; put them in "
                            f"{folder}/<class>/, one folder per class")
        parent = os.path.dirname(os.path.normpath(folder))
        if len(folder_classes(parent)) >= 2:
            fix = f"(here probably {parent})"
        else:
            fix = f"(or put the images in {folder}/<class>/, one folder per class)"
        raise DataError(f"data_dir {folder} holds images but no class folders; point "
                        f"data_dir at the folder whose subfolders are the classes {fix}")
    if training and len(classes) == 1:
        only = os.path.join(folder, classes[0])
        subject = f"data_dir {folder}" if folder == data_dir else folder
        if len(folder_classes(only)) >= 2 and not _holds_images(only):
            raise DataError(f"{subject} has one folder, {classes[0]}/, whose subfolders "
                            f"look like the classes; point data_dir at {only}")
        raise DataError(f"{subject} has only one class folder, {classes[0]}/, and a "
                        "classifier needs two or more; add a folder per class next to it "
                        "or point data_dir at the folder whose subfolders are the classes")


def _warn_small_classes(labels: Sequence[int], class_names: Sequence[str], root: str):
    """Warns about training classes with under a tenth of the median class's images."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    median = float(np.median(counts))
    small = [(name, int(n)) for name, n in zip(class_names, counts, strict=True)
             if n < 0.1 * median]
    if small:
        shown = ", ".join(f"{name} ({n})" for name, n in small[:5])
        more = f" and {len(small) - 5} more" if len(small) > 5 else ""
        log.warning("class folder(s) %s%s in %s hold under 10%% of the median class's %d "
                    "images; such a class is barely learned: add images or drop it",
                    shown, more, root, round(median))


def list_image_folder(root: str, *, class_names: Sequence[str] | None = None,
                      check_images: bool = True):
    """Lists ``root/<class>/**/<image>`` files.

    Args:
        root: folder with one sub-folder per class.
        class_names: the label order to use (e.g. the training split's); a sub-folder not
            in it is an error. Default: the sorted sub-folder names.
        check_images: cheaply check every file (non-empty, a known image signature, and
            for JPEG/PNG/GIF the end-of-image marker present) so truncated or mislabelled
            files are skipped up front instead of failing inside tf.data.

    Returns:
        (paths, labels, class_names, skipped): sorted paths, int labels, the class names
        and the skipped files.

    Raises:
        DataError: no class folders, an unknown class, or a class with no usable image.
    """
    found = folder_classes(root)
    if not found:
        raise DataError(
            f"{root} has no class sub-folders; expected {root}/<class>/<image>.jpg (or "
            "train/, val/, test/ folders that each hold class folders)"
        )
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DataError(f"{root} has class folders {unknown} that the training split "
                            "does not have")
    class_names = list(class_names)
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue  # a validation/test folder may lack a class
        files = class_files(folder)
        if not files:
            raise DataError(
                f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add its images or remove the folder"
            )
        paths += files
        labels += [label] * len(files)
    skipped = []
    if check_images:
        ok = _check_files(paths)
        skipped = [p for p, good in zip(paths, ok, strict=True) if not good]
        paths = [p for p, good in zip(paths, ok, strict=True) if good]
        labels = [lab for lab, good in zip(labels, ok, strict=True) if good]
        have = set(labels)
        for label, name in enumerate(class_names):
            if label not in have and os.path.isdir(os.path.join(root, name)):
                raise DataError(f"class folder {os.path.join(root, name)} has no readable "
                                "image (all are empty, truncated or not images)")
    return paths, labels, class_names, skipped


def class_files(folder: str) -> list[str]:
    """The image files of one class folder (sub-folders included; hidden ones left out),
    sorted: the files a folder dataset reads."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return files


def _image_file_ok(path: str) -> bool:
    """Whether a file looks like a whole image: known signature and end marker."""
    try:
        size = os.path.getsize(path)
        if size < 16:
            return False
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 4096))
            tail = f.read()
    except OSError:
        return False
    if head.startswith(b"\xff\xd8"):
        # Entropy-coded JPEG data escapes 0xFF, so FFD9 only appears as end-of-image;
        # allow trailing padding after it.
        return b"\xff\xd9" in tail
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" in tail[-64:]
    if head.startswith((b"GIF87a", b"GIF89a")):
        return b"\x3b" in tail[-16:]
    if head.startswith(b"BM"):
        return int.from_bytes(head[2:6], "little") <= size
    return False


def _check_files(paths: list[str]) -> list[bool]:
    # Checks are I/O bound (two small reads per file), so threads overlap the waits.
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(_image_file_ok, paths, chunksize=256))


def _warn_skipped(skipped):
    if skipped:
        log.warning("skipped %d unreadable, empty or truncated image file(s), e.g. %s",
                    len(skipped), skipped[0])


def carve(paths: Sequence, labels: Sequence[int], val_fraction: float, seed: int):
    """Splits off ``val_fraction`` of every class, as a fixed function of ``seed``.

    Returns:
        ((train_paths, train_labels), (val_paths, val_labels)), each in input order.
    """
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels_arr), dtype=bool)
    for label in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == label)
        n_val = min(round(len(idx) * val_fraction), len(idx) - 1)
        if n_val > 0:
            is_val[rng.permutation(idx)[:n_val]] = True

    def take(mask):
        return [paths[i] for i in np.flatnonzero(mask)], labels_arr[mask].tolist()

    return take(~is_val), take(is_val)


def _files_split(paths, labels) -> Split:
    import tensorflow as tf

    encoded = sum(os.path.getsize(p) for p in paths) if len(paths) <= 200_000 else 0
    elements = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))
    return Split(elements, len(paths), files=True, encoded_bytes=encoded)


# ---- digits


def _digits_arrays(*, test: bool):
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    index = np.arange(len(digits.target))
    keep = (index % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1) == test
    # 0..16 ink levels to 0..255 grey, repeated over RGB.
    images = np.round(digits.images[keep] * (255.0 / 16.0)).astype("uint8")[..., None]
    images = np.repeat(images, 3, axis=-1)
    return images, digits.target[keep].astype("int32"), [str(d) for d in range(10)]


def _digits_split(images, labels) -> Split:
    import tensorflow as tf

    elements = tf.data.Dataset.from_tensor_slices((images, labels))
    return Split(elements, len(labels), files=False, flip=False, small_style=True)


def _digits_splits(val_fraction, seed):
    images, labels, names = _digits_arrays(test=False)
    (tr, tr_y), (va, va_y) = carve(np.arange(len(labels)), labels, val_fraction, seed)
    train = _digits_split(images[tr], np.asarray(tr_y, "int32"))
    val = _digits_split(images[va], np.asarray(va_y, "int32")) if va else None
    return train, val, names, []


# ---- fingerprints: what data a run saw


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a dataset's training data is, to tell later whether it is still the same.

    Attributes:
        summary: ``{"kind", "digest", ...}``: for a folder the image count and the count per
            class; for TFDS the name, version and split sizes (stored in config.json).
        files: for a folder, one ``"<path relative to data_dir>\\t<bytes>"`` line per image
            file of the training (and validation) folders, sorted; the digest is theirs.
    """

    summary: dict
    files: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return self.summary["digest"]


def fingerprint(dataset: str, data_dir: str | None) -> Fingerprint:
    """The fingerprint of the data a run of ``dataset`` trains and validates on: for a
    folder every image file of its training (and validation) folders with its size, for
    TFDS the dataset's name, version and split sizes.

    Raises:
        DataError: as listing the dataset for training does.
    """
    if dataset == "folder":
        return _folder_fingerprint(_folder_root(data_dir))
    if dataset == "digits":
        images, labels, _ = _digits_arrays(test=False)
        digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
        return Fingerprint({"kind": "digits", "images": len(labels), "digest": digest})
    if dataset == "synthetic":
        return Fingerprint({"kind": "synthetic", "digest": "synthetic"})
    from keras_resnet.pipeline.data import tfds_sources

    return Fingerprint(tfds_sources.fingerprint(dataset, data_dir))


def _folder_fingerprint(root: str) -> Fingerprint:
    dirs = _split_dirs(root) or {}
    roots = [dirs.get("train", root)] + ([dirs["val"]] if "val" in dirs else [])
    lines, classes = [], {}
    for top in roots:
        if not os.path.isdir(top):
            continue
        for name in sorted(e.name for e in os.scandir(top)
                           if e.is_dir() and not e.name.startswith(".")):
            files = class_files(os.path.join(top, name))
            classes[name] = classes.get(name, 0) + len(files)
            for path in files:
                size = os.path.getsize(path)
                lines.append(f"{os.path.relpath(path, root)}\t{size}")
    lines.sort()
    digest = hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()
    return Fingerprint({"kind": "folder", "images": len(lines), "classes": classes,
                        "digest": digest}, tuple(lines))


def describe_change(recorded: dict, recorded_files: Sequence[str] | None,
                    current: Fingerprint) -> str:
    """What changed from a recorded fingerprint to ``current``, in a few words: images
    added, removed and changed per class for a folder, else the recorded and current
    values."""
    if recorded.get("kind") != current.summary.get("kind"):
        return f"it was {recorded.get('kind')} data, it is {current.summary.get('kind')} now"
    if current.summary["kind"] != "folder":
        keys = sorted(k for k in set(recorded) | set(current.summary)
                      if k != "digest" and recorded.get(k) != current.summary.get(k))
        return "; ".join(f"{k} {recorded.get(k)} -> {current.summary.get(k)}"
                         for k in keys) or "its contents differ"
    if recorded_files is None:
        old, new = recorded.get("classes", {}), current.summary["classes"]
        counts = [f"{c} {old.get(c, 0)} -> {new.get(c, 0)}" for c in sorted(set(old) | set(new))
                  if old.get(c, 0) != new.get(c, 0)]
        return ("images per class " + ", ".join(counts[:8])
                + (f" and {len(counts) - 8} more" if len(counts) > 8 else "")
                if counts else "the same number of images per class, other files")
    before = dict(line.rsplit("\t", 1) for line in recorded_files)
    after = dict(line.rsplit("\t", 1) for line in current.files)
    parts = []
    for what, paths in (("added", after.keys() - before.keys()),
                        ("removed", before.keys() - after.keys()),
                        ("changed", {p for p in before.keys() & after.keys()
                                     if before[p] != after[p]})):
        if paths:
            per_class = collections.Counter(_class_of(p) for p in paths)
            shown = ", ".join(f"{c} {n}" for c, n in sorted(per_class.items())[:8])
            more = f" and {len(per_class) - 8} more classes" if len(per_class) > 8 else ""
            parts.append(f"{len(paths)} image(s) {what} ({shown}{more})")
    return "; ".join(parts) or "its contents differ"


def _class_of(relative: str) -> str:
    """The class of a fingerprint line's path: the folder under train/ or val/, else the
    first folder."""
    parts = relative.split(os.sep)
    return parts[1] if len(parts) > 2 and parts[0] in ("train", "val", "validation") else parts[0]
