"""What a run computes on: the Keras backend's GPUs, the CPU and its flags, the library
versions, the machines a resumed run moved between, and what ``jit_compile=auto`` means
there.

Training and the benchmarks share these; nothing here imports TensorFlow unless the
Keras backend is TensorFlow.
"""

from __future__ import annotations

import functools
import importlib
import os
import platform
import sys
from typing import Any

import keras
import numpy as np

import keras_resnet

MACHINE_KEYS = ("accelerator", "cpu", "cpus", "keras_backend")


# CPU flags with native bfloat16 arithmetic that oneDNN uses (AMX tiles, AVX512-BF16).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = "/proc/cpuinfo"


def _cpuinfo_field(path: str, keys: tuple[str, ...]) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags(path: str = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags (the ``flags`` line of /proc/cpuinfo); empty elsewhere."""
    return frozenset((_cpuinfo_field(path, ("flags", "Features")) or "").split())


def cpu_model(path: str = CPUINFO) -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    return _cpuinfo_field(path, ("model name",)) or platform.processor() or platform.machine()


@functools.cache
def host_cpu_flags() -> frozenset[str]:
    """:func:`cpu_flags` of this machine (read once)."""
    return cpu_flags() if platform.system() == "Linux" else frozenset()


def bf16_flags(flags) -> tuple[str, ...]:
    """The flags of ``flags`` that make bfloat16 native (empty: no native bfloat16)."""
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def host_description() -> str:
    """This machine in a few words: its architecture and CPU count, e.g. "x86_64, 2 CPUs"."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


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
