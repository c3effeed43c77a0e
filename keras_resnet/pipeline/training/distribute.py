"""Distribution: which tf.distribute strategy a run uses, and who writes the run folder.

One CPU or one GPU runs the default strategy; several GPUs MirroredStrategy; a cluster
described by ``TF_CONFIG`` MultiWorkerMirroredStrategy, where only the chief writes. On
JAX, several local devices train data-parallel
(:class:`~keras_resnet.pipeline.training.jax_distribution.DataParallel`); otherwise a run on
another Keras backend (JAX, PyTorch) trains on that backend's first device
(:class:`OneDevice`). TensorFlow is not imported there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

import keras

from keras_resnet.pipeline.errors import UserError, choose
from keras_resnet.pipeline.run.config import STRATEGIES
from keras_resnet.pipeline.training import jax_distribution

if TYPE_CHECKING:
    import tensorflow as tf


class OneDevice:
    """The strategy of a run on a Keras backend other than TensorFlow: one process on the
    backend's default device (its first GPU where it has one)."""

    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


def _tf_config() -> dict:
    try:
        return json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError as e:
        raise UserError(f"TF_CONFIG is not valid JSON ({e})") from e


def _cluster_workers(config: dict) -> int:
    """Chief and worker tasks in the cluster of a parsed TF_CONFIG."""
    cluster = config.get("cluster", {})
    return sum(len(cluster.get(k, [])) for k in ("chief", "worker"))


def _chief_task(task_type: str, task_id: int, cluster: dict) -> bool:
    """The rule of tf.distribute: the "chief" task, else worker 0 of a cluster without one."""
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Picks the distribution strategy.

    "auto" is MultiWorkerMirroredStrategy when TF_CONFIG describes a cluster of several
    workers, MirroredStrategy over all visible GPUs when there is one, and the default
    (single-device) strategy otherwise. "mirrored" without GPUs mirrors over all logical
    CPU devices.

    Must run before any other TensorFlow work when a multi-worker strategy is chosen.
    On another Keras backend only "auto" and "default" exist: "auto" on JAX is
    :class:`~keras_resnet.pipeline.training.jax_distribution.DataParallel` over every local
    device where there are several, else (and "default") :class:`OneDevice`.
    """
    choose("strategy", name, STRATEGIES)
    backend = keras.config.backend()
    if backend != "tensorflow":
        if name not in ("auto", "default"):
            raise UserError(f"strategy={name} needs the TensorFlow backend; run with "
                            f"KERAS_BACKEND=tensorflow, or strategy=auto on {backend}")
        if backend == "jax":
            jax_distribution.clear()  # an earlier run of this process may have set one
            if name == "auto":
                return jax_distribution.data_parallel() or OneDevice()
        return OneDevice()
    import tensorflow as tf

    workers = _cluster_workers(_tf_config())
    if name == "auto":
        if workers > 1:
            name = "multiworker"
        else:
            # physical (not logical) devices: listing them does not initialise TF.
            name = "mirrored" if tf.config.list_physical_devices("GPU") else "default"
    if name == "multiworker":
        if workers < 1:
            raise UserError("strategy=multiworker needs TF_CONFIG describing the cluster "
                            "(cluster.worker addresses and this task's type and index)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The public tf.distribute name of ``strategy`` (its class may be an internal alias)."""
    if isinstance(strategy, OneDevice):
        return f"OneDevice ({keras.config.backend()})"
    if isinstance(strategy, jax_distribution.DataParallel):
        return strategy.name
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    name = type(strategy).__name__
    return "DefaultStrategy" if name == "_DefaultDistributionStrategy" else name


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run directory (always, unless multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return _chief_task(resolver.task_type, resolver.task_id, resolver.cluster_spec().as_dict())


def is_cluster_task() -> bool:
    """Whether TF_CONFIG makes this process one task (chief or not) of a cluster of two or
    more workers (read from the environment alone, without TensorFlow)."""
    try:
        config = _tf_config()
    except UserError:
        return False
    return _cluster_workers(config) >= 2 and bool(config.get("task", {}).get("type"))


# How long a task waits at the exit barrier for the others (the chief may still be
# writing its last checkpoint and models).
_EXIT_BARRIER_MS = 600_000


def leave_cluster(status: int) -> None:
    """Ends the process with ``status`` once every task of the cluster has got here, when
    it is a task of a cluster (:func:`is_cluster_task`); returns otherwise.

    The tasks first meet at a barrier of TensorFlow's coordination service, so that no
    task leaves while the chief still writes the run folder: the chief's service reports a
    task that has gone before the others ("The tasks have crashed") after the chief's last
    line. Then each task leaves at once, without the interpreter's teardown, in which the
    coordination service would report the others' exit and a task's heartbeat to the gone
    chief would fail. A failed barrier (a task that crashed, or a process that never
    joined the cluster) does not stop the exit. Output streams and Python log handlers are
    flushed and closed first; the run folder's files are closed by then.
    """
    if not is_cluster_task():
        return
    from tensorflow.python.eager import context  # the barrier has no tf.* name

    try:
        context.context().wait_at_barrier("keras_resnet_exit", _EXIT_BARRIER_MS)
    except Exception:  # noqa: BLE001 - leaving regardless
        pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# Signal numbers below this are agreed on (SIGINT is 2, SIGTERM 15).
_SIGNALS = 32


def agreement(strategy: tf.distribute.Strategy):
    """A function ``signum -> signum`` that gives every worker the same stop signal.

    Workers of a multi-worker run must stop at the same step (the next step's collective
    ops would wait forever for one that stopped), so each step the signal a worker received
    (none, or its number as a one-hot vector) is summed over all replicas, a small
    all-reduce beside each step's gradient all-reduce: any worker's signal stops them all
    (the highest-numbered one names it). Any other strategy runs in one process: None
    (this process's signal decides alone).
    """
    if not is_multiworker(strategy):
        return None
    import tensorflow as tf

    def any_worker(signum: int) -> int:
        local = (tf.one_hot(signum, _SIGNALS, dtype=tf.float32) if signum
                 else tf.zeros([_SIGNALS]))
        counts = strategy.reduce(tf.distribute.ReduceOp.SUM,
                                 strategy.run(lambda: tf.identity(local)), axis=None)
        received = [n for n, c in enumerate(counts.numpy()) if c > 0]
        return max(received, default=0)

    return any_worker


def is_multiworker(strategy) -> bool:
    """Whether ``strategy`` is a MultiWorkerMirroredStrategy."""
    if isinstance(strategy, OneDevice | jax_distribution.DataParallel):
        return False
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def patch_for_multiworker(model, strategy):
    """Works around two Keras 3 bugs that stop fit() under MultiWorkerMirroredStrategy.

    Both are in Keras' TensorFlow trainer (keras-team/keras#20585) and are patched on this
    model instance only:

    * before the first step Keras reduces one distributed (images, labels) batch with
      ``strategy.reduce`` to learn input shapes, which the multi-worker strategy cannot do
      for a nested batch; only shapes matter there, so this worker's first replica's batch
      is used instead;
    * it averages each step's scalar logs with ``strategy.reduce(..., axis=0)``, which
      fails on scalars; the steps here return them as length-1 vectors, which that
      reduction averages over all replicas of all workers.
    """
    import tensorflow as tf

    cls = type(model)

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    def vector_logs(step):
        def run(data):
            return {k: tf.reshape(v, [1]) for k, v in step(model, data).items()}
        return run

    model._maybe_symbolic_build = maybe_symbolic_build
    model.train_step = vector_logs(cls.train_step)
    model.test_step = vector_logs(cls.test_step)
