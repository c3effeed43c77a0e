"""Shows what a .tflite file holds: ops, input/output tensors and the embedded metadata.

    python tools/inspect_tflite.py runs/r20/model_int8.tflite [--json]

Prints the tensors an app sees (shape, dtype, quantization), whether the graph ends in a
softmax, the op counts, and the TFLite model metadata MediaPipe Tasks reads (name,
description, version, author, license, input normalisation and value range, the labels
file). ``--json`` prints the metadata as JSON instead.
"""

from __future__ import annotations

import json
import sys

import _cli

_cli.setup()

from absl import flags  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_bool("json", False, "print the metadata as JSON.", flag_values=FLAGS)


def main(argv: list[str]) -> int:
    """Parses arguments and prints; returns the exit status (2 for bad input)."""
    status, paths = _cli.parse(FLAGS, argv, doc=__doc__, max_positional=1)
    if status is not None:
        return status
    if not paths:
        return _cli.error("give the .tflite file to inspect")
    from keras_resnet import pipeline
    from keras_resnet.pipeline.deploy import metadata, tflite
    from keras_resnet.pipeline.run import formats

    try:
        formats.check_file_format(paths[0])
        with open(paths[0], "rb") as f:
            content = f.read()
        audit = tflite.inspect(content)
        found = metadata.read(content)
    except OSError as e:
        return _cli.error(f"cannot read {paths[0]} ({e.strerror})")
    except pipeline.UserError as e:
        return _cli.user_error(e, FLAGS)
    if FLAGS.json:
        print(json.dumps(found, indent=1))
        return 0
    print(f"{paths[0]}: {len(content):,} bytes")
    print(f"input:  {list(audit.input_shape)} {audit.input_type}")
    softmax = " (softmax: class probabilities)" if audit.ends_in_softmax else ""
    print(f"output: {audit.num_outputs} {audit.output_type}{softmax}")
    print(f"ops:    {audit.summary()}")
    model = found["metadata"]
    if model is None:
        print("metadata: none (MediaPipe Tasks needs it; export with tools/export_tflite.py)")
        return 0
    print(f"metadata: {model.get('name')} {model.get('version', '')}, author "
          f"{model.get('author')}, license {model.get('license')}")
    print(f"  description: {model.get('description')}")
    graph = model["subgraph_metadata"][0]
    for kind, tensor in (("input", graph["input_tensor_metadata"][0]),
                         ("output", graph["output_tensor_metadata"][0])):
        units = [u["options"] for u in tensor.get("process_units", [])]
        stats = tensor.get("stats", {})
        low, high = (", ".join(map(str, stats.get(k, []))) for k in ("min", "max"))
        props = tensor.get("content", {}).get("content_properties", {})
        parts = [f"{k.replace('_', ' ')} {v}" for k, v in props.items()]
        parts.append(f"value range {low}..{high}")
        if units:
            parts.append(f"normalization mean {units[0]['mean']} std {units[0]['std']}")
        print(f"  {kind} {tensor.get('name')!r}: {', '.join(parts)}")
    labels = found["labels"] or []
    print(f"  labels ({found['associated_files']}): {', '.join(labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
