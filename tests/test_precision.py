"""The dtype policy a run trains in, decided from faked CPU flags."""

from __future__ import annotations

import logging

import pytest

from keras_resnet.pipeline.errors import UserError
from keras_resnet.pipeline.training import machine, precision

XEON_AMX = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
EPYC_AVX512 = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
EPYC_AVX2 = {"avx2", "fma"}


@pytest.mark.parametrize("flags, option, gpu, policy", [
    (XEON_AMX, "auto", False, "mixed_bfloat16"),
    (EPYC_AVX512, "auto", False, "mixed_bfloat16"),
    (EPYC_AVX2, "auto", False, "float32"),
    (set(), "auto", False, "float32"),
    (EPYC_AVX2, "auto", True, "mixed_float16"),
    (XEON_AMX, "auto", True, "mixed_float16"),  # GPUs train in float16, as before
    (XEON_AMX, "true", False, "mixed_bfloat16"),
    (EPYC_AVX2, "true", True, "mixed_float16"),
    (XEON_AMX, "false", False, "float32"),
    (XEON_AMX, "false", True, "float32"),
])
def test_policy_decision(flags, option, gpu, policy):
    assert precision.choose_policy(option, gpu=gpu, flags=flags) == policy


def test_true_on_a_cpu_without_bfloat16_is_one_sentence():
    with pytest.raises(UserError) as e:
        precision.choose_policy("true", gpu=False, flags=EPYC_AVX2)
    assert str(e.value) == (
        "mixed_precision=true needs a GPU or a CPU with native bfloat16 (amx_bf16 or "
        "avx512_bf16), which this CPU lacks; use mixed_precision=auto")
    with pytest.raises(UserError, match="mixed_precision='maybe' is not valid"):
        precision.choose_policy("maybe", gpu=False, flags=XEON_AMX)


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\n"
                       "flags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    flags = machine.cpu_flags(str(cpuinfo))
    assert {"avx2", "avx512_bf16"} <= flags
    assert machine.bf16_flags(flags) == ("avx512_bf16",)
    assert machine.cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert isinstance(machine.host_cpu_flags(), frozenset)


def test_a_resumed_run_keeps_the_policy_it_started_with(caplog):
    with caplog.at_level(logging.WARNING, logger="keras_resnet"):
        assert precision.resumed_policy("float32", "float32") == "float32"
        assert precision.resumed_policy(None, "mixed_bfloat16") == "mixed_bfloat16"
        assert not caplog.records
        assert precision.resumed_policy("float32", "mixed_bfloat16",
                                        flags=XEON_AMX) == "float32"
        assert precision.resumed_policy("mixed_bfloat16", "mixed_float16",
                                        flags=XEON_AMX) == "mixed_bfloat16"
    assert [r.getMessage() for r in caplog.records] == [
        "resuming in float32, the dtype policy this run started with, although this machine "
        "would choose mixed_bfloat16; start a new run to train in mixed_bfloat16",
        "resuming in mixed_bfloat16, the dtype policy this run started with, although this "
        "machine would choose mixed_float16; start a new run to train in mixed_float16"]
