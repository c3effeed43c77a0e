"""Benchmarks keras_resnet: training and inference speed, input pipeline, comparisons, memory.

Usage: ``python tools/benchmark.py MODE [--flag=value ...]`` (or ``--mode=MODE``).

Modes:
    train     training images/s of one model (``--model`` or ``--depth``) on one Keras
              backend (``--backend``: tensorflow, jax or torch), built and compiled by the
              same keras_resnet.pipeline.train helpers as tools/train.py (resolve,
              build_model, weight decay, make_schedule, make_optimizer, compile), fed one
              fixed in-memory random batch so only the model is timed.
    infer     inference images/s and latency at batch 1 and ``--batch_size`` of a built model
              or of ``--model_file`` files: .keras (Keras predict_on_batch) and .tflite (LiteRT
              interpreter with ``--tflite_threads``, default 1 and 2).
    pipeline  the training input pipeline alone (decode, augment, batch): the training
              stream of keras_resnet.pipeline.data.load_data exactly as tools/train.py builds
              it, for ``--dataset`` folder (``--data_dir``), a prepared TFDS name, digits or
              synthetic.
    compare   in one run, with windows interleaved A, B, A, B (fair on a noisy machine):
              (a) keras_resnet vs keras.applications (ResNet-50/101/152, weights=None, same
              backend, batch, size and classes), training and inference; (b) keras_resnet
              vs a plain PyTorch twin (CIFAR option-A ResNets, ImageNet v1.5 ResNets) in NCHW
              and channels_last, SGD momentum 0.9, same batch, equal parameter counts. Every
              Keras measurement runs in its own subprocess with its own KERAS_BACKEND
              (``--backends``); a table gives the ratio keras_resnet / other.
    memory    peak RSS (ru_maxrss of the child process) of tools/train.py running a few
              steps on synthetic data, and of the folder pipeline over two image folders of
              different sizes (``--memory_images``, default 5,000 and 50,000 images built
              from the real CIFAR-10 JPEGs in ../shared, or synthetic JPEGs): a streamed
              folder pipeline should need about the same memory for both (within 10%).

Method: every measured thing first runs ``--warmup`` steps (the first one compiles; its
time is reported), then ``--windows`` windows of ``--steps`` steps; each step ends with its
result on the host (the loss or the output fetched to NumPy), so the clock sees finished
work. Reported: median images/s over the windows, the min and max window, and the median
step time. Several measurements of one run are interleaved window by window, so machine
noise falls on all of them alike.

Output: a table on stdout; ``--output_json=FILE`` holds every figure, the settings, the
machine (platform, CPUs, memory, load) and the library versions, and the date.

Examples:
    python tools/benchmark.py train --depth=20 --batch_size=128
    python tools/benchmark.py train --model=resnet50 --batch_size=32 --backend=jax
    python tools/benchmark.py infer --model_file=runs/r20/model.keras,runs/r20/model.tflite
    python tools/benchmark.py pipeline --dataset=folder --data_dir=/data/cifar \\
        --image_size=32 --batch_size=128
    python tools/benchmark.py compare --compare_models=resnet20 --compare=pytorch \\
        --backends=tensorflow,jax,torch --output_json=/tmp/compare.json
    python tools/benchmark.py memory --depth=20 --output_json=/tmp/memory.json

PyTorch (compare, ``--backend=torch``) is a benchmark-only extra:
``pip install -e '.[bench]'``. Bad input ends with one line ``error: ...`` and exit
status 2.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN kernels: 1.6x faster ResNet training on CPUs where TensorFlow leaves them off by
# default (AMD, AVX2-only); see BUILD.md "Performance".
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import _cli  # noqa: E402
from absl import flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.abspath(__file__)
CIFAR_TAR = os.path.join(os.path.dirname(REPO), "shared", "datasets", "cifar10",
                         "train.tar.gz")

MODES = ("train", "infer", "pipeline", "compare", "memory")
BACKENDS = ("tensorflow", "jax", "torch")
PRECISIONS = ("float32", "mixed_bfloat16")
AUTO_BOOL = ("auto", "true", "false")
COMPARISONS = ("applications", "pytorch")
TASKS = ("train", "infer")
TORCH_FORMATS = ("nchw", "channels_last")
MEMORY_CHECKS = ("train", "folder")
FOLDER_SOURCES = ("auto", "cifar", "synthetic")
# keras_resnet variants that keras.applications also builds.
APPLICATIONS = {"resnet50": "ResNet50", "resnet101": "ResNet101", "resnet152": "ResNet152"}
# Batch sizes when --batch_size is unset: the CIFAR recipe's 128; ImageNet-style nets get
# 32 (the recipe's 256 at 224 pixels takes about a minute a step on a 2-core CPU).
DEFAULT_BATCH = {"cifar": 128, "imagenet": 32}
BENCH_EXTRA = "pip install -e '.[bench]'"
_MARK = "@@benchmark "  # prefix of worker replies on stdout

FLAGS = flags.FlagValues()
_integer = functools.partial(flags.DEFINE_integer, flag_values=FLAGS)
_string = functools.partial(flags.DEFINE_string, flag_values=FLAGS)
_list = functools.partial(flags.DEFINE_list, flag_values=FLAGS)
_bool = functools.partial(flags.DEFINE_bool, flag_values=FLAGS)
_float = functools.partial(flags.DEFINE_float, flag_values=FLAGS)

_string("mode", None, "train, infer, pipeline, compare or memory (or give it as the first "
        "argument).")
_string("model", None, "variant name, e.g. resnet20, resnet50 (see keras_resnet.VARIANTS).")
_integer("depth", None, "ResNet depth instead of --model: 18/34/50/101/152/200 or 6n+2 "
         "(8, 14, 20, 56, ...).")
_string("model_options", None, 'JSON dict of ResNetConfig overrides, e.g. '
        '\'{"keras_applications": true}\'.')
_integer("batch_size", None, "batch size (default 128 for CIFAR-style nets, 32 otherwise).")
_integer("image_size", None, "square input side (default: the network's, 32 or 224).")
_integer("classes", None, "output classes (default 10 up to 64 pixels, else 1000, like "
         "--dataset=synthetic in training).")
_string("backend", "tensorflow", "Keras backend of train/infer: tensorflow, jax or torch "
        "(run in a subprocess when it is not this process's backend).")
_list("backends", ["tensorflow"], "Keras backends measured by compare.")
_string("precision", "float32", "float32 or mixed_bfloat16 (Keras dtype policy).")
_string("jit_compile", "auto", "auto (TensorFlow: as tools/train.py, XLA only with a GPU; "
        "jax: on; torch: off), true or false.")
_integer("warmup", 3, "warm-up steps before timing (the first compiles).")
_integer("windows", 5, "timed windows.")
_integer("steps", 10, "steps per timed window.")
_integer("seed", 0, "seeds weights and the random batch.")
_integer("inter_op_threads", 0, "TensorFlow inter-op threads (0: TensorFlow's default).")
_integer("intra_op_threads", 0, "TensorFlow intra-op threads, and torch.set_num_threads "
         "(0: the library's default).")
_list("model_file", [], "infer: .keras and/or .tflite files (default: a built --model).")
_list("infer_batch_sizes", [], "infer: batch sizes (default 1 and --batch_size).")
_list("tflite_threads", ["1", "2"], "infer: LiteRT interpreter thread counts.")
_string("dataset", "synthetic", "pipeline: folder, a prepared TFDS name, digits or "
        "synthetic.")
_string("data_dir", None, "pipeline: folder root or TFDS data dir.")
_bool("augment", True, "pipeline: random crops and flips, as in training.")
_float("val_fraction", 0.1, "pipeline: fraction carved off as validation, as in training.")
_integer("cache_budget_mb", None, "pipeline: decoded-image cache budget (default as "
         "tools/train.py, 2048); memory's folder check defaults to 0 (streamed).")
_list("compare", list(COMPARISONS), "compare: applications (keras.applications) and/or "
      "pytorch (plain PyTorch twin).")
_list("compare_models", ["resnet20", "resnet50"], "compare: models; applications covers "
      "resnet50/101/152.")
_list("tasks", list(TASKS), "compare: train and/or infer.")
_list("torch_formats", list(TORCH_FORMATS), "compare: PyTorch memory formats, nchw and/or "
      "channels_last.")
_list("memory_checks", list(MEMORY_CHECKS), "memory: train (tools/train.py) and/or folder.")
_list("memory_images", ["5000", "50000"], "memory: images in each generated folder.")
_integer("memory_steps", 5, "memory: training steps of tools/train.py.")
_string("train_args", "", "memory: extra tools/train.py flags, e.g. "
        "'--optimizer=adam'.")
_string("folder_source", "auto", "memory: images of the folders: cifar (real CIFAR-10 "
        "JPEGs from ../shared), synthetic (generated JPEGs) or auto (cifar when present).")
_string("cifar_tar", CIFAR_TAR, "memory: the CIFAR-10 train.tar.gz.")
_string("work_dir", None, "memory: where the temporary folders and runs go (default: the "
        "system temp dir); removed afterwards.")
_integer("worker_timeout", 1800, "seconds a subprocess may take for one reply.")
_string("output_json", None, "write every figure here as JSON.")


class BenchError(Exception):
    """A problem with what was asked for, said in one sentence (printed as ``error: ...``)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [BenchError]
    data = sys.modules.get("keras_resnet.pipeline.data")
    if data is not None:
        errors.append(data.UserError)
    return tuple(errors)


def _parse_task(task: str) -> tuple[str, int]:
    kind, batch = task.split(":")
    return kind, int(batch)


# --------------------------------------------------------------------------- benches
# A bench holds one model (or input pipeline) and runs tasks "train:B", "infer:B" or
# "pipeline:B" (B = batch size). step(task) returns only once the result is on the host.


def _apply_threads(spec):
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
        raise BenchError("thread settings must be made before TensorFlow starts; run the "
                         f"benchmark in a fresh process ({_first_line(e)})") from e


def _random_images(batch, size, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")


def _random_labels(batch, classes, seed):
    import numpy as np

    return np.random.default_rng(seed + 1).integers(0, classes, batch)


class _KerasBench:
    """A keras_resnet (or keras.applications, or .keras file) model on the Keras backend."""

    def __init__(self, spec):
        _apply_threads(spec)
        import keras

        self.keras = keras
        self.spec = spec
        keras.utils.set_random_seed(spec["seed"])
        if spec.get("model_file"):
            from keras_resnet.pipeline import evaluate

            self.model = evaluate.KerasPredictor(spec["model_file"]).model
            shape = self.model.input_shape
            self.size = spec.get("image_size") or (shape[1] if isinstance(shape, tuple)
                                                   else None)
            if not self.size:
                raise BenchError(f"{spec['model_file']} has no fixed input size; pass "
                                 "--image_size")
            self.classes = int(self.model.output_shape[-1])
            jit = None
        else:
            self.size, self.classes = spec["image_size"], spec["classes"]
            self.model, jit = _build_and_compile(spec)
        self.inputs = {}
        for task in spec["tasks"]:
            self._inputs(_parse_task(task)[1])
        trainable = sum(int(_prod(w.shape)) for w in self.model.trainable_weights)
        self.info = {"backend": keras.config.backend(), "keras": keras.__version__,
                     "model_name": self.model.name, "params_trainable": trainable,
                     "params_total": int(self.model.count_params()),
                     "jit_compile": jit, "precision": spec.get("precision"),
                     "image_size": self.size, "classes": self.classes}
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
            x = _random_images(batch, self.size, self.spec["seed"])
            y = self.keras.utils.to_categorical(
                _random_labels(batch, self.classes, self.spec["seed"]), self.classes)
            self.inputs[batch] = (ops.convert_to_tensor(x), ops.convert_to_tensor(
                y.astype("float32")))
        return self.inputs[batch]

    def step(self, task):
        kind, batch = _parse_task(task)
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


def _resolve_jit(value, backend):
    if value != "auto":
        return value == "true"
    if backend == "jax":
        return True  # jax without jit runs op by op; Keras' own "auto" is jit on jax
    if backend == "torch":
        return False  # Keras' "auto" on torch: no torch.compile
    import tensorflow as tf

    # tools/train.py: XLA only with a GPU (and one replica).
    return bool(tf.config.list_physical_devices("GPU"))


def _build_and_compile(spec):
    """Builds and compiles through the same helpers as tools/train.py."""
    import keras

    from keras_resnet.pipeline import train as train_lib

    resolved = train_lib.resolve(_train_config(train_lib, spec))
    classes = spec["classes"]
    jit = _resolve_jit(spec["jit_compile"], keras.config.backend())
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(spec["precision"])
    try:
        if spec["source"] == "applications":
            size = spec["image_size"]
            builder = getattr(keras.applications, APPLICATIONS[resolved["model"]])
            model = builder(weights=None, input_shape=(size, size, 3), classes=classes,
                            classifier_activation=None)
        else:
            model = train_lib.build_model(resolved, classes)
        if resolved["optimizer"] != "adamw":
            train_lib._add_weight_decay(model, resolved["weight_decay"])
        schedule = train_lib.make_schedule(resolved["lr_schedule"], resolved["learning_rate"],
                                           total_steps=spec["total_steps"], warmup_steps=0)
        optimizer = train_lib.make_optimizer(resolved, schedule)
        train_lib._compile(model, resolved, optimizer, classes, jit)
    finally:
        keras.config.set_dtype_policy(previous)
    return model, bool(model.jit_compile)


def _train_config(train_lib, spec):
    return train_lib.TrainConfig(
        depth=spec.get("depth"), model=spec.get("model"),
        model_options=dict(spec.get("model_options") or {}), dataset="synthetic",
        batch_size=spec["batch_size"], image_size=spec["image_size"], seed=spec["seed"])


class _TorchBench:
    """The plain PyTorch twin of a keras_resnet model (torch is imported only here)."""

    def __init__(self, spec):
        _apply_threads(spec)
        import torch

        self.torch = torch
        torch.manual_seed(spec["seed"])
        fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
        self.model = _torch_resnet(spec["arch"], spec["classes"]).to(memory_format=fmt)
        decay = [p for p in self.model.parameters() if p.ndim > 1]  # conv / linear kernels
        rest = [p for p in self.model.parameters() if p.ndim <= 1]  # BN and biases
        recipe = spec["recipe"]
        # keras_resnet's coupled L2 of wd/2 * sum(w^2) on kernels is SGD weight_decay=wd.
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": recipe["weight_decay"]},
             {"params": rest, "weight_decay": 0.0}],
            lr=recipe["learning_rate"], momentum=recipe["momentum"])
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
        self.inputs = {}
        self.size, self.classes, self.fmt = spec["image_size"], spec["classes"], fmt
        for task in spec["tasks"]:
            self._inputs(_parse_task(task)[1], spec["seed"])
        self.info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "params_trainable": sum(p.numel() for p in self.model.parameters()
                                             if p.requires_grad),
                     "memory_format": "channels_last" if spec["channels_last"] else "nchw",
                     "image_size": self.size, "classes": self.classes}

    def _inputs(self, batch, seed=0):
        if batch not in self.inputs:
            torch = self.torch
            x = torch.from_numpy(_random_images(batch, self.size, seed).transpose(0, 3, 1, 2))
            x = x.contiguous(memory_format=self.fmt)
            y = torch.from_numpy(_random_labels(batch, self.classes, seed)).long()
            self.inputs[batch] = (x, y)
        return self.inputs[batch]

    def step(self, task):
        kind, batch = _parse_task(task)
        x, y = self._inputs(batch)
        if kind == "train":
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            return float(loss.item())
        self.model.eval()
        with self.torch.inference_mode():
            return float(self.model(x)[0, 0].item())


def _torch_resnet(arch, classes):
    """Plain PyTorch ResNets equal to keras_resnet's in layers and trainable parameters.

    CIFAR nets (He et al. 2015 §4.2): 3x3 stem, widths 16-32-64, basic blocks, option-A
    shortcuts (subsample, zero-pad channels: no parameters). ImageNet nets: 7x7/2 stem and
    max-pool, basic (18/34) or v1.5 bottleneck blocks (stride on the 3x3 conv, as
    torchvision), projection shortcuts. Raw 0..255 pixels are normalised first, as
    keras_resnet models built with include_preprocessing=True do.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    def conv_bn(cin, cout, k, stride):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Basic(nn.Module):
        def __init__(self, cin, width, stride, option_a):
            super().__init__()
            self.conv1, self.bn1 = conv_bn(cin, width, 3, stride)
            self.conv2, self.bn2 = conv_bn(width, width, 3, 1)
            self.stride, self.pad = stride, width - cin
            self.project = None
            if not option_a and (stride != 1 or cin != width):
                self.project = nn.Sequential(*conv_bn(cin, width, 1, stride))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if self.project is not None:
                shortcut = self.project(x)
            elif self.stride != 1 or self.pad:
                shortcut = x[:, :, ::self.stride, ::self.stride]
                shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2,
                                            self.pad - self.pad // 2))
            else:
                shortcut = x
            return F.relu(out + shortcut)

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride, option_a):
            super().__init__()
            self.conv1, self.bn1 = conv_bn(cin, width, 1, 1)
            self.conv2, self.bn2 = conv_bn(width, width, 3, stride)
            self.conv3, self.bn3 = conv_bn(width, 4 * width, 1, 1)
            self.project = None
            if stride != 1 or cin != 4 * width:
                self.project = nn.Sequential(*conv_bn(cin, 4 * width, 1, stride))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            shortcut = x if self.project is None else self.project(x)
            return F.relu(out + shortcut)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            mean = torch.tensor([0.485, 0.456, 0.406]) * 255
            std = torch.tensor([0.229, 0.224, 0.225]) * 255
            self.register_buffer("mean", mean.view(1, 3, 1, 1))
            self.register_buffer("std", std.view(1, 3, 1, 1))
            cifar = arch["stem"] == "cifar"
            width = arch["stem_width"]
            if cifar:
                self.stem = nn.Sequential(*conv_bn(3, width, 3, 1), nn.ReLU())
            else:
                self.stem = nn.Sequential(*conv_bn(3, width, 7, 2), nn.ReLU(),
                                          nn.MaxPool2d(3, 2, 1))
            block = Bottleneck if arch["block"] == "bottleneck" else Basic
            expansion = 4 if block is Bottleneck else 1
            layers, cin = [], width
            for stage, (depth, w) in enumerate(zip(arch["depths"], arch["widths"],
                                                   strict=True)):
                for i in range(depth):
                    stride = 2 if stage > 0 and i == 0 else 1
                    layers.append(block(cin, w, stride, cifar))
                    cin = w * expansion
            self.stages = nn.Sequential(*layers)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            x = self.stages(self.stem((x - self.mean) / self.std))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return ResNet()


def _torch_arch(resolved):
    """The architecture fields of a keras_resnet model that has a plain PyTorch twin."""
    a = resolved["architecture"]
    cifar_a = (a["stem"] == "cifar" and a["block"] == "basic" and a["shortcut"] == "zeropad")
    imagenet = (a["stem"] == "imagenet" and a["shortcut"] == "projection")
    plain = (not a["preact"] and a["groups"] == 1 and a["width_per_group"] == 64
             and a["width_factor"] == 1 and not a["se_ratio"] and not a["keras_applications"]
             and a["residual_scale"] == 1.0 and not a["stochastic_depth"])
    if not (plain and (cifar_a or imagenet)):
        raise BenchError(f"{resolved['model']} has no plain PyTorch twin here; the PyTorch "
                         "comparison covers CIFAR option-A ResNets (resnet20, resnet56, ...) "
                         "and ImageNet ResNet-18/34/50/101/152/200 without model_options")
    return {k: a[k] for k in ("block", "depths", "widths", "stem", "stem_width")}


class _TFLiteBench:
    """A .tflite file on the LiteRT interpreter (one interpreter per batch size)."""

    def __init__(self, spec):
        from keras_resnet.pipeline import evaluate

        self.predictors, self.inputs = {}, {}
        for task in spec["tasks"]:
            batch = _parse_task(task)[1]
            p = evaluate.TFLitePredictor(spec["model_file"], num_threads=spec["threads"])
            self.predictors[batch] = p
            self.inputs[batch] = _random_images(batch, p.image_size, spec["seed"])
            p(self.inputs[batch])  # resizes the interpreter to the batch once
        p = next(iter(self.predictors.values()))
        self.info = {"threads": spec["threads"], "image_size": p.image_size,
                     "classes": p.num_outputs,
                     "input_dtype": str(p.input["dtype"].__name__),
                     "ai_edge_litert": _version("ai-edge-litert")}

    def step(self, task):
        batch = _parse_task(task)[1]
        return float(self.predictors[batch](self.inputs[batch]).reshape(-1)[0])


class _PipelineBench:
    """The training stream of load_data, exactly as keras_resnet.pipeline.train uses it."""

    def __init__(self, spec):
        _apply_threads(spec)
        import tensorflow as tf

        from keras_resnet.pipeline import data as data_lib

        kwargs = {}
        if spec.get("cache_budget_mb") is not None:
            kwargs["cache_budget"] = spec["cache_budget_mb"] * 2**20
        start = time.perf_counter()
        bundle = data_lib.load_data(
            spec["dataset"], data_dir=spec.get("data_dir"), image_size=spec["image_size"],
            batch_size=spec["batch_size"], val_fraction=spec["val_fraction"],
            seed=spec["seed"], augment=spec["augment"], **kwargs)
        classes = bundle.num_classes

        def one_hot(x, y):  # as train.train's stream
            return x, tf.one_hot(y, classes)

        self.iterator = iter(bundle.epochs(0).map(one_hot))
        self.info = {"dataset": spec["dataset"], "train_images": bundle.train_size,
                     "val_images": bundle.val_size, "classes": classes,
                     "cached_in_memory": bundle.cached, "skipped_images": len(bundle.skipped),
                     "augmentation": data_lib.augmentation_style(spec["image_size"])
                     if spec["augment"] else "none",
                     "load_data_s": time.perf_counter() - start}

    def step(self, task):
        x, _ = next(self.iterator)  # an eager tensor: the batch is finished
        return float(x.shape[0])


BENCHES = {"keras": _KerasBench, "torch": _TorchBench, "tflite": _TFLiteBench,
           "pipeline": _PipelineBench}


def _warm(bench, tasks, warmup):
    out = {}
    for task in tasks:
        start = time.perf_counter()
        bench.step(task)
        first = time.perf_counter() - start
        for _ in range(max(warmup, 1) - 1):
            bench.step(task)
        out[task] = {"first_step_s": first, "warmup_s": time.perf_counter() - start}
    return out


def _window(bench, task, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        bench.step(task)
        times.append(time.perf_counter() - start)
    return {"seconds": sum(times), "step_s": times}


# --------------------------------------------------------------------------- runners


class _Local:
    """Runs a bench in this process."""

    def __init__(self, spec):
        self.spec = spec
        self.bench = None

    def start(self):
        self.bench = BENCHES[self.spec["kind"]](self.spec)
        return {"info": self.bench.info,
                "warm": _warm(self.bench, self.spec["tasks"], self.spec["warmup"])}

    def window(self, task, steps):
        return _window(self.bench, task, steps)

    def close(self):
        self.bench = None


class _Worker:
    """Runs a bench in a subprocess with its own KERAS_BACKEND, answering one request a time.

    Requests and replies are JSON lines (replies prefixed with ``_MARK`` on stdout); the
    worker's stderr goes to a temporary file quoted when it fails.
    """

    def __init__(self, spec, timeout):
        self.spec = spec
        self.timeout = timeout
        self.proc = None
        self.stderr = None

    def start(self):
        env = dict(os.environ, KERAS_BACKEND=self.spec.get("backend") or "tensorflow",
                   TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.pathsep.join(filter(None, [REPO,
                                                            os.environ.get("PYTHONPATH")])))
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, THIS, "--mode=_worker"], cwd=REPO,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)
        return self._ask({"cmd": "start", "spec": self.spec})

    def _ask(self, request):
        timer = threading.Timer(self.timeout, self.proc.kill)
        timer.start()
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise BenchError(f"the {self.spec['name']} subprocess ended without an "
                                     f"answer ({self._stderr_tail()})")
                if line.startswith(_MARK):
                    reply = json.loads(line[len(_MARK):])
                    break
        except (BrokenPipeError, OSError) as e:
            raise BenchError(f"the {self.spec['name']} subprocess failed "
                             f"({self._stderr_tail() or e})") from None
        finally:
            timer.cancel()
        if "error" in reply:
            if reply.get("user"):
                raise BenchError(reply["error"])
            raise RuntimeError(f"{self.spec['name']}: {reply['error']}")
        return reply

    def _stderr_tail(self):
        self.stderr.seek(0)
        lines = [ln for ln in self.stderr.read().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "no message"

    def window(self, task, steps):
        return self._ask({"cmd": "window", "task": task, "steps": steps})

    def close(self):
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self.stderr.close()
            self.proc = None


def _worker_main() -> int:
    """The subprocess side of _Worker: reads requests on stdin, replies on stdout."""
    reply_to = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    bench = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "start":
                spec = request["spec"]
                bench = BENCHES[spec["kind"]](spec)
                reply = {"info": bench.info,
                         "warm": _warm(bench, spec["tasks"], spec["warmup"])}
            elif request["cmd"] == "window":
                reply = _window(bench, request["task"], request["steps"])
            else:
                reply_to.write(_MARK + json.dumps({"ok": True}) + "\n")
                break
        except _user_errors() as e:
            reply = {"error": str(e), "user": True}
        except Exception as e:  # noqa: BLE001 - reported to the parent, traceback on stderr
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {_first_line(e)}", "user": False}
        reply_to.write(_MARK + json.dumps(reply) + "\n")
    return 0


def _current_backend():
    keras = sys.modules.get("keras")
    if keras is not None:
        return keras.config.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def _runner(spec, *, subprocess_only=False):
    local = (not subprocess_only and spec["kind"] != "torch"
             and (spec["kind"] != "keras" or spec["backend"] == _current_backend()))
    return _Local(spec) if local else _Worker(spec, FLAGS.worker_timeout)


def _measure(items, *, windows, steps):
    """Starts every runner in turn, then times windows round-robin over (runner, task).

    Returns one result dict per (runner, task).
    """
    runners = []
    for runner, _ in items:
        if runner not in runners:
            runners.append(runner)
    started = {}
    try:
        for runner in runners:
            print(f"  starting {runner.spec['name']} ...", flush=True)
            started[id(runner)] = runner.start()
        times = {i: [] for i in range(len(items))}
        for w in range(windows):
            for i, (runner, task) in enumerate(items):
                times[i].append(runner.window(task, steps))
                # Lets the previous runner's spinning thread pools go idle.
                time.sleep(0.05)
            print(f"  window {w + 1}/{windows} done", flush=True)
    finally:
        for runner in runners:
            runner.close()
    results = []
    for i, (runner, task) in enumerate(items):
        kind, batch = _parse_task(task)
        start = started[id(runner)]
        secs = [t["seconds"] for t in times[i]]
        rates = [steps * batch / s for s in secs]
        step_ms = [1e3 * s for t in times[i] for s in t["step_s"]]
        spec = runner.spec
        results.append({
            "name": spec["name"], "kind": spec["kind"], "backend": spec.get("backend"),
            "group": spec.get("group"), "role": spec.get("role"), "task": kind,
            "batch_size": batch, "model": spec.get("variant") or spec.get("model"),
            "images_per_sec": {"median": statistics.median(rates), "min": min(rates),
                               "max": max(rates)},
            "window_images_per_sec": rates,
            "step_ms": {"median": statistics.median(step_ms), "min": min(step_ms),
                        "max": max(step_ms)},
            "first_step_s": start["warm"][task]["first_step_s"],
            "warmup_s": start["warm"][task]["warmup_s"],
            "windows": windows, "steps_per_window": steps, "info": start["info"],
        })
    return results


# --------------------------------------------------------------------------- settings


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _machine():
    info = {"platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            info["memory_gib"] = round(kb / 2**20, 1)
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    info["versions"] = {d: _version(d) for d in (
        "keras", "tensorflow", "jax", "jaxlib", "torch", "numpy", "ai-edge-litert",
        "keras_resnet")}
    return info


def _need(module, hint):
    if importlib.util.find_spec(module) is None:
        raise BenchError(f"{module} is not installed; {hint}")


def _torch_available():
    return importlib.util.find_spec("torch") is not None


def _need_torch(why):
    if not _torch_available():
        raise BenchError(f"{why} needs PyTorch, which is not installed; {BENCH_EXTRA}")


def _need_backend(backend):
    if backend not in BACKENDS:
        raise BenchError(f"backend={backend!r} is not valid; choose one of "
                         f"{', '.join(BACKENDS)}")
    if backend == "torch":
        _need_torch("the torch Keras backend")
    elif backend == "jax":
        _need("jax", "pip install 'jax[cpu]' (or pip install -e '.[dev]')")


def _choose(name, value, valid):
    if value not in valid:
        raise BenchError(f"{name}={value!r} is not valid; choose one of {', '.join(valid)}")


def _choose_list(name, values, valid):
    if not values:
        raise BenchError(f"--{name} is empty; choose from {', '.join(valid)}")
    for v in values:
        _choose(name, v, valid)


def _ints(name, values, minimum=1):
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise BenchError(f"--{name}={','.join(values)} must be integers") from None
    if not out or min(out) < minimum:
        raise BenchError(f"--{name} must hold integers of at least {minimum}")
    return out


def _model_options():
    if not FLAGS.model_options:
        return {}
    try:
        options = json.loads(FLAGS.model_options)
    except json.JSONDecodeError as e:
        raise BenchError(f"--model_options is not valid JSON ({e})") from None
    if not isinstance(options, dict):
        raise BenchError("--model_options must be a JSON dict of ResNetConfig fields")
    return options


def _resolve_model(*, model=None, depth=None, options=None, batch_size=None,
                   image_size=None):
    """Validates a model choice; returns (resolved training config, batch, size, classes)."""
    from keras_resnet.pipeline import data as data_lib
    from keras_resnet.pipeline import train as train_lib

    if model is None and depth is None:
        raise BenchError("pass --model (e.g. resnet20, resnet50) or --depth (e.g. 20, 50)")
    probe = train_lib.TrainConfig(model=model, depth=depth, model_options=options or {},
                                  dataset="synthetic", image_size=image_size)
    resolved = train_lib.resolve(probe)
    batch = batch_size or DEFAULT_BATCH[resolved["recipe"]]
    resolved = train_lib.resolve(_train_config(train_lib, {
        "model": model, "depth": depth, "model_options": options, "batch_size": batch,
        "image_size": resolved["image_size"], "seed": FLAGS.seed}))
    size = resolved["image_size"]
    classes = FLAGS.classes or data_lib.synthetic_classes(size)
    return resolved, batch, size, classes


def _check_common():
    for name in ("warmup", "windows", "steps"):
        if FLAGS[name].value < 1:
            raise BenchError(f"--{name} must be at least 1")
    _choose("precision", FLAGS.precision, PRECISIONS)
    _choose("jit_compile", FLAGS.jit_compile, AUTO_BOOL)
    if FLAGS.batch_size is not None and FLAGS.batch_size < 1:
        raise BenchError("--batch_size must be at least 1")
    if FLAGS.classes is not None and FLAGS.classes < 2:
        raise BenchError("--classes must be at least 2")
    if FLAGS.inter_op_threads < 0 or FLAGS.intra_op_threads < 0:
        raise BenchError("thread counts must be at least 0")


def _keras_spec(name, *, backend, resolved, batch, size, classes, tasks, source="keras_resnet",
                **extra):
    depth = resolved.get("depth")
    return {"kind": "keras", "name": name, "backend": backend, "source": source,
            "variant": resolved["model"], "model": None if depth else resolved["model"],
            "depth": depth,
            "model_options": resolved["model_options"], "batch_size": batch,
            "image_size": size, "classes": classes, "tasks": tasks,
            "precision": FLAGS.precision, "jit_compile": FLAGS.jit_compile,
            "seed": FLAGS.seed, "warmup": FLAGS.warmup,
            "total_steps": FLAGS.warmup + FLAGS.windows * FLAGS.steps,
            "inter_op_threads": FLAGS.inter_op_threads,
            "intra_op_threads": FLAGS.intra_op_threads, **extra}


def _threads_force_subprocess():
    # Thread pools are fixed when TensorFlow starts: a fresh process applies them surely.
    return bool(FLAGS.inter_op_threads or FLAGS.intra_op_threads)


# --------------------------------------------------------------------------- modes


def run_train():
    _need_backend(FLAGS.backend)
    resolved, batch, size, classes = _resolve_model(
        model=FLAGS.model, depth=FLAGS.depth, options=_model_options(),
        batch_size=FLAGS.batch_size, image_size=FLAGS.image_size)
    spec = _keras_spec(f"keras_resnet {resolved['model']}", backend=FLAGS.backend,
                       resolved=resolved, batch=batch, size=size, classes=classes,
                       tasks=[f"train:{batch}"])
    runner = _runner(spec, subprocess_only=_threads_force_subprocess())
    results = _measure([(runner, t) for t in spec["tasks"]], windows=FLAGS.windows,
                       steps=FLAGS.steps)
    return {"results": results}


def run_infer():
    files = [os.path.expanduser(f) for f in FLAGS.model_file]
    for f in files:
        if not f.endswith((".keras", ".tflite")):
            raise BenchError(f"--model_file {f} must be a .keras or .tflite file")
        if not os.path.isfile(f):
            raise BenchError(f"--model_file {f} does not exist")
    items = []
    if not files or any(f.endswith(".keras") for f in files):
        _need_backend(FLAGS.backend)
    if files:
        default_batch = FLAGS.batch_size or 32
    else:
        resolved, default_batch, size, classes = _resolve_model(
            model=FLAGS.model, depth=FLAGS.depth, options=_model_options(),
            batch_size=FLAGS.batch_size, image_size=FLAGS.image_size)
    batches = (_ints("infer_batch_sizes", FLAGS.infer_batch_sizes)
               if FLAGS.infer_batch_sizes else sorted({1, default_batch}))
    tasks = [f"infer:{b}" for b in batches]
    force = _threads_force_subprocess()
    if not files:
        spec = _keras_spec(f"keras_resnet {resolved['model']}", backend=FLAGS.backend,
                           resolved=resolved, batch=max(batches), size=size,
                           classes=classes, tasks=tasks)
        runner = _runner(spec, subprocess_only=force)
        items += [(runner, t) for t in tasks]
    for f in files:
        base = os.path.basename(f)
        if f.endswith(".keras"):
            spec = {"kind": "keras", "name": f"{base} (keras)", "backend": FLAGS.backend,
                    "model_file": f, "image_size": FLAGS.image_size, "tasks": tasks,
                    "seed": FLAGS.seed, "warmup": FLAGS.warmup,
                    "inter_op_threads": FLAGS.inter_op_threads,
                    "intra_op_threads": FLAGS.intra_op_threads}
            runner = _runner(spec, subprocess_only=force)
            items += [(runner, t) for t in tasks]
        else:
            _need("ai_edge_litert", "pip install -e '.[train]'")
            for threads in _ints("tflite_threads", FLAGS.tflite_threads):
                spec = {"kind": "tflite", "name": f"{base} (LiteRT, {threads} thr)",
                        "model_file": f, "threads": threads, "tasks": tasks,
                        "seed": FLAGS.seed, "warmup": FLAGS.warmup}
                runner = _Local(spec)
                items += [(runner, t) for t in tasks]
    return {"results": _measure(items, windows=FLAGS.windows, steps=FLAGS.steps)}


def run_pipeline():
    if FLAGS.model is not None or FLAGS.depth is not None:
        _, batch, size, _ = _resolve_model(model=FLAGS.model, depth=FLAGS.depth,
                                           options=_model_options(),
                                           batch_size=FLAGS.batch_size,
                                           image_size=FLAGS.image_size)
    else:
        batch, size = FLAGS.batch_size or DEFAULT_BATCH["cifar"], FLAGS.image_size or 32
    spec = {"kind": "pipeline", "name": f"load_data({FLAGS.dataset}) training stream",
            "dataset": FLAGS.dataset, "data_dir": FLAGS.data_dir, "image_size": size,
            "batch_size": batch, "val_fraction": FLAGS.val_fraction, "seed": FLAGS.seed,
            "augment": FLAGS.augment, "cache_budget_mb": FLAGS.cache_budget_mb,
            "tasks": [f"pipeline:{batch}"], "warmup": FLAGS.warmup,
            "inter_op_threads": FLAGS.inter_op_threads,
            "intra_op_threads": FLAGS.intra_op_threads}
    if FLAGS.cache_budget_mb is not None and FLAGS.cache_budget_mb < 0:
        raise BenchError("--cache_budget_mb must be at least 0")
    runner = _Local(spec) if not _threads_force_subprocess() else _Worker(
        spec, FLAGS.worker_timeout)
    return {"results": _measure([(runner, spec["tasks"][0])], windows=FLAGS.windows,
                                steps=FLAGS.steps)}


def run_compare():
    _choose_list("compare", FLAGS.compare, COMPARISONS)
    _choose_list("tasks", FLAGS.tasks, TASKS)
    _choose_list("torch_formats", FLAGS.torch_formats, TORCH_FORMATS)
    if not FLAGS.backends:
        raise BenchError(f"--backends is empty; choose from {', '.join(BACKENDS)}")
    for backend in FLAGS.backends:
        _need_backend(backend)
    if "pytorch" in FLAGS.compare:
        _need_torch("--compare=pytorch")
    if not FLAGS.compare_models:
        raise BenchError("--compare_models is empty; e.g. resnet20,resnet50")
    options = _model_options()
    groups = []
    for name in FLAGS.compare_models:
        resolved, batch, size, classes = _resolve_model(
            **_model_or_depth(name), options=options, batch_size=FLAGS.batch_size,
            image_size=FLAGS.image_size)
        variant = resolved["model"]
        with_apps = "applications" in FLAGS.compare and variant in APPLICATIONS
        with_torch = "pytorch" in FLAGS.compare
        arch = _torch_arch(resolved) if with_torch else None
        if not (with_apps or with_torch):
            raise BenchError(f"{variant} has nothing to compare with: keras.applications "
                             f"builds {', '.join(APPLICATIONS)}; add pytorch to --compare")
        tasks = [f"{t}:{batch}" for t in FLAGS.tasks]
        specs = []
        for backend in FLAGS.backends:
            common = dict(backend=backend, resolved=resolved, batch=batch, size=size,
                          classes=classes, tasks=tasks, group=variant)
            specs.append(_keras_spec(f"keras_resnet {variant} [{backend}]",
                                     role="keras_resnet", **common))
            if with_apps:
                specs.append(_keras_spec(
                    f"keras.applications.{APPLICATIONS[variant]} [{backend}]",
                    source="applications", role="applications", **common))
        if with_torch:
            recipe = {k: resolved[k] for k in ("learning_rate", "weight_decay",
                                               "label_smoothing", "momentum")}
            for fmt in FLAGS.torch_formats:
                specs.append({"kind": "torch", "name": f"pytorch {variant} [{fmt}]",
                              "backend": None, "group": variant, "role": f"pytorch_{fmt}",
                              "model": variant, "arch": arch, "channels_last":
                              fmt == "channels_last", "classes": classes, "image_size": size,
                              "recipe": recipe, "tasks": tasks, "seed": FLAGS.seed,
                              "warmup": FLAGS.warmup,
                              "intra_op_threads": FLAGS.intra_op_threads})
        groups.append((variant, specs))
    results = []
    for variant, specs in groups:
        print(f"{variant}: {len(specs)} subprocesses, windows interleaved", flush=True)
        items = []
        for spec in specs:
            runner = _Worker(spec, FLAGS.worker_timeout)
            items += [(runner, t) for t in spec["tasks"]]
        results += _measure(items, windows=FLAGS.windows, steps=FLAGS.steps)
    return {"results": results, "ratios": _ratios(results), "params": _params(results)}


def _model_or_depth(name):
    """A variant name, or "resnetN" / "N" for a depth outside the table (e.g. resnet8)."""
    from keras_resnet import configs

    key = name.lower().replace("-", "_")
    digits = key[len("resnet"):] if key.startswith("resnet") else key
    if key not in configs.VARIANTS and digits.isdigit():
        return {"depth": int(digits)}
    return {"model": name}


def _ratios(results):
    """keras_resnet / other, per group, backend and task: of medians and paired by window."""
    ratios = []
    for a in results:
        if a["role"] != "keras_resnet":
            continue
        for b in results:
            if b is a or b["group"] != a["group"] or b["task"] != a["task"] or b["role"] in (
                    "keras_resnet", None):
                continue
            if b["role"] == "applications" and b["backend"] != a["backend"]:
                continue
            paired = [x / y for x, y in zip(a["window_images_per_sec"],
                                            b["window_images_per_sec"], strict=True)]
            ratios.append({"group": a["group"], "task": a["task"], "keras_resnet": a["name"],
                           "other": b["name"], "ratio_of_medians":
                           a["images_per_sec"]["median"] / b["images_per_sec"]["median"],
                           "paired_window_ratio_median": statistics.median(paired)})
    return ratios


def _params(results):
    """Trainable parameter counts of every model of the comparison, and whether they match."""
    out = {}
    for r in results:
        group = out.setdefault(r["group"], {})
        group[r["name"]] = r["info"].get("params_trainable")
    checks = []
    for group, counts in out.items():
        keras_counts = {n: c for n, c in counts.items() if n.startswith("keras_resnet")}
        torch_counts = {n: c for n, c in counts.items() if n.startswith("pytorch")}
        if keras_counts and torch_counts:
            checks.append({"group": group, "keras_resnet": sorted(set(keras_counts.values())),
                           "pytorch": sorted(set(torch_counts.values())),
                           "equal": set(keras_counts.values()) == set(torch_counts.values())})
    return {"trainable": out, "keras_resnet_vs_pytorch": checks}


# ---- memory


# Runs argv[2:] as a child and writes that child's ru_maxrss (KiB) to argv[1]. A child's
# ru_maxrss includes the memory of the process it was forked from (counted until exec), so
# the measured command is forked from this small launcher, never from a benchmark process
# that may hold TensorFlow; the launcher's own few MiB are the floor of the figure.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def _run_measured(cmd, *, timeout, env=None):
    """Runs a command; returns (exit status, stdout, stderr, peak RSS MiB, wall seconds).

    The peak RSS is the command's own ru_maxrss (see ``_LAUNCHER``).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryDirectory() as tmp:
        rss_file = os.path.join(tmp, "maxrss")
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, rss_file, *cmd], cwd=REPO,
            stdout=out, stderr=err, start_new_session=True,
            env=env or dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher's own session: it and the command
            proc.wait()
            raise RuntimeError(f"{os.path.basename(cmd[1])} took over {timeout} s") from None
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        try:
            with open(rss_file) as f:
                peak = int(f.read()) / 1024  # ru_maxrss is in KiB on Linux
        except (OSError, ValueError):
            peak = float("nan")
        return status, out.read(), err.read(), peak, wall


def _tail(text, n=1):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "no output"


def _memory_train(work, train_args):
    model_args = ([f"--model={FLAGS.model}"] if FLAGS.model else
                  [f"--depth={FLAGS.depth or 20}"])
    extra = [f"--batch_size={FLAGS.batch_size}"] if FLAGS.batch_size else []
    extra += [f"--image_size={FLAGS.image_size}"] if FLAGS.image_size else []
    extra += train_args
    run_dir = os.path.join(work, "train_run")
    cmd = [sys.executable, os.path.join(REPO, "tools", "train.py"), *model_args,
           "--dataset=synthetic", "--epochs=1", f"--steps_per_epoch={FLAGS.memory_steps}",
           "--warmup_epochs=0",  # one short epoch: the ImageNet recipe's 5 would not fit
           f"--model_dir={run_dir}", "--verbose=false", *extra]
    print("  running " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
    status, out, err, peak, wall = _run_measured(cmd, timeout=FLAGS.worker_timeout)
    if status == 2:
        raise BenchError(f"tools/train.py refused the arguments: {_tail(err)}")
    if status != 0:
        raise RuntimeError(f"tools/train.py failed with status {status}: {_tail(err, 3)}")
    done = [ln for ln in out.splitlines() if ln.startswith("done: ")]
    metrics = json.loads(done[-1][len("done: "):]) if done else {}
    return {"command": cmd[1:], "peak_rss_mib": peak, "wall_s": wall,
            "train_py_images_per_sec": metrics.get("images_per_sec"),
            "steps": FLAGS.memory_steps}


def _cifar_images(tar_path):
    """{class: [jpeg bytes, ...]} of the CIFAR-10 training archive, in file order."""
    images = {}
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(".jpg"):
                parts = member.name.split("/")
                images.setdefault(parts[-2], []).append(tar.extractfile(member).read())
    return images


def _synthetic_images(per_class=50, classes=10, size=32, seed=0):
    """{class: [jpeg bytes, ...]} of random-pattern JPEGs (no data needed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = {}
    for c in range(classes):
        base = rng.uniform(0, 255, (1, 1, 3))
        out = []
        for _ in range(per_class):
            pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255)
            buf = io.BytesIO()
            Image.fromarray(pixels.astype("uint8")).save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
        images[f"class_{c}"] = out
    return images


def _write_folder(root, images, count):
    """Writes ``count`` images spread evenly over the classes (repeating files if needed)."""
    classes = sorted(images)
    for k, name in enumerate(classes):
        n = count // len(classes) + (1 if k < count % len(classes) else 0)
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        pool = images[name]
        for i in range(n):
            with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
                f.write(pool[i % len(pool)])
    return root


def _folder_plan():
    """Validates the folder check's flags: returns (image counts, image source)."""
    counts = _ints("memory_images", FLAGS.memory_images, minimum=20)
    if len(counts) < 2:
        raise BenchError("--memory_images needs at least two folder sizes, e.g. 5000,50000")
    _choose("folder_source", FLAGS.folder_source, FOLDER_SOURCES)
    source = FLAGS.folder_source
    if source == "auto":
        source = "cifar" if os.path.isfile(FLAGS.cifar_tar) else "synthetic"
    if source == "cifar" and not os.path.isfile(FLAGS.cifar_tar):
        raise BenchError(f"--cifar_tar {FLAGS.cifar_tar} does not exist; pass "
                         "--folder_source=synthetic")
    if FLAGS.cache_budget_mb is not None and FLAGS.cache_budget_mb < 0:
        raise BenchError("--cache_budget_mb must be at least 0")
    return counts, source


def _memory_folder(work, counts, source):
    if source == "cifar":
        images = _cifar_images(FLAGS.cifar_tar)
    else:
        images = _synthetic_images()
    size = FLAGS.image_size or 32
    batch = FLAGS.batch_size or DEFAULT_BATCH["cifar"]
    budget = 0 if FLAGS.cache_budget_mb is None else FLAGS.cache_budget_mb
    rows = []
    for count in counts:
        start = time.perf_counter()
        folder = _write_folder(os.path.join(work, f"folder_{count}"), images, count)
        written = time.perf_counter() - start
        out_json = os.path.join(work, f"pipeline_{count}.json")
        cmd = [sys.executable, THIS, "pipeline", "--dataset=folder", f"--data_dir={folder}",
               f"--image_size={size}", f"--batch_size={batch}", f"--warmup={FLAGS.warmup}",
               f"--windows={FLAGS.windows}", f"--steps={FLAGS.steps}",
               f"--cache_budget_mb={budget}", f"--val_fraction={FLAGS.val_fraction}",
               f"--output_json={out_json}"]
        print(f"  folder of {count} images: iterating the training stream", flush=True)
        status, _, err, peak, wall = _run_measured(cmd, timeout=FLAGS.worker_timeout)
        if status != 0:
            raise RuntimeError(f"the folder pipeline of {count} images failed: "
                               f"{_tail(err, 3)}")
        with open(out_json) as f:
            child = json.load(f)["results"][0]
        shutil.rmtree(folder, ignore_errors=True)
        rows.append({"images": count, "peak_rss_mib": peak, "wall_s": wall,
                     "write_folder_s": written,
                     "batches_iterated": FLAGS.warmup + FLAGS.windows * FLAGS.steps,
                     "images_per_sec": child["images_per_sec"], "info": child["info"]})
    small = min(rows, key=lambda r: r["images"])
    large = max(rows, key=lambda r: r["images"])
    growth = large["peak_rss_mib"] / small["peak_rss_mib"] - 1
    return {"source": source, "image_size": size, "batch_size": batch,
            "cache_budget_mb": budget, "folders": rows,
            "peak_rss_growth_largest_vs_smallest": growth,
            "within_10_percent": abs(growth) <= 0.10}


def run_memory():
    _choose_list("memory_checks", FLAGS.memory_checks, MEMORY_CHECKS)
    if FLAGS.memory_steps < 1:
        raise BenchError("--memory_steps must be at least 1")
    try:
        train_args = shlex.split(FLAGS.train_args)
    except ValueError as e:
        raise BenchError(f"--train_args cannot be split into flags ({e})") from None
    plan = _folder_plan() if "folder" in FLAGS.memory_checks else None
    if FLAGS.work_dir and not os.path.isdir(FLAGS.work_dir):
        raise BenchError(f"--work_dir {FLAGS.work_dir} does not exist")
    work = tempfile.mkdtemp(prefix="benchmark_memory_", dir=FLAGS.work_dir)
    out = {}
    try:
        if "train" in FLAGS.memory_checks:
            print("memory: tools/train.py", flush=True)
            out["train"] = _memory_train(work, train_args)
        if plan:
            print("memory: folder pipeline", flush=True)
            out["folder"] = _memory_folder(work, *plan)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"memory": out}


# --------------------------------------------------------------------------- output


def _table(rows, headers):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def format_report(report) -> str:
    """The human-readable tables of a report (every figure comes from the report)."""
    parts = []
    results = report.get("results") or []
    if results:
        rows = []
        for r in results:
            ips = r["images_per_sec"]
            rows.append([r["name"], r.get("backend") or "-", r["task"], r["batch_size"],
                         f"{ips['median']:.1f}", f"{ips['min']:.1f}-{ips['max']:.1f}",
                         f"{r['step_ms']['median']:.2f}", f"{r['first_step_s']:.2f}"])
        parts.append(_table(rows, ["measurement", "backend", "task", "batch",
                                   "images/s median", "min-max (windows)", "ms/step median",
                                   "first step s"]))
    if report.get("ratios"):
        rows = [[r["group"], r["task"], r["keras_resnet"], r["other"],
                 f"{r['ratio_of_medians']:.3f}", f"{r['paired_window_ratio_median']:.3f}"]
                for r in report["ratios"]]
        parts.append(_table(rows, ["model", "task", "keras_resnet", "other",
                                   "ratio (medians)", "ratio (paired windows)"]))
    for check in (report.get("params") or {}).get("keras_resnet_vs_pytorch", []):
        k = ", ".join(f"{c:,}" for c in check["keras_resnet"])
        t = ", ".join(f"{c:,}" for c in check["pytorch"])
        verdict = "equal" if check["equal"] else "DIFFERENT"
        parts.append(f"trainable parameters of {check['group']}: keras_resnet {k}, "
                     f"pytorch {t} ({verdict})")
    memory = report.get("memory") or {}
    if "train" in memory:
        m = memory["train"]
        rate = m["train_py_images_per_sec"]
        rate_text = f", {rate:.1f} images/s reported by train.py" if rate else ""
        parts.append(f"tools/train.py ({m['steps']} steps): peak RSS "
                     f"{m['peak_rss_mib']:.0f} MiB, {m['wall_s']:.1f} s{rate_text}")
    if "folder" in memory:
        m = memory["folder"]
        rows = [[f"{r['images']:,}", f"{r['peak_rss_mib']:.0f}",
                 f"{r['images_per_sec']['median']:.1f}", r["batches_iterated"],
                 r["info"]["cached_in_memory"]] for r in m["folders"]]
        parts.append(_table(rows, ["folder images", "peak RSS MiB", "images/s median",
                                   "batches", "cached"]))
        verdict = "within" if m["within_10_percent"] else "NOT within"
        parts.append(f"folder pipeline ({m['source']} JPEGs, cache budget "
                     f"{m['cache_budget_mb']} MiB): peak RSS grows "
                     f"{100 * m['peak_rss_growth_largest_vs_smallest']:+.1f}% from the "
                     f"smallest to the largest folder ({verdict} 10%)")
    machine = report["machine"]
    parts.append(f"machine: {machine.get('cpu', machine['machine'])}, "
                 f"{machine['cpus_usable']} CPUs usable, {machine.get('memory_gib', '?')} "
                 f"GiB; load average at start {machine.get('load_average_at_start')}")
    return "\n\n".join(parts)


def _settings():
    return {name: FLAGS[name].value for name in FLAGS if name not in ("mode",)}


# --------------------------------------------------------------------------- main


RUNS = {"train": run_train, "infer": run_infer, "pipeline": run_pipeline,
        "compare": run_compare, "memory": run_memory}


def main(argv: list[str]) -> int:
    """Parses flags and runs one mode; returns the exit status (2 for bad input)."""
    # Positionals are checked here: the mode may come first, once.
    status, rest = _cli.parse(FLAGS, argv, doc=__doc__, max_positional=len(argv))
    if status is not None:
        return status
    mode = FLAGS.mode
    if len(rest) > 1 or (rest and mode not in (None, rest[0])):
        return _cli.error(f"unexpected arguments {rest}; give the mode once, then "
                          "--name=value flags")
    if rest:
        mode = rest[0]
    if mode == "_worker":
        return _worker_main()
    if mode is None:
        return _cli.error(f"give a mode: {', '.join(MODES)} (e.g. benchmark.py train "
                      "--depth=20)")
    if mode not in MODES:
        return _cli.error(f"mode {mode!r} is not valid; choose one of {', '.join(MODES)}")
    report = {"mode": mode,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": _machine(), "settings": _settings()}
    try:
        _check_common()
        report.update(RUNS[mode]())
    except _user_errors() as e:
        return _cli.error(_first_line(e) if not isinstance(e, BenchError) else str(e))
    except RuntimeError as e:
        return _cli.error(f"the benchmark failed: {_first_line(e)}", status=1)
    report["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(format_report(report), flush=True)
    if FLAGS.output_json:
        folder = os.path.dirname(os.path.abspath(FLAGS.output_json))
        os.makedirs(folder, exist_ok=True)
        with open(FLAGS.output_json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
