"""The GPU measurement: keras_resnet on the Keras JAX backend against PyTorch on the same
GPU, in one command that needs no TensorFlow (``tools/benchmark.py gpu``).

Two parts, each measurement in its own subprocess, one after the other (a GPU holds one
at a time; they are not interleaved, since a process holding ResNet-50 at batch 256 would
crowd the next out of memory):

* ResNet-50 at 224 pixels, batch 256, synthetic data: keras_resnet's ResNet50 built and
  compiled as ``tools/train.py`` builds it, on JAX, in float32 and in ``mixed_bfloat16``,
  one ``train_on_batch`` per step; torchvision's ``resnet50`` (the plain twin of
  :mod:`~keras_resnet.benchmark.torch_twins` where torchvision is missing) in
  channels_last, float32 and bfloat16 autocast, eager and ``torch.compile``.
* CIFAR ResNet-56 (``--depth``), whole epochs of the real training images of a CIFAR
  folder (``--data_dir``, the 45,000 images of the seed-0 carve, batch 128): keras_resnet
  through the device-resident loop tools/train.py runs on JAX, the PyTorch twin with the
  images on the GPU and the same augmentation there (:mod:`~keras_resnet.benchmark.
  epochs`), in ``--cifar_precisions`` (bfloat16 by default), eager and compiled.

The report (``--output_json``, and a markdown file beside it) names the GPU, the driver,
the library versions, the date and the command, every figure (median images/s over the
windows, min-max, the compile step's time), the ratios keras_resnet / PyTorch of the same
precision and best against best. Float32 on a GPU is XLA's default precision on JAX
(TF32 convolutions) and cuDNN's default on PyTorch (TF32 convolutions allowed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from keras_resnet.benchmark import protocol, runners, torch_twins
from keras_resnet.benchmark.errors import BenchmarkError
from keras_resnet.benchmark.report import version
from keras_resnet.benchmark.settings import (
    COMPARE_PRECISIONS,
    TORCH_MODES,
    Settings,
    choose_list,
    need,
)

RESNET50_BATCH = 256
CIFAR_BATCH = 128
CIFAR_DEPTH = 56
SHORT = {"float32": "float32", "mixed_bfloat16": "bf16"}


def gpu_info() -> dict:
    """The GPU and driver as ``nvidia-smi`` reports them (empty without it)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [[x.strip() for x in line.split(",")] for line in out.strip().splitlines()]
    if not rows or len(rows[0]) < 3:
        return {}
    return {"gpus": [r[0] for r in rows], "driver": rows[0][1], "memory": rows[0][2]}


def _torchvision() -> bool:
    """Whether torchvision's models import here (its wheel must match torch's)."""
    try:
        result = subprocess.run([sys.executable, "-c", "import torchvision.models"],
                                capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _resnet50_specs(s: Settings, torchvision: bool) -> list[dict]:
    from keras_resnet.benchmark.benches import train_config
    from keras_resnet.pipeline.run import config

    batch, size = s.batch_size or RESNET50_BATCH, s.image_size or 224
    resolved = config.resolve(train_config(model="resnet50", batch_size=batch,
                                           image_size=size, seed=s.seed,
                                           fused_batch_norm=False))
    classes = s.classes or 1000
    tasks = [f"train:{batch}"]
    specs = []
    for precision in s.precisions:
        specs.append(s.keras_spec(
            f"keras_resnet resnet50 [jax, {SHORT[precision]}]", backend="jax",
            resolved=resolved, batch=batch, size=size, classes=classes, tasks=tasks,
            group="resnet50", role="keras_resnet", precision=precision,
            fused_batch_norm=False))
    recipe = {"learning_rate": resolved.learning_rate, "weight_decay": resolved.weight_decay,
              "label_smoothing": resolved.label_smoothing, "momentum": resolved.momentum}
    source = "torchvision" if torchvision else "pytorch"
    for precision in s.precisions:
        for mode in s.torch_modes:
            label = ", ".join(["channels_last", SHORT[precision]]
                              + (["compile"] if mode == "compile" else []))
            specs.append({"kind": "torch", "name": f"{source} resnet50 [{label}]",
                          "backend": "torch", "group": "resnet50", "role": "pytorch",
                          "model": "resnet50", "arch": torch_twins.torch_arch(resolved),
                          "torchvision": torchvision, "precision": precision,
                          "compile": mode == "compile", "channels_last": True,
                          "classes": classes, "image_size": size, "recipe": recipe,
                          "tasks": tasks, "seed": s.seed, "warmup": s.warmup,
                          "intra_op_threads": s.intra_op_threads})
    return specs


def _cifar_specs(s: Settings) -> list[dict]:
    from keras_resnet.pipeline.data import sources

    depth, batch = s.depth or CIFAR_DEPTH, s.cifar_batch_size
    (paths, _), _, _, _ = sources.folder_files(s.data_dir, s.val_fraction, s.seed)
    images = (len(paths) // batch) * batch
    if not images:
        raise BenchmarkError(f"data_dir {s.data_dir} holds {len(paths)} training images, "
                             f"fewer than cifar_batch_size={batch}")
    group = f"resnet{depth} epochs"
    common = {"depth": depth, "data_dir": s.data_dir, "image_size": 32, "batch_size": batch,
              "val_fraction": s.val_fraction, "seed": s.seed, "group": group,
              "tasks": [f"epoch:{images}"], "warmup": 1}
    specs = []
    for precision in s.cifar_precisions:
        specs.append({**common, "kind": "keras_epochs", "backend": "jax",
                      "role": "keras_resnet", "precision": precision,
                      "name": f"keras_resnet resnet{depth} epochs [jax, {SHORT[precision]}]"})
    for precision in s.cifar_precisions:
        for mode in s.torch_modes:
            label = ", ".join(["channels_last", SHORT[precision]]
                              + (["compile"] if mode == "compile" else []))
            specs.append({**common, "kind": "torch_epochs", "backend": "torch",
                          "role": "pytorch", "precision": precision,
                          "compile": mode == "compile",
                          "name": f"pytorch resnet{depth} epochs [{label}]"})
    return specs


def run_gpu(s: Settings) -> dict:
    """Measures both parts (see the module docstring); returns the report's part."""
    s.check()
    choose_list("precisions", s.precisions, COMPARE_PRECISIONS)
    choose_list("cifar_precisions", s.cifar_precisions, COMPARE_PRECISIONS)
    choose_list("torch_modes", s.torch_modes, TORCH_MODES)
    need("jax", "install JAX (with CUDA for a GPU)")
    torch_twins.need_torch("the gpu mode")
    if not s.data_dir:
        raise BenchmarkError("the gpu mode needs --data_dir, a CIFAR-10 training folder "
                             "(one sub-folder of 32-pixel images per class)")
    if s.cifar_batch_size < 1 or s.epochs < 1:
        raise BenchmarkError("cifar_batch_size and epochs must be at least 1")
    torchvision = _torchvision()
    results = []
    parts = [("resnet50", _resnet50_specs(s, torchvision), s.windows, s.steps),
             ("cifar", _cifar_specs(s), s.epochs, 1)]
    for part, specs, windows, steps in parts:
        for spec in specs:
            print(f"{part}: {spec['name']}", flush=True)
            runner = runners.Worker(spec, s.worker_timeout)
            results += protocol.measure([(runner, spec["tasks"][0])], windows=windows,
                                        steps=steps)
    report = {"results": results, "ratios": protocol.ratios(results),
              "best": protocol.best_against_best(results),
              "params": protocol.param_checks(results),
              "gpu": {**gpu_info(), "devices_seen": sorted({str(r["info"].get("device"))
                                                           for r in results}),
                      "versions": {d: version(d) for d in (
                          "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "keras",
                          "torch", "torchvision", "numpy", "keras_resnet")},
                      "torch_model": "torchvision" if torchvision else "keras_resnet twin",
                      "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}}
    report["markdown"] = markdown(report, s)
    if s.output_json:
        path = os.path.splitext(s.output_json)[0] + ".md"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(report["markdown"])
    return report


def markdown(report: dict, s: Settings) -> str:
    """The tables of a gpu report as markdown, with the GPU, versions and command."""
    gpu = report["gpu"]
    versions = ", ".join(f"{k} {v}" for k, v in gpu["versions"].items() if v)
    lines = [f"GPU: {', '.join(gpu.get('gpus', [])) or 'none found by nvidia-smi'}"
             f" (driver {gpu.get('driver', '?')}, {gpu.get('memory', '?')}); devices the "
             f"measurements ran on: {', '.join(gpu['devices_seen'])}",
             f"Versions: {versions}", f"Command: `{gpu['command']}`", "",
             "| measurement | task | batch (epoch: its images) | images/s (median) | min-max "
             "| median step or epoch (ms) | first step or epoch (s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        ips = r["images_per_sec"]
        lines.append(f"| {r['name']} | {r['task']} | {r['batch_size']} | "
                     f"{ips['median']:,.1f} | {ips['min']:,.1f}-{ips['max']:,.1f} | "
                     f"{r['step_ms']['median']:,.1f} | {r['first_step_s']:.1f} |")
    lines += ["", "| model | keras_resnet | PyTorch | ratio (medians) | ratio (paired) |",
              "|---|---|---|---:|---:|"]
    for r in report["ratios"] + [{**b, "best": True} for b in report["best"]]:
        tag = " (best against best)" if r.get("best") else ""
        lines.append(f"| {r['group']}{tag} | {r['keras_resnet']} | {r['other']} | "
                     f"{r['ratio_of_medians']:.3f} | {r['paired_window_ratio_median']:.3f} |")
    lines.append("")
    return "\n".join(lines)
