"""The pipeline as a notebook runs it: train, qat, export, evaluate in one Python process
(uint8 I/O for the int8 files, as a camera app wants them).

Each call returns what it measured, with the same fields as the JSON file the tools write.
Runs in a fresh interpreter: QAT imports tfmot, which switches ``tf.keras`` to tf_keras for
the rest of the process, as it would in a notebook. Training runs in bfloat16 with the fused
BatchNormalization on every machine (the CPU is told it has AMX), so a bf16-trained run is
shown to go through QAT and export.
"""

from __future__ import annotations

import json

from conftest import python_subprocess

NOTEBOOK = """
    import json, sys
    from keras_resnet import pipeline
    from keras_resnet.pipeline.training import machine

    machine.host_cpu_flags = lambda: frozenset({"amx_bf16", "avx512_bf16"})
    run = sys.argv[1]
    result = pipeline.train(pipeline.TrainConfig(depth=8, dataset="digits", epochs=1,
                                                 batch_size=64, steps_per_epoch=5, model_dir=run,
                                                 mixed_precision="true", verbose="false"))
    qat = pipeline.qat(run, epochs=1, steps_per_epoch=5, calibration_steps=4,
                       agreement_samples=100, io="uint8", verbose="false")
    exported = pipeline.export(run, modes=["float32", "ptq_int8", "qat_int8"], io="uint8",
                               eval_samples=100, representative_samples=64, latency_runs=2)
    report = pipeline.evaluate(f"{run}/model_int8.tflite", split="test")
    print("RESULT " + json.dumps({"train": result, "qat": qat, "export": exported,
                                  "evaluate": report}))
"""


def test_python_api_end_to_end(tmp_path):
    run = tmp_path / "run"
    out = python_subprocess(NOTEBOOK, str(run))
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    assert got["train"] == json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert (config["dtype_policy"], config["fused_batch_norm_resolved"]) == (
        "mixed_bfloat16", True)
    assert got["qat"] == json.loads((run / "qat.json").read_text())
    export = dict(got["export"])
    assert export.pop("table").startswith("LiteRT on 100 validation images")
    assert export == json.loads((run / "export.json").read_text())
    assert [r["name"] for r in export["rows"]] == ["float32 (model_float32.tflite)",
                                                   "ptq_int8 (model_ptq_int8.tflite)",
                                                   "qat_int8 (model_int8.tflite)"]
    handoff = json.loads((run / "model_int8.json").read_text())
    assert handoff["input"]["dtype"] == "uint8"
    assert handoff["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    report = got["evaluate"]
    assert report["format"] == "tflite" and report["split"] == "test"
    assert report["images"] == 359 and 0 <= report["top1"] <= 1  # digits test split
    for name in ("model.keras", "model_int8.tflite", "model_float32.tflite",
                 "model_ptq_int8.tflite", "model_qat.h5"):
        assert (run / name).is_file(), name
