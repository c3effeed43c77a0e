"""The quantization stage: quantization-aware training (:func:`keras_resnet.pipeline.qat`)
and post-training int8 diagnosis, built on the training and deploy stages.

    quantize_configs  how tfmot quantizes each layer of the family (QuantizeConfigs)
    bn_folding        BatchNormalization folded into the convolution before it
    calibration       quantization ranges from training batches, fine-tuning, saving
    aware             qat(): the tf_keras twin, QAT and the int8 file of a run
    selective         per-layer int8 error and keeping layers in float (keep_float)

tfmot is imported only where QAT runs.
"""
