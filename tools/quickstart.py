"""Quick start: train, quantize and export a ResNet end to end on a dataset that needs no download.

    python tools/quickstart.py [--model_dir=runs/quickstart] [--epochs=8]

Runs the three tools a user runs, each in its own process, on scikit-learn's 1,797 bundled
8x8 digit images (upscaled to 32x32; every 5th image is the held-out test split):

1. ``tools/train.py --depth=20 --dataset=digits``: CIFAR ResNet-20, float32;
2. ``tools/qat.py``: quantization-aware training (tfmot) and the int8 TFLite file;
3. ``tools/export_tflite.py --modes=float32,qat_int8``: op audit and LiteRT check;
4. ``tools/evaluate.py`` on the test split: model.keras, then model_int8.tflite on the
   LiteRT interpreter and through MediaPipe Tasks' ImageClassifier (the Android task
   runtime, reading the file's metadata; skipped, with the apt-get line that fixes it,
   where MediaPipe's native library cannot load),

and prints the three test top-1 figures and the path of the Android-ready ``.tflite`` file.
Re-running continues the run in ``--model_dir`` (finished steps are not repeated).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import _cli
from absl import flags

FLAGS = flags.FlagValues()
flags.DEFINE_string("model_dir", "runs/quickstart", "run folder.", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 8, "training epochs.", flag_values=FLAGS)
flags.DEFINE_integer("qat_epochs", 1, "quantization-aware training epochs.", flag_values=FLAGS)

TOOLS = Path(__file__).resolve().parent


def _tool(name: str, *args: str) -> None:
    print(f"\n$ python tools/{name} {' '.join(args)}", flush=True)
    status = subprocess.call([sys.executable, str(TOOLS / name), *args])
    if status:
        raise SystemExit(f"error: tools/{name} failed (exit status {status}); see above")


def _mediapipe_problem() -> str | None:
    """Why MediaPipe Tasks cannot run on this machine (e.g. a slim image without libEGL),
    or None: that step is then skipped with the fix instead of failing the quick start."""
    _cli.setup()  # the check imports TensorFlow (through keras_resnet and MediaPipe)
    from keras_resnet.pipeline.deploy.mediapipe_tasks import unavailable

    return unavailable()


def main(argv: list[str]) -> int:
    status, _ = _cli.parse(FLAGS, argv, doc=__doc__)
    if status is not None:
        return status
    run = Path(FLAGS.model_dir)
    start = time.perf_counter()
    _tool("train.py", "--depth=20", "--dataset=digits", f"--epochs={FLAGS.epochs}",
          "--batch_size=64", f"--model_dir={run}", "--verbose=false")
    if not (run / "qat.json").is_file():
        _tool("qat.py", f"--model_dir={run}", f"--epochs={FLAGS.qat_epochs}", "--overwrite",
              "--verbose=false")
        (run / "export.json").unlink(missing_ok=True)
        (run / "model_float32.tflite").unlink(missing_ok=True)
    if not (run / "export.json").is_file():
        # Verifies the int8 file tools/qat.py wrote next to a float32 export.
        _tool("export_tflite.py", f"--model_dir={run}", "--modes=float32,qat_int8",
              "--latency_runs=20")
    top1 = {}
    for name, runtime in (("model.keras", None), ("model_int8.tflite", "litert"),
                          ("model_int8.tflite", "mediapipe")):
        problem = _mediapipe_problem() if runtime == "mediapipe" else None
        if problem:
            print(f"\nskipped tools/evaluate.py --runtime=mediapipe: {problem}", flush=True)
            continue
        out = run / f"test_{name.replace('.', '_')}{'_' + runtime if runtime else ''}.json"
        _tool("evaluate.py", f"--model={run / name}", "--split=test",
              *([f"--runtime={runtime}"] if runtime else []), f"--output_json={out}")
        top1[name, runtime] = json.loads(out.read_text())["top1"]
    print(f"\ndigits test split, {time.perf_counter() - start:.0f} s in all:")
    print(f"  float  {run / 'model.keras'}: top-1 {100 * top1['model.keras', None]:.2f}%")
    for runtime, label in (("litert", "LiteRT interpreter"), ("mediapipe", "MediaPipe Tasks")):
        if ("model_int8.tflite", runtime) in top1:
            print(f"  int8   {run / 'model_int8.tflite'} on {label}: top-1 "
                  f"{100 * top1['model_int8.tflite', runtime]:.2f}%")
    print(f"Android: {run / 'model_int8.tflite'} (labels and normalisation inside; "
          f"python tools/inspect_tflite.py shows them), sidecar {run / 'model_int8.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
