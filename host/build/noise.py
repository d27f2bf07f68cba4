"""Third-party output during a build: what the libraries a build calls print, kept out of the way.

Converters and runtimes talk on their own: Python ``warnings`` (onnxconverter-common's float16
truncation notes), ``logging`` records (``WARNING:root:…`` from onnxruntime's tools, tf2onnx,
skl2onnx), and C++ logs written straight to file descriptors 1 and 2 (TensorFlow, absl, oneDNN,
LiteRT, onnxruntime). :class:`ThirdPartyOutput` collects all three while a build runs, counts them
per source and keeps the first lines of each for the report (``third_party_output`` in
``report.json``); with ``live=True`` they reach the terminal as they happen and only the Python
ones are counted.

The C++ side needs the file descriptors themselves redirected: that is
:func:`edgepack.host.build.tflite_intake.captured_output`, the one helper for it. edgepack's own
progress display writes to :attr:`ThirdPartyOutput.terminal`, a copy of the real stderr taken
before the redirect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["FIRST_LINES", "ThirdPartyOutput"]

FIRST_LINES = 10  # lines kept per source in the report

# "2026-12-02 13:40:00.123456: I tensorflow/core/util/port.cc:153] …" (TensorFlow's C++ log)
_TF_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] (?:external/)?(\w+)")
# "W0000 00:00:1733150000.123 12345 file.cc:40] …" (absl)
_ABSL_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
# "2026-12-02 13:40:00.123 [W:onnxruntime:, graph.cc:123 …]"
_ORT_LOG = re.compile(r"\[[VIWEF]:onnxruntime:")
# "WARNING:root:Inference failed …" (logging's default format)
_PY_LOG = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):([\w.]+):")
# "/…/site-packages/pkg/mod.py:52: UserWarning: …" (a warning printed as text)
_PY_WARNING = re.compile(r"^(\S+\.py):\d+: (\w+): ")
_LITERT = ("INFO: Created TensorFlow Lite", "fully_quantize:", "Estimated count of arithmetic")


def _package(filename: str) -> str:
    """The top-level package a source file belongs to (``onnxconverter_common``)."""
    parts = re.split(r"[\\/]", filename)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            i = len(parts) - 1 - parts[::-1].index(marker)
            if i + 1 < len(parts):
                return parts[i + 1].removesuffix(".py")
    return parts[-1].removesuffix(".py") or "unknown"


def _source_of(line: str) -> str:
    """Where a line of captured text came from, as the report names it."""
    if m := _TF_LOG.match(line):
        return f"{'tensorflow' if m.group(1) in ('local_xla', 'local_tsl') else m.group(1)} " \
               "C++ log"
    if _ABSL_LOG.match(line) or line.startswith("WARNING: All log messages before absl"):
        return "absl C++ log"
    if _ORT_LOG.search(line):
        return "onnxruntime C++ log"
    if line.startswith(_LITERT):
        return "LiteRT C++ log"
    if m := _PY_LOG.match(line):
        return f"log {m.group(1)}"
    if m := _PY_WARNING.match(line):
        return f"{m.group(2)} from {_package(m.group(1))}"
    return "other output"


@dataclass
class _Source:
    count: int = 0
    first: list[str] = field(default_factory=list)


class _Records(logging.Handler):
    """Stands in for the root logger's handlers: records count, and pass through when live."""

    def __init__(self, owner: ThirdPartyOutput) -> None:
        super().__init__(logging.WARNING)
        self._owner = owner
        self.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self._owner.add(f"log {record.name}", self.format(record))


class ThirdPartyOutput:
    """Collect the warnings, log records and C++ output of the libraries a build calls.

    Use as a context manager around the build. :meth:`summary` may be called inside (the package
    stage writes it into ``report.json`` before the build ends). On an exception that is not an
    :class:`~edgepack.agent.errors.EdgepackError` (a bug), what was collected is written to the
    terminal before the traceback, since it may explain the failure.
    """

    def __init__(self, *, live: bool = False, first_lines: int = FIRST_LINES) -> None:
        self.live = live
        self.first_lines = first_lines
        self.terminal: IO[str] = sys.stderr
        self._sources: dict[str, _Source] = {}
        self._stack = contextlib.ExitStack()
        self._native: contextlib.ExitStack | None = None
        self._lines: list[str] = []
        self._root_handlers: list[logging.Handler] = []

    # -- collecting ----------------------------------------------------------------------------

    def add(self, source: str, text: str) -> None:
        """Count one message of ``source`` (its first line is what the report keeps)."""
        s = self._sources.setdefault(source, _Source())
        s.count += 1
        if len(s.first) < self.first_lines:
            s.first.append(text.splitlines()[0][:500] if text.strip() else text)
        if self.live:
            print(text, file=self.terminal, flush=True)

    def _warning(self, message: Any, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
        self.add(f"{category.__name__} from {_package(filename)}",
                 f"{filename}:{lineno}: {category.__name__}: {message}")

    def _start_native(self) -> None:
        from edgepack.host.build.tflite_intake import captured_output

        self._native = contextlib.ExitStack()
        self._lines = self._native.enter_context(captured_output())

    def _collect_native(self) -> None:
        if self._native is None:
            return
        self._native.close()  # the lines arrive when the redirect ends
        self._native = None
        live, self.live = self.live, False
        previous = ""
        for line in self._lines:
            source = _source_of(line)
            if source == "other output" and previous.endswith("C++ log") and line[:1].isupper():
                source = previous  # a C++ message's second line ("To enable the following…")
            self.add(source, line)
            previous = source
        self.live = live

    # -- context -------------------------------------------------------------------------------

    def __enter__(self) -> ThirdPartyOutput:
        sys.stdout.flush()
        sys.stderr.flush()
        if not self.live:
            self.terminal = self._stack.enter_context(
                os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace"))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.showwarning = self._warning
        root = logging.getLogger()
        self._root_handlers = root.handlers[:]
        root.handlers = [_Records(self)]
        self._stack.callback(setattr, root, "handlers", self._root_handlers)
        if not self.live:
            self._start_native()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        from edgepack.agent.errors import EdgepackError

        sys.stdout.flush()
        sys.stderr.flush()
        self._collect_native()
        if exc is not None and not isinstance(exc, EdgepackError) and self._sources:
            print("third-party output before the failure:", file=self.terminal)
            for name, s in self._sources.items():
                for line in s.first:
                    print(f"  [{name}] {line}", file=self.terminal)
            self.terminal.flush()
        self._stack.close()
        self.terminal = sys.stderr

    def summary(self) -> dict[str, Any]:
        """``{"count", "shown_live", "sources": {name: {"count", "first"}}}`` so far."""
        if self._native is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            self._collect_native()
            self._start_native()
        return {"count": sum(s.count for s in self._sources.values()),
                "shown_live": self.live,
                "sources": {name: {"count": s.count, "first": list(s.first)}
                            for name, s in sorted(self._sources.items())}}
