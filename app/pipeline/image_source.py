"""The bytes behind an OpenAI-style ``image_url``: a base64 data: URL, or an http(s) URL on a host the operator
listed. Anything else is refused, so the service cannot be made to fetch internal addresses (server-side request
forgery) unless someone decided it may."""

from __future__ import annotations

import asyncio
import base64
import binascii
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from app.errors import ImageFetchError, ImageURLNotAllowedError, InvalidRequestError, PayloadTooLargeError

PARAM = "messages"
MAX_REDIRECTS = 3


def parse_hosts(value: str) -> frozenset[str]:
    """ALLOWED_IMAGE_HOSTS: 'host', 'host:port' or '*.domain' entries, comma-separated, case-insensitive."""
    return frozenset(entry.strip().lower() for entry in value.split(",") if entry.strip())


def http_url(url: str) -> SplitResult | None:
    """``url`` split, when it is a well-formed http(s) URL with a host; else None. The one check for every URL
    the service fetches or posts to (images, job callbacks): whitespace or control characters make no valid URL
    (they would reach the HTTP client as a malformed request rather than be refused here), and neither does an
    unclosed IPv6 literal or a port that is not a number."""
    if any(ord(character) <= 0x20 or ord(character) == 0x7F for character in url):
        return None
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            return None
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number, or out of range
    except ValueError:
        return None
    return parts


def host_allowed(url: str, allowed: frozenset[str]) -> bool:
    """A well-formed http(s) URL on a listed host ('host', 'host:port' or '*.domain'; an IPv6 literal is listed
    in brackets, as in a URL: '[::1]:8080')."""
    parts = http_url(url)
    if parts is None:
        return False
    host = parts.hostname.lower()
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    if ":" in host:  # IPv6: urlsplit drops the brackets the list writes
        host = f"[{host}]"
    return (host in allowed or f"{host}:{port}" in allowed
            or any(entry.startswith("*.") and host.endswith(entry[1:]) for entry in allowed))


async def load_image_url(url: str, *, allowed_hosts: frozenset[str], max_bytes: int, timeout_s: float) -> bytes:
    """The file an image_url points to. Raises ServiceError (400 or 413) with what to do instead."""
    if url[:5].lower() == "data:":
        return await asyncio.to_thread(decode_data_url, url, max_bytes)  # a 27 MB string takes ~0.1 s
    if http_url(url) is None:
        raise InvalidRequestError("image_url.url must be a data: URL (base64) or a well-formed http(s) URL",
                                  param=PARAM)
    if not allowed_hosts:
        raise ImageURLNotAllowedError("this service does not fetch remote images: send the image as a base64 "
                                      "data: URL (or ask its operator to list the host in ALLOWED_IMAGE_HOSTS)",
                                      param=PARAM)
    return await fetch(url, allowed_hosts, max_bytes, timeout_s)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise InvalidRequestError("a data: URL must be base64-encoded: data:<media type>;base64,<data>", param=PARAM)
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("the data: URL is not valid base64", param=PARAM) from None
    if not data:
        raise InvalidRequestError("the data: URL holds no data", param=PARAM)
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"the image is larger than MAX_UPLOAD_MB ({max_bytes} bytes)", param=PARAM)
    return data


async def fetch(url: str, allowed_hosts: frozenset[str], max_bytes: int, timeout_s: float) -> bytes:
    """GET the image within ``timeout_s`` and ``max_bytes``, following at most MAX_REDIRECTS redirects, each to a
    listed host too."""
    try:
        async with asyncio.timeout(timeout_s):
            async with httpx.AsyncClient(follow_redirects=False, timeout=timeout_s) as client:
                for _ in range(MAX_REDIRECTS + 1):
                    if not host_allowed(url, allowed_hosts):
                        parts = http_url(url)
                        where = f"on {parts.hostname}" if parts is not None else "like this one (malformed)"
                        raise ImageURLNotAllowedError(
                            f"image URLs {where} are not allowed (ALLOWED_IMAGE_HOSTS); send the image as a base64 "
                            "data: URL", param=PARAM)
                    async with client.stream("GET", url) as response:
                        if response.is_redirect and "location" in response.headers:
                            url = urljoin(url, response.headers["location"])
                            continue
                        return await _read_image(response, max_bytes)
                raise ImageFetchError(f"the image URL redirected more than {MAX_REDIRECTS} times", param=PARAM)
    except TimeoutError:
        raise ImageFetchError(f"the image URL did not answer in full within IMAGE_FETCH_TIMEOUT_S={timeout_s:g} s",
                              param=PARAM) from None
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise ImageFetchError(f"the image URL could not be fetched ({type(error).__name__})", param=PARAM) from None


async def _read_image(response: httpx.Response, max_bytes: int) -> bytes:
    if response.status_code != 200:
        raise ImageFetchError(f"the image URL answered HTTP {response.status_code}", param=PARAM)
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"the image at the URL is larger than MAX_UPLOAD_MB ({max_bytes} bytes)",
                                   param=PARAM)
    chunks, received = [], 0
    async for chunk in response.aiter_bytes():
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLargeError(f"the image at the URL is larger than MAX_UPLOAD_MB ({max_bytes} bytes)",
                                       param=PARAM)
        chunks.append(chunk)
    return b"".join(chunks)
