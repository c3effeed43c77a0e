"""Benches on Keras and LiteRT: a model's training or inference step, and the input pipeline.

Every bench takes a *spec* (a JSON-able dict, so a subprocess can build the same bench)
and runs the tasks of :mod:`keras_resnet.benchmark.protocol`. Models are built and compiled
by the same public helpers as training (``resolve``, ``build_model``,
``prepare_for_training``), and fed one fixed in-memory random batch so only the model is
timed. Keras, TensorFlow and LiteRT are imported inside, after the thread settings.
"""

from __future__ import annotations

import time

from keras_resnet.benchmark.errors import BenchmarkError
from keras_resnet.benchmark.protocol import parse_task, random_images, random_labels
from keras_resnet.benchmark.report import version
from keras_resnet.pipeline.errors import first_line

# keras_resnet variants that keras.applications also builds.
APPLICATIONS = {"resnet50": "ResNet50", "resnet101": "ResNet101", "resnet152": "ResNet152"}


def apply_threads(spec: dict) -> None:
    """Sets the spec's TensorFlow (or torch) thread counts; 0 keeps the library's default."""
    inter, intra = spec.get("inter_op_threads", 0), spec.get("intra_op_threads", 0)
    if not (inter or intra):
        return
    if spec.get("backend") == "torch" or spec["kind"] == "torch":
        import torch

        if intra:
            torch.set_num_threads(intra)
        return
    import tensorflow as tf

    try:
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
    except RuntimeError as e:
        raise BenchmarkError("thread settings must be made before TensorFlow starts; run "
                             f"the benchmark in a fresh process ({first_line(e)})") from e


def train_config(*, model=None, depth=None, model_options=None, batch_size=None,
                 image_size=None, seed=0, fused_batch_norm=True):
    """The TrainConfig of a benchmarked model: synthetic data, one epoch, no warm-up.

    One epoch without warm-up gives the plain schedule of the recipe over the benchmark's
    steps; the step time does not depend on the schedule.
    """
    from keras_resnet.pipeline.run.config import TrainConfig

    return TrainConfig(depth=depth, model=model, model_options=dict(model_options or {}),
                       dataset="synthetic", batch_size=batch_size, image_size=image_size,
                       seed=seed, epochs=1, warmup_epochs=0,
                       fused_batch_norm=fused_batch_norm)


def resolve_precision(precision: str, backend: str) -> str:
    """The dtype policy of ``precision``; "auto" is tools/train.py's choice on this machine."""
    from keras_resnet.pipeline.training.machine import accelerator
    from keras_resnet.pipeline.training.precision import choose_policy

    if precision != "auto":
        return precision
    return choose_policy("auto", gpu=accelerator(backend) is not None)


def build_and_compile(spec: dict):
    """Builds and compiles the spec's model as training does; returns (model, jit_compile)."""
    import keras

    from keras_resnet.pipeline.run import config
    from keras_resnet.pipeline.training import machine, network, optimization

    resolved = config.resolve(train_config(
        model=spec.get("model"), depth=spec.get("depth"),
        model_options=spec.get("model_options"), batch_size=spec["batch_size"],
        image_size=spec["image_size"], seed=spec["seed"],
        fused_batch_norm=bool(spec.get("fused_batch_norm"))))
    classes = spec["classes"]
    backend = keras.config.backend()
    jit = config.truthy(spec["jit_compile"], machine.default_jit(
        backend, gpu=machine.accelerator(backend) is not None))
    policy = resolve_precision(spec["precision"], backend)
    if spec["source"] == "applications":
        size = spec["image_size"]
        builder = getattr(keras.applications, APPLICATIONS[resolved.model])
        with network.dtype_policy(policy):
            model = builder(weights=None, input_shape=(size, size, 3), classes=classes,
                            classifier_activation=None)
    else:
        model = network.build_training_model(resolved, classes, policy=policy)
    optimization.prepare_for_training(model, resolved, classes,
                                      steps_per_epoch=spec["total_steps"], jit_compile=jit)
    return model, bool(model.jit_compile), policy


class KerasBench:
    """A keras_resnet (or keras.applications, or .keras file) model on the Keras backend."""

    def __init__(self, spec):
        apply_threads(spec)
        import keras

        from keras_resnet.pipeline.training import machine

        self.keras = keras
        self.spec = spec
        machine.set_random_seed(spec["seed"])
        if spec.get("model_file"):
            from keras_resnet.pipeline.deploy.scoring import load_predictor

            predictor = load_predictor(spec["model_file"])
            self.model = predictor.model
            self.size = spec.get("image_size") or predictor.image_size
            if not self.size:
                raise BenchmarkError(f"{spec['model_file']} has no fixed input size; pass "
                                     "image_size")
            self.classes = predictor.num_outputs
            jit, policy = None, self.model.dtype_policy.name
        else:
            self.size, self.classes = spec["image_size"], spec["classes"]
            self.model, jit, policy = build_and_compile(spec)
        self.inputs = {}
        for task in spec["tasks"]:
            self._inputs(parse_task(task)[1])
        trainable = sum(int(_prod(w.shape)) for w in self.model.trainable_weights)
        self.info = {"backend": keras.config.backend(), "keras": keras.__version__,
                     "model_name": self.model.name, "params_trainable": trainable,
                     "params_total": int(self.model.count_params()),
                     "jit_compile": jit, "precision": policy,
                     "fused_batch_norm": any(
                         type(layer).__module__.startswith("keras_resnet")
                         for layer in self.model.layers),
                     "image_size": self.size, "classes": self.classes}
        if spec.get("model_file") is None:
            from keras_resnet.pipeline.training.machine import accelerator

            self.info["device"] = accelerator(keras.config.backend()) or "cpu"
        if keras.config.backend() == "tensorflow":
            import tensorflow as tf

            self.info["tf_threads"] = {
                "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
                "intra_op": tf.config.threading.get_intra_op_parallelism_threads()}
        elif keras.config.backend() == "torch":
            import torch

            self.info["torch_threads"] = torch.get_num_threads()

    def _inputs(self, batch):
        if batch not in self.inputs:
            ops = self.keras.ops
            x = random_images(batch, self.size, self.spec["seed"])
            y = self.keras.utils.to_categorical(
                random_labels(batch, self.classes, self.spec["seed"]), self.classes)
            self.inputs[batch] = (ops.convert_to_tensor(x), ops.convert_to_tensor(
                y.astype("float32")))
        return self.inputs[batch]

    def step(self, task):
        kind, batch = parse_task(task)
        x, y = self._inputs(batch)
        if kind == "train":
            logs = self.model.train_on_batch(x, y, return_dict=True)
            return float(logs["loss"])
        out = self.model.predict_on_batch(x)  # a NumPy array: computed and on the host
        return float(out.reshape(-1)[0])


def _prod(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


class TFLiteBench:
    """A .tflite file on the LiteRT interpreter (one interpreter per batch size)."""

    def __init__(self, spec):
        from keras_resnet.pipeline.deploy.litert import LiteRTModel

        self.models, self.inputs = {}, {}
        for task in spec["tasks"]:
            batch = parse_task(task)[1]
            m = LiteRTModel(path=spec["model_file"], num_threads=spec["threads"])
            self.models[batch] = m
            self.inputs[batch] = random_images(batch, m.image_size, spec["seed"])
            m.predict(self.inputs[batch], batch_size=batch)  # resizes the input once
        m = next(iter(self.models.values()))
        self.info = {"threads": spec["threads"], "image_size": m.image_size,
                     "classes": m.num_outputs,
                     "input_dtype": str(m.input["dtype"].__name__),
                     "ai_edge_litert": version("ai-edge-litert")}

    def step(self, task):
        batch = parse_task(task)[1]
        out = self.models[batch].predict(self.inputs[batch], batch_size=batch)
        return float(out.reshape(-1)[0])


class PipelineBench:
    """The training stream of load_data, exactly as training uses it."""

    def __init__(self, spec):
        apply_threads(spec)
        import tensorflow as tf

        from keras_resnet.pipeline import data as data_lib
        from keras_resnet.pipeline.data.transforms import augmentation_style

        budget, cutout = spec.get("cache_budget_mb"), spec.get("cutout", 0)
        start = time.perf_counter()
        bundle = data_lib.load_data(
            spec["dataset"], data_dir=spec.get("data_dir"), image_size=spec["image_size"],
            batch_size=spec["batch_size"], val_fraction=spec["val_fraction"],
            seed=spec["seed"], augment=spec["augment"], cutout=cutout,
            cache_budget=data_lib.DEFAULT_CACHE_BUDGET if budget is None else budget * 2**20)
        classes = bundle.num_classes
        augmentation = augmentation_style(spec["image_size"]) if spec["augment"] else "none"
        if spec["augment"] and cutout:
            augmentation += f" + cutout {cutout}"

        def one_hot(x, y):  # as training's stream
            return x, tf.one_hot(y, classes)

        self.iterator = iter(bundle.epochs(0).map(one_hot))
        self.info = {"dataset": spec["dataset"], "train_images": bundle.train_size,
                     "val_images": bundle.val_size, "classes": classes,
                     "cached_in_memory": bundle.cached, "skipped_images": len(bundle.skipped),
                     "augmentation": augmentation,
                     "load_data_s": time.perf_counter() - start}

    def step(self, task):
        x, _ = next(self.iterator)  # an eager tensor: the batch is finished
        return float(x.shape[0])


class StreamBench:
    """The training stream of a folder read without TensorFlow
    (:func:`keras_resnet.pipeline.data.folder_stream.load_folder_stream`), as JAX and PyTorch
    runs read images above 64 pixels."""

    def __init__(self, spec):
        from keras_resnet.pipeline.data import folder_stream
        from keras_resnet.pipeline.data.transforms import augmentation_style

        start = time.perf_counter()
        bundle = folder_stream.load_folder_stream(
            spec["dataset"], data_dir=spec.get("data_dir"), image_size=spec["image_size"],
            batch_size=spec["batch_size"], val_fraction=spec["val_fraction"],
            seed=spec["seed"], augment=spec["augment"], cutout=spec.get("cutout", 0),
            threads=spec.get("threads") or None)
        self.stream, self.index = bundle.epochs(0), 0
        augmentation = augmentation_style(spec["image_size"]) if spec["augment"] else "none"
        self.info = {"dataset": spec["dataset"], "train_images": bundle.train_size,
                     "val_images": bundle.val_size, "classes": bundle.num_classes,
                     "cached_in_memory": False, "skipped_images": len(bundle.skipped),
                     "augmentation": augmentation,
                     "threads": bundle.threads,
                     "load_data_s": time.perf_counter() - start}

    def step(self, task):
        x, _ = self.stream[self.index]  # a finished NumPy batch
        self.index += 1
        return float(x.shape[0])
