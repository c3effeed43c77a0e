"""Benchmarks of keras_resnet: training and inference speed, input pipeline, comparisons
with keras.applications and PyTorch, and peak memory (``tools/benchmark.py`` is the
command line).

Every mode is one call taking :class:`Settings` and returning its part of the report::

    from keras_resnet import benchmark

    settings = benchmark.Settings(depth=20, batch_size=128, windows=3)
    report = benchmark.start_report("train", settings.to_dict())
    report.update(benchmark.run_train(settings))
    print(benchmark.finish_report(report))

Method: every measured thing first runs ``warmup`` steps (the first one compiles), then
``windows`` windows of ``steps`` steps, each step ending with its result on the host;
several measurements are interleaved window by window (A, B, A, B), so machine noise falls
on all of them alike. Bad requests raise
:class:`~keras_resnet.benchmark.errors.BenchmarkError` (a ``UserError``) naming the
setting.

Modules, one concern each:
    settings: Settings, their validation and the model a run measures.
    protocol: tasks, warm-up, timed windows, interleaving, medians and paired ratios.
    benches, torch_twins: Keras, LiteRT and input-pipeline benches; PyTorch twins (torch
        is imported only inside).
    runners, worker: a bench in this process or in a subprocess, and the JSON protocol
        between them; ``python -m keras_resnet.benchmark.worker`` is the subprocess.
    modes, memory, gpu: run_train/infer/pipeline/compare; run_memory (peak RSS); run_gpu
        (keras_resnet on JAX against PyTorch on one GPU, no TensorFlow).
    epochs: whole CIFAR epochs with the images on the device (the gpu mode's benches).
    report: machine line, tables and the JSON report.
"""

from __future__ import annotations

from keras_resnet.benchmark.gpu import run_gpu
from keras_resnet.benchmark.memory import run_memory
from keras_resnet.benchmark.modes import run_compare, run_infer, run_pipeline, run_train
from keras_resnet.benchmark.report import finish_report, format_report, start_report
from keras_resnet.benchmark.settings import Settings, flag_specs

__all__ = ["Settings", "flag_specs", "run_train", "run_infer", "run_pipeline", "run_compare",
           "run_memory", "run_gpu", "start_report", "finish_report", "format_report"]
