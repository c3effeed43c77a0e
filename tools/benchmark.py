"""Benchmarks keras_resnet: training and inference speed, input pipeline, comparisons, memory.

Usage: ``python tools/benchmark.py MODE [--flag=value ...]`` (or ``--mode=MODE``).

Modes:
    train     training images/s of one model (``--model`` or ``--depth``) on one Keras
              backend (``--backend``: tensorflow, jax or torch), built and compiled by the
              same public keras_resnet.pipeline helpers as tools/train.py (resolve,
              build_model, prepare_for_training), fed one fixed in-memory random batch so
              only the model is timed.
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
    gpu       on one GPU, without TensorFlow (run it with KERAS_BACKEND=jax): ResNet-50 at
              224 pixels, batch 256, synthetic data, keras_resnet on Keras' JAX backend in
              float32 and bfloat16 against torchvision's resnet50 (channels_last, bfloat16
              autocast or float32, eager and torch.compile); and whole CIFAR ResNet-56
              epochs of the folder ``--data_dir`` with the images on the GPU, keras_resnet
              through tools/train.py's JAX loop against the PyTorch twin. Each measurement
              runs alone in its own process; ``--output_json`` also writes a markdown
              report beside it (BUILD.md "GPU" says how to run it).

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

import sys

import _cli

_cli.setup()

from absl import flags  # noqa: E402

from keras_resnet import benchmark  # noqa: E402
from keras_resnet.pipeline.errors import UserError, first_line  # noqa: E402

# One public function per mode; each takes benchmark.Settings, returns its report part.
RUNS = {"train": benchmark.run_train, "infer": benchmark.run_infer,
        "pipeline": benchmark.run_pipeline, "compare": benchmark.run_compare,
        "memory": benchmark.run_memory, "gpu": benchmark.run_gpu}
MODES = tuple(RUNS)

# Own flag registry: several tools can then be imported into one process (tests). One flag
# per benchmark.Settings field, with the help written there.
FLAGS = flags.FlagValues()
flags.DEFINE_string("mode", None, "train, infer, pipeline, compare, memory or gpu (or give "
                    "it as the first argument).", flag_values=FLAGS)
for _name, _kind, _default, _help in benchmark.flag_specs():
    getattr(flags, f"DEFINE_{_kind}")(_name, _default, _help, flag_values=FLAGS)


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
    if mode is None:
        return _cli.error(f"give a mode: {', '.join(MODES)} (e.g. benchmark.py train "
                          "--depth=20)")
    if mode not in MODES:
        return _cli.error(f"mode {mode!r} is not valid; choose one of {', '.join(MODES)}")
    settings = benchmark.Settings(**{name: FLAGS[name].value for name in FLAGS
                                     if name != "mode"})
    report = benchmark.start_report(mode, settings.to_dict())
    try:
        report.update(RUNS[mode](settings))
    except UserError as e:
        return _cli.user_error(e, FLAGS)
    except RuntimeError as e:
        return _cli.error(f"the benchmark failed: {first_line(e)}", status=1)
    print(benchmark.finish_report(report, settings.output_json), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
