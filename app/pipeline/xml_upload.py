"""Uploaded XML (BPMN, SVG): recognised from its decoded start, parsed by defusedxml (entities and external
references refused by the parser itself, whatever the file's encoding), bounded in depth and size before any
recursive code walks it, and every way it can be broken answered as a 400 that names the file kind."""

from __future__ import annotations

import codecs
import re
import xml.etree.ElementTree as ElementTree

import defusedxml
import defusedxml.ElementTree

from app.errors import InvalidImageError

# resvg overflows its stack near 500 levels and ElementTree.tostring recurses per level: far above what any
# exporter writes (draw.io and bpmn.io stay under 20), far below either limit.
MAX_DEPTH = 100
MAX_ELEMENTS = 500_000
HEAD_BYTES = 4096
# What may come before the root element: declaration, processing instructions, comments, a DOCTYPE.
_PROLOG = r"\A(?:\s|<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^>\[]*(?:\[.*?\])?\s*>)*"
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def local_name(name: str) -> str:
    """A tag or attribute name without its namespace: ``{http://…/MODEL}task`` -> ``task``."""
    return name.rsplit("}", 1)[-1]


def decoded_head(data: bytes) -> str:
    """The start of an XML file as text, in its encoding: a byte-order mark, else the UTF-16/32 pattern of ``<``
    (the XML spec's own detection), else UTF-8 (ASCII-compatible encodings read the same for markup)."""
    head = data[:HEAD_BYTES]
    encoding = "utf-8"
    for bom, name in _BOMS:
        if head.startswith(bom):
            head, encoding = head[len(bom):], name
            break
    else:
        if head.startswith(b"<\x00\x00\x00"):
            encoding = "utf-32-le"
        elif head.startswith(b"\x00\x00\x00<"):
            encoding = "utf-32-be"
        elif head.startswith(b"<\x00"):
            encoding = "utf-16-le"
        elif head.startswith(b"\x00<"):
            encoding = "utf-16-be"
    return head.decode(encoding, errors="replace")


def root_tag(data: bytes, name: str) -> str | None:
    """The start tag of the root element (its attributes included) when that element is ``name`` (any prefix),
    judged from the decoded start of the file; comments before it do not count."""
    match = re.match(_PROLOG + r"<((?:[A-Za-z_][\w.-]*:)?" + re.escape(name) + r")([\s/>][^>]*>?)",
                     decoded_head(data), re.DOTALL)
    return "<" + match.group(1) + match.group(2) if match else None


def parse_upload(data: bytes, kind: str, allow_doctype: bool) -> ElementTree.Element:
    """The root element of ``data``. Raises InvalidImageError for entities, external references, a DOCTYPE
    (unless ``allow_doctype``: draw.io writes a plain one, never fetched), broken XML, or a tree deeper than
    MAX_DEPTH or larger than MAX_ELEMENTS."""
    try:
        root = defusedxml.ElementTree.fromstring(data, forbid_dtd=not allow_doctype, forbid_entities=True,
                                                 forbid_external=True)
    except defusedxml.DTDForbidden:
        raise InvalidImageError(f"the {kind} file has a DOCTYPE, which is refused (entity expansion, external "
                                "references); export it without one") from None
    except (defusedxml.EntitiesForbidden, defusedxml.ExternalReferenceForbidden):
        raise InvalidImageError(f"the {kind} file declares entities or external references, which are refused "
                                "(entity expansion, files or URLs read); export it without them") from None
    except ElementTree.ParseError as error:
        raise InvalidImageError(f"cannot read the {kind} XML: {error}") from None
    check_shape(root, kind)
    return root


def check_shape(root: ElementTree.Element, kind: str) -> None:
    """Depth and element count, measured without recursion."""
    count = 0
    stack = [(root, 1)]
    while stack:
        element, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise InvalidImageError(f"the {kind} file nests elements more than {MAX_DEPTH} deep; no diagram "
                                    "exporter does, send a flatter export")
        if count > MAX_ELEMENTS:
            raise InvalidImageError(f"the {kind} file has more than {MAX_ELEMENTS} elements")
        stack.extend((child, depth + 1) for child in element)
