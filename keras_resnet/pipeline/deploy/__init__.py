"""The deploy stage: files an app runs, the runtimes that run them, and scoring.

    tflite           TFLite conversion with builtin ops only, and the op audit
    metadata         TFLite metadata (labels, normalisation) and the hand-off JSON
    litert           the LiteRT interpreter (the runtime Android ships)
    mediapipe_tasks  MediaPipe Tasks' ImageClassifier (the Android task runtime)
    delegates        which ops LiteRT's GPU delegate runs
    onnx_export      the ONNX file and its ONNX Runtime runner
    scoring          any model file as a predictor; scoring batches of images

MediaPipe and ONNX Runtime are imported only where used.
"""
