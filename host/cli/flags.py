"""Library messages name arguments as Python spells them (`` `calibration=` ``); people at the
command line type flags (``--calibration``). This module is the one place that translates."""

from __future__ import annotations

import re

import click

__all__ = ["as_flags"]

# An argument named in a library message: `calibration=` (see agent/errors.py).
_ARGUMENT = re.compile(r"`([a-z_][a-z0-9_]*)=`")
# Where the Python argument and the flag are not spelled alike.
_FLAG_FOR = {"eval": "--eval", "eval_data": "--eval", "out": "--out", "out_dir": "--out",
             "fmt": "--format", "format": "--format", "pubs": "--pub", "key": "--key",
             "overwrite": "--force"}


def _flags(command: click.Command | None) -> dict[str, str]:
    """Python parameter name -> its first long flag, for ``command`` and any sub-commands."""
    flags: dict[str, str] = {}
    todo = [command] if command is not None else []
    while todo:
        cmd = todo.pop(0)
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name:
                longs = [o for o in p.opts if o.startswith("--")]
                flags.setdefault(p.name, longs[0] if longs else p.opts[0])
        if isinstance(cmd, click.Group):
            todo.extend(cmd.commands.values())
    return flags


def as_flags(text: str, command: click.Command | None = None) -> str:
    """A library message or warning as a CLI user reads it: "pass `calibration=` data.npz"
    reads "pass --calibration data.npz"."""
    flags = _flags(command)

    def flag(m: re.Match) -> str:
        name = m.group(1)
        return _FLAG_FOR.get(name) or flags.get(name) or "--" + name.replace("_", "-")

    return _ARGUMENT.sub(flag, text)


