"""Every local device on the JAX backend: Keras' ``DataParallel`` distribution, the JAX
counterpart of tf.distribute's MirroredStrategy.

The variables are replicated on every device and each global batch is split along its
first axis, one share per device; XLA compiles one program over all devices (SPMD), so
gradients are summed across devices and BatchNormalization's batch statistics are those
of the whole global batch (synchronised, unlike MirroredStrategy's per-replica
statistics): a run on several devices computes what a run on one device computes, up to
the order of floating-point sums. The global batch must divide evenly over the devices.

Keras reads its distribution from a process-wide setting (in ``fit``, ``evaluate`` and
when variables are created), so :class:`DataParallel` sets it when made; this module
imports neither TensorFlow nor, until a strategy is made, JAX.

Example:
    >>> strategy = data_parallel()  # None with one device
    >>> strategy.num_replicas_in_sync, strategy.name
    (2, 'DataParallel (jax, 2 devices)')
"""

from __future__ import annotations

import contextlib

import keras


class DataParallel:
    """A run's strategy over the JAX backend's local devices (``devices``: Keras device
    names such as "gpu:0"), with the interface training uses of a tf.distribute strategy:
    ``num_replicas_in_sync`` and ``scope()``."""

    def __init__(self, devices: list[str]):
        self.devices = list(devices)
        self.distribution = keras.distribution.DataParallel(devices=self.devices)
        # fit, evaluate and variable creation read the process-wide distribution.
        keras.distribution.set_distribution(self.distribution)

    @property
    def num_replicas_in_sync(self) -> int:
        return len(self.devices)

    @property
    def name(self) -> str:
        return f"DataParallel ({keras.config.backend()}, {len(self.devices)} devices)"

    def scope(self):
        return contextlib.nullcontext()  # the distribution is set for the process


def local_devices() -> list[str]:
    """Keras names of the JAX backend's local devices of its default platform (its GPUs
    where it has any; ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` makes N CPU
    devices)."""
    return list(keras.distribution.list_devices())


def data_parallel() -> DataParallel | None:
    """A :class:`DataParallel` over every local device, or None where there is one."""
    devices = local_devices()
    return DataParallel(devices) if len(devices) > 1 else None


def clear() -> None:
    """Removes the process-wide distribution (a run on one device follows)."""
    keras.distribution.set_distribution(None)


def replicas() -> int:
    """Devices the process-wide distribution splits each batch over (1: none set)."""
    distribution = keras.distribution.distribution()
    return 1 if distribution is None else int(distribution.device_mesh.devices.size)
