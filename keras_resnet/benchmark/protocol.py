"""The measuring protocol: warm-up, timed windows interleaved A, B, A, B, medians, ratios.

A *bench* holds one model (or input pipeline) and runs *tasks* ``"train:B"``,
``"infer:B"`` or ``"pipeline:B"`` (B = batch size): ``bench.step(task)`` returns only once
the result is on the host (the loss or the output fetched to NumPy), so the clock sees
finished work. A *runner* (see :mod:`keras_resnet.benchmark.runners`) holds a bench in this
process or in a subprocess and answers ``start()``, ``window(task, steps)`` and ``close()``.

Several measurements of one run are interleaved window by window, so machine noise falls
on all of them alike; a window's images/s is ``steps x batch / seconds``.
"""

from __future__ import annotations

import statistics
import time


def parse_task(task: str) -> tuple[str, int]:
    """``"train:128"`` -> ``("train", 128)``."""
    kind, batch = task.split(":")
    return kind, int(batch)


def random_images(batch: int, size: int, seed: int):
    """One fixed batch of float32 raw 0..255 pixels, NHWC."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")


def random_labels(batch: int, classes: int, seed: int):
    """Integer labels to go with :func:`random_images`."""
    import numpy as np

    return np.random.default_rng(seed + 1).integers(0, classes, batch)


def warm(bench, tasks, warmup: int) -> dict:
    """Runs ``warmup`` steps of each task (at least one: it compiles; its time is kept)."""
    out = {}
    for task in tasks:
        start = time.perf_counter()
        bench.step(task)
        first = time.perf_counter() - start
        for _ in range(max(warmup, 1) - 1):
            bench.step(task)
        out[task] = {"first_step_s": first, "warmup_s": time.perf_counter() - start}
    return out


def window(bench, task: str, steps: int) -> dict:
    """One timed window: the total seconds and each step's."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        bench.step(task)
        times.append(time.perf_counter() - start)
    return {"seconds": sum(times), "step_s": times}


def measure(items, *, windows: int, steps: int) -> list[dict]:
    """Starts every runner in turn, then times windows round-robin over (runner, task).

    Args:
        items: ``(runner, task)`` pairs; a runner may appear with several tasks.
        windows: timed windows of each pair.
        steps: steps per window.

    Returns:
        One result dict per (runner, task), in the order of ``items``.
    """
    runners = []
    for runner, _ in items:
        if runner not in runners:
            runners.append(runner)
    started = {}
    try:
        for runner in runners:
            print(f"  starting {runner.spec['name']} ...", flush=True)
            started[id(runner)] = runner.start()
        times = {i: [] for i in range(len(items))}
        for w in range(windows):
            for i, (runner, task) in enumerate(items):
                times[i].append(runner.window(task, steps))
                # Lets the previous runner's spinning thread pools go idle.
                time.sleep(0.05)
            print(f"  window {w + 1}/{windows} done", flush=True)
    finally:
        for runner in runners:
            runner.close()
    return [_result(runner.spec, task, started[id(runner)], times[i], steps=steps)
            for i, (runner, task) in enumerate(items)]


def _result(spec, task, start, times, *, steps):
    kind, batch = parse_task(task)
    secs = [t["seconds"] for t in times]
    rates = [steps * batch / s for s in secs]
    step_ms = [1e3 * s for t in times for s in t["step_s"]]
    return {
        "name": spec["name"], "kind": spec["kind"], "backend": spec.get("backend"),
        "group": spec.get("group"), "role": spec.get("role"), "task": kind,
        # the dtype policy the bench resolved ("auto" becomes what it ran in)
        "precision": start["info"].get("precision", spec.get("precision")),
        "batch_size": batch, "model": spec.get("variant") or spec.get("model"),
        "images_per_sec": {"median": statistics.median(rates), "min": min(rates),
                           "max": max(rates)},
        "window_images_per_sec": rates,
        "step_ms": {"median": statistics.median(step_ms), "min": min(step_ms),
                    "max": max(step_ms)},
        "first_step_s": start["warm"][task]["first_step_s"],
        "warmup_s": start["warm"][task]["warmup_s"],
        "windows": len(times), "steps_per_window": steps, "info": start["info"],
    }


def ratios(results: list[dict]) -> list[dict]:
    """keras_resnet / other, per group, task and precision: of medians and paired by window.

    keras.applications is compared on the same backend only; a PyTorch twin with every
    keras_resnet backend. Only measurements in the same precision are paired here (see
    :func:`best_against_best` for each side's fastest).
    """
    out = []
    for a in results:
        if a["role"] != "keras_resnet":
            continue
        for b in results:
            if b is a or b["group"] != a["group"] or b["task"] != a["task"] or b["role"] in (
                    "keras_resnet", None) or b.get("precision") != a.get("precision"):
                continue
            if b["role"] == "applications" and b["backend"] != a["backend"]:
                continue
            out.append(_ratio(a, b))
    return out


def best_against_best(results: list[dict]) -> list[dict]:
    """Per group and task: keras_resnet's fastest measurement / PyTorch's fastest.

    Each side picks its best precision, memory format and mode (what a user of either
    would run); the ratio says how the two stand when both do their best.
    """
    out = []
    groups = sorted({(r["group"], r["task"]) for r in results}, key=str)
    for group, task in groups:
        mine = [r for r in results if (r["group"], r["task"]) == (group, task)]
        keras_best = _fastest([r for r in mine if r["role"] == "keras_resnet"])
        torch_best = _fastest([r for r in mine if r["role"] == "pytorch"])
        if keras_best and torch_best:
            out.append({**_ratio(keras_best, torch_best),
                        "keras_resnet_precision": keras_best.get("precision"),
                        "pytorch_precision": torch_best.get("precision")})
    return out


def _fastest(results):
    return max(results, key=lambda r: r["images_per_sec"]["median"], default=None)


def _ratio(a, b):
    paired = [x / y for x, y in zip(a["window_images_per_sec"], b["window_images_per_sec"],
                                    strict=True)]
    return {"group": a["group"], "task": a["task"], "keras_resnet": a["name"],
            "other": b["name"], "ratio_of_medians":
            a["images_per_sec"]["median"] / b["images_per_sec"]["median"],
            "paired_window_ratio_median": statistics.median(paired)}


def param_checks(results: list[dict]) -> dict:
    """Trainable parameter counts of every model of the comparison, and whether they match."""
    out = {}
    for r in results:
        group = out.setdefault(r["group"], {})
        group[r["name"]] = r["info"].get("params_trainable")
    checks = []
    for group, counts in out.items():
        keras_counts = {n: c for n, c in counts.items() if n.startswith("keras_resnet")}
        torch_counts = {n: c for n, c in counts.items() if n.startswith("pytorch")}
        if keras_counts and torch_counts:
            checks.append({"group": group, "keras_resnet": sorted(set(keras_counts.values())),
                           "pytorch": sorted(set(torch_counts.values())),
                           "equal": set(keras_counts.values()) == set(torch_counts.values())})
    return {"trainable": out, "keras_resnet_vs_pytorch": checks}
