"""Flag parsing and one-line errors shared by the command-line tools (absl only, no TF)."""

from __future__ import annotations

import sys

from absl import flags

HELP = ("-h", "--help", "--helpfull")


def error(message: str, status: int = 2) -> int:
    """Prints ``error: message`` on stderr; returns the exit status."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


def parse(flag_values: flags.FlagValues, argv: list[str], *, doc: str | None = None,
          max_positional: int = 0) -> tuple[int | None, list[str]]:
    """Parses ``argv`` into ``flag_values`` (cleared first, so tests can call twice).

    Args:
        flag_values: the tool's own flag registry.
        argv: the command line, program name first.
        doc: the tool's docstring; when given, -h/--help/--helpfull print it and the flags.
        max_positional: positional arguments allowed after the program name.

    Returns:
        ``(status, positional)``: status None when the tool should go on, else the exit
        status (0 after help, 2 after a one-line error).
    """
    flag_values.unparse_flags()
    if doc is not None and any(a in HELP for a in argv[1:]):
        print(doc.strip() + "\n\nFlags:\n" + flag_values.get_help())
        return 0, []
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        return error(str(e)), []
    if len(rest) - 1 > max_positional:
        return error(f"unexpected arguments {rest[1:]}; options are --name=value flags"), []
    return None, rest[1:]
