"""The measuring modes: train, infer, pipeline and compare (memory is in ``memory``).

Each ``run_<mode>(settings)`` validates what it needs, measures, and returns the part of
the report it adds (``results``; compare adds ``ratios`` and ``params``).
"""

from __future__ import annotations

import itertools
import os
import re

from keras_resnet.benchmark import protocol, runners, torch_twins
from keras_resnet.benchmark.benches import APPLICATIONS
from keras_resnet.benchmark.errors import BenchmarkError
from keras_resnet.benchmark.settings import (
    BACKENDS,
    CIFAR_BATCH,
    COMPARE_PRECISIONS,
    COMPARISONS,
    PIPELINE_INPUTS,
    TASKS,
    TORCH_FORMATS,
    TORCH_MODES,
    Settings,
    choose_list,
    ints,
    need,
    need_backend,
)
from keras_resnet.pipeline.errors import choose


def _measure(s: Settings, items):
    return protocol.measure(items, windows=s.windows, steps=s.steps)


def run_train(s: Settings) -> dict:
    """Training images/s of one model on one Keras backend."""
    s.check()
    need_backend(s.backend)
    resolved, batch, size, classes = s.resolve_model(model=s.model, depth=s.depth)
    spec = s.keras_spec(f"keras_resnet {resolved.model}", backend=s.backend,
                        resolved=resolved, batch=batch, size=size, classes=classes,
                        tasks=[f"train:{batch}"])
    runner = runners.make_runner(spec, timeout=s.worker_timeout,
                                 subprocess_only=s.fresh_process)
    return {"results": _measure(s, [(runner, t) for t in spec["tasks"]])}


def run_infer(s: Settings) -> dict:
    """Inference images/s of a built model or of .keras / .tflite files, per batch size."""
    s.check()
    files = [os.path.expanduser(f) for f in s.model_file]
    for f in files:
        if not f.endswith((".keras", ".tflite")):
            raise BenchmarkError(f"model_file {f} must be a .keras or .tflite file")
        if not os.path.isfile(f):
            raise BenchmarkError(f"model_file {f} does not exist")
    if not files or any(f.endswith(".keras") for f in files):
        need_backend(s.backend)
    if files:
        default_batch = s.batch_size or 32
    else:
        resolved, default_batch, size, classes = s.resolve_model(model=s.model, depth=s.depth)
    batches = (ints("infer_batch_sizes", s.infer_batch_sizes) if s.infer_batch_sizes
               else sorted({1, default_batch}))
    tasks = [f"infer:{b}" for b in batches]
    specs = []
    if not files:
        specs.append(s.keras_spec(f"keras_resnet {resolved.model}", backend=s.backend,
                                  resolved=resolved, batch=max(batches), size=size,
                                  classes=classes, tasks=tasks))
    for f in files:
        base = os.path.basename(f)
        if f.endswith(".keras"):
            specs.append({"kind": "keras", "name": f"{base} (keras)", "backend": s.backend,
                          "model_file": f, "image_size": s.image_size, "tasks": tasks,
                          "seed": s.seed, "warmup": s.warmup,
                          "inter_op_threads": s.inter_op_threads,
                          "intra_op_threads": s.intra_op_threads})
            continue
        need("ai_edge_litert", "pip install -e '.[train]'")
        for threads in ints("tflite_threads", s.tflite_threads):
            specs.append({"kind": "tflite", "name": f"{base} (LiteRT, {threads} thr)",
                          "model_file": f, "threads": threads, "tasks": tasks,
                          "seed": s.seed, "warmup": s.warmup})
    items = []
    for spec in specs:
        # LiteRT has its own thread count: it always runs here.
        runner = runners.Local(spec) if spec["kind"] == "tflite" else runners.make_runner(
            spec, timeout=s.worker_timeout, subprocess_only=s.fresh_process)
        items += [(runner, t) for t in tasks]
    return {"results": _measure(s, items)}


def pipeline_spec(s: Settings, *, batch: int, size: int, cache_budget_mb=None) -> dict:
    """The spec of the training stream of ``s.dataset`` (see benches.PipelineBench and
    benches.StreamBench)."""
    if s.pipeline_input == "stream":
        return {"kind": "stream", "name": f"folder_stream({s.dataset}) training stream",
                "dataset": s.dataset, "data_dir": s.data_dir, "image_size": size,
                "batch_size": batch, "val_fraction": s.val_fraction, "seed": s.seed,
                "augment": s.augment, "cutout": s.cutout, "tasks": [f"pipeline:{batch}"],
                "warmup": s.warmup, "threads": s.intra_op_threads}
    return {"kind": "pipeline", "name": f"load_data({s.dataset}) training stream",
            "dataset": s.dataset, "data_dir": s.data_dir, "image_size": size,
            "batch_size": batch, "val_fraction": s.val_fraction, "seed": s.seed,
            "augment": s.augment, "cutout": s.cutout, "cache_budget_mb": cache_budget_mb,
            "tasks": [f"pipeline:{batch}"], "warmup": s.warmup,
            "inter_op_threads": s.inter_op_threads, "intra_op_threads": s.intra_op_threads}


def run_pipeline(s: Settings) -> dict:
    """Images/s of the training input pipeline alone (decode, augment, batch)."""
    s.check()
    if s.model is not None or s.depth is not None:
        _, batch, size, _ = s.resolve_model(model=s.model, depth=s.depth)
    else:
        batch, size = s.batch_size or CIFAR_BATCH, s.image_size or 32
    if s.cache_budget_mb is not None and s.cache_budget_mb < 0:
        raise BenchmarkError(f"cache_budget_mb={s.cache_budget_mb} must be at least 0")
    choose("pipeline_input", s.pipeline_input, PIPELINE_INPUTS, error=BenchmarkError)
    spec = pipeline_spec(s, batch=batch, size=size, cache_budget_mb=s.cache_budget_mb)
    runner = runners.make_runner(spec, timeout=s.worker_timeout,
                                 subprocess_only=s.fresh_process)
    return {"results": _measure(s, [(runner, spec["tasks"][0])])}


def model_or_depth(name: str) -> dict:
    """A variant name, or "resnetN" / "N" for a depth outside the table (e.g. resnet8)."""
    from keras_resnet import configs

    try:
        return {"model": configs.resolve_variant(name)[0]}
    except ValueError:
        pass
    match = re.fullmatch(r"(resnet)?(\d+)", str(name).lower())
    return {"depth": int(match[2])} if match else {"model": name}


def _compare_specs(s: Settings, name: str) -> tuple[str, list[dict]]:
    """The variant and the specs measured side by side for one --compare_models entry."""
    resolved, batch, size, classes = s.resolve_model(**model_or_depth(name))
    variant = resolved.model
    with_apps = "applications" in s.compare and variant in APPLICATIONS
    with_torch = "pytorch" in s.compare
    arch = torch_twins.torch_arch(resolved) if with_torch else None
    if not (with_apps or with_torch):
        raise BenchmarkError(f"{variant} has nothing to compare with: keras.applications "
                             f"builds {', '.join(APPLICATIONS)}; use compare=applications,pytorch")
    tasks = [f"{t}:{batch}" for t in s.tasks]
    specs = []
    short = {"float32": "float32", "mixed_bfloat16": "bf16"}
    for precision in s.precisions:
        p = short[precision]
        for backend in s.backends:
            common = dict(backend=backend, resolved=resolved, batch=batch, size=size,
                          classes=classes, tasks=tasks, group=variant, precision=precision)
            specs.append(s.keras_spec(f"keras_resnet {variant} [{backend}, {p}]",
                                      role="keras_resnet", **common))
            if with_apps:
                specs.append(s.keras_spec(
                    f"keras.applications.{APPLICATIONS[variant]} [{backend}, {p}]",
                    source="applications", role="applications", **common))
    if with_torch:
        recipe = {"learning_rate": resolved.learning_rate,
                  "weight_decay": resolved.weight_decay,
                  "label_smoothing": resolved.label_smoothing, "momentum": resolved.momentum}
        for precision, fmt, mode in itertools.product(s.precisions, s.torch_formats,
                                                      s.torch_modes):
            p = short[precision]
            label = ", ".join([fmt, p] + (["compile"] if mode == "compile" else []))
            specs.append({"kind": "torch", "name": f"pytorch {variant} [{label}]",
                          "backend": None, "group": variant, "role": "pytorch",
                          "model": variant, "arch": arch, "precision": precision,
                          "compile": mode == "compile",
                          "channels_last": fmt == "channels_last", "classes": classes,
                          "image_size": size, "recipe": recipe, "tasks": tasks,
                          "seed": s.seed, "warmup": s.warmup,
                          "intra_op_threads": s.intra_op_threads})
    return variant, specs


def run_compare(s: Settings) -> dict:
    """keras_resnet vs keras.applications and/or PyTorch twins, windows interleaved.

    Every measurement runs in its own subprocess, so each Keras backend is its own process.
    """
    s.check()
    choose_list("compare", s.compare, COMPARISONS)
    choose_list("tasks", s.tasks, TASKS)
    choose_list("torch_formats", s.torch_formats, TORCH_FORMATS)
    choose_list("torch_modes", s.torch_modes, TORCH_MODES)
    choose_list("precisions", s.precisions, COMPARE_PRECISIONS)
    choose_list("backends", s.backends, BACKENDS)
    for backend in s.backends:
        need_backend(backend)
    if "pytorch" in s.compare:
        torch_twins.need_torch("compare=pytorch")
    if not s.compare_models:
        raise BenchmarkError("compare_models= is empty; e.g. resnet20,resnet50")
    groups = [_compare_specs(s, name) for name in s.compare_models]
    results = []
    for variant, specs in groups:
        print(f"{variant}: {len(specs)} subprocesses, windows interleaved", flush=True)
        items = []
        for spec in specs:
            runner = runners.Worker(spec, s.worker_timeout)
            items += [(runner, t) for t in spec["tasks"]]
        results += _measure(s, items)
    return {"results": results, "ratios": protocol.ratios(results),
            "best": protocol.best_against_best(results),
            "params": protocol.param_checks(results)}
