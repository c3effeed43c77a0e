"""What one benchmark run is asked to do: :class:`Settings`, and its validation.

tools/benchmark.py has one flag per field, generated from :func:`flag_specs`, with the
help text written here. Messages name the fields (``windows=0 must be at least 1``); the
tool writes them as flags.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from pathlib import Path

from keras_resnet.benchmark.errors import BenchmarkError
from keras_resnet.pipeline.errors import choose
from keras_resnet.pipeline.run.config import AUTO_BOOL

# The source checkout: tools/train.py and the shared datasets next to it.
REPO = Path(__file__).resolve().parents[2]
CIFAR_TAR = str(REPO.parent / "shared" / "datasets" / "cifar10" / "train.tar.gz")
BACKENDS = ("tensorflow", "jax", "torch")
# "auto" is what tools/train.py picks here (see keras_resnet.pipeline.training.precision).
PRECISIONS = ("auto", "float32", "mixed_bfloat16")
COMPARE_PRECISIONS = ("float32", "mixed_bfloat16")
COMPARISONS = ("applications", "pytorch")
TASKS = ("train", "infer")
TORCH_FORMATS = ("nchw", "channels_last")
TORCH_MODES = ("eager", "compile")
MEMORY_CHECKS = ("train", "folder")
FOLDER_SOURCES = ("auto", "cifar", "synthetic")
# The input pipelines the pipeline mode measures: tf.data (TensorFlow backend) or the
# folder stream of the other backends (keras_resnet.pipeline.data.folder_stream).
PIPELINE_INPUTS = ("tf.data", "stream")
# Batch sizes when batch_size is unset: the CIFAR recipe's 128; ImageNet-style nets get
# 32 (the recipe's 256 at 224 pixels takes about a minute a step on a 2-core CPU).
CIFAR_BATCH = 128
IMAGENET_BATCH = 32


def _option(default=None, help=""):  # noqa: A002 - "help" as in argparse
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default),
                                 metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Settings:
    """One benchmark run; the help of each field is its flag's help."""

    model: str | None = _option(
        help="variant name, e.g. resnet20, resnet50 (see keras_resnet.VARIANTS).")
    depth: int | None = _option(
        help="ResNet depth instead of --model: 18/34/50/101/152/200 or 6n+2 (8, 14, 20, 56, "
             "...).")
    model_options: str | None = _option(
        help='JSON dict of ResNetConfig overrides, e.g. \'{"keras_applications": true}\'.')
    batch_size: int | None = _option(
        help="batch size (default 128 for CIFAR-style nets, 32 otherwise).")
    image_size: int | None = _option(
        help="square input side (default: the network's, 32 or 224).")
    classes: int | None = _option(
        help="output classes (default 10 up to 64 pixels, else 1000, like "
             "--dataset=synthetic in training).")
    backend: str = _option(
        "tensorflow", "Keras backend of train/infer: tensorflow, jax or torch (run in a "
        "subprocess when it is not this process's backend).")
    backends: list[str] = _option(["tensorflow"], "Keras backends measured by compare.")
    precision: str = _option(
        "auto", "train/infer: auto (as tools/train.py: mixed_bfloat16 on a CPU with AMX or "
        "AVX512_BF16, else float32), float32 or mixed_bfloat16 (Keras dtype policy).")
    fused_batch_norm: bool = _option(
        True, "keras_resnet models train with the fused BatchNormalization, as "
        "tools/train.py does (false: the stock Keras layer).")
    jit_compile: str = _option(
        "auto", "auto (TensorFlow: as tools/train.py, XLA only with a GPU; jax: on; torch: "
        "off), true or false.")
    warmup: int = _option(3, "warm-up steps before timing (the first compiles).")
    windows: int = _option(5, "timed windows.")
    steps: int = _option(10, "steps per timed window.")
    seed: int = _option(0, "seeds weights and the random batch.")
    inter_op_threads: int = _option(
        0, "TensorFlow inter-op threads (0: TensorFlow's default).")
    intra_op_threads: int = _option(
        0, "TensorFlow intra-op threads, and torch.set_num_threads (0: the library's "
        "default).")
    model_file: list[str] = _option(
        [], "infer: .keras and/or .tflite files (default: a built --model).")
    infer_batch_sizes: list[str] = _option(
        [], "infer: batch sizes (default 1 and --batch_size).")
    tflite_threads: list[str] = _option(["1", "2"], "infer: LiteRT interpreter thread counts.")
    dataset: str = _option(
        "synthetic", "pipeline: folder, a prepared TFDS name, digits or synthetic.")
    data_dir: str | None = _option(help="pipeline: folder root or TFDS data dir.")
    augment: bool = _option(True, "pipeline: random crops and flips, as in training.")
    cutout: int = _option(0, "pipeline: Cutout's square side after the crops and flips, as "
                             "tools/train.py --cutout (0: none).")
    val_fraction: float = _option(
        0.1, "pipeline: fraction carved off as validation, as in training.")
    pipeline_input: str = _option(
        "tf.data", "pipeline: tf.data (the TensorFlow backend's input) or stream (a folder "
        "decoded by Pillow threads, as JAX and PyTorch runs read images above 64 pixels; "
        "--intra_op_threads sets its thread count).")
    cache_budget_mb: int | None = _option(
        help="pipeline: decoded-image cache budget (default as tools/train.py, 2048); "
             "memory's folder check defaults to 0 (streamed).")
    compare: list[str] = _option(
        list(COMPARISONS), "compare: applications (keras.applications) and/or pytorch "
        "(plain PyTorch twin).")
    compare_models: list[str] = _option(
        ["resnet20", "resnet50"], "compare: models; applications covers resnet50/101/152.")
    tasks: list[str] = _option(list(TASKS), "compare: train and/or infer.")
    torch_formats: list[str] = _option(
        list(TORCH_FORMATS), "compare: PyTorch memory formats, nchw and/or channels_last.")
    precisions: list[str] = _option(
        list(COMPARE_PRECISIONS), "compare: precisions of every model, float32 and/or "
        "mixed_bfloat16 (PyTorch: bfloat16 autocast).")
    torch_modes: list[str] = _option(
        list(TORCH_MODES), "compare: PyTorch eager and/or torch.compile.")
    memory_checks: list[str] = _option(
        list(MEMORY_CHECKS), "memory: train (tools/train.py) and/or folder.")
    memory_images: list[str] = _option(
        ["5000", "50000"], "memory: images in each generated folder.")
    memory_steps: int = _option(5, "memory: training steps of tools/train.py.")
    train_args: str = _option(
        "", "memory: extra tools/train.py flags, e.g. '--optimizer=adam'.")
    folder_source: str = _option(
        "auto", "memory: images of the folders: cifar (real CIFAR-10 JPEGs from ../shared), "
        "synthetic (generated JPEGs) or auto (cifar when present).")
    cifar_tar: str = _option(CIFAR_TAR, "memory: the CIFAR-10 train.tar.gz.")
    work_dir: str | None = _option(
        help="memory: where the temporary folders and runs go (default: the system temp "
             "dir); removed afterwards.")
    cifar_batch_size: int = _option(128, "gpu: batch of the CIFAR epochs.")
    epochs: int = _option(2, "gpu: timed CIFAR epochs of each measurement (after one "
                             "that compiles).")
    cifar_precisions: list[str] = _option(
        ["mixed_bfloat16"], "gpu: precisions of the CIFAR epochs, float32 and/or "
        "mixed_bfloat16 (ResNet-50 takes --precisions).")
    worker_timeout: int = _option(1800, "seconds a subprocess may take for one reply.")
    output_json: str | None = _option(help="write every figure here as JSON.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Checks the settings every mode uses."""
        for name in ("warmup", "windows", "steps"):
            if getattr(self, name) < 1:
                raise BenchmarkError(f"{name}={getattr(self, name)} must be at least 1")
        choose("precision", self.precision, PRECISIONS, error=BenchmarkError)
        choose("jit_compile", self.jit_compile, AUTO_BOOL, error=BenchmarkError)
        if self.batch_size is not None and self.batch_size < 1:
            raise BenchmarkError(f"batch_size={self.batch_size} must be at least 1")
        if self.classes is not None and self.classes < 2:
            raise BenchmarkError(f"classes={self.classes} must be at least 2")
        if self.cutout < 0:
            raise BenchmarkError(f"cutout={self.cutout} must be at least 0 (0: none)")
        if self.inter_op_threads < 0 or self.intra_op_threads < 0:
            raise BenchmarkError("inter_op_threads and intra_op_threads must be at least 0")

    @property
    def fresh_process(self) -> bool:
        """Whether benches must run in a subprocess: thread pools are fixed when TensorFlow
        starts, so only a fresh process applies thread settings surely."""
        return bool(self.inter_op_threads or self.intra_op_threads)

    def model_options_dict(self) -> dict:
        if not self.model_options:
            return {}
        try:
            options = json.loads(self.model_options)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"model_options is not valid JSON ({e})") from None
        if not isinstance(options, dict):
            raise BenchmarkError("model_options must be a JSON dict of ResNetConfig fields")
        return options

    def resolve_model(self, *, model=None, depth=None):
        """Validates a model choice; returns (ResolvedConfig, batch, image size, classes)."""
        from keras_resnet.benchmark.benches import train_config
        from keras_resnet.pipeline import data
        from keras_resnet.pipeline.run import config

        if model is None and depth is None:
            raise BenchmarkError("pass model=NAME (e.g. resnet20, resnet50) or depth=N "
                                 "(e.g. 20, 50)")
        options = self.model_options_dict()
        probe = config.resolve(train_config(model=model, depth=depth, model_options=options,
                                            image_size=self.image_size))
        batch = self.batch_size or (IMAGENET_BATCH if probe.recipe == "imagenet"
                                    else probe.batch_size)
        resolved = config.resolve(train_config(
            model=model, depth=depth, model_options=options, batch_size=batch,
            image_size=probe.image_size, seed=self.seed))
        size = resolved.image_size
        return resolved, batch, size, self.classes or data.synthetic_classes(size)

    def keras_spec(self, name, *, backend, resolved, batch, size, classes, tasks,
                   source="keras_resnet", **extra) -> dict:
        """The spec of a keras_resnet (or keras.applications) model bench."""
        depth = resolved.depth
        return {"kind": "keras", "name": name, "backend": backend, "source": source,
                "variant": resolved.model, "model": None if depth else resolved.model,
                "depth": depth, "model_options": resolved.model_options,
                "batch_size": batch, "image_size": size, "classes": classes, "tasks": tasks,
                "precision": self.precision, "jit_compile": self.jit_compile,
                "fused_batch_norm": self.fused_batch_norm and source == "keras_resnet",
                "seed": self.seed, "warmup": self.warmup,
                "total_steps": self.warmup + self.windows * self.steps,
                "inter_op_threads": self.inter_op_threads,
                "intra_op_threads": self.intra_op_threads, **extra}


def flag_specs() -> list[tuple[str, str, object, str]]:
    """``(name, kind, default, help)`` of every field; kind is the absl ``DEFINE_<kind>``."""
    hints = typing.get_type_hints(Settings)
    defaults = Settings()
    kinds = {int: "integer", float: "float", bool: "bool", str: "string", list: "list"}
    out = []
    for field in dataclasses.fields(Settings):
        hint = hints[field.name]
        if isinstance(hint, types.UnionType):
            hint = next(h for h in typing.get_args(hint) if h is not type(None))
        kind = kinds[typing.get_origin(hint) or hint]
        out.append((field.name, kind, getattr(defaults, field.name), field.metadata["help"]))
    return out


def choose_list(name: str, values, valid) -> None:
    """Raises unless ``values`` is a non-empty list of ``valid`` choices."""
    if not values:
        raise BenchmarkError(f"{name}= is empty; choose from {', '.join(valid)}")
    for v in values:
        choose(name, v, valid, error=BenchmarkError)


def ints(name: str, values, minimum: int = 1) -> list[int]:
    """A list flag's values as integers of at least ``minimum``."""
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise BenchmarkError(f"{name}={','.join(values)} must be integers") from None
    if not out or min(out) < minimum:
        raise BenchmarkError(f"{name} must hold integers of at least {minimum}")
    return out


def need(module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise BenchmarkError(f"{module} is not installed; {hint}")


def need_backend(backend: str) -> None:
    """Raises unless ``backend`` is a Keras backend installed here."""
    from keras_resnet.benchmark import torch_twins

    choose("backend", backend, BACKENDS, error=BenchmarkError)
    if backend == "torch":
        torch_twins.need_torch("the torch Keras backend")
    elif backend == "jax":
        need("jax", "pip install 'jax[cpu]' (or pip install -e '.[dev]')")
