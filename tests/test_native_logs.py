"""native_logs.filtered_stderr and the tools' quiet start-up, whatever TF_CPP_MIN_LOG_LEVEL."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO, TEST_ENV, tool_subprocess

from keras_resnet.pipeline import native_logs

# What TensorFlow's import printed on tools' stderr when the user exported
# TF_CPP_MIN_LOG_LEVEL=3 (twice each; they come before TensorFlow reads the variable).
TF_STARTUP_LINES = ("WARNING: All log messages before absl::InitializeLog()",
                    "oneDNN custom operations are on", "Could not find cuda drivers")


def test_filtered_stderr_drops_only_the_noise(capfd):
    with native_logs.filtered_stderr(re.compile("^noise")):
        os.write(2, b"noise from C++\nreal problem\n\nnoise again\n")
    assert capfd.readouterr().err == "real problem\n"
    try:
        with native_logs.filtered_stderr(re.compile("^noise")):
            os.write(2, b"said before failing\n")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert capfd.readouterr().err == "said before failing\n"  # kept on the way out, too
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"  # descriptor 2 is back


def test_tools_start_quietly_when_the_user_sets_tf_cpp_min_log_level():
    env = {**TEST_ENV, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = tool_subprocess("train", "--help", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [line for line in TF_STARTUP_LINES if line in result.stderr], result.stderr


LOG_SCRIPT = """
import logging, sys
sys.path.insert(0, "tools")
import _cli
_cli.setup()
import tensorflow_datasets  # noqa: F401 - libraries that would set a format of their own
from keras_resnet import pipeline  # noqa: F401
logging.getLogger("keras_resnet").setLevel(logging.INFO)  # as tools/train.py sets it
logging.getLogger("keras_resnet.pipeline.data.sources").warning("class folder(s) bird (2) ...")
logging.getLogger("keras_resnet.pipeline.training.network").info("initialised 3 layers")
logging.getLogger("absl").info("not shown")
"""


def test_tool_log_records_are_plain_lines():
    result = subprocess.run([sys.executable, "-c", LOG_SCRIPT], cwd=REPO, env=TEST_ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.splitlines() == ["warning: class folder(s) bird (2) ...",
                                          "initialised 3 layers"], result.stderr
