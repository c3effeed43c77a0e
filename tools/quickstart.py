"""Quick start: builds CIFAR ResNet-20, saves it, reloads it and checks the outputs agree.

    python tools/quickstart.py [--model_dir=runs/quickstart]
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_resnet  # noqa: E402

MODEL_DIR = flags.DEFINE_string("model_dir", "runs/quickstart", "where to write model.keras")


def main(argv):
    del argv
    model = keras_resnet.ResNet20(include_preprocessing=True)
    model.summary(line_length=100, print_fn=lambda line, **_: None)
    params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    print(f"{model.name}: {len(model.layers)} layers, {params:,} trainable parameters")
    os.makedirs(MODEL_DIR.value, exist_ok=True)
    path = os.path.join(MODEL_DIR.value, "model.keras")
    model.save(path)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    same = np.array_equal(model.predict(x, verbose=0),
                          keras.models.load_model(path).predict(x, verbose=0))
    print(f"saved {path}; reloaded outputs identical: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
