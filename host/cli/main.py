"""The ``edgepack`` command line: thin wrappers that turn flags and a profile into library calls.

Heavy libraries (TensorFlow, onnx, onnxruntime) are imported inside commands, so ``--help``
answers instantly. Only :class:`EdgepackError` is caught: it prints ``error: …`` and exits 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

from edgepack.agent.errors import EdgepackError

__all__ = ["main", "emit"]


def emit(obj: Any, as_json: bool, render: Any = None) -> None:
    """Print ``obj`` as JSON (for scripts) or through ``render`` (for people)."""
    if as_json or render is None:
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        render(obj)


def as_flags(message: str) -> str:
    """Library messages name arguments as `` `calibration=` ``; on the command line they are
    ``--calibration``."""
    return re.sub(r"`([a-z][a-z0-9_]*)=`", lambda m: "--" + m.group(1).replace("_", "-"),
                  message)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgepackError as exc:
            click.echo(f"error: {as_flags(str(exc))}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgepack")
def main() -> None:
    """edgepack: package, ship, verify, run and measure ML models on edge devices."""


def _register() -> None:
    from edgepack.host.cli import agent, build, distill, fleet, profile, serve

    for mod in (build, fleet, serve, agent, distill, profile):
        mod.register(main)


_register()


if __name__ == "__main__":
    main()
