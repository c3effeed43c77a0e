"""Training images resident on the accelerator, augmented inside the compiled training
step, several steps per host call: the training input of runs on the JAX backend.

The in-memory input of other backends (:mod:`keras_resnet.pipeline.data.arrays`) gathers,
crops and flips every batch on the host with NumPy and feeds ``fit`` one batch at a time:
on a GPU the host's step loop, not the device, then bounds small nets. Here the decoded
uint8 training images and their labels are put on the device once (CIFAR-10's 45,000
images take 138 MiB), and one jitted call runs up to :data:`STEPS_PER_CALL` training
steps: each step gathers its batch by index, augments it (zero-pad by size/8, random crop
back, random horizontal flip, He et al. 2015 §4.2; then Cutout where asked, DeVries &
Taylor 2017), and runs the model's own ``train_step`` (loss, weight decay, optimizer,
metrics), all on the device. The host only sends the batch indices of each call (a few
KiB) and hands each call's logs to the callbacks.

Every random draw is a pure function of ``(seed, epoch, batch)`` (``jax.random`` keys
folded from them, partitionable: the same draws on one device or several), and epoch
k's image order is :meth:`ArrayBundle.epoch_order`'s, so a run resumed at any step sees
exactly the batches an uninterrupted run sees. The draws are not those of the NumPy
stream or of tf.data; the distributions are the same (tested).

Why a loop of its own rather than Keras' ``steps_per_execution``: on JAX that option
calls the jitted single step once per batch from a Python loop (one dispatch and one
host-to-device copy per step); it only calls the callbacks less often. Here one dispatch
covers many steps and no batch crosses from the host. The loop keeps ``fit``'s contract
with the callbacks of :mod:`keras_resnet.pipeline.training.callbacks`: ``on_train_batch_end``
after every call with the call's last step index and logs (the epoch's running means,
as Keras' own), validation through ``model.evaluate``, ``on_epoch_end`` with the epoch's
metrics, and ``model.stop_training``; the logs reach the callbacks as device arrays
(Keras' ``CallbackList`` converts them to floats, which waits for every step). Calls end
where the run checkpoints
(``checkpoint_every``) and at epoch ends. A call stops early at the first step whose loss
is not finite, and says how many steps it ran (``steps_run``), so the NaN guard names
that very step. Augmentation lives only in the training loop: the model stays the stock
functional graph, and saved models never contain it.

Example:
    >>> arrays_bundle = arrays.load_arrays("folder", data_dir="cifar10/train",
    ...                                    image_size=32, batch_size=128)
    >>> bundle = to_device(arrays_bundle)
    >>> bundle.epochs(0).fit(model, epochs=2, steps_per_epoch=bundle.steps_per_epoch(128))
"""

from __future__ import annotations

import time

import keras
import numpy as np

from keras_resnet.pipeline.data.arrays import ArrayBundle
from keras_resnet.pipeline.data.transforms import CUTOUT_FILL
from keras_resnet.pipeline.training.callbacks import RunMonitor

# Training steps one host call runs at most on an accelerator. A call costs the host about
# as much as one step of Keras' loop, so 32 steps a call leave the host idle while the
# device works; a stop request, a checkpoint or the epoch end take effect at the end of a
# call. On a CPU a call runs one step: XLA's CPU backend runs a convolution net inside a
# while loop many times slower than the same step jitted alone (BUILD.md, "GPU"),
# and there the step, not the host, takes the time anyway.
STEPS_PER_CALL = 32
# Training images may take at most this share of an accelerator's memory.
DEVICE_MEMORY_SHARE = 0.25


def augment(images, key, *, cutout: int = 0):
    """CIFAR-style augmentation of a uint8 batch ``[n, size, size, 3]`` on the device:
    :func:`crop_and_flip`, then with ``cutout`` :func:`cutout_squares` (as
    :func:`keras_resnet.pipeline.data.arrays.augment_small` and
    :func:`~keras_resnet.pipeline.data.arrays.cutout` do on the host, and tf.data's
    :mod:`~keras_resnet.pipeline.data.transforms`). Returns float32 raw pixels; the crops and
    flips are the same with and without Cutout. A pure function of ``key``; traceable
    inside ``jax.jit``.

    Example:
        >>> x = augment(images, jax.random.key(0), cutout=16)
    """
    import jax

    k_crop, k_cut = jax.random.split(key)
    x = crop_and_flip(images, k_crop).astype("float32")
    return cutout_squares(x, k_cut, cutout) if cutout else x


def crop_and_flip(images, key):
    """Each image of ``[n, height, width, 3]`` becomes a window of itself zero-padded by
    height/8 (both offsets uniform over the 2 * pad + 1 positions), mirrored with
    probability 1/2 (He et al. 2015 §4.2); the dtype is kept."""
    import jax
    import jax.numpy as jnp

    n, height, width, _ = images.shape
    pad = max(1, height // 8)
    k_top, k_left, k_flip = jax.random.split(key, 3)
    top = jax.random.randint(k_top, (n,), 0, 2 * pad + 1) - pad
    left = jax.random.randint(k_left, (n,), 0, 2 * pad + 1) - pad
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    rows = top[:, None] + jnp.arange(height)
    cols = left[:, None] + jnp.arange(width)
    cols = jnp.where(flip[:, None], cols[:, ::-1], cols)
    # A gather from the unpadded image; positions in the border read as zeros.
    inside = (((rows >= 0) & (rows < height))[:, :, None]
              & ((cols >= 0) & (cols < width))[:, None, :])
    x = images[jnp.arange(n)[:, None, None], jnp.clip(rows, 0, height - 1)[:, :, None],
               jnp.clip(cols, 0, width - 1)[:, None, :]]
    return jnp.where(inside[..., None], x, jnp.zeros((), x.dtype))


def cutout_squares(images, key, size: int):
    """Cutout (DeVries & Taylor 2017) on ``[n, height, width, 3]``: in each image a
    ``size`` x ``size`` square, centred uniformly over the image and clipped at its edges,
    set to :data:`~keras_resnet.pipeline.data.transforms.CUTOUT_FILL`."""
    import jax
    import jax.numpy as jnp

    n, height, width, _ = images.shape
    k_row, k_col = jax.random.split(key)
    start_row = jax.random.randint(k_row, (n,), 0, height) - size // 2
    start_col = jax.random.randint(k_col, (n,), 0, width) - size // 2
    r = jnp.arange(height)[None, :] - start_row[:, None]
    c = jnp.arange(width)[None, :] - start_col[:, None]
    square = (((r >= 0) & (r < size))[:, :, None] & ((c >= 0) & (c < size))[:, None, :])
    return jnp.where(square[..., None], jnp.asarray(CUTOUT_FILL, images.dtype), images)


def batch_key(seed: int, epoch, index):
    """The random key of batch ``index`` of epoch ``epoch`` (traceable)."""
    import jax

    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)


def default_steps_per_call() -> int:
    """Training steps per host call: :data:`STEPS_PER_CALL` on an accelerator, 1 on a CPU."""
    import jax

    return 1 if jax.default_backend() == "cpu" else STEPS_PER_CALL


def device_memory() -> int | None:
    """Bytes of memory of the first JAX device where it reports them (GPUs), else None."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def fits(bundle: ArrayBundle, budget: int | None = None) -> bool:
    """Whether ``bundle``'s training images may live on the device: within ``budget``
    bytes, and within :data:`DEVICE_MEMORY_SHARE` of an accelerator's memory."""
    size = bundle.train_images.nbytes + bundle.train_labels.nbytes
    memory = device_memory()
    if memory is not None and size > DEVICE_MEMORY_SHARE * memory:
        return False
    return budget is None or size <= budget


def to_device(bundle: ArrayBundle) -> DeviceBundle:
    """``bundle``'s training images and labels put on the device(s) of the run (every
    device holds them all under a data-parallel distribution)."""
    return DeviceBundle(bundle)


class DeviceBundle:
    """An :class:`~keras_resnet.pipeline.data.arrays.ArrayBundle` whose training images live on
    the device; the interface of the other bundles (``epochs``, ``val``,
    ``steps_per_epoch``, ``first_batches``, sizes and class names).

    ``epochs()`` returns a :class:`DeviceStream`, which trains a model itself
    (:meth:`DeviceStream.fit`) instead of feeding ``model.fit``.
    """

    input_kind = "device"

    def __init__(self, bundle: ArrayBundle):
        import jax

        self.arrays = bundle
        self.replicated = _replicated_sharding()
        put = (lambda a: jax.device_put(a, self.replicated)) if self.replicated else (
            jax.device_put)
        self.images = put(bundle.train_images)
        self.labels = put(bundle.train_labels)
        self._steps = {}  # compiled multi-step functions, per (model, optimizer)
        self._augment = None

    class_names = property(lambda self: self.arrays.class_names)
    num_classes = property(lambda self: self.arrays.num_classes)
    train_size = property(lambda self: self.arrays.train_size)
    val_size = property(lambda self: self.arrays.val_size)
    val = property(lambda self: self.arrays.val)
    skipped = property(lambda self: self.arrays.skipped)
    cached = True
    batch_size = property(lambda self: self.arrays.batch_size)
    seed = property(lambda self: self.arrays.seed)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.arrays.steps_per_epoch(batch_size)

    def epochs(self, start_epoch: int = 0, skip_batches: int = 0) -> DeviceStream:
        """The endless training stream from ``skip_batches`` batches into ``start_epoch``."""
        return DeviceStream(self, start_epoch * max(self.data_steps, 1) + skip_batches)

    @property
    def data_steps(self) -> int:
        """Full batches in one pass over the training images."""
        return self.arrays.steps_per_epoch(self.batch_size)

    def position(self, index: int) -> tuple[int, int]:
        """``(epoch, batch)`` of the ``index``-th batch of the endless stream."""
        return divmod(index, max(self.data_steps, 1))

    def indices(self, first: int, count: int) -> np.ndarray:
        """Image indices ``[count, batch_size]`` of stream batches ``first ..``."""
        out = np.empty((count, self.batch_size), np.int32)
        orders = {}
        for i in range(count):
            epoch, batch = self.position(first + i)
            if epoch not in orders:
                orders[epoch] = self.arrays.epoch_order(epoch)
            out[i] = orders[epoch][batch * self.batch_size:(batch + 1) * self.batch_size]
        return out

    def batch(self, epoch: int, index: int):
        """Batch ``index`` of epoch ``epoch`` as training sees it: ``(float32 images,
        float32 one-hot labels)`` on the device."""
        import jax

        if self._augment is None:
            self._augment = jax.jit(self._make_batch)
        position = epoch * max(self.data_steps, 1) + index
        picked = self.indices(position, 1)[0]
        return self._augment(self.images, self.labels, picked, epoch, index)

    def _make_batch(self, images, labels, picked, epoch, index):
        import jax

        x = images[picked]
        if self.arrays.augment:
            x = augment(x, batch_key(self.seed, epoch, index), cutout=self.arrays.cutout)
        y = jax.nn.one_hot(labels[picked], self.num_classes, dtype="float32")
        return x.astype("float32"), y

    def first_batches(self, count: int) -> list:
        """The first ``count`` batches of epoch 0 (the same every time)."""
        return [self.batch(0, i) for i in range(count)]

    # ------------------------------------------------------------------ the compiled loop

    def multi_step(self, model, steps_per_call: int):
        """The jitted ``(state, indices, epochs, batches, count) -> (state, logs)`` that
        runs ``count`` training steps of ``model`` (at most ``steps_per_call``, the length
        of ``indices``), stopping after the first step whose loss is not finite. ``state``
        is Keras' JAX training state (trainable, non-trainable, optimizer and metrics
        variables); ``logs`` are the last step's, with ``steps_run``."""
        key = (id(model), id(model.optimizer), steps_per_call)
        if key not in self._steps:
            self._steps = {key: self._compile(model, steps_per_call)}  # older phases' go
        return self._steps[key]

    def _compile(self, model, steps_per_call):
        import jax
        import jax.numpy as jnp

        images, labels, seed = self.images, self.labels, self.seed
        augmenting, size = self.arrays.augment, self.arrays.cutout
        classes = self.num_classes
        cls = type(model)

        def one_step(state, picked, epoch, index):
            x = images[picked]
            if augmenting:
                x = augment(x, batch_key(seed, epoch, index), cutout=size)
            y = jax.nn.one_hot(labels[picked], classes, dtype="float32")
            # The class's own step (an instance may carry a patched one).
            logs, state = cls.train_step(model, state, (x.astype("float32"), y))
            return logs, state

        def single(state, picked, epochs, batches, count):
            logs, state = one_step(state, picked[0], epochs[0], batches[0])
            return state, {**logs, "steps_run": jnp.int32(1)}

        def run(state, picked, epochs, batches, count):
            logs = jax.eval_shape(lambda s: one_step(s, picked[0], epochs[0], batches[0])[0],
                                  state)
            logs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), logs)

            def going(carry):
                i, _, logs = carry
                finite = jnp.all(jnp.isfinite(logs["loss"])) if "loss" in logs else True
                return (i < count) & ((i == 0) | finite)

            def body(carry):
                i, state, _ = carry
                logs, state = one_step(state, picked[i], epochs[i], batches[i])
                return i + 1, state, logs

            ran, state, logs = jax.lax.while_loop(going, body, (jnp.int32(0), state, logs))
            return state, {**logs, "steps_run": ran}

        shardings = None
        if self.replicated is not None:
            shardings = (_state_shardings(model), None)
        return jax.jit(single if steps_per_call == 1 else run, donate_argnums=(0,),
                       out_shardings=shardings)

    def put_indices(self, indices: np.ndarray):
        """Batch indices ``[steps, batch]`` on the device(s), split along the batch."""
        import jax

        sharding = _batch_sharding()
        return jax.device_put(indices, sharding) if sharding else jax.device_put(indices)


class DeviceStream:
    """The endless training stream of a :class:`DeviceBundle` from one batch on; it trains
    a model itself (:meth:`fit`)."""

    def __init__(self, bundle: DeviceBundle, start: int):
        self.bundle = bundle
        self.start = start
        # Seconds by phase of the last fit (host preparation, dispatch, callbacks,
        # validation, waiting for the device at epoch ends); see BUILD.md's profile.
        self.timings = {}

    def fit(self, model, *, epochs: int, initial_epoch: int = 0, steps_per_epoch: int,
            validation_data=None, callbacks=None, verbose=0, first_step: int = 0,
            checkpoint_every: int = 0, steps_per_call: int | None = None, shuffle=False):
        """Trains ``model`` (compiled) on the stream, as ``model.fit`` would.

        Args:
            epochs, initial_epoch, steps_per_epoch, validation_data, callbacks, verbose:
                as in ``model.fit`` (``steps_per_epoch`` steps per epoch, drawn from the
                stream in order across epochs).
            first_step: steps of the first epoch that ran before (a resumed mid-epoch
                checkpoint): calls end where that epoch's step count is a multiple of
                ``checkpoint_every`` (0: epoch ends only).
            steps_per_call: training steps of one host call at most (default:
                :func:`default_steps_per_call`).
            shuffle: ignored (the stream is ordered by seed and epoch); accepted as
                ``model.fit`` takes it.

        Returns:
            The ``History`` callback.
        """
        del shuffle
        callbacks = keras.callbacks.CallbackList(
            callbacks, add_history=True, add_progbar=verbose != 0, verbose=verbose,
            epochs=epochs, steps=steps_per_epoch, model=model)
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        _build_metrics(model, self.bundle)
        steps_per_call = steps_per_call or default_steps_per_call()
        run = self.bundle.multi_step(model, steps_per_call)
        timings = self.timings = {k: 0.0 for k in (
            "host", "dispatch", "callbacks", "validation", "epoch_end_wait")}
        model.stop_training = False
        position = self.start
        logs = {}
        callbacks.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            model.reset_metrics()
            callbacks.on_epoch_begin(epoch)
            done = 0
            while done < steps_per_epoch and not model.stop_training:
                t0 = time.perf_counter()
                count = _call_length(done, steps_per_epoch, first_step, checkpoint_every,
                                     steps_per_call)
                indices = np.zeros((steps_per_call, self.bundle.batch_size), np.int32)
                indices[:count] = self.bundle.indices(position, count)
                where = np.zeros((2, steps_per_call), np.int32)
                where[:, :count] = np.array([self.bundle.position(position + i)
                                             for i in range(count)]).T
                callbacks.on_train_batch_begin(done)
                t1 = time.perf_counter()
                state, logs = run(_state(model), self.bundle.put_indices(indices),
                                  where[0], where[1], np.int32(count))
                _assign(model, state)
                t2 = time.perf_counter()
                position += count
                done += count
                logs = dict(logs)
                # Each callback gets the call's logs as device arrays: a CallbackList would
                # convert them to floats first, waiting for the call to finish before the
                # next one is even sent. The NaN guard reads them one call late.
                steps_run = logs.pop("steps_run")
                for callback in callbacks.callbacks:
                    # The monitor's NaN guard names the step a call stopped at.
                    extra = ({"steps_run": steps_run, "steps_asked": count} if isinstance(
                        callback, RunMonitor) else {})
                    callback.on_train_batch_end(done - 1, {**logs, **extra})
                t3 = time.perf_counter()
                timings["host"] += t1 - t0
                timings["dispatch"] += t2 - t1
                timings["callbacks"] += t3 - t2
            t0 = time.perf_counter()
            epoch_logs = {k: float(v) for k, v in model.get_metrics_result().items()}
            timings["epoch_end_wait"] += time.perf_counter() - t0
            if model.stop_training and done < steps_per_epoch:
                break  # a stop inside the epoch (NaN guard): no validation, no epoch end
            if validation_data is not None:
                t0 = time.perf_counter()
                val = model.evaluate(validation_data, verbose=0, return_dict=True,
                                     callbacks=callbacks)
                epoch_logs.update({f"val_{k}": float(v) for k, v in val.items()})
                timings["validation"] += time.perf_counter() - t0
            callbacks.on_epoch_end(epoch, epoch_logs)
            logs = epoch_logs
            if model.stop_training:
                break
        callbacks.on_train_end(logs)
        self.start = position
        return model.history


def _call_length(done, steps, first_step, checkpoint_every, most):
    """Steps of the next call: at most ``most``, ending at the epoch's end or at the next
    step count (``first_step + done + n``) that is a multiple of ``checkpoint_every``."""
    count = min(most, steps - done)
    if checkpoint_every:
        reached = first_step + done
        count = min(count, checkpoint_every - reached % checkpoint_every)
    return count


def _state(model):
    return ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables],
            [v.value for v in model.metrics_variables])


def _assign(model, state):
    # The call donated the arrays the variables held: they take the new ones at once.
    groups = (model.trainable_variables, model.non_trainable_variables,
              model.optimizer.variables, model.metrics_variables)
    for variables, values in zip(groups, state, strict=True):
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)


def _state_shardings(model):
    return tuple([v.value.sharding for v in group] for group in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))


def _build_metrics(model, bundle):
    """Builds the compiled loss and metrics from the batch shapes, as ``fit`` does before
    its first step (their variables must exist before the step is traced)."""
    import jax

    size = bundle.arrays.train_images.shape[1:3]
    x = jax.ShapeDtypeStruct((bundle.batch_size, *size, 3), "float32")
    y = jax.ShapeDtypeStruct((bundle.batch_size, bundle.num_classes), "float32")
    model._symbolic_build(data_batch=(x, y))  # noqa: SLF001 - Keras' own pre-fit build


def _distribution():
    return keras.distribution.distribution()


def _replicated_sharding():
    distribution = _distribution()
    if distribution is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(distribution.device_mesh.backend_mesh, PartitionSpec())


def _batch_sharding():
    distribution = _distribution()
    if distribution is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = distribution.device_mesh
    return NamedSharding(mesh.backend_mesh, PartitionSpec(None, distribution.batch_dim_name))
