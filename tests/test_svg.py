"""SVG uploads: recognised, drawn with their text, bounded in pixels, and nothing outside the file ever read."""

from __future__ import annotations

import base64
import http.server
import io
import shutil
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from app.errors import InvalidImageError, InvalidRequestError, PayloadTooLargeError, UnsupportedMediaError
from app.pipeline import svg
from app.pipeline.imaging import VisionGeometry, prepare_image, sniff_format

from .test_http import BPMN, FakeEngine, make_client, wait_for_status

GEOMETRY = VisionGeometry(factor=32, min_pixels=64 * 64, max_pixels=32 * 32 * 1024)
NS = 'xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"'


def document(body: str, size: str = 'width="400" height="200"', prolog: str = "") -> bytes:
    return f'{prolog}<svg {NS} {size}>{body}</svg>'.encode()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def dark_pixels(image: Image.Image, box: tuple[float, float, float, float]) -> int:
    """Dark pixels inside ``box``, given as fractions of the image (the render size depends on the geometry)."""
    width, height = image.size
    crop = image.convert("L").crop((int(box[0] * width), int(box[1] * height), int(box[2] * width),
                                    int(box[3] * height)))
    return int((np.asarray(crop) < 100).sum())


def colour_at(image: Image.Image, x: float, y: float) -> tuple[int, int, int]:
    return image.getpixel((int(x * image.width), int(y * image.height)))


LABEL = '<text x="20" y="110" font-family="Arial" font-size="40">Принять заявку</text>'


@pytest.mark.parametrize("head", [
    "", '<?xml version="1.0" encoding="UTF-8"?>\n',
    '<?xml version="1.0"?>\n<!-- drawn by hand -->\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
    '"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n',
], ids=["bare", "declaration", "doctype"])
def test_svg_is_recognised_from_its_root_element(head):
    assert sniff_format(document(LABEL, prolog=head)) == "SVG"
    assert sniff_format(b"\xef\xbb\xbf" + document(LABEL, prolog=head)) == "SVG"


def test_other_xml_is_not_svg():
    assert sniff_format(BPMN) is None
    assert sniff_format(b'<?xml version="1.0"?><html><svg></svg></html>') is None
    assert sniff_format(b"just text mentioning <svg>") is None


@pytest.fixture
def drawn_boxes(monkeypatch):
    """The pixel size each SVG is rasterised at (metadata shows the declared size, not this)."""
    boxes = []
    rasterise = svg.rasterise

    def spy(document, box):
        boxes.append(box)
        return rasterise(document, box)

    monkeypatch.setattr(svg, "rasterise", spy)
    return boxes


def test_an_svg_is_drawn_with_its_text_at_the_model_resolution(drawn_boxes):
    prepared = prepare_image(document('<rect x="10" y="10" width="380" height="180" fill="none" stroke="black"/>'
                                      + LABEL), GEOMETRY)
    assert prepared.source_format == "SVG" and prepared.page_count == 1
    assert drawn_boxes == [(1448, 724)]  # 400x200 scaled to the model's 1M-pixel budget
    assert prepared.received_size == (400, 200)  # as received: the declared size
    assert prepared.image.mode == "RGB"
    assert dark_pixels(prepared.image, (0.05, 0.3, 0.9, 0.6)) > 500  # the label was drawn, not dropped


def test_the_declared_size_never_decides_the_pixels(drawn_boxes):
    huge = document('<rect width="50000" height="50000" fill="blue"/>', size='width="100000" height="100000"')
    prepared = prepare_image(huge, GEOMETRY)
    assert drawn_boxes[0][0] * drawn_boxes[0][1] <= GEOMETRY.max_pixels
    assert prepared.received_size == (100000, 100000)
    assert colour_at(prepared.image, 0.25, 0.25) == (0, 0, 255)
    assert colour_at(prepared.image, 0.75, 0.75) == (255, 255, 255)
    mm = prepare_image(document("", size='width="100mm" height="50mm"'), GEOMETRY)  # units, not 0 px
    assert drawn_boxes[1] == (1448, 724) and mm.received_size == (378, 189)
    view_box = prepare_image(document("", size='viewBox="0 0 30 10"'), GEOMETRY)  # 4x at most, like a PDF
    assert drawn_boxes[2] == (120, 40) and view_box.received_size == (30, 10)
    with pytest.raises(InvalidImageError, match="aspect ratio"):
        prepare_image(document("", size='width="10000" height="2"'), GEOMETRY)


class CountingServer(http.server.ThreadingHTTPServer):
    requests = 0


class CountingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.server.requests += 1
        body = png(Image.new("RGB", (10, 10), "red"))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_nothing_outside_the_file_is_fetched_or_read(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(Image.new("RGB", (50, 50), "red")))
    server = CountingServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/logo.png"
    try:
        hostile = document(
            f'<image href="{secret}" x="0" y="0" width="200" height="200"/>'
            f'<image xlink:href="file://{secret}" x="200" y="0" width="200" height="200"/>'
            f'<image href="{url}" x="0" y="0" width="400" height="200"/>'
            f'<style>@import url("{url}");</style>'
            '<image href="data:image/svg+xml;base64,'
            + base64.b64encode(document(f'<image href="{secret}" width="400" height="200"/>')).decode()
            + '" x="0" y="0" width="400" height="200"/>'
            '<script>document.write("x")</script>' + LABEL)
        prepared = prepare_image(hostile, GEOMETRY)
    finally:
        server.shutdown()
    assert server.requests == 0
    for x in (0.1, 0.25, 0.6, 0.9):
        assert colour_at(prepared.image, x, 0.9) == (255, 255, 255)  # no red from the file on disk
    assert dark_pixels(prepared.image, (0.05, 0.3, 0.9, 0.6)) > 500  # the rest still drawn


def test_pictures_embedded_in_the_file_are_drawn_within_the_pixel_limit():
    blue = data_url(png(Image.new("RGB", (40, 20), "blue")))
    prepared = prepare_image(document(f'<image href="{blue}" x="0" y="0" width="400" height="200"/>'), GEOMETRY)
    assert colour_at(prepared.image, 0.5, 0.5) == (0, 0, 255)
    # A few bytes that declare a large picture: refused from the header, before anything decodes it.
    for side in (5_000, 100_000):  # under Pillow's own bomb limit, and far over it
        bomb = png_header(side, side)
        with pytest.raises(PayloadTooLargeError, match="embedded"):
            prepare_image(document(f'<image href="{data_url(bomb)}" width="400" height="200"/>'), GEOMETRY,
                          max_decoded_pixels=20_000_000)
    # Each under the limit, together over it.
    tiles = "".join(f'<image href="{data_url(png_header(3_000, 3_000))}" width="10" height="10"/>' for _ in range(3))
    with pytest.raises(PayloadTooLargeError, match="embedded"):
        prepare_image(document(tiles), GEOMETRY, max_decoded_pixels=20_000_000)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds one empty data chunk: a bomb's header."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("declaration", [
    '<!DOCTYPE svg [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>',
    '<!DOCTYPE svg [<!ENTITY secret SYSTEM "file:///etc/passwd">]>',
], ids=["billion-laughs", "external-entity"])
def test_entities_are_refused(declaration):
    with pytest.raises(InvalidImageError, match="entities"):
        prepare_image(document("<text>&lol2;</text>", prolog=declaration), GEOMETRY)


def test_broken_files_and_pages_are_clear_errors():
    with pytest.raises(InvalidImageError, match="cannot read the SVG XML"):
        prepare_image(document(LABEL)[:-10], GEOMETRY)
    with pytest.raises(InvalidImageError, match="no area"):
        prepare_image(document("", size='width="0" height="10"'), GEOMETRY)
    lenient = prepare_image(b'<svg width="10" height="10"><rect width="5" height="5"/></svg>', GEOMETRY)
    assert lenient.source_format == "SVG"  # no namespace: drawn all the same
    with pytest.raises(InvalidRequestError, match="PDF and TIFF"):
        prepare_image(document(LABEL), GEOMETRY, page=2)


def test_text_without_fonts_is_refused_not_drawn_blank(monkeypatch, tmp_path):
    monkeypatch.setattr(svg, "_font_dirs", lambda: [tmp_path / "no-fonts-here"])
    with pytest.raises(UnsupportedMediaError, match="no fonts"):
        prepare_image(document(LABEL), GEOMETRY)
    assert prepare_image(document('<rect width="10" height="10"/>'), GEOMETRY).source_format == "SVG"


@pytest.mark.parametrize("family", ["", 'font-family="Arial"', 'font-family="Helvetica, sans-serif"',
                                    'font-family="Times New Roman"', 'font-family="monospace"'])
def test_text_is_drawn_with_the_one_font_a_slim_image_has(monkeypatch, tmp_path, family):
    """The container has DejaVu only, while exports name Arial or Helvetica (and resvg defaults to Times New
    Roman): with nothing but one font installed, every label is still drawn."""
    real = [path for folder in svg._font_dirs() if folder.is_dir() for path in folder.rglob("DejaVuSans.ttf")]
    if not real:
        pytest.skip("DejaVuSans.ttf is not installed on this machine (fonts-dejavu-core)")
    (tmp_path / "fonts").mkdir()
    shutil.copy(real[0], tmp_path / "fonts")
    monkeypatch.setattr(svg, "_font_dirs", lambda: [tmp_path / "fonts"])
    assert svg.installed_fonts().family == "DejaVu Sans"
    label = f'<text x="20" y="110" font-size="40" {family}>Принять заявку</text>'
    assert dark_pixels(prepare_image(document(label), GEOMETRY).image, (0.05, 0.3, 0.9, 0.6)) > 500


def test_infer_answers_an_svg_like_a_png():
    engine = FakeEngine()
    with make_client(engine=engine) as client:
        wait_for_status(client, "healthy")
        response = client.post("/infer", files={"file": ("d.svg", document(LABEL), "image/svg+xml")})
        assert response.status_code == 200, response.text
        assert response.json()["metadata"]["source_format"] == "SVG"
        assert engine.prefills == 1
        job = client.post("/jobs", files={"file": ("d.svg", document(LABEL), "image/svg+xml")})
        assert job.status_code == 202, job.text


def test_a_use_bomb_is_refused_not_drawn():
    # Six levels of ten <use> each: a million nodes from a few kilobytes; resvg's node limit stops it early.
    defs = '<rect id="l0" width="1" height="1"/>' + "".join(
        f'<g id="l{level}">' + "".join(f'<use href="#l{level - 1}" x="{i}"/>' for i in range(10)) + "</g>"
        for level in range(1, 7))
    with pytest.raises(InvalidImageError, match="nodes limit"):
        prepare_image(document(f'<defs>{defs}</defs><use href="#l6"/>'), GEOMETRY)


def test_draw_io_labels_are_drawn_and_its_notice_is_not():
    """draw.io: HTML labels with SVG text fallbacks, and a "Text is not SVG" notice a browser never shows."""
    extensibility = 'requiredFeatures="http://www.w3.org/TR/SVG11/feature#Extensibility"'
    exported = document(
        f'<switch><foreignObject {extensibility} width="380" height="100"><div xmlns="http://www.w3.org/1999/xhtml">'
        f'Принять заявку</div></foreignObject>{LABEL}</switch>'
        f'<switch><g {extensibility}/><a xlink:href="https://www.drawio.com/doc/faq/svg-export-text-problems">'
        '<text text-anchor="middle" font-size="20px" x="50%" y="100%">Text is not SVG - cannot display</text></a>'
        '</switch>')
    prepared = prepare_image(exported, GEOMETRY)
    assert dark_pixels(prepared.image, (0.05, 0.3, 0.9, 0.6)) > 500  # the label, from its SVG fallback
    assert dark_pixels(prepared.image, (0.0, 0.8, 1.0, 1.0)) == 0  # no notice along the bottom
