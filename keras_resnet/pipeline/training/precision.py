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

import logging

from keras_resnet.pipeline.errors import UserError, choose
from keras_resnet.pipeline.run.config import AUTO_BOOL
from keras_resnet.pipeline.training import machine

log = logging.getLogger(__name__)

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
    flags = machine.host_cpu_flags() if flags is None else flags
    if machine.bf16_flags(flags):
        return "mixed_bfloat16"
    if option == "true":
        raise UserError("mixed_precision=true needs a GPU or a CPU with native bfloat16 "
                        f"({' or '.join(machine.BF16_CPU_FLAGS)}), which this CPU lacks; use "
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
    flags = machine.host_cpu_flags() if flags is None else flags
    slower = (", where bfloat16 is emulated and slower" if recorded == "mixed_bfloat16"
              and not machine.bf16_flags(flags) else "")
    log.warning("resuming in %s, the dtype policy this run started with, although this "
                "machine would choose %s%s; start a new run to train in %s", recorded,
                chosen, slower, chosen)
    return recorded
