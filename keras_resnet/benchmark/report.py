"""The report: the machine and library versions, tables on stdout, and the JSON file.

Every figure printed comes from the report dict, which is also what ``output_json``
holds.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform

from keras_resnet.pipeline.training.machine import bf16_flags, cpu_model, host_cpu_flags


def version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """Platform, CPUs (usable by this process), memory, load average and library versions."""
    info = {"platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()}
    info["cpu"] = cpu_model()
    # The flags that decide whether bfloat16 pays (see keras_resnet.pipeline.training.precision).
    info["cpu_bf16_flags"] = list(bf16_flags(host_cpu_flags()))
    info["cpu_vector_flags"] = sorted(f for f in host_cpu_flags()
                                      if f.startswith(("avx", "amx")) or f == "fma")
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            info["memory_gib"] = round(kb / 2**20, 1)
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    info["versions"] = {d: version(d) for d in (
        "keras", "tensorflow", "jax", "jaxlib", "torch", "numpy", "ai-edge-litert",
        "keras_resnet")}
    return info


def _now():
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def start_report(mode: str, settings: dict) -> dict:
    """A report's header: mode, date, machine (its load now) and settings."""
    return {"mode": mode, "date": _now(), "machine": machine(), "settings": settings}


def finish_report(report: dict, output_json: str | None = None) -> str:
    """Stamps the end time, writes ``output_json`` (when given); returns the tables."""
    report["finished"] = _now()
    if output_json:
        folder = os.path.dirname(os.path.abspath(output_json))
        os.makedirs(folder, exist_ok=True)
        with open(output_json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return format_report(report)


def table(rows, headers) -> str:
    """Left-aligned columns under a header and a rule."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """The human-readable tables of a report (every figure comes from the report)."""
    parts = []
    results = report.get("results") or []
    if results:
        rows = []
        for r in results:
            ips = r["images_per_sec"]
            rows.append([r["name"], r.get("backend") or "-", r["task"], r["batch_size"],
                         f"{ips['median']:.1f}", f"{ips['min']:.1f}-{ips['max']:.1f}",
                         f"{r['step_ms']['median']:.2f}", f"{r['first_step_s']:.2f}"])
        parts.append(table(rows, ["measurement", "backend", "task", "batch",
                                  "images/s median", "min-max (windows)", "ms/step median",
                                  "first step s"]))
    for key, title in (("ratios", "keras_resnet"), ("best", "keras_resnet's best")):
        if report.get(key):
            other = "other" if key == "ratios" else "PyTorch's best"
            rows = [[r["group"], r["task"], r["keras_resnet"], r["other"],
                     f"{r['ratio_of_medians']:.3f}", f"{r['paired_window_ratio_median']:.3f}"]
                    for r in report[key]]
            parts.append(table(rows, ["model", "task", title, other, "ratio (medians)",
                                      "ratio (paired windows)"]))
    for check in (report.get("params") or {}).get("keras_resnet_vs_pytorch", []):
        k = ", ".join(f"{c:,}" for c in check["keras_resnet"])
        t = ", ".join(f"{c:,}" for c in check["pytorch"])
        verdict = "equal" if check["equal"] else "DIFFERENT"
        parts.append(f"trainable parameters of {check['group']}: keras_resnet {k}, "
                     f"pytorch {t} ({verdict})")
    parts += _memory_lines(report.get("memory") or {})
    if report.get("markdown"):
        parts.append(report["markdown"])
    m = report["machine"]
    bf16 = m.get("cpu_bf16_flags")
    flags = (f"; bfloat16 CPU flags: {', '.join(bf16)}" if bf16 else
             "; no bfloat16 CPU flags (amx_bf16, avx512_bf16)" if bf16 is not None else "")
    parts.append(f"machine: {m.get('cpu', m['machine'])}, {m['cpus_usable']} CPUs usable, "
                 f"{m.get('memory_gib', '?')} GiB{flags}; load average at start "
                 f"{m.get('load_average_at_start')}")
    return "\n\n".join(parts)


def _memory_lines(memory):
    parts = []
    if "train" in memory:
        m = memory["train"]
        rate = m["train_py_images_per_sec"]
        rate_text = f", {rate:.1f} images/s reported by train.py" if rate else ""
        parts.append(f"tools/train.py ({m['steps']} steps): peak RSS "
                     f"{m['peak_rss_mib']:.0f} MiB, {m['wall_s']:.1f} s{rate_text}")
    if "folder" in memory:
        m = memory["folder"]
        rows = [[f"{r['images']:,}", f"{r['peak_rss_mib']:.0f}",
                 f"{r['images_per_sec']['median']:.1f}", r["batches_iterated"],
                 r["info"]["cached_in_memory"]] for r in m["folders"]]
        parts.append(table(rows, ["folder images", "peak RSS MiB", "images/s median",
                                  "batches", "cached"]))
        verdict = "within" if m["within_10_percent"] else "NOT within"
        parts.append(f"folder pipeline ({m['source']} JPEGs, cache budget "
                     f"{m['cache_budget_mb']} MiB): peak RSS grows "
                     f"{100 * m['peak_rss_growth_largest_vs_smallest']:+.1f}% from the "
                     f"smallest to the largest folder ({verdict} 10%)")
    return parts
