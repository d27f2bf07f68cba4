"""The ``edgepack`` command line: thin wrappers that turn flags and a profile into library calls.

Heavy libraries (TensorFlow, onnx, onnxruntime) are imported inside commands, so ``--help``
answers instantly. Only :class:`EdgepackError` is caught: it prints ``error: …`` and exits with the
error's code; anything else is a bug and keeps its traceback.

Library errors name what the caller passed as Python arguments (`` `calibration=` ``); this is the
one place where those names become the flags a CLI user types (``--calibration``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from edgepack.agent.errors import EdgepackError
from edgepack.host.cli.flags import as_flags

__all__ = ["main", "emit", "render_error", "as_flags"]

def emit(obj: Any, as_json: bool, render: Any = None) -> None:
    """Print ``obj`` as JSON (for scripts) or through ``render`` (for people)."""
    if as_json or render is None:
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        render(obj)


def render_error(exc: EdgepackError, command: click.Command | None = None) -> str:
    """The message a CLI user reads: `` `name=` `` becomes ``--name`` (or the flag it maps to),
    so "pass `calibration=` data.npz" reads "pass --calibration data.npz"."""
    return as_flags(str(exc), command)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgepackError as exc:
            name = ctx.invoked_subcommand
            command = self.get_command(ctx, name) if name else None
            click.echo(f"error: {render_error(exc, command)}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgepack")
def main() -> None:
    """edgepack: package, ship, verify, run and measure ML models on edge devices."""


def _register() -> None:
    from edgepack.host.cli import agent, build, capture, distill, fleet, profile, serve

    for mod in (build, fleet, serve, agent, distill, profile, capture):
        mod.register(main)


_register()


if __name__ == "__main__":
    main()
