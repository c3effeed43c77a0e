"""What every command-line tool shares: the environment set before TensorFlow loads, flag
parsing (flags can be generated from a dataclass), and one-line errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
import sys
import types
import typing

from absl import flags

HELP = ("-h", "--help", "--helpfull")
# TensorFlow's C++ start-up lines that a new user reads as errors ("Could not find cuda
# drivers", "failed call to cuInit", the oneDNN notice, CPU instruction hints).
_STARTUP_NOISE = re.compile(
    r"absl::InitializeLog|oneDNN custom operations|cuda drivers|cuInit|cpu_feature_guard|"
    r"TensorFlow binary is optimized|To enable the following instructions|"
    r"Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|"
    r"TF-TRT Warning")


def setup() -> None:
    """Sets the environment the tools run in, before TensorFlow is imported.

    Keras on TensorFlow; oneDNN kernels (1.6x faster ResNet training on CPUs where
    TensorFlow leaves them off: docs/performance.md); TensorFlow's C++ log lines off
    unless the user sets TF_CPP_MIN_LOG_LEVEL. TensorFlow's start-up lines are filtered
    whatever TF_CPP_MIN_LOG_LEVEL says: they are printed before TensorFlow reads it.
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    native_logs = _native_logs()
    if native_logs is not None:
        native_logs.plain_log_lines()
    # tf_keras' Python warnings about compiled metrics of loaded models, and the like
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if os.environ["KERAS_BACKEND"] == "tensorflow":
        _import_tensorflow_quietly(native_logs)


def _native_logs() -> types.ModuleType | None:
    """keras_resnet.pipeline.native_logs, loaded from its file (None: no keras_resnet).

    Importing any keras_resnet module first imports the package, which loads TensorFlow:
    the very import whose lines the helper filters.
    """
    package = importlib.util.find_spec("keras_resnet")  # finds the folder, imports nothing
    if package is None:
        return None
    path = os.path.join(package.submodule_search_locations[0], "pipeline", "native_logs.py")
    spec = importlib.util.spec_from_file_location("keras_resnet_native_logs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_tensorflow_quietly(native_logs: types.ModuleType | None) -> None:
    """Imports TensorFlow with its start-up lines filtered out of stderr.

    Those lines are written from C++ before its logging reads TF_CPP_MIN_LOG_LEVEL, so the
    process's stderr is captured while TensorFlow loads; any other line is passed on.
    """
    if native_logs is None or "tensorflow" in sys.modules:
        return  # keras_resnet missing (its import says so), or TensorFlow already loaded
    with native_logs.filtered_stderr(_STARTUP_NOISE):
        import tensorflow  # noqa: F401


def error(message: str, status: int = 2) -> int:
    """Prints ``error: message`` on stderr; returns the exit status."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


def finish(status: int) -> typing.NoReturn:
    """Exits with ``status``; a task of a cluster leaves with the others
    (:func:`keras_resnet.pipeline.training.distribute.leave_cluster`)."""
    if "TF_CONFIG" in os.environ:
        from keras_resnet.pipeline.training import distribute

        distribute.leave_cluster(status)
    sys.exit(status)


RUN_FOLDER = "the run folder tools/train.py wrote"


def parse(flag_values: flags.FlagValues, argv: list[str], *, doc: str | None = None,
          max_positional: int = 0,
          required: dict[str, str] | None = None) -> tuple[int | None, list[str]]:
    """Parses ``argv`` into ``flag_values`` (cleared first, so tests can call twice).

    Args:
        flag_values: the tool's own flag registry.
        argv: the command line, program name first.
        doc: the tool's docstring; -h/--help/--helpfull print it and the flags.
        max_positional: positional arguments allowed after the program name.
        required: flags that must be given -> what they are (for the error).

    Returns:
        ``(status, positional)``: status None when the tool should go on, else the exit
        status (0 after help, 2 after a one-line error).
    """
    flag_values.unparse_flags()
    if any(a in HELP for a in argv[1:]):
        print((doc or "").strip() + "\n\nFlags:\n" + flag_values.get_help())
        return 0, []
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        return error(str(e)), []
    if len(rest) - 1 > max_positional:
        return error(f"unexpected arguments {rest[1:]}; options are --name=value flags"), []
    for name, what in (required or {}).items():
        if flag_values[name].value is None:
            return error(f"--{name} is required: {what}"), []
    return None, rest[1:]


def call(flag_values: flags.FlagValues, function, first: str):
    """Calls ``function(<flag first>, **<every other flag>)`` for a tool whose flags are the
    function's arguments.

    Returns:
        ``(None, result)``, or ``(2, None)`` after printing a UserError as one line, or
        ``(128 + signal, None)`` after a stop by SIGTERM/SIGINT.
    """
    from keras_resnet.pipeline.errors import Interrupted, UserError

    options = {name: flag_values[name].value for name in flag_values if name != first}
    try:
        return None, function(flag_values[first].value, **options)
    except Interrupted as e:  # SIGTERM/SIGINT: one line, 128 + the signal
        print(str(e), file=sys.stderr, flush=True)
        return e.status, None
    except UserError as e:
        return user_error(e, flag_values), None


def user_error(e: Exception, flag_values: flags.FlagValues) -> int:
    """Reports a library UserError with its argument names written as this tool's flags."""
    from keras_resnet.pipeline.errors import as_flags

    return error(as_flags(str(e), list(flag_values)))


def _flag_kind(annotation) -> type:
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    kinds = [h for h in hints if h is not type(None)] or [annotation]
    kind = typing.get_origin(kinds[0]) or kinds[0]
    return kind


def define_from_dataclass(flag_values: flags.FlagValues, cls, *,
                          module_name: str | None = None) -> list[str]:
    """Defines one flag per field of ``cls``, with the help text in the field's metadata.

    A dict field becomes a JSON string flag. ``module_name`` heads the flags in --help.
    Returns the flag names.
    """
    hints = typing.get_type_hints(cls)
    names = []
    for field in dataclasses.fields(cls):
        kind = _flag_kind(hints[field.name])
        default = None if field.default is dataclasses.MISSING else field.default
        define = {int: flags.DEFINE_integer, float: flags.DEFINE_float,
                  bool: flags.DEFINE_bool, str: flags.DEFINE_string}.get(kind)
        help_text = field.metadata.get("help", field.name)
        if kind is dict:
            define, help_text = flags.DEFINE_string, help_text + " (JSON)"
        define(field.name, default, help_text, flag_values=flag_values,
               module_name=module_name)
        names.append(field.name)
    return names


def dataclass_from_flags(flag_values: flags.FlagValues, cls):
    """An instance of ``cls`` from the parsed flags of :func:`define_from_dataclass`.

    Raises:
        ValueError: a JSON flag that does not hold a JSON object.
    """
    import json

    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        value = flag_values[field.name].value
        if _flag_kind(hints[field.name]) is dict:
            try:
                value = json.loads(value) if value else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"--{field.name} is not valid JSON ({e})") from None
            if not isinstance(value, dict):
                raise ValueError(f"--{field.name} must be a JSON object")
        values[field.name] = value
    return cls(**values)
