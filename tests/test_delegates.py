"""The GPU-delegate verdict (delegates.gpu_compatibility) on files whose answer is known.

float32/float16 ResNets use only ops the GPU delegate implements; int8 files too, run
dequantized; a graph with TOPK_V2, LOG_SOFTMAX and REDUCE_ANY (ops the delegate lacks)
must have them named, whatever TensorFlow's own analyzer says about it.
"""

from __future__ import annotations

import numpy as np
import pytest

from keras_resnet.pipeline.deploy import scoring


@pytest.fixture(scope="module")
def resnet8():
    import keras

    import keras_resnet

    keras.utils.set_random_seed(0)
    model = keras_resnet.resnet(depth=8, classes=10, input_shape=(32, 32, 3),
                                include_preprocessing=True, classifier_activation=None)
    images = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    return scoring.with_softmax(model), images


@pytest.mark.parametrize("mode,quantized", [("float32", False), ("float16", False),
                                            ("dynamic", True), ("ptq_int8", True)])
def test_resnet_files_run_whole_on_the_gpu_delegate(resnet8, mode, quantized):
    from keras_resnet.pipeline.deploy import delegates, tflite

    model, images = resnet8
    content = tflite.convert(model, mode, representative=images)
    verdict = delegates.gpu_compatibility(content)
    assert verdict.compatible and verdict.fallback == []
    assert verdict.quantized is quantized
    assert verdict.summary() == ("all ops, runs dequantized" if quantized else "all ops")
    assert verdict.analyzer == "compatible"


def _unsupported_ops_model() -> bytes:
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 16], tf.float32)])
    def graph(x):
        values, _ = tf.math.top_k(x, k=3)
        return values, tf.nn.log_softmax(x), tf.math.reduce_any(x > 0, axis=1)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [graph.get_concrete_function()], graph)
    return converter.convert()


def test_ops_the_gpu_delegate_lacks_are_named():
    from keras_resnet.pipeline.deploy import delegates, tflite

    content = _unsupported_ops_model()
    assert {"TOPK_V2", "LOG_SOFTMAX", "REDUCE_ANY"} <= set(tflite.inspect(content).ops)
    verdict = delegates.gpu_compatibility(content)
    assert not verdict.compatible
    assert verdict.fallback == ["LOG_SOFTMAX (1x)", "REDUCE_ANY (1x)", "TOPK_V2 (1x)"]
    assert verdict.summary() == "CPU fallback: LOG_SOFTMAX (1x), REDUCE_ANY (1x), TOPK_V2 (1x)"
    # TensorFlow's analyzer is run and quoted, but does not decide: TF 2.21's calls this
    # graph compatible; one whose GPU check works names the ops.
    assert verdict.analyzer == "compatible" or "TOPK_V2" in verdict.analyzer
    assert "=== TFLite ModelAnalyzer ===" in delegates.analyzer_report(content)


def test_custom_ops_fall_back():
    import tensorflow as tf

    from keras_resnet.pipeline.deploy import delegates

    erf = tf.function(tf.math.erf, input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([erf.get_concrete_function()],
                                                               erf)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                           tf.lite.OpsSet.SELECT_TF_OPS]
    verdict = delegates.gpu_compatibility(converter.convert(), run_analyzer=False)
    assert verdict.fallback == ["CUSTOM:FlexErf (1x)"] and verdict.analyzer == ""
