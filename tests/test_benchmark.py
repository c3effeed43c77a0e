"""tools/benchmark.py and keras_resnet.benchmark: every mode on tiny settings, the JSON
report, and bad input.

Keras measurements on the TensorFlow backend run in this process; compare (and other
backends) start subprocesses. PyTorch is a benchmark-only extra (``.[bench]``): tests that
need it are skipped without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import benchmark as benchmark_tool  # tools/benchmark.py (conftest puts tools/ on sys.path)
import pytest

from keras_resnet.benchmark import memory, modes, protocol, torch_twins
from keras_resnet.benchmark.errors import BenchmarkError
from keras_resnet.benchmark.report import format_report
from keras_resnet.benchmark.settings import Settings
from keras_resnet.pipeline.run import config

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (it is in "
                                 "the bench extra only: pip install -e '.[bench]')")
# The smallest timing that still exercises warm-up, windows and interleaving.
TINY = ["--warmup=1", "--windows=2", "--steps=2"]
# Golden trainable-parameter counts (DESIGN.md; torchvision's resnet50 has 25,557,032).
RESNET20_PARAMS = 269_722
RESNET50_PARAMS = 25_557_032


def run(capsys, tmp_path, *args):
    """Runs the tool in this process; returns (status, report or None, stdout, stderr)."""
    out_json = tmp_path / "report.json"
    status = benchmark_tool.main(["benchmark.py", *args, f"--output_json={out_json}"])
    out, err = capsys.readouterr()
    report = json.loads(out_json.read_text()) if status == 0 else None
    return status, report, out, err


def check_result(r, *, task, batch):
    assert r["task"] == task and r["batch_size"] == batch
    ips = r["images_per_sec"]
    assert 0 < ips["min"] <= ips["median"] <= ips["max"]
    assert len(r["window_images_per_sec"]) == r["windows"]
    assert all(v > 0 for v in r["window_images_per_sec"])
    assert r["step_ms"]["median"] > 0 and r["first_step_s"] > 0


def check_report(report, mode):
    assert report["mode"] == mode
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["versions"]["keras"]
    assert machine["versions"]["tensorflow"]
    assert report["date"] and report["settings"]["windows"] >= 1


def test_train_mode(capsys, tmp_path):
    status, report, out, err = run(capsys, tmp_path, "train", "--depth=8", "--image_size=16",
                                   "--batch_size=8", *TINY)
    assert status == 0, err
    check_report(report, "train")
    (r,) = report["results"]
    check_result(r, task="train", batch=8)
    assert r["backend"] == "tensorflow" and r["model"] == "resnet8"
    # The same builder as training: raw-pixel input, frozen preprocessing, trainable rest.
    assert r["info"]["params_trainable"] < r["info"]["params_total"]
    assert r["info"]["jit_compile"] is False  # tools/train.py's "auto" on a CPU
    assert "images/s median" in out and "keras_resnet resnet8" in out


def test_infer_mode_keras_and_tflite(capsys, tmp_path):
    import keras
    import tensorflow as tf

    import keras_resnet

    model = keras_resnet.resnet(depth=8, input_shape=(16, 16, 3), include_preprocessing=True,
                                classifier_activation=None)
    model.save(tmp_path / "tiny.keras")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    (tmp_path / "tiny.tflite").write_bytes(converter.convert())
    keras.backend.clear_session()

    status, report, out, err = run(
        capsys, tmp_path, "--mode=infer",
        f"--model_file={tmp_path / 'tiny.keras'},{tmp_path / 'tiny.tflite'}",
        "--batch_size=4", *TINY)
    assert status == 0, err
    check_report(report, "infer")
    rows = {(r["name"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {(n, b) for n in ("tiny.keras (keras)", "tiny.tflite (LiteRT, 1 thr)",
                                          "tiny.tflite (LiteRT, 2 thr)") for b in (1, 4)}
    for (_, batch), r in rows.items():
        check_result(r, task="infer", batch=batch)
    assert rows[("tiny.tflite (LiteRT, 2 thr)", 1)]["info"]["threads"] == 2


def test_infer_mode_built_model(capsys, tmp_path):
    status, report, _, err = run(capsys, tmp_path, "infer", "--depth=8", "--image_size=8",
                                 "--infer_batch_sizes=1,2", *TINY)
    assert status == 0, err
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        check_result(r, task="infer", batch=r["batch_size"])


def _jpeg_folder(root, classes=2, per_class=12):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.jpg")
    return root


def test_pipeline_mode_folder(capsys, tmp_path):
    folder = _jpeg_folder(tmp_path / "images")
    status, report, _, err = run(capsys, tmp_path, "pipeline", "--dataset=folder",
                                 f"--data_dir={folder}", "--image_size=16", "--batch_size=4",
                                 *TINY)
    assert status == 0, err
    check_report(report, "pipeline")
    (r,) = report["results"]
    check_result(r, task="pipeline", batch=4)
    assert r["info"]["classes"] == 2 and r["info"]["augmentation"] == "cifar"
    assert r["info"]["train_images"] + r["info"]["val_images"] == 24
    status, report, _, err = run(capsys, tmp_path, "pipeline", "--dataset=folder",
                                 f"--data_dir={folder}", "--image_size=16", "--batch_size=4",
                                 "--cutout=8", *TINY)
    assert status == 0, err
    assert report["results"][0]["info"]["augmentation"] == "cifar + cutout 8"


def test_pipeline_mode_synthetic(capsys, tmp_path):
    status, report, _, err = run(capsys, tmp_path, "pipeline", "--dataset=synthetic",
                                 "--image_size=8", "--batch_size=4", *TINY)
    assert status == 0, err
    check_result(report["results"][0], task="pipeline", batch=4)


@pytest.mark.slow
def test_memory_mode_folder(capsys, tmp_path):
    status, report, out, err = run(capsys, tmp_path, "memory", "--memory_checks=folder",
                                   "--memory_images=40,120", "--folder_source=synthetic",
                                   "--batch_size=8", f"--work_dir={tmp_path}", *TINY)
    assert status == 0, err
    folder = report["memory"]["folder"]
    assert [r["images"] for r in folder["folders"]] == [40, 120]
    for r in folder["folders"]:
        assert r["peak_rss_mib"] > 50 and r["images_per_sec"]["median"] > 0
        assert r["info"]["cached_in_memory"] is False  # the check streams (budget 0)
    assert isinstance(folder["within_10_percent"], bool)
    assert "peak RSS grows" in out
    assert not list(tmp_path.glob("benchmark_memory_*"))  # the work folder is removed


@pytest.mark.slow
def test_memory_mode_train(capsys, tmp_path):
    status, report, out, err = run(capsys, tmp_path, "memory", "--memory_checks=train",
                                   "--depth=8", "--batch_size=8", "--image_size=16",
                                   "--memory_steps=2", f"--work_dir={tmp_path}")
    assert status == 0, err
    m = report["memory"]["train"]
    assert m["peak_rss_mib"] > 100 and m["wall_s"] > 0
    assert "--dataset=synthetic" in m["command"] and "tools/train.py" in out


@needs_torch
def test_compare_mode_pytorch(capsys, tmp_path):
    status, report, out, err = run(
        capsys, tmp_path, "compare", "--compare=pytorch", "--compare_models=resnet8",
        "--backends=tensorflow", "--image_size=8", "--batch_size=4", "--tasks=train",
        "--precisions=float32,mixed_bfloat16", "--torch_modes=eager",
        "--torch_formats=channels_last",
        # One thread each: OpenMP teams stall badly on a loaded 2-core machine.
        "--intra_op_threads=1", *TINY)
    assert status == 0, err
    check_report(report, "compare")
    names = [r["name"] for r in report["results"]]
    assert names == ["keras_resnet resnet8 [tensorflow, float32]",
                     "keras_resnet resnet8 [tensorflow, bf16]",
                     "pytorch resnet8 [channels_last, float32]",
                     "pytorch resnet8 [channels_last, bf16]"]
    assert [r["precision"] for r in report["results"]] == ["float32", "mixed_bfloat16"] * 2
    for r in report["results"]:
        check_result(r, task="train", batch=4)
    assert report["results"][0]["info"]["fused_batch_norm"] is True  # as tools/train.py
    assert report["results"][2]["info"]["torch_threads"] == 1
    # ratios pair the same precision; best against best takes each side's fastest
    assert {(r["keras_resnet"], r["other"]) for r in report["ratios"]} == {
        (names[0], names[2]), (names[1], names[3])}
    (best,) = report["best"]
    fastest = max(report["results"][:2], key=lambda r: r["images_per_sec"]["median"])
    assert best["keras_resnet"] == fastest["name"]
    assert best["keras_resnet_precision"] == fastest["precision"]
    (check,) = report["params"]["keras_resnet_vs_pytorch"]
    assert check["equal"], check
    assert "ratio (medians)" in out and "(equal)" in out and "PyTorch's best" in out
    assert "bfloat16 CPU flags" in out


@pytest.mark.slow
@needs_torch
def test_compare_mode_torch_compile(capsys, tmp_path):
    status, report, _, err = run(
        capsys, tmp_path, "compare", "--compare=pytorch", "--compare_models=resnet8",
        "--backends=tensorflow", "--image_size=8", "--batch_size=4", "--tasks=train",
        "--precisions=mixed_bfloat16", "--torch_modes=compile",
        "--torch_formats=channels_last", *TINY)
    assert status == 0, err
    torch_result = report["results"][1]
    assert torch_result["name"] == "pytorch resnet8 [channels_last, bf16, compile]"
    assert torch_result["info"]["compile"] is True


@needs_torch
@pytest.mark.parametrize("variant, golden", [("resnet20", RESNET20_PARAMS),
                                             ("resnet50", RESNET50_PARAMS)])
def test_pytorch_twins_have_keras_resnet_parameter_counts(variant, golden):
    """The PyTorch twins match the golden counts that tests/test_models.py pins for
    keras_resnet (and test_compare_mode_pytorch compares the two at run time)."""
    import torch

    resolved = config.resolve(config.TrainConfig(model=variant, dataset="synthetic"))
    classes = 10 if variant == "resnet20" else 1000
    net = torch_twins.torch_resnet(torch_twins.torch_arch(resolved), classes)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == golden
    size = 32 if variant == "resnet20" else 64
    with torch.no_grad():
        assert tuple(net.eval()(torch.zeros(2, 3, size, size)).shape) == (2, classes)


def test_models_without_a_pytorch_twin_are_refused():
    resolved = config.resolve(config.TrainConfig(model="resnet50v2", dataset="synthetic"))
    with pytest.raises(BenchmarkError, match="no plain PyTorch twin"):
        torch_twins.torch_arch(resolved)


def test_peak_rss_is_the_commands_own():
    """Not the maximum over earlier children, nor this (TensorFlow-sized) process's RSS."""
    import sys

    import tensorflow as tf  # noqa: F401 - makes this process big, as in the other tests

    touch = "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096])"
    status, _, _, big, _ = memory.run_measured([sys.executable, "-c", touch], timeout=60)
    assert status == 0 and big > 200
    status, _, _, small, _ = memory.run_measured([sys.executable, "-c", "pass"], timeout=60)
    assert status == 0 and small < 60
    status, _, _, _, _ = memory.run_measured([sys.executable, "-c", "raise SystemExit(3)"],
                                             timeout=60)
    assert status == 3


@pytest.mark.slow
def test_compare_mode_applications(capsys, tmp_path):
    status, report, _, err = run(
        capsys, tmp_path, "compare", "--compare=applications", "--compare_models=resnet50",
        "--backends=tensorflow", "--image_size=32", "--batch_size=2", "--classes=10",
        "--tasks=infer", "--precisions=float32", *TINY)
    assert status == 0, err
    names = [r["name"] for r in report["results"]]
    assert names == ["keras_resnet resnet50 [tensorflow, float32]",
                     "keras.applications.ResNet50 [tensorflow, float32]"]
    (ratio,) = report["ratios"]
    assert ratio["task"] == "infer" and ratio["ratio_of_medians"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed")
def test_train_mode_jax_backend_subprocess(capsys, tmp_path):
    status, report, _, err = run(capsys, tmp_path, "train", "--depth=8", "--image_size=8",
                                 "--batch_size=4", "--backend=jax", *TINY)
    assert status == 0, err
    (r,) = report["results"]
    assert r["backend"] == "jax" and r["info"]["backend"] == "jax"
    assert r["info"]["jit_compile"] is True
    check_result(r, task="train", batch=4)


def test_ratios_and_table_come_from_the_measurements():
    def result(name, role, rates, backend="tensorflow", precision="float32"):
        return {"name": name, "role": role, "group": "g", "task": "train",
                "backend": backend, "batch_size": 2, "window_images_per_sec": rates,
                "precision": precision,
                "images_per_sec": {"median": sorted(rates)[1], "min": min(rates),
                                   "max": max(rates)},
                "step_ms": {"median": 1.0}, "first_step_s": 0.5,
                "info": {"params_trainable": 10}}

    results = [result("keras_resnet m [tensorflow]", "keras_resnet", [10.0, 20.0, 30.0]),
               result("apps [tensorflow]", "applications", [5.0, 10.0, 60.0]),
               result("apps [jax]", "applications", [1.0, 1.0, 1.0], backend="jax"),
               result("pytorch m [nchw]", "pytorch", [20.0, 40.0, 60.0]),
               result("keras_resnet m [tensorflow, bf16]", "keras_resnet", [30.0, 50.0, 70.0],
                      precision="mixed_bfloat16"),
               result("pytorch m [bf16]", "pytorch", [40.0, 100.0, 100.0],
                      precision="mixed_bfloat16")]
    ratios = {(r["keras_resnet"], r["other"]): r for r in protocol.ratios(results)}
    # same backend (applications) and same precision only
    assert set(ratios) == {("keras_resnet m [tensorflow]", "apps [tensorflow]"),
                           ("keras_resnet m [tensorflow]", "pytorch m [nchw]"),
                           ("keras_resnet m [tensorflow, bf16]", "pytorch m [bf16]")}
    ratios = {other: r for (mine, other), r in ratios.items() if "bf16" not in mine}
    (best,) = protocol.best_against_best(results)
    assert (best["keras_resnet"], best["other"]) == ("keras_resnet m [tensorflow, bf16]",
                                                     "pytorch m [bf16]")
    assert best["ratio_of_medians"] == 0.5
    assert ratios["apps [tensorflow]"]["ratio_of_medians"] == 2.0
    assert ratios["apps [tensorflow]"]["paired_window_ratio_median"] == 2.0
    assert ratios["pytorch m [nchw]"]["ratio_of_medians"] == 0.5
    params = protocol.param_checks(results)
    assert params["keras_resnet_vs_pytorch"] == [
        {"group": "g", "keras_resnet": [10], "pytorch": [10], "equal": True}]
    text = format_report({"results": results, "ratios": list(ratios.values()), "params": params,
                          "best": [best], "machine": {"machine": "x86_64", "cpus_usable": 2,
                                                      "cpu_bf16_flags": []}})
    assert "2.000" in text and "0.500" in text and "(equal)" in text
    assert "PyTorch's best" in text and "no bfloat16 CPU flags" in text


@pytest.mark.parametrize("args, message", [
    (["train", "--model=resnet9000"], "not a known ResNet"),
    (["train"], "--model"),
    (["fly"], "mode 'fly' is not valid"),
    ([], "give a mode"),
    (["train", "--depth=8", "--backend=theano"], "backend='theano' is not valid"),
    (["train", "--depth=8", "--windows=0"], "--windows=0 must be at least 1"),
    (["train", "--depth=8", "--precision=float16"], "precision='float16' is not valid"),
    (["compare", "--precisions=float16"], "precisions='float16' is not valid"),
    (["compare", "--torch_modes=jit"], "torch_modes='jit' is not valid"),
    (["infer", "--model_file=missing.keras"], "does not exist"),
    (["infer", "--model_file=model.h5"], "must be a .keras or .tflite file"),
    (["pipeline", "--dataset=folder"], "needs --data_dir"),
    (["pipeline", "--cutout=-1"], "cutout=-1 must be at least 0"),
    (["compare", "--compare=timm"], "compare='timm' is not valid"),
    (["memory", "--memory_images=5000"], "at least two folder sizes"),
    (["train", "--nope=1"], "nope"),
])
def test_bad_input_is_one_error_line(capsys, tmp_path, args, message):
    status = benchmark_tool.main(["benchmark.py", *args, f"--work_dir={tmp_path}"])
    out, err = capsys.readouterr()
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_missing_torch_says_how_to_install(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch_twins, "torch_available", lambda: False)
    for args in (["compare", "--compare=pytorch", "--compare_models=resnet20"],
                 ["train", "--depth=8", "--backend=torch"]):
        status = benchmark_tool.main(["benchmark.py", *args])
        _, err = capsys.readouterr()
        assert status == 2 and "pip install -e '.[bench]'" in err, err


def test_help_lists_modes_and_every_setting(capsys):
    assert benchmark_tool.main(["benchmark.py", "--help"]) == 0
    out = capsys.readouterr().out
    for mode in benchmark_tool.MODES:
        assert mode in out
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert set(benchmark_tool.FLAGS) == {"mode", *fields}  # one flag per setting
    for name in fields:
        assert f"--{name}:" in out or f"--[no]{name}:" in out, name


@pytest.mark.parametrize("name, expected", [
    ("resnet20", {"model": "resnet20"}), ("Wide-ResNet50-2", {"model": "wide_resnet50_2"}),
    ("resnet8", {"depth": 8}), ("14", {"depth": 14}), ("nope", {"model": "nope"})])
def test_compare_models_name_a_variant_or_a_depth(name, expected):
    assert modes.model_or_depth(name) == expected


@needs_torch
@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed")
def test_gpu_mode_runs_at_tiny_sizes_without_tensorflow(tmp_path):
    """The GPU measurement, on the CPU at tiny sizes, with TensorFlow unimportable in the
    tool and in every measuring subprocess: ResNet-50 (here at 32 pixels, batch 2) on JAX
    against PyTorch, whole epochs of a small CIFAR-style folder, ratios and the markdown
    report."""
    import os
    import subprocess
    import sys

    import numpy as np
    from conftest import REPO
    from PIL import Image

    blocked = tmp_path / "blocked" / "tensorflow"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('TensorFlow is blocked')\n")
    folder = tmp_path / "cifar"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype="uint8")).save(
                folder / c / f"{i}.jpg")
    out = tmp_path / "report" / "gpu.json"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), *sys.path])}
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "benchmark.py"), "gpu", f"--data_dir={folder}",
         "--depth=8", "--batch_size=2", "--image_size=32", "--classes=10",
         "--cifar_batch_size=4", "--epochs=1", "--windows=1", "--steps=1", "--warmup=1",
         "--precisions=float32", "--cifar_precisions=float32", "--torch_modes=eager",
         "--val_fraction=0.2", f"--output_json={out}"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names[0] == "keras_resnet resnet50 [jax, float32]"
    assert names[1].endswith("resnet50 [channels_last, float32]")
    assert names[2:] == ["keras_resnet resnet8 epochs [jax, float32]",
                         "pytorch resnet8 epochs [channels_last, float32]"]
    epochs = report["results"][2]
    assert (epochs["task"], epochs["batch_size"]) == ("epoch", 16)  # 16 images, batch 4
    assert epochs["info"]["train_images"] == 16
    for r in report["results"]:
        check_result(r, task=r["task"], batch=r["batch_size"])
    assert {r["group"] for r in report["ratios"]} == {"resnet50", "resnet8 epochs"}
    assert all(check["equal"] for check in report["params"]["keras_resnet_vs_pytorch"])
    text = (out.parent / "gpu.md").read_text()
    assert "| keras_resnet resnet50 [jax, float32] | train | 2 |" in text
    assert "Command: `benchmark.py gpu" in text and "Versions: jax" in text
