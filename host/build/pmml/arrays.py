"""PMML ``Array`` elements: whitespace-separated tokens, double-quoted strings with ``\\"``."""

from __future__ import annotations

import re

__all__ = ["parse_array"]

_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


def parse_array(el) -> list[str]:
    """The tokens of an ``Array`` element, quotes removed and ``\\"`` unescaped."""
    text = el.text or ""
    out = []
    for quoted, bare in _TOKEN.findall(text):
        out.append(quoted.replace('\\"', '"') if bare == "" else bare)
    return out
