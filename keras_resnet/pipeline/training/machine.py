"""What a run computes on: the Keras backend's GPUs, the library versions, the machines a
resumed run moved between, and what ``jit_compile=auto`` means there.

Training and the benchmarks share these; nothing here imports TensorFlow unless the
Keras backend is TensorFlow.
"""

from __future__ import annotations

import functools
import importlib
import platform
import sys
from typing import Any

import keras
import numpy as np

import keras_resnet

MACHINE_KEYS = ("accelerator", "cpu", "cpus", "keras_backend")


def set_random_seed(seed: int) -> None:
    """``keras.utils.set_random_seed`` without loading TensorFlow on another backend.

    Keras seeds TensorFlow too wherever it is installed, which imports it (seconds, memory,
    and its C++ start-up lines on stderr) in a JAX or PyTorch run that never uses it. There
    TensorFlow is kept out of the call unless something imported it already: Keras then
    sees it as not installed and seeds Python, NumPy, its own generators and torch.
    """
    if keras.config.backend() == "tensorflow" or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    sys.modules["tensorflow"] = None  # an import of it raises ImportError
    try:
        keras.utils.set_random_seed(seed)
    finally:
        del sys.modules["tensorflow"]


def accelerator(backend: str | None = None) -> str | None:
    """The GPUs ``backend`` (default: the Keras backend) computes on, e.g. "NVIDIA H200"
    or "2 x NVIDIA A100" (None: the CPU)."""
    return _accelerator(backend or keras.config.backend())


@functools.cache  # a process keeps its devices; layers ask at every trace
def _accelerator(backend: str) -> str | None:
    if backend == "tensorflow":
        import tensorflow as tf

        names = [tf.config.experimental.get_device_details(gpu).get("device_name", "GPU")
                 for gpu in tf.config.list_physical_devices("GPU")]
    elif backend == "jax":
        import jax

        names = [d.device_kind for d in jax.devices() if d.platform == "gpu"]
    elif backend == "torch":
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        names = []
    if not names:
        return None
    return names[0] if len(names) == 1 else f"{len(names)} x {names[0]}"


def default_jit(backend: str, *, gpu: bool, replicas: int = 1) -> bool:
    """What ``jit_compile=auto`` means: XLA on JAX always (op by op, JAX is many times
    slower; Keras' own "auto"), on TensorFlow with one GPU replica, never on PyTorch
    (Keras' "auto" there: no torch.compile)."""
    if backend == "jax":
        return True
    if backend == "torch":
        return False
    return gpu and replicas == 1


def versions() -> dict[str, str]:
    """Versions of the libraries a run depends on (recorded in config.json)."""
    backend = keras.config.backend()
    out = {"python": platform.python_version(), "keras_resnet": keras_resnet.__version__,
           "keras": keras.__version__, "keras_backend": backend, "numpy": np.__version__}
    names = {"tensorflow": ("tensorflow", "tensorflow_datasets"), "jax": ("jax", "jaxlib"),
             "torch": ("torch",)}.get(backend, ())
    for name in names:
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:  # pragma: no cover
            pass
    return out


def machine_of(config: dict[str, Any]) -> dict[str, Any]:
    """The machine a config.json (or the record being written) names: its
    :data:`MACHINE_KEYS`; a record without a backend is TensorFlow's."""
    return {"accelerator": config.get("accelerator"), "cpu": config.get("cpu"),
            "cpus": config.get("cpus"),
            "keras_backend": (config.get("versions") or {}).get("keras_backend",
                                                                "tensorflow")}


def machines(record: dict[str, Any], previous: dict[str, Any] | None,
             state: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The machines a run trained on, oldest first, each with the epoch it started at.

    A run resumed on another machine (or backend) appends this one; ``previous`` is the
    run's config.json before this process, ``state`` its checkpoint state. A config.json
    from before this record counts as one machine from epoch 1.
    """
    here = machine_of(record)
    if not previous:
        return [{**here, "from_epoch": 1}]
    earlier = previous.get("machines") or [{**machine_of(previous), "from_epoch": 1}]
    if {key: earlier[-1].get(key) for key in MACHINE_KEYS} == here:
        return earlier
    return [*earlier, {**here, "from_epoch": (state or {}).get("epoch", 0) + 1}]
