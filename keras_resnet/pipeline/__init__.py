"""Training, evaluation and export pipelines (need the ``train`` extras: TensorFlow, TFDS).

Modules:
    data: tf.data input for TFDS datasets, image folders, digits and synthetic data.
    train: strategy selection, recipes, compile, fit, checkpoints and resume.
    evaluate: top-1/top-5, per-class accuracy and confusion matrices of .keras and .tflite
        models.

Submodules are imported on use, so importing this package stays cheap.
"""
