"""Prints the documentation tables: the models (from keras_resnet.VARIANTS), the shipped
weights and how each was trained (from keras_resnet.shipped_weights(), i.e. the model
cards).

Usage:
    python tools/model_table.py            # the markdown tables on stdout
    python tools/model_table.py --readme=README.md,docs/models.md,docs/zoo.md
        # rewrite each table between its markers (<!-- NAME:begin/end -->) in place
"""

from __future__ import annotations

import re

import _cli

_cli.setup()

import sys  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

import keras_resnet as kr  # noqa: E402
from keras_resnet import weights as weights_lib  # noqa: E402

# Own flag registry: several tools can then be imported into one process (tests).
FLAGS = flags.FlagValues()
flags.DEFINE_list("readme", None, "rewrite the tables between their markers in these files "
                  "(comma-separated)", flag_values=FLAGS)


def table() -> str:
    public = {v: k for k, v in kr.CONSTRUCTORS.items()}
    rows = ["| Constructor | `variant=` | Depth | Trainable params | Input | Reference |",
            "|---|---|---:|---:|---|---|"]
    for name, config in kr.VARIANTS.items():
        model = kr.resnet(variant=name)
        params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
        size = config.default_size
        rows.append(f"| `{public[name]}` | `{name}` | {config.depth} | {params:,} | "
                    f"{size}x{size}, {config.default_classes} classes | {config.reference} |")
    return "\n".join(rows)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def weights_table() -> str:
    """One row per shipped weights file: validation top-1 (with flip TTA in brackets) of
    the float model and its int8 files, recipe, data, size and training time."""
    rows = ["| Model | `weights=` | Float top-1 (flip) | QAT int8 `.tflite` (flip) | "
            "PTQ int8 `.tflite` (flip) | Recipe, epochs | Training images | Weights file | "
            "Trained in |",
            "|---|---|---:|---:|---:|---|---:|---:|---|"]
    public = {v: k for k, v in kr.CONSTRUCTORS.items()}
    for w in kr.shipped_weights():
        top1 = w["top1"]
        cells = [f"{_percent(top1[k])} ({_percent(top1[k + '_flip'])})"
                 for k in ("float", "qat_int8", "ptq_int8")]
        names = [m.get("accelerator") or m.get("cpu") for m in w.get("machines") or []]
        machine = " + ".join(dict.fromkeys(n for n in names if n)) or (
            w.get("accelerator") or w["cpu"])
        hours = (f"{w['training_time_s'] / 3600:.1f} h on {machine}"
                 if w["training_time_s"] and machine else "-")
        size = f"{w['bytes'] / 2**20:.2f} MiB ({w['dtype']})" if w["bytes"] else "-"
        images = f"{w['train_images']:,}" if w["train_images"] else "-"
        recipe = f"`{w['recipe']}`" if w["recipe"] else None
        if recipe and w["recipe_changes"]:
            recipe += " with " + ", ".join(f"{k} {v}" for k, v in w["recipe_changes"].items())
        schedule = ", ".join(str(p) for p in (recipe, w["epochs"]) if p is not None) or "-"
        rows.append(f"| `{public.get(w['variant'], w['variant'])}` | `{w['weights']}` | "
                    f"{' | '.join(cells)} | {schedule} | "
                    f"{images} | {size} | {hours} |")
    return "\n".join(rows)


def _machine(w) -> str:
    """The CPU (cores, bfloat16 flags) or GPU of each machine the run trained on."""
    card = weights_lib.read_card(kr.PRETRAINED[w["variant"]][w["weights"]])
    training = card.get("training", {})
    flags_ = ", ".join(training.get("cpu_bf16_flags") or []) or "no bfloat16 flags"
    cpus = training.get("cpus")
    names = [m.get("accelerator") or m.get("cpu") for m in w.get("machines") or []]
    machine = " + ".join(dict.fromkeys(n for n in names if n)) or (
        w.get("accelerator") or w["cpu"] or "-")
    return f"{machine}, {cpus} cores ({flags_}), {training.get('dtype_policy', '-')}"


def zoo_table() -> str:
    """One row per shipped weights file: the recipe in a few items, top-1, the exact
    command and the machine, from the model card."""
    rows = ["| Model | Recipe | Float top-1 | QAT int8 | PTQ int8 | Command | Machine, "
            "training time |",
            "|---|---|---:|---:|---:|---|---|"]
    public = {v: k for k, v in kr.CONSTRUCTORS.items()}
    for w in kr.shipped_weights():
        card = weights_lib.read_card(kr.PRETRAINED[w["variant"]][w["weights"]])
        t = card.get("training", {})
        items = [f"`{w['recipe']}`, {w['epochs']} epochs, batch {t.get('batch_size')}",
                 f"SGD{' (Nesterov)' if t.get('nesterov') else ''} lr "
                 f"{t.get('learning_rate')}, {t.get('lr_schedule')}, warm-up "
                 f"{t.get('warmup_epochs')} epochs",
                 f"weight decay {t.get('weight_decay')}, label smoothing "
                 f"{t.get('label_smoothing')}, cutout {t.get('cutout', 0)}",
                 f"{w['train_images']:,} training images, {t.get('val_images'):,} "
                 "validation"]
        top1 = w["top1"]
        hours = f"{w['training_time_s'] / 3600:.1f} h" if w["training_time_s"] else "-"
        rows.append(f"| `{public.get(w['variant'], w['variant'])}` | {'<br>'.join(items)} | "
                    f"{_percent(top1['float'])} | {_percent(top1['qat_int8'])} | "
                    f"{_percent(top1['ptq_int8'])} | `{w['command']}` | "
                    f"{_machine(w)}, {hours} |")
    return "\n".join(rows)


TABLES = {"model-table": table, "weights-table": weights_table, "zoo-table": zoo_table}


def main(argv: list[str]) -> int:
    """Prints the tables, or rewrites them in --readme; returns the exit status."""
    status, _ = _cli.parse(FLAGS, argv, doc=__doc__)
    if status is not None:
        return status
    if FLAGS.readme is None:
        print("\n\n".join(make() for make in TABLES.values()))
        return 0
    for path in FLAGS.readme:
        try:
            with open(path) as f:
                readme = f.read()
        except OSError as e:
            return _cli.error(f"--readme={path} cannot be read ({e.strerror})")
        for marker, make in TABLES.items():
            begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
            if begin not in readme:
                continue
            pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
            text = make()
            readme = pattern.sub(lambda _, t=text, b=begin, e=end: f"{b}\n{t}\n{e}", readme)
        with open(path, "w") as f:
            f.write(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
