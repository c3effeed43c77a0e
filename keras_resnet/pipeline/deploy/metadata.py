"""TFLite model metadata: what MediaPipe Tasks (and Android Studio) read from a ``.tflite``.

Every file the pipeline exports carries, inside the flatbuffer:

* general information: name, description (architecture, mode, training data), version,
  author and license;
* on the input tensor: image properties (RGB) and NormalizationOptions mean 0 / std 1 with
  value range 0..255 (normalisation is inside the graph, so the task runtime feeds raw
  pixels; for uint8 input it feeds them as they are);
* on the output tensor: feature properties with value range 0..1 (the graph ends in a
  softmax) and the class names as an associated ``labels.txt`` of type
  TENSOR_AXIS_LABELS, so a classifier names its categories.

The metadata schema and writer classes are MediaPipe's
(``mediapipe.tasks.python.metadata``). The ``py3-none`` MediaPipe wheels (0.10.30 and
later, on which MediaPipe installs beside TensorFlow 2.21) lack one compiled helper that
module imports, ``_pywrap_metadata_version.GetMinimumMetadataParserVersion``: it is
provided here in Python (:func:`minimum_parser_version`) before MediaPipe is imported.
tflite-support, the older home of these writers, needs protobuf < 4 and does not install
beside TensorFlow 2.21 (BUILD.md, "TFLite metadata").

Writing and reading use no native code: MediaPipe's own metadata-to-JSON converter calls
into libmediapipe.so, which does not load where libEGL.so.1 / libGLESv2.so.2 are missing
(slim Debian images), so :func:`read` converts the flatbuffer in Python (:func:`as_dict`,
the same JSON).

Example:
    >>> content = attach(content, labels=("cat", "dog"), variant="resnet20",
    ...                  description="CIFAR ResNet-20, int8")
    >>> read(content)["labels"]
    ['cat', 'dog']
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import types
from collections.abc import Sequence

import numpy as np

from keras_resnet.pipeline.errors import MetadataError, first_line
from keras_resnet.pipeline.run import layout

NAME = "keras_resnet image classifier"
AUTHOR = "keras_resnet"
LICENSE = "Apache-2.0"
LABELS_FILE = layout.LABELS  # the associated file holding the class names
METADATA_NAME = "TFLITE_METADATA"  # the flatbuffer's metadata entry of model metadata
_VERSION_MODULE = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"
_INSTALL_HINT = ("TFLite metadata needs MediaPipe: pip install --no-deps -c constraints.txt "
                 "mediapipe (see BUILD.md)")


def minimum_parser_version(metadata_buffer) -> str:
    """The oldest metadata parser version that reads ``metadata_buffer``.

    A port of MediaPipe's ``metadata_version.cc``: 1.0.0, raised to the version that
    introduced each optional schema member the metadata uses.
    """
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    buffer = bytes(metadata_buffer)
    if not fb.ModelMetadata.ModelMetadataBufferHasIdentifier(buffer, 0):
        raise ValueError("The model metadata is not a valid FlatBuffer buffer.")
    model = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAsModelMetadata(buffer, 0))
    needed = [(1, 0, 0)]
    tokenizers = {fb.ProcessUnitOptions.BertTokenizerOptions: (1, 1, 0),
                  fb.ProcessUnitOptions.SentencePieceTokenizerOptions: (1, 1, 0),
                  fb.ProcessUnitOptions.RegexTokenizerOptions: (1, 2, 1)}

    def files(entries):
        for f in entries or []:
            needed.append({fb.AssociatedFileType.VOCABULARY: (1, 0, 1),
                           fb.AssociatedFileType.SCANN_INDEX_FILE: (1, 4, 0)}.get(
                               f.type, (1, 0, 0)))
            if f.version is not None:
                needed.append((1, 4, 1))

    def units(entries):
        for unit in entries or []:
            needed.append(tokenizers.get(unit.optionsType, (1, 0, 0)))

    def tensors(entries):
        for tensor in entries or []:
            files(tensor.associatedFiles)
            units(tensor.processUnits)
            content = tensor.content
            if content is not None and (content.contentPropertiesType
                                        == fb.ContentProperties.AudioProperties):
                needed.append((1, 3, 0))

    for graph in model.subgraphMetadata or []:
        tensors(graph.inputTensorMetadata)
        tensors(graph.outputTensorMetadata)
        files(graph.associatedFiles)
        for process_units in (graph.inputProcessUnits, graph.outputProcessUnits):
            if process_units is not None:
                needed.append((1, 1, 0))
                units(process_units)
        if graph.inputTensorGroups is not None or graph.outputTensorGroups is not None:
            needed.append((1, 2, 0))
        if graph.customMetadata is not None:
            needed.append((1, 5, 0))
    files(model.associatedFiles)
    return ".".join(map(str, max(needed)))


def _metadata_lib():
    """MediaPipe's metadata module, with the version helper its wheel lacks provided."""
    if _VERSION_MODULE not in sys.modules:
        try:
            __import__(_VERSION_MODULE)
        except ImportError:
            parts = _VERSION_MODULE.split(".")
            try:
                import mediapipe  # noqa: F401 - the parent packages must be the real ones
            except ImportError as e:
                raise MetadataError(f"{_INSTALL_HINT} ({first_line(e)})") from None
            for i in range(3, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    module = types.ModuleType(name)
                    module.__path__ = []
                    sys.modules[name] = module
                    setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], module)
            sys.modules[_VERSION_MODULE].GetMinimumMetadataParserVersion = (
                minimum_parser_version)
    from mediapipe.tasks.python.metadata import metadata

    return metadata


def attach(content: bytes, *, labels: Sequence[str], variant: str, description: str,
           version: str | None = None) -> bytes:
    """Returns ``content`` with image-classifier metadata and the labels file inside.

    Args:
        content: a ``.tflite`` flatbuffer taking [1, h, w, 3] raw RGB pixels and returning
            class probabilities (float32, uint8 or int8).
        labels: class names in output order.
        variant: the architecture, e.g. "resnet20".
        description: what the file is (mode, training data, accuracy).
        version: the model version (default: the keras_resnet version).

    Raises:
        MetadataError: MediaPipe is missing, or the label count is not the output width.
    """
    metadata = _metadata_lib()
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb
    from mediapipe.tasks.metadata import schema_py_generated as schema
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info

    import keras_resnet
    from keras_resnet.pipeline.deploy import tflite

    audit = tflite.inspect(content)
    labels = [str(name) for name in labels]
    if len(labels) != audit.num_outputs:
        raise MetadataError(f"labels has {len(labels)} class names but the model has "
                            f"{audit.num_outputs} outputs")
    if any(not name.strip() or "\n" in name for name in labels):
        raise MetadataError("labels must be non-empty single-line class names")
    general = metadata_info.GeneralMd(
        name=NAME, version=version or keras_resnet.__version__,
        description=f"{variant}: {description}", author=AUTHOR, licenses=LICENSE)
    with tempfile.TemporaryDirectory() as folder:
        label_path = os.path.join(folder, LABELS_FILE)
        with open(label_path, "w") as f:
            f.write("\n".join(labels) + "\n")
        image = metadata_info.InputImageTensorMd(
            name="image", description="RGB image, raw 0..255 pixel values; the model "
            "normalises inside", norm_mean=[0.0], norm_std=[1.0],
            color_space_type=fb.ColorSpaceType.RGB,
            tensor_type=getattr(schema.TensorType, audit.input_type))
        scores = metadata_info.ClassificationTensorMd(
            name="probability", description="probabilities of the classes in labels.txt",
            label_files=[metadata_info.LabelFileMd(label_path)],
            tensor_type=getattr(schema.TensorType, audit.output_type))
        graph = fb.SubGraphMetadataT()
        graph.inputTensorMetadata = [image.create_metadata()]
        graph.outputTensorMetadata = [scores.create_metadata()]
        model = general.create_metadata()
        model.subgraphMetadata = [graph]
        import flatbuffers

        builder = flatbuffers.Builder(0)
        builder.Finish(model.Pack(builder),
                       metadata.MetadataPopulator.METADATA_FILE_IDENTIFIER)
        try:
            populator = metadata.MetadataPopulator.with_model_buffer(bytearray(content))
            populator.load_metadata_buffer(builder.Output())
            populator.load_associated_files([label_path])
            populator.populate()
            result = bytes(populator.get_model_buffer())
        except (ValueError, RuntimeError) as e:
            raise MetadataError(f"could not write TFLite metadata ({first_line(e)})") from None
        finally:
            populator = None  # its temporary file goes now, not at interpreter exit
        return result


def read(content: bytes) -> dict:
    """The metadata of a ``.tflite`` flatbuffer, as MediaPipe reads it.

    Returns:
        ``{"metadata": <the metadata as a dict>, "associated_files": [names],
        "labels": [class names] or None}``; ``metadata`` is None for a file without.
    """
    from keras_resnet.pipeline.deploy import tflite

    if METADATA_NAME not in tflite.inspect(content).metadata:
        return {"metadata": None, "associated_files": [], "labels": None}
    metadata = _metadata_lib()
    displayer = metadata.MetadataDisplayer.with_model_buffer(bytearray(content))
    files = list(displayer.get_packed_associated_file_list())
    labels = None
    if LABELS_FILE in files:
        text = displayer.get_associated_file_buffer(LABELS_FILE).decode()
        labels = [line for line in text.splitlines() if line.strip()]
    return {"metadata": as_dict(displayer.get_metadata_buffer()),
            "associated_files": files, "labels": labels}


def _schema_tables() -> dict[str, list[tuple[str, str]]]:
    """{table: [(field, type), ...]} of MediaPipe's metadata_schema.fbs, in field order."""
    from importlib import resources

    text = (resources.files("mediapipe.tasks.metadata") / "metadata_schema.fbs").read_text()
    text = re.sub(r"//[^\n]*", "", text)
    return {name: re.findall(r"(\w+)\s*:\s*(\[?\w+\]?)", re.sub(r"\([^)]*\)", "", body))
            for name, body in re.findall(r"\btable\s+(\w+)\s*\{(.*?)\}", text, re.S)}


def as_dict(metadata_buffer) -> dict:
    """A model-metadata flatbuffer as the JSON that flatc (and MediaPipe's
    ``MetadataDisplayer.get_metadata_json``) writes: schema field names, enum and union
    member names, fields left at their defaults omitted.

    Pure Python (MediaPipe's own converter needs its native library, which does not load
    on a system without libEGL/libGLESv2); float32 values are written as float32 prints
    them (0.1, not 0.10000000149011612).
    """
    import numpy as np
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    tables = _schema_tables()

    def names(kind):  # enum or union values -> member names, or None for other types
        cls = getattr(fb, kind, None)
        if kind in tables or not isinstance(cls, type):
            return None
        return {v: k for k, v in vars(cls).items() if isinstance(v, int) and k[0] != "_"}

    def value(item, kind):
        if kind.startswith("["):
            return [value(v, kind[1:-1]) for v in list(item)]
        if kind in tables:
            return table(item, kind)
        if kind == "float":
            return float(str(np.float32(item)))
        if kind == "string":
            return item.decode() if isinstance(item, bytes) else item
        members = names(kind)
        if members is not None:
            return members.get(int(item), int(item))
        return item.item() if isinstance(item, np.generic) else item

    def table(obj, name):
        attrs = {a.replace("_", "").lower(): a for a in vars(obj)}
        fresh = type(obj)()
        out = {}
        for field, kind in tables[name]:
            attr = attrs[field.replace("_", "").lower()]
            item = getattr(obj, attr)
            if attr + "Type" in vars(obj):  # a union: its member's name, then the member
                member = names(kind).get(getattr(obj, attr + "Type"), "NONE")
                if member != "NONE" and item is not None:
                    out[field + "_type"] = member
                    out[field] = table(item, member)
            elif item is not None and (kind.startswith("[") or kind in tables
                                       or item != getattr(fresh, attr)):
                out[field] = value(item, kind)
        return out

    buffer = bytes(metadata_buffer)
    root = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAsModelMetadata(buffer, 0))
    return table(root, "ModelMetadata")


def describe_run(run, mode: str) -> str:
    """The description of a file exported from a run: mode, data, classes."""
    config = run.config
    what = {"float32": "float32", "float16": "float16 weights",
            "dynamic": "dynamic-range int8 weights", "ptq_int8": "post-training int8",
            "qat_int8": "quantization-aware-trained int8", "onnx": "float32 ONNX"}.get(mode,
                                                                                   mode)
    data = config.get("dataset") or "its training data"
    if data == "folder" and config.get("data_dir"):
        data = f"the image folder {os.path.basename(os.path.normpath(config['data_dir']))}"
    return (f"{what}, trained on {data} ({run.num_classes} classes, {run.image_size}x"
            f"{run.image_size} RGB input, raw 0..255 pixels); outputs class probabilities")


def handoff(content: bytes, *, model_file: str, labels_file: str = layout.LABELS,
            variant: str | None = None, top1: float | None = None,
            images: int | None = None, made_from: dict[str, str] | None = None) -> dict:
    """The hand-off file for apps that do not read metadata: layout, dtypes and
    quantization, and (``made_from``) the sha256 of the file and of what it was made from.

    Normalisation is inside the model, so the app feeds raw 0..255 RGB pixels.
    """
    from keras_resnet.pipeline.deploy.litert import LiteRTModel

    runtime = LiteRTModel(content)

    def tensor(details, kind):
        entry = {"shape": [int(d) for d in details["shape"]],
                 "dtype": np.dtype(details["dtype"]).name}
        if details["dtype"] != np.float32:
            scale, zero = details["quantization"]
            entry["quantization"] = {"scale": float(scale), "zero_point": int(zero)}
        entry.update(kind)
        return entry

    result = {
        "model": model_file,
        "labels": labels_file,
        "metadata": "TFLite model metadata inside the file: labels, normalisation, "
                    "description (MediaPipe Tasks reads it)",
        "input": tensor(runtime.input, {
            "layout": "NHWC", "color": "RGB", "range": [0, 255],
            "normalization": "inside the model: feed raw 0..255 RGB pixels, no mean/std",
        }),
        "output": tensor(runtime.output, {
            "meaning": "class probabilities (softmax) in labels.txt order",
        }),
    }
    if variant:
        result["architecture"] = variant
    if made_from:
        result["made_from"] = made_from
    if top1 is not None and not math.isnan(top1):
        result["validation_top1"] = round(top1, 2)
        if images:
            result["validation_images"] = int(images)
    return result
