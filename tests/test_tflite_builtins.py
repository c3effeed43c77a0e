"""Architecture options convert to TFLite builtin ops and run in LiteRT like Keras.

Grouped 3x3 convolutions (ResNeXt) and the option A shortcut conv in particular: models
are only in the table if they convert without Flex ops.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import keras_resnet as kr

tf = pytest.importorskip("tensorflow")
litert = pytest.importorskip("ai_edge_litert.interpreter",
                             reason="needs ai-edge-litert (pip install -e .[train])")


@pytest.mark.parametrize("name", ["resnext50_32x4d", "resnet20", "se_resnet50",
                                  "preact_resnet164"])
def test_converts_to_builtins_and_matches_keras(name):
    c = kr.VARIANTS[name]
    c = dataclasses.replace(c, depths=(1,) * len(c.depths))
    side = 32 if c.stem == "cifar" else 64
    model = kr.resnet(config=c, input_shape=(side, side, 3), classes=10,
                      classifier_activation=None, include_preprocessing=True)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = litert.Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "CONV_2D" in ops and not any(op.startswith("Flex") for op in ops), ops
    x = np.random.default_rng(0).uniform(0, 255, (1, side, side, 3)).astype("float32")
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, model.predict(x, verbose=0), atol=1e-4, rtol=1e-4)
