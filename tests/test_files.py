"""formats.check_file_format: a model file that exists but is not what its name says."""

from __future__ import annotations

import zipfile

import pytest
from conftest import tool_error

from keras_resnet.pipeline.errors import ExportError, UserError
from keras_resnet.pipeline.run import formats

KINDS = {
    ".keras": ("a Keras archive", "zip header",
               "pass a .keras file saved with model.save()"),
    ".weights.h5": ("an HDF5 file", "HDF5 signature",
                    "pass a .weights.h5 file saved with model.save_weights()"),
    ".h5": ("an HDF5 file", "HDF5 signature",
            "pass an .h5 model saved by Keras (tools/qat.py writes model_qat.h5)"),
    ".tflite": ("a TFLite flatbuffer", "TFL3 identifier",
                "pass a .tflite file written by tools/export_tflite.py or a TFLite "
                "converter"),
}


@pytest.mark.parametrize("suffix", KINDS)
@pytest.mark.parametrize("content, found", [
    (b"this is not a model\n", "it holds text"),
    (b"", "it is empty"),
    (bytes(range(256)) * 4, "it has no {signature}"),
])
def test_a_file_that_is_not_its_kind_is_named(tmp_path, suffix, content, found):
    kind, signature, fix = KINDS[suffix]
    path = tmp_path / f"model{suffix}"
    path.write_bytes(content)
    with pytest.raises(UserError) as refused:
        formats.check_file_format(path)
    found = found.format(signature=signature)
    assert str(refused.value) == f"{path} is not {kind} ({found}); {fix}"
    with pytest.raises(ExportError):  # the caller's own error class
        formats.check_file_format(path, error=ExportError)


def test_real_signatures_pass(tmp_path):
    import h5py

    with zipfile.ZipFile(tmp_path / "a.keras", "w") as z:
        z.writestr("config.json", "{}")
    for name, userblock in (("a.h5", 0), ("a.weights.h5", 0), ("b.h5", 1024)):
        with h5py.File(tmp_path / name, "w", userblock_size=userblock) as f:
            f["x"] = [1, 2, 3]
    (tmp_path / "a.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    for name in ("a.keras", "a.h5", "a.weights.h5", "b.h5", "a.tflite"):
        formats.check_file_format(tmp_path / name)
    # a missing file, or a name the helper does not know, is left to the caller
    formats.check_file_format(tmp_path / "missing.keras")
    (tmp_path / "notes.txt").write_text("hello")
    formats.check_file_format(tmp_path / "notes.txt")


@pytest.mark.parametrize("name", ["weights.keras", "weights.weights.h5"])
def test_train_refuses_initial_weights_that_are_not_their_kind(tmp_path, capsys, name):
    fake = tmp_path / name
    fake.write_text("not weights")
    err = tool_error(capsys, "train", "--depth=8", "--dataset=digits", "--epochs=1",
                     f"--initial_weights={fake}", f"--model_dir={tmp_path / 'run'}")
    kind = "a Keras archive" if name.endswith(".keras") else "an HDF5 file"
    assert f"error: {fake} is not {kind} (it holds text)" in err


def test_inspect_tflite_names_a_file_that_is_not_a_flatbuffer(tmp_path, capsys):
    fake = tmp_path / "model.tflite"
    fake.write_text("hello")
    err = tool_error(capsys, "inspect_tflite", str(fake))
    assert err == (f"error: {fake} is not a TFLite flatbuffer (it holds text); pass a .tflite "
                   "file written by tools/export_tflite.py or a TFLite converter")
