"""The ``edgepack`` command line: thin commands that parse flags, call the library and render."""

from edgepack.host.cli.main import emit, main

__all__ = ["main", "emit"]
