"""TFDS image-classification datasets as sources: read from an already prepared data_dir.

Nothing is downloaded (offline, ``download_and_prepare`` hangs for minutes before failing):
a dataset that is not prepared is one :class:`~keras_resnet.pipeline.errors.DataError`
saying how to prepare it. Without a validation split, the tail ``val_fraction`` of train
is carved off (TFDS stores records shuffled). :mod:`keras_resnet.pipeline.data.sources` loads
this module only for TFDS datasets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re

import tensorflow as tf

from keras_resnet.pipeline.data.splits import AUTOTUNE, BUILTIN_DATASETS, Split
from keras_resnet.pipeline.errors import DataError


def _builder(name, data_dir):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - part of the training extras
        raise DataError(f"dataset {name!r} needs tensorflow-datasets ({e}); install "
                        "keras_resnet[train]") from e
    try:
        # Probing an unprepared data_dir logs absl warnings ("Variant folder ... has no
        # dataset_info.json") that would come before, and bury, the one line below.
        with _absl_warnings_off():
            builder = tfds.builder(name, data_dir=data_dir)
            prepared = builder.is_prepared()
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"dataset {name!r} is neither {', '.join(BUILTIN_DATASETS)} nor a TFDS dataset "
            "name (e.g. cifar10, cifar100, imagenette, imagenet2012)"
        ) from e
    # Offline, download_and_prepare hangs for minutes before failing, so never call it:
    # the data must already be prepared in data_dir.
    if not prepared:
        raise DataError(_preparation(builder, name))
    return builder


@contextlib.contextmanager
def _absl_warnings_off():
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _preparation(builder, name: str) -> str:
    """How to prepare a TFDS dataset that is not in data_dir, in one sentence.

    Datasets with MANUAL_DOWNLOAD_INSTRUCTIONS (imagenet2012) cannot be downloaded by
    TFDS: their files go in ``<data_dir>/downloads/manual`` first.
    """
    instructions = getattr(type(builder), "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if not instructions:
        return (f"TFDS dataset {name!r} is not prepared in {builder.data_dir} (nothing is "
                f"downloaded here); run `tfds build {name} --data_dir=DIR` where it can be "
                "downloaded and pass that DIR as data_dir")
    root = os.fspath(builder.data_dir_root)
    build = f"then run `tfds build {name} --data_dir={root}`"
    files = list(dict.fromkeys(re.findall(r"[\w.-]+\.(?:tar\.gz|tgz|tar|zip)\b",
                                          instructions)))
    if files:
        what = " and ".join([", ".join(files[:-1]), files[-1]] if len(files) > 1 else files)
        step = f"place {what} in {root}/downloads/manual"
    else:
        first = next(line.strip() for line in instructions.splitlines() if line.strip())
        step = (f"put the files its manual download instructions name (\"{first}\") in "
                f"{root}/downloads/manual")
    return (f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and TFDS cannot "
            f"download it; {step}, {build}")


def _keys(builder):
    import tensorflow_datasets as tfds

    features = builder.info.features
    keys = builder.info.supervised_keys
    if keys and len(keys) == 2 and isinstance(keys[0], str) and isinstance(keys[1], str):
        image_key, label_key = keys
    else:
        image_key = next((k for k, f in features.items()
                          if isinstance(f, tfds.features.Image)), None)
        label_key = next((k for k, f in features.items()
                          if isinstance(f, tfds.features.ClassLabel)), None)
    if (image_key not in features or label_key not in features
            or not isinstance(features[image_key], tfds.features.Image)
            or not isinstance(features[label_key], tfds.features.ClassLabel)):
        raise DataError(f"TFDS dataset {builder.name!r} is not an image-classification "
                        "dataset (it has no image feature with a class label)")
    return image_key, label_key, list(features[label_key].names)


def _split(builder, split, *, shuffle, seed=0) -> Split:
    import tensorflow_datasets as tfds

    image_key, label_key, _ = _keys(builder)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle,
                            read_config=tfds.ReadConfig(shuffle_seed=seed))
    ds = ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)),
                num_parallel_calls=AUTOTUNE)
    return Split(ds, builder.info.splits[split].num_examples, files=False)


def _val_name(builder):
    return next((s for s in ("validation", "val") if s in builder.info.splits), None)


def _carve(builder, val_fraction):
    n = builder.info.splits["train"].num_examples
    n_val = round(n * val_fraction)
    # TFDS stores records shuffled, so the tail of train is a random sample.
    return f"train[:{n - n_val}]", (f"train[{n - n_val}:]" if n_val else None)


def training_splits(name, data_dir, val_fraction, seed):
    builder = _builder(name, data_dir)
    _, _, class_names = _keys(builder)
    if "train" not in builder.info.splits:
        raise DataError(f"TFDS dataset {name!r} has no train split (it has "
                        f"{', '.join(builder.info.splits)})")
    val_name = _val_name(builder)
    train_name = "train"
    if val_name is None:
        train_name, val_name = _carve(builder, val_fraction)
        if val_fraction > 0 and val_name is None:
            logging.getLogger(__name__).warning(
                "val_fraction=%g carves no validation image from the %d training images of "
                "%s, so nothing will be validated; raise val_fraction", val_fraction,
                builder.info.splits["train"].num_examples, name)
    train = _split(builder, train_name, shuffle=True, seed=seed)
    val = _split(builder, val_name, shuffle=False) if val_name else None
    return train, val, class_names, []


def named_split(name, data_dir, split, val_fraction):
    builder = _builder(name, data_dir)
    _, _, class_names = _keys(builder)
    if split in ("train", "val") and _val_name(builder) is None:
        train_name, val_name = _carve(builder, val_fraction)
        split = train_name if split == "train" else val_name
        if split is None:
            raise DataError(f"val_fraction=0 leaves {name} without a validation split")
    elif split == "val":
        split = _val_name(builder)
    try:
        chosen = _split(builder, split, shuffle=False)
    except (KeyError, ValueError) as e:
        raise DataError(f"split={split!r} is not available for {name}; it has "
                        f"{', '.join(builder.info.splits)}") from e
    return chosen, class_names, []


def fingerprint(name, data_dir) -> dict:
    """What a TFDS dataset is: its name, version and split sizes, with their digest."""
    builder = _builder(name, data_dir)
    summary = {"kind": "tfds", "name": builder.name, "version": str(builder.version),
               "splits": {s: int(v.num_examples) for s, v in sorted(builder.info.splits.items())}}
    summary["digest"] = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()
    return summary
