"""The model code is backend-neutral: the same models build, train and agree under JAX and
PyTorch (each skips where its backend is not installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import BACKEND_EXTRAS, skip_without_backend

import keras_resnet as kr

SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    import keras, numpy as np
    import keras_resnet as kr
    assert keras.backend.backend() == sys.argv[2]
    keras.utils.set_random_seed(0)
    out = {}
    for name in sys.argv[3:]:
        c = kr.VARIANTS[name]
        c = dataclasses.replace(c, depths=(2,) * len(c.depths),
                                widths=tuple(16 * 2**i for i in range(len(c.depths))),
                                width_factor=min(c.width_factor, 2), stem_width=16)
        side = 32 if c.stem == "cifar" else 64
        m = kr.resnet(config=c, classes=5, input_shape=(side, side, 3),
                      classifier_activation=None, stochastic_depth=0.1)
        m.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.default_rng(0).uniform(0, 1, (4, side, side, 3)).astype("float32")
        y = np.arange(4) % 5
        losses = [float(m.train_on_batch(x, y)) for _ in range(10)]
        # Stochastic depth makes single steps spiky: the last four steps, by their median.
        out[name] = [losses[0], float(np.median(losses[-4:]))]
    saved = keras.models.load_model(sys.argv[1] + "/model.keras")
    x = np.load(sys.argv[1] + "/x.npy")
    np.save(sys.argv[1] + "/out.npy", np.asarray(saved.predict(x, verbose=0)))
    shipped = kr.ResNet20(weights="cifar10")
    x32 = np.load(sys.argv[1] + "/x32.npy")
    np.save(sys.argv[1] + "/shipped_out.npy", np.asarray(shipped.predict(x32, verbose=0)))
    print(json.dumps(out))
    """
)


# One variant per block kind trains: CIFAR basic, bottleneck (deep stem, average-pool
# shortcuts), pre-activation bottleneck, squeeze-excitation, grouped convolutions, wide
# pre-activation basic: the slow tier's (each compiles its own training step, a minute or
# more on two CPU cores). The fast tier checks the outputs only (tools/train.py trains on
# each backend in test_arrays.py).
EVERY_BLOCK_KIND = ["resnet20", "resnet50d", "resnet50v2", "se_resnet50", "resnext50_32x4d",
                    "wrn_16_8"]


@pytest.mark.parametrize("backend, names", [
    *[pytest.param(b, [], id=b) for b in BACKEND_EXTRAS],
    *[pytest.param(b, EVERY_BLOCK_KIND, id=f"{b}-every-block-kind", marks=pytest.mark.slow)
      for b in BACKEND_EXTRAS],
])
def test_models_build_train_and_agree_under_another_backend(backend, names, tmp_path):
    skip_without_backend(backend, f"the {backend} backend test")
    model = kr.ResNet50(input_shape=(64, 64, 3), classes=10, include_preprocessing=True)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    # The shipped CIFAR-10 weights too (stored in float16, loaded in float32).
    x32 = np.random.default_rng(1).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    np.save(tmp_path / "x32.npy", x32)
    # The saved ResNet50 checks the plain net's outputs; ``names`` train.
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), backend, *names],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        before, after = losses[name]
        assert after < before, (name, before, after)
    tf_out = model.predict(x, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), tf_out, atol=1e-4)
    shipped_out = kr.ResNet20(weights="cifar10").predict(x32, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "shipped_out.npy"), shipped_out, atol=1e-5)
