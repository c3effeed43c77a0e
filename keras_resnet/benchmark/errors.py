"""The benchmark's one error: a request that cannot be measured."""

from __future__ import annotations

from keras_resnet.pipeline.errors import UserError


class BenchmarkError(UserError):
    """A benchmark request that cannot be measured (one sentence naming the setting); the
    tool prints it as one ``error:`` line, as every UserError."""
