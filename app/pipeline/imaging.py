"""Upload bytes -> one upright RGB image sized for the vision encoder. Pillow and pypdfium2 only, no torch.

The format is decided from the bytes, and only decoders on the allow-list ever see a file.
"""

from __future__ import annotations

import io
import math
import re
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from app.errors import InvalidImageError, InvalidRequestError, PayloadTooLargeError, UnsupportedMediaError
from app.pipeline import svg

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PDF", "SVG")
ACCEPTED_TEXT = ", ".join(ACCEPTED_FORMATS)
UNSUPPORTED_FILE = (f"not a supported file: accepted formats are {ACCEPTED_TEXT}, and BPMN 2.0 XML (UTF-8, UTF-16 "
                    "or any declared encoding)")
MAX_ASPECT_RATIO = 200  # the Qwen-VL processors refuse anything more extreme
_VECTOR_MAX_SCALE = 4.0  # 288 dpi: past that a PDF page or an SVG gains no legibility, only pixels
_pdfium_lock = threading.Lock()  # pdfium is not thread-safe


@dataclass(frozen=True)
class VisionGeometry:
    """What the vision encoder accepts: sides in multiples of ``factor`` px, total pixels in [min, max]."""

    factor: int
    min_pixels: int
    max_pixels: int


@dataclass(frozen=True)
class ImageFacts:
    """What the answer reports about the image, without holding its pixels."""

    source_format: str
    received_size: tuple[int, int]  # (width, height) as received: a raster's pixels, a vector page's declared size
    model_size: tuple[int, int]  # (width, height) fed to the model
    page_count: int = 1  # pages in the file (PDF, TIFF); 1 for other formats


@dataclass(frozen=True)
class PreparedImage:
    image: Image.Image
    source_format: str
    received_size: tuple[int, int]
    model_size: tuple[int, int]
    page_count: int = 1

    @property
    def facts(self) -> ImageFacts:
        return ImageFacts(self.source_format, self.received_size, self.model_size, self.page_count)


def sniff_format(data: bytes) -> str | None:
    """The container format from the magic bytes, or None for anything not on the allow-list."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if b"%PDF-" in data[:1024]:  # the PDF spec allows junk before the header
        return "PDF"
    if svg.looks_like_svg(data):
        return "SVG"
    return None


def _check_pixels(width: int, height: int, max_decoded_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_decoded_pixels:
        raise PayloadTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_decoded_pixels}; "
            "send a smaller export"
        )
    _check_aspect(width, height, "the image")


def _check_aspect(width: float, height: float, what: str) -> None:
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidImageError(f"{what} is {width:g}x{height:g}: aspect ratio over {MAX_ASPECT_RATIO}:1, which the "
                                "model cannot take; crop it or split it into parts")


MULTI_PAGE_RASTERS = frozenset({"TIFF"})  # GIF frames are animation, not pages: the first one is read


def _decode_raster(data: bytes, fmt: str, max_decoded_pixels: int, page: int = 1) -> tuple[Image.Image, int]:
    """The page's image (the first frame of others) and the file's page count."""
    Image.MAX_IMAGE_PIXELS = max_decoded_pixels  # Pillow's own bomb guard, from our setting
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            pages = getattr(image, "n_frames", 1) if fmt in MULTI_PAGE_RASTERS else 1
            if page > pages:
                raise InvalidRequestError(f"page {page} requested but the {fmt} file has {pages} page(s)")
            image.seek(page - 1)  # GIF: first frame; TIFF: the page asked for
            _check_pixels(*image.size, max_decoded_pixels)  # header only: nothing decoded yet
            image.load()
            image = ImageOps.exif_transpose(image) or image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLargeError(f"the image has more than {max_decoded_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError,
            ZeroDivisionError, KeyError) as error:
        # Pillow signals broken files with a spread of exception types; all mean "not a valid image".
        raise InvalidImageError(f"cannot decode the {fmt} file: {_one_line(error)}") from None
    return image, pages


def _declared(width: float, height: float) -> tuple[int, int]:
    """A vector page's size as the file states it (CSS px, PDF points), in whole units: what was received."""
    return max(1, round(width)), max(1, round(height))


def _render_pdf(data: bytes, page: int, geometry: VisionGeometry, max_decoded_pixels: int
                ) -> tuple[Image.Image, int, tuple[int, int]]:
    import pypdfium2 as pdfium

    with _pdfium_lock:
        try:
            document = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as error:
            raise InvalidImageError(f"cannot read the PDF: {_one_line(error)}") from None
        try:
            pages = len(document)
            if pages == 0:
                raise InvalidImageError("the PDF has no pages")
            if page > pages:
                raise InvalidRequestError(f"page {page} requested but the PDF has {pages} page(s)")
            pdf_page = document[page - 1]
            width_pt, height_pt = pdf_page.get_size()
            if width_pt <= 0 or height_pt <= 0:
                raise InvalidImageError("the PDF page has no area")
            _check_aspect(round(width_pt), round(height_pt), f"PDF page {page} (in points)")
            # Render straight at the resolution the model will see, never bigger than the decode limit.
            budget = min(geometry.max_pixels, max_decoded_pixels)
            scale = min(_VECTOR_MAX_SCALE, math.sqrt(budget / (width_pt * height_pt)))
            bitmap = pdf_page.render(scale=scale, fill_color=(255, 255, 255, 255))
            return bitmap.to_pil().convert("RGB"), pages, _declared(width_pt, height_pt)
        except pdfium.PdfiumError as error:
            raise InvalidImageError(f"cannot render the PDF page: {_one_line(error)}") from None
        finally:
            document.close()


MIN_SVG_SIDE_PX = 1e-3  # a side below a thousandth of a pixel is no drawing (and 1e-300 squared is 0)


def _render_svg(data: bytes, geometry: VisionGeometry, max_decoded_pixels: int
                ) -> tuple[Image.Image, tuple[int, int]]:
    """Like a PDF page: drawn straight at the resolution the model will see, never past the decode limit,
    whatever size the file declares."""
    document = svg.parse_svg(data, max_decoded_pixels)
    if not (MIN_SVG_SIDE_PX <= document.width < math.inf and MIN_SVG_SIDE_PX <= document.height < math.inf):
        raise InvalidImageError(f"the SVG declares a size with no area ({document.width:g}x{document.height:g})")
    _check_aspect(document.width, document.height, "the SVG's declared size")
    budget = min(geometry.max_pixels, max_decoded_pixels)
    image = svg.rasterise(document, svg.fit_box(document.width, document.height, budget, _VECTOR_MAX_SCALE))
    _check_pixels(*image.size, max_decoded_pixels)
    return image, _declared(document.width, document.height)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, with transparency composited onto white (diagrams stay visible).

    Memory stays near the image's own size: integer arithmetic in place for 16-bit samples (no float64 copy
    of a 7000x7000 scan), and the alpha channel used as a paste mask instead of full RGBA composites."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.array(image)  # one writable copy; everything below works in place
        sixteen_bit = values.dtype.kind != "f" and values.max(initial=0) > 255
        np.clip(values, 0, 65535 if sixteen_bit else 255, out=values)
        if sixteen_bit:
            values >>= 8
        image = Image.fromarray(values.astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def model_size(width: int, height: int, geometry: VisionGeometry) -> tuple[int, int]:
    """Sides rounded to the patch grid, scaled (aspect kept) into [min_pixels, max_pixels]."""
    factor = geometry.factor
    w = max(factor, round(width / factor) * factor)
    h = max(factor, round(height / factor) * factor)
    if w * h > geometry.max_pixels:
        beta = math.sqrt(width * height / geometry.max_pixels)
        w = max(factor, math.floor(width / beta / factor) * factor)
        h = max(factor, math.floor(height / beta / factor) * factor)
    elif w * h < geometry.min_pixels:
        beta = math.sqrt(geometry.min_pixels / (width * height))
        w = math.ceil(width * beta / factor) * factor
        h = math.ceil(height * beta / factor) * factor
    return w, h


def prepare_image(data: bytes, geometry: VisionGeometry, *, page: int = 1,
                  max_decoded_pixels: int = 50_000_000) -> PreparedImage:
    """The whole decode path. Raises only ServiceError subclasses for anything wrong with ``data``."""
    if not data:
        raise InvalidImageError("the uploaded file is empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMediaError(UNSUPPORTED_FILE)
    if fmt == "PDF":
        image, pages, received = _render_pdf(data, page, geometry, max_decoded_pixels)
    elif page != 1 and fmt not in MULTI_PAGE_RASTERS:
        raise InvalidRequestError(f"page={page} applies to PDF and TIFF uploads only; this file is {fmt}")
    elif fmt == "SVG":
        (image, received), pages = _render_svg(data, geometry, max_decoded_pixels), 1
    else:
        image, pages = _decode_raster(data, fmt, max_decoded_pixels, page)
        received = image.size
    size = model_size(*image.size, geometry)
    # Fitting the sides to the patch grid can push a thin image past the limit (47x6425 becomes 32x6432).
    _check_aspect(*size, f"the image as fitted to the model's {geometry.factor}-px grid")
    if image.mode in ("RGBA", "LA") and size != image.size:
        # Pillow resamples these with premultiplied alpha, so compositing the model-sized image is the same
        # picture for a fraction of the memory.
        image = image.resize(size, Image.Resampling.BICUBIC)
    image = to_rgb(image)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return PreparedImage(image, fmt, received, size, pages)


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_CLASS_REPR = re.compile(r"<class '([\w.]+)'>")


def _one_line(error: BaseException) -> str:
    """A decoder's message for the client: first line, no object addresses or class reprs."""
    text = str(error).strip().splitlines()
    if not text:
        return type(error).__name__
    line = _OBJECT_REPR.sub("the file", text[0])
    return _CLASS_REPR.sub(lambda match: match.group(1).rsplit(".", 1)[-1], line)[:200]
