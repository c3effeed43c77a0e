"""Which Keras dtype policy a training run computes in.

``mixed_precision`` is auto, true or false:

* with a GPU, true (and auto) is ``mixed_float16``, as Keras recommends for GPUs;
* on a CPU whose flags (``/proc/cpuinfo`` on Linux) include ``amx_bf16`` or
  ``avx512_bf16``, true (and auto) is ``mixed_bfloat16``: oneDNN runs bfloat16
  convolutions on AMX tiles or AVX512-BF16 dot products there, faster than float32; on
  other CPUs bfloat16 is emulated and slower, so auto stays ``float32`` and true is refused;
* false is ``float32`` everywhere.

A resumed run keeps the policy it started with (:func:`resumed_policy`), even where this
machine would decide otherwise, so that moving a run to another machine never changes its
arithmetic half-way.

Only the computation changes: variables stay float32 under either mixed policy, and every
saved ``.keras`` file holds a float32 model (see :func:`keras_resnet.pipeline.training.loop.
save_model`), so QAT and export see what they always saw.

Example:
    >>> choose_policy("auto", gpu=False, flags={"avx2", "avx512_bf16"})
    'mixed_bfloat16'
"""

from __future__ import annotations

import functools
import logging
import platform

from keras_resnet.pipeline.errors import UserError, choose
from keras_resnet.pipeline.run.config import AUTO_BOOL

log = logging.getLogger(__name__)

# CPU flags with native bfloat16 arithmetic that oneDNN uses (AMX tiles, AVX512-BF16).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = "/proc/cpuinfo"


def _cpuinfo_field(path: str, keys: tuple[str, ...]) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags(path: str = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags (the ``flags`` line of /proc/cpuinfo); empty elsewhere."""
    return frozenset((_cpuinfo_field(path, ("flags", "Features")) or "").split())


def cpu_model(path: str = CPUINFO) -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    return _cpuinfo_field(path, ("model name",)) or platform.processor() or platform.machine()


@functools.cache
def host_cpu_flags() -> frozenset[str]:
    """:func:`cpu_flags` of this machine (read once)."""
    return cpu_flags() if platform.system() == "Linux" else frozenset()


def bf16_flags(flags) -> tuple[str, ...]:
    """The flags of ``flags`` that make bfloat16 native (empty: no native bfloat16)."""
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def choose_policy(option: str, *, gpu: bool, flags=None) -> str:
    """The dtype policy of a run: "mixed_float16", "mixed_bfloat16" or "float32".

    Args:
        option: the run's ``mixed_precision`` (auto, true or false).
        gpu: whether the run trains on GPUs.
        flags: the CPU's flags (default: this machine's).

    Raises:
        UserError: ``true`` on a CPU without native bfloat16.
    """
    choose("mixed_precision", option, AUTO_BOOL)
    if option == "false":
        return "float32"
    if gpu:
        return "mixed_float16"
    flags = host_cpu_flags() if flags is None else flags
    if bf16_flags(flags):
        return "mixed_bfloat16"
    if option == "true":
        raise UserError("mixed_precision=true needs a GPU or a CPU with native bfloat16 "
                        f"({' or '.join(BF16_CPU_FLAGS)}), which this CPU lacks; use "
                        "mixed_precision=auto")
    return "float32"


def resumed_policy(recorded: str | None, chosen: str, *, flags=None) -> str:
    """The policy a resumed run computes in: ``recorded``, the one it started with.

    Args:
        recorded: the run's ``dtype_policy`` from config.json (None: not recorded, as in
            runs from before it was).
        chosen: what :func:`choose_policy` decides on this machine.
        flags: the CPU's flags (default: this machine's).

    Logs one warning when the two differ, saying what this machine would have chosen.
    """
    if not recorded or recorded == chosen:
        return chosen
    flags = host_cpu_flags() if flags is None else flags
    slower = (", where bfloat16 is emulated and slower" if recorded == "mixed_bfloat16"
              and not bf16_flags(flags) else "")
    log.warning("resuming in %s, the dtype policy this run started with, although this "
                "machine would choose %s%s; start a new run to train in %s", recorded,
                chosen, slower, chosen)
    return recorded
