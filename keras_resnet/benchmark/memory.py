"""Peak memory: tools/train.py, and the folder pipeline over folders of two sizes.

The figure is the peak RSS (``ru_maxrss``) of the measured command itself. A streamed
folder pipeline should need about the same memory for a small and a large folder (within
10%).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from keras_resnet.benchmark import runners
from keras_resnet.benchmark.errors import BenchmarkError
from keras_resnet.benchmark.modes import pipeline_spec
from keras_resnet.benchmark.settings import (
    CIFAR_BATCH,
    FOLDER_SOURCES,
    MEMORY_CHECKS,
    REPO,
    Settings,
    choose_list,
    ints,
)
from keras_resnet.pipeline.errors import choose

TRAIN_SCRIPT = REPO / "tools" / "train.py"

# Runs argv[2:] as a child and writes that child's ru_maxrss (KiB) to argv[1]. A child's
# ru_maxrss includes the memory of the process it was forked from (counted until exec), so
# the measured command is forked from this small launcher, never from a benchmark process
# that may hold TensorFlow; the launcher's own few MiB are the floor of the figure.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(cmd: list[str], *, timeout: float, env: dict | None = None):
    """Runs a command; returns (exit status, stdout, stderr, peak RSS MiB, wall seconds).

    The peak RSS is the command's own ru_maxrss (see ``_LAUNCHER``).

    Raises:
        RuntimeError: the command took over ``timeout`` seconds (it is killed).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryDirectory() as tmp:
        rss_file = os.path.join(tmp, "maxrss")
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, rss_file, *cmd], cwd=REPO,
            stdout=out, stderr=err, start_new_session=True, env=env or runners.child_env())
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher's own session: it and the command
            proc.wait()
            raise RuntimeError(f"{shlex.join(cmd[1:3])} took over {timeout} s") from None
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        try:
            with open(rss_file) as f:
                peak = int(f.read()) / 1024  # ru_maxrss is in KiB on Linux
        except (OSError, ValueError):
            peak = float("nan")
        return status, out.read(), err.read(), peak, wall


def _tail(text, n=1):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "no output"


def memory_train(s: Settings, work: str, train_args: list[str]) -> dict:
    """Peak RSS of tools/train.py running ``s.memory_steps`` steps on synthetic data."""
    model_args = [f"--model={s.model}"] if s.model else [f"--depth={s.depth or 20}"]
    extra = [f"--batch_size={s.batch_size}"] if s.batch_size else []
    extra += [f"--image_size={s.image_size}"] if s.image_size else []
    extra += train_args
    cmd = [sys.executable, str(TRAIN_SCRIPT), *model_args,
           "--dataset=synthetic", "--epochs=1", f"--steps_per_epoch={s.memory_steps}",
           "--warmup_epochs=0",  # one short epoch: the ImageNet recipe's 5 would not fit
           f"--model_dir={os.path.join(work, 'train_run')}", "--verbose=false", *extra]
    print("  running " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
    status, out, err, peak, wall = run_measured(cmd, timeout=s.worker_timeout)
    if status == 2:
        raise BenchmarkError(f"tools/train.py refused the arguments: {_tail(err)}")
    if status != 0:
        raise RuntimeError(f"tools/train.py failed with status {status}: {_tail(err, 3)}")
    done = [ln for ln in out.splitlines() if ln.startswith("done: ")]
    metrics = json.loads(done[-1][len("done: "):]) if done else {}
    return {"command": cmd[1:], "peak_rss_mib": peak, "wall_s": wall,
            "train_py_images_per_sec": metrics.get("images_per_sec"),
            "steps": s.memory_steps}


def cifar_images(tar_path: str) -> dict[str, list[bytes]]:
    """{class: [jpeg bytes, ...]} of the CIFAR-10 training archive, in file order."""
    images = {}
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(".jpg"):
                parts = member.name.split("/")
                images.setdefault(parts[-2], []).append(tar.extractfile(member).read())
    return images


def synthetic_images(per_class=50, classes=10, size=32, seed=0) -> dict[str, list[bytes]]:
    """{class: [jpeg bytes, ...]} of random-pattern JPEGs (no data needed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = {}
    for c in range(classes):
        base = rng.uniform(0, 255, (1, 1, 3))
        out = []
        for _ in range(per_class):
            pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255)
            buf = io.BytesIO()
            Image.fromarray(pixels.astype("uint8")).save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
        images[f"class_{c}"] = out
    return images


def write_folder(root: str, images: dict[str, list[bytes]], count: int) -> str:
    """Writes ``count`` images spread evenly over the classes (repeating files if needed)."""
    classes = sorted(images)
    for k, name in enumerate(classes):
        n = count // len(classes) + (1 if k < count % len(classes) else 0)
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        pool = images[name]
        for i in range(n):
            with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
                f.write(pool[i % len(pool)])
    return root


def _folder_plan(s: Settings):
    """Validates the folder check's settings: returns (image counts, image source)."""
    counts = ints("memory_images", s.memory_images, minimum=20)
    if len(counts) < 2:
        raise BenchmarkError("memory_images needs at least two folder sizes, e.g. 5000,50000")
    source = choose("folder_source", s.folder_source, FOLDER_SOURCES, error=BenchmarkError)
    if source == "auto":
        source = "cifar" if os.path.isfile(s.cifar_tar) else "synthetic"
    if source == "cifar" and not os.path.isfile(s.cifar_tar):
        raise BenchmarkError(f"cifar_tar {s.cifar_tar} does not exist; pass "
                             "folder_source=synthetic")
    if s.cache_budget_mb is not None and s.cache_budget_mb < 0:
        raise BenchmarkError(f"cache_budget_mb={s.cache_budget_mb} must be at least 0")
    return counts, source


def memory_folder(s: Settings, work: str, counts: list[int], source: str) -> dict:
    """Peak RSS of a process iterating the folder pipeline, for each folder size."""
    images = cifar_images(s.cifar_tar) if source == "cifar" else synthetic_images()
    size = s.image_size or 32
    batch = s.batch_size or CIFAR_BATCH
    budget = 0 if s.cache_budget_mb is None else s.cache_budget_mb
    rows = []
    for count in counts:
        start = time.perf_counter()
        folder = write_folder(os.path.join(work, f"folder_{count}"), images, count)
        written = time.perf_counter() - start
        spec = pipeline_spec(dataclasses.replace(s, dataset="folder", data_dir=folder),
                             batch=batch, size=size, cache_budget_mb=budget)
        job = os.path.join(work, f"job_{count}.json")
        out_json = os.path.join(work, f"pipeline_{count}.json")
        with open(job, "w") as f:
            json.dump({"spec": spec, "windows": s.windows, "steps": s.steps}, f)
        print(f"  folder of {count} images: iterating the training stream", flush=True)
        status, _, err, peak, wall = run_measured(runners.measure_command(job, out_json),
                                                  timeout=s.worker_timeout)
        if status != 0:
            raise RuntimeError(f"the folder pipeline of {count} images failed: "
                               f"{_tail(err, 3)}")
        with open(out_json) as f:
            child = json.load(f)["results"][0]
        shutil.rmtree(folder, ignore_errors=True)
        rows.append({"images": count, "peak_rss_mib": peak, "wall_s": wall,
                     "write_folder_s": written,
                     "batches_iterated": s.warmup + s.windows * s.steps,
                     "images_per_sec": child["images_per_sec"], "info": child["info"]})
    small = min(rows, key=lambda r: r["images"])
    large = max(rows, key=lambda r: r["images"])
    growth = large["peak_rss_mib"] / small["peak_rss_mib"] - 1
    return {"source": source, "image_size": size, "batch_size": batch,
            "cache_budget_mb": budget, "folders": rows,
            "peak_rss_growth_largest_vs_smallest": growth,
            "within_10_percent": abs(growth) <= 0.10}


def run_memory(s: Settings) -> dict:
    """Peak RSS of tools/train.py and/or of the folder pipeline (``s.memory_checks``)."""
    s.check()
    choose_list("memory_checks", s.memory_checks, MEMORY_CHECKS)
    if s.memory_steps < 1:
        raise BenchmarkError(f"memory_steps={s.memory_steps} must be at least 1")
    try:
        train_args = shlex.split(s.train_args)
    except ValueError as e:
        raise BenchmarkError(f"train_args cannot be split into flags ({e})") from None
    if "train" in s.memory_checks and not TRAIN_SCRIPT.is_file():
        raise BenchmarkError(f"the train check runs {TRAIN_SCRIPT} of a source checkout, "
                             "which is not here")
    plan = _folder_plan(s) if "folder" in s.memory_checks else None
    if s.work_dir and not os.path.isdir(s.work_dir):
        raise BenchmarkError(f"work_dir {s.work_dir} does not exist")
    work = tempfile.mkdtemp(prefix="benchmark_memory_", dir=s.work_dir)
    out = {}
    try:
        if "train" in s.memory_checks:
            print("memory: tools/train.py", flush=True)
            out["train"] = memory_train(s, work, train_args)
        if plan:
            print("memory: folder pipeline", flush=True)
            out["folder"] = memory_folder(s, work, *plan)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"memory": out}
