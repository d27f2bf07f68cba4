"""Reading a PMML document: namespaces dropped, ``Extension`` elements ignored, line numbers kept.

The context object every stage shares (:class:`Context`) carries the graph, the string table,
the features used (for the build report) and the error helper that names element and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgepack.agent.errors import ModelError

from .graph import Graph, Vocabulary

__all__ = ["Context", "read_document", "children", "child", "unsupported", "attr_float"]

_PMML_NS = re.compile(r"^\{http://www\.dmg\.org/PMML-4_\d\}")


def read_document(path: Path):
    """Parse ``path`` and return the root ``PMML`` element with namespaces stripped."""
    from lxml import etree

    try:
        tree = etree.parse(str(path), etree.XMLParser(remove_comments=True, huge_tree=True))
    except (OSError, etree.XMLSyntaxError) as exc:
        raise ModelError(f"{path}: not a readable PMML document ({exc}); check the file is "
                         "complete XML", path=str(path)) from exc
    root = tree.getroot()
    ns = root.tag.split("}")[0][1:] if root.tag.startswith("{") else ""
    if root.tag.split("}")[-1] != "PMML":
        raise ModelError(f"{path}: the root element is <{root.tag}>, not <PMML>; pass a PMML "
                         "document as `model=`", path=str(path), field="model")
    if ns and not ns.startswith("http://www.dmg.org/PMML-4_"):
        raise ModelError(f"{path}: namespace {ns} is not PMML 4.x; re-export the model as "
                         "PMML 4.1 to 4.4", path=str(path))
    for el in root.iter():
        if isinstance(el.tag, str):
            el.tag = _PMML_NS.sub("", el.tag)
            if el.tag.startswith("{"):
                el.tag = el.tag.split("}")[-1]
    return root


def children(el, *tags: str) -> list:
    """Child elements of ``el`` with one of ``tags`` (all but Extension when no tag is given)."""
    return [c for c in el if isinstance(c.tag, str) and c.tag != "Extension"
            and (not tags or c.tag in tags)]


def child(el, tag: str):
    found = children(el, tag)
    return found[0] if found else None


def attr_float(el, name: str, default: float | None = None) -> float | None:
    raw = el.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise unsupported(el, f"attribute {name}={raw!r} is not a number",
                          "fix the value in the document") from None


def unsupported(el, what: str, todo: str = "re-export the model without it") -> ModelError:
    """A ModelError naming the element and its line."""
    line = getattr(el, "sourceline", None)
    return ModelError(f"PMML <{el.tag}> at line {line}: {what}; {todo}",
                      element=el.tag, line=line)


def collect_strings(root) -> set[str]:
    """Every attribute value, Array token and table cell: a superset of the strings in play."""
    from .arrays import parse_array

    found: set[str] = set()
    for el in root.iter():
        if not isinstance(el.tag, str):
            continue
        found.update(el.attrib.values())
        if el.tag == "Array":
            found.update(parse_array(el))
        elif len(el) == 0 and el.text and el.text.strip():
            found.add(el.text.strip())
    return found


@dataclass
class Context:
    """State shared by the stages that turn one PMML document into one ONNX graph."""

    root: object
    graph: Graph
    vocab: Vocabulary
    features: set = field(default_factory=set)
    fields: dict = field(default_factory=dict)
    data_fields: dict = field(default_factory=dict)
    functions: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)
    invalid: list = field(default_factory=list)
    zeros: str = ""
    falses: str = ""

    def use(self, feature: str) -> None:
        self.features.add(feature)

    def scoped(self, fields: dict) -> Context:
        """A copy whose field scope is ``fields`` (a segment's or model's own view)."""
        return replace(self, fields=dict(fields))
