"""Uploaded XML (BPMN, SVG): parsed only once the declarations that expand text or pull in files are refused, and
every way it can be broken answered as a 400 that names the file kind."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree

from app.errors import InvalidImageError


def local_name(name: str) -> str:
    """A tag or attribute name without its namespace: ``{http://…/MODEL}task`` -> ``task``."""
    return name.rsplit("}", 1)[-1]


def parse_upload(data: bytes, kind: str, refused: re.Pattern[bytes], refused_text: str) -> ElementTree.Element:
    """The root element of ``data``. Raises InvalidImageError when ``refused`` matches it or it is broken XML."""
    if refused.search(data):
        raise InvalidImageError(f"the {kind} file declares {refused_text}, which are refused (entity expansion, "
                                "external references); export it without them")
    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise InvalidImageError(f"cannot read the {kind} XML: {error}") from None
