"""Prints the README model table, generated from keras_resnet.VARIANTS.

Usage:
    python tools/model_table.py            # markdown table on stdout
    python tools/model_table.py --readme=README.md   # rewrite the table in place
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_resnet as kr  # noqa: E402

FLAGS = flags.DEFINE_string("readme", None, "rewrite the table between the markers in this file")
BEGIN, END = "<!-- model-table:begin -->", "<!-- model-table:end -->"


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


def main(argv):
    del argv
    text = table()
    if FLAGS.value is None:
        print(text)
        return
    with open(FLAGS.value) as f:
        readme = f.read()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    with open(FLAGS.value, "w") as f:
        f.write(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", readme))


if __name__ == "__main__":
    app.run(main)
