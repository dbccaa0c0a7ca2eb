"""SVG uploads -> a raster the size the model will see, drawn by resvg, with nothing outside the file read.

resvg has no network and no script engine, but it does read files named by ``href`` (an ``<image>`` pointing at
``/etc/…`` would be drawn into the diagram, or ``/dev/zero`` read forever). So the document is parsed first and
every reference that is not inside the file is dropped; embedded pictures count against the same pixel limit as
any upload. Text needs fonts: where none are installed a diagram's labels would silently vanish, so such a file
is refused instead (the container image ships DejaVu), and text naming a font that is not installed is drawn in
one that is.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import math
import os
import re
import sys
import urllib.parse
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFont

from app.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaError
from app.pipeline.xml_upload import local_name, parse_upload, root_tag

SVG_NAMESPACE = "http://www.w3.org/2000/svg"
XLINK_NAMESPACE = "http://www.w3.org/1999/xlink"
ElementTree.register_namespace("", SVG_NAMESPACE)  # serialised back as plain <svg>, as resvg expects
ElementTree.register_namespace("xlink", XLINK_NAMESPACE)

_RASTERS = {"PNG", "JPEG", "GIF", "WEBP"}  # what resvg draws from an embedded picture
_UNITS_PX = {"": 1.0, "px": 1.0, "pt": 96 / 72, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0,
             "em": 16.0, "ex": 8.0}
_LENGTH = re.compile(r"^\s*([+]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-z]*)\s*$")
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
# Linux packages (fonts-dejavu-core, fonts-liberation, fonts-noto-core), then macOS's and Windows' own.
PREFERRED_FONT_FILES = ("dejavusans.ttf", "liberationsans-regular.ttf", "notosans-regular.ttf", "helvetica.ttc",
                        "arial.ttf", "segoeui.ttf")


@dataclass(frozen=True)
class SvgDocument:
    """A parsed, cleaned SVG: the text handed to resvg and the size it declares (CSS px)."""

    text: str
    width: float
    height: float
    has_text: bool


def looks_like_svg(data: bytes) -> bool:
    """XML whose root element is ``svg``, judged from the decoded start of the file (any encoding)."""
    return root_tag(data, "svg") is not None


def _length_px(value: str | None) -> float | None:
    """An absolute SVG length in px; None for a percentage, an unknown unit or nothing."""
    match = _LENGTH.match(value or "")
    if not match or match.group(2) not in _UNITS_PX:
        return None
    return float(match.group(1)) * _UNITS_PX[match.group(2)]


def declared_size(root: ElementTree.Element) -> tuple[float, float]:
    """The size resvg will give the drawing: width/height when absolute, else from the viewBox (keeping its
    aspect when one side is given), else 100x100 as the SVG spec says."""
    width, height = _length_px(root.get("width")), _length_px(root.get("height"))
    try:
        box = [float(part) for part in re.split(r"[\s,]+", (root.get("viewBox") or "").strip())]
    except ValueError:
        box = []
    if len(box) == 4 and box[2] > 0 and box[3] > 0:
        if width is None and height is None:
            width, height = box[2], box[3]
        elif width is None:
            width = height * box[2] / box[3]
        elif height is None:
            height = width * box[3] / box[2]
    return (width if width is not None else 100.0), (height if height is not None else 100.0)


def _embedded_picture(href: str) -> Image.Image | None:
    """The picture a ``data:`` URL holds (header read only), or None when it is not one resvg would draw."""
    header, _, payload = href[5:].partition(",")
    try:
        raw = base64.b64decode(payload, validate=False) if header.endswith(";base64") else \
            urllib.parse.unquote_to_bytes(payload)
        picture = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise PayloadTooLargeError("a picture embedded in the SVG declares more pixels than Pillow's bomb limit; "
                                   "send a smaller export") from None
    except (binascii.Error, ValueError, OSError, SyntaxError):
        return None
    return picture if picture.format in _RASTERS else None  # an SVG inside an SVG could name files again


def _drop_outside_references(root: ElementTree.Element, max_pixels: int) -> None:
    """Remove every ``href`` that points outside the document. Pictures embedded as ``data:`` URLs stay, up to
    ``max_pixels`` in all (a small PNG can declare gigapixels)."""
    embedded_pixels = 0
    for element in root.iter():
        for name in [name for name in element.attrib if local_name(name) == "href"]:
            href = element.attrib[name].strip()
            if href.startswith("#"):
                continue  # a link inside the document: gradients, <use>, markers
            picture = _embedded_picture(href) if href[:5].lower() == "data:" else None
            if picture is None:
                del element.attrib[name]
                continue
            embedded_pixels += picture.width * picture.height
            if embedded_pixels > max_pixels:
                raise PayloadTooLargeError(f"the pictures embedded in the SVG hold more than {max_pixels} pixels; "
                                           "send a smaller export")


def _skip_foreign_object_notices(root: ElementTree.Element) -> None:
    """Exporters such as draw.io put each label in a ``<switch>``: HTML in a ``<foreignObject>``, then the same
    text as SVG for renderers without HTML, which resvg draws. They also add a switch whose first choice is an
    empty group marked as needing foreignObject support ("Extensibility") and whose fallback is a notice, "Text
    is not SVG - cannot display". resvg supports no optional feature, so it would draw that notice into the
    diagram; a browser draws the empty group. Letting such non-HTML choices pass does what the browser does,
    while the HTML choices still fall back to their SVG text."""
    for switch in root.iter():
        if local_name(switch.tag) != "switch":
            continue
        for choice in switch:
            features = choice.get("requiredFeatures", "")
            if local_name(choice.tag) != "foreignObject" and features.strip().endswith("#Extensibility"):
                del choice.attrib["requiredFeatures"]


def parse_svg(data: bytes, max_pixels: int) -> SvgDocument:
    """Parse and clean an SVG upload. Raises InvalidImageError (400) for entities or broken XML."""
    root = parse_upload(data, "SVG", allow_doctype=True)
    if local_name(root.tag) != "svg":
        raise InvalidImageError(f"the XML's root element is <{local_name(root.tag)}>, not <svg>")
    _drop_outside_references(root, max_pixels)
    _skip_foreign_object_notices(root)
    width, height = declared_size(root)
    has_text = any(local_name(element.tag) in ("text", "tspan", "textPath") for element in root.iter())
    return SvgDocument(ElementTree.tostring(root, encoding="unicode"), width, height, has_text)


def _font_dirs() -> list[Path]:
    """Where fonts are installed: fontconfig's usual folders on Linux, the system's on macOS (a native run for
    MPS) and Windows."""
    home = Path.home()
    if sys.platform == "darwin":
        return [Path("/System/Library/Fonts"), Path("/Library/Fonts"), home / "Library" / "Fonts"]
    if sys.platform == "win32":
        return [Path(os.environ.get("WINDIR", r"C:\Windows")) / "Fonts"]
    data_home = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return [Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), home / ".fonts", data_home / "fonts"]


@dataclass(frozen=True)
class InstalledFonts:
    folders: tuple[str, ...]  # the font folders resvg is given, and the only ones it reads
    family: str | None  # what text is drawn in when the font it names is missing; None: no fonts at all


def _family(files: list[Path]) -> str | None:
    """A common sans-serif family with Latin and Cyrillic among ``files`` if there is one (diagram labels), else
    a regular sans-serif one, else any readable one."""
    def rank(path: Path) -> tuple[int, bool, bool, str]:
        name = path.name.lower()
        known = PREFERRED_FONT_FILES.index(name) if name in PREFERRED_FONT_FILES else len(PREFERRED_FONT_FILES)
        return (known, "sans" not in name or "mono" in name, any(s in name for s in ("bold", "oblique", "italic")),
                name)

    for path in sorted(files, key=rank):
        try:
            return ImageFont.truetype(str(path), 12).getname()[0]
        except OSError:
            continue
    return None


@functools.cache
def _fonts_in(folders: tuple[Path, ...]) -> InstalledFonts:
    found: list[str] = []
    files: list[Path] = []
    for folder in folders:
        try:
            fonts = [path for path in folder.rglob("*") if path.suffix.lower() in FONT_SUFFIXES]
        except OSError:
            continue
        if fonts:
            found.append(str(folder))
            files += fonts
    return InstalledFonts(tuple(found), _family(files))


def installed_fonts() -> InstalledFonts:
    return _fonts_in(tuple(_font_dirs()))


def rasterise(document: SvgDocument, box: tuple[int, int]) -> Image.Image:
    """Draw ``document`` to fit ``box`` (width, height) px, aspect kept, on white."""
    import resvg_py

    fonts = installed_fonts()
    if document.has_text and fonts.family is None:
        raise UnsupportedMediaError("this server has no fonts installed, so the SVG's text cannot be drawn; send "
                                    "the diagram as PNG or PDF (operators: install a font package such as "
                                    "fonts-dejavu-core)")
    # resvg draws nothing for text whose family it lacks: exports name Arial or Helvetica, and resvg's own
    # defaults are Times New Roman and Arial, none of which a slim image has. Every generic family, and the
    # fallback for missing ones, is therefore a family that is installed.
    family = fonts.family or "sans-serif"
    generic = {name: family for name in ("font_family", "serif_family", "sans_serif_family", "cursive_family",
                                         "fantasy_family", "monospace_family")}
    try:
        png = resvg_py.svg_to_bytes(svg_string=document.text, width=box[0], height=box[1], background="white",
                                    dpi=96.0,  # resvg-py's default 0 makes mm and pt lengths 0 px
                                    skip_system_fonts=True, font_dirs=list(fonts.folders), **generic)
    except Exception as error:  # noqa: BLE001 - resvg reports every malformed document as a plain exception
        raise InvalidImageError(f"cannot render the SVG: {str(error)[:200]}") from None
    except BaseException as error:  # a Rust panic arrives as pyo3's PanicException, a BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise InvalidImageError("the SVG renderer failed on this file") from None
    image = Image.open(io.BytesIO(bytes(png)))
    image.load()
    return image


def fit_box(width: float, height: float, budget_pixels: int, max_scale: float) -> tuple[int, int]:
    """The render size: the declared size scaled to at most ``budget_pixels`` and ``max_scale`` (each side's
    root taken apart, so no product of two extreme sizes overflows or underflows)."""
    scale = min(max_scale, math.sqrt(budget_pixels) / math.sqrt(width) / math.sqrt(height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
