"""Which pages of a document a request asks for: "1", "2-4,7" or "all", checked against the document."""

from __future__ import annotations

import re

from app.errors import InvalidRequestError, PayloadTooLargeError

_PART = re.compile(r"^\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?$")  # ASCII digits: \d would take "٣" too


def _ranges(spec: str) -> list[tuple[int, int]]:
    """(first, last) of each part of ``spec`` (lower-cased, not "all"); a 400 for a part that is not a page or a
    range."""
    ranges = []
    for part in spec.split(","):
        match = _PART.match(part)
        if not match:
            raise InvalidRequestError(f"pages={spec!r}: use a page (3), a range (2-4), a list (1,3-5) or all",
                                      param="pages")
        ranges.append((int(match.group(1)), int(match.group(2) or match.group(1))))
    return ranges


def first_page(spec: str) -> int:
    """The lowest page ``spec`` names (its syntax checked), to decode first and learn the page count from."""
    spec = spec.strip().lower()
    if spec == "all":
        return 1
    firsts = [first for first, _ in _ranges(spec)]
    if min(firsts) < 1:
        raise InvalidRequestError(f"pages={spec!r}: pages count from 1", param="pages")
    return min(firsts)


def names_several_pages(spec: str) -> bool:
    """Whether ``spec`` surely names more than one page; what "all" names only the file tells."""
    spec = spec.strip().lower()
    if spec == "all":
        return False
    ranges = _ranges(spec)
    return any(last > first for first, last in ranges) or len({first for first, _ in ranges}) > 1


def select_pages(spec: str, page_count: int, max_pages: int) -> list[int]:
    """The 1-based page numbers ``spec`` names, in page order, without repeats. A page past the end is a 400 (the
    request names a page that is not there); more pages than ``max_pages`` a 413 with the count."""
    spec = spec.strip().lower()
    if spec == "all":
        pages = list(range(1, page_count + 1))
    else:
        pages, seen = [], set()
        for first, last in _ranges(spec):
            if first < 1 or last < first:
                raise InvalidRequestError(f"pages={spec!r}: pages count from 1, ranges go upwards", param="pages")
            if last > page_count:
                raise InvalidRequestError(f"pages={spec!r} asks for page {last}, but the file has {page_count} "
                                          "page(s)", param="pages")
            for page in range(first, last + 1):
                if page not in seen:
                    seen.add(page)
                    pages.append(page)
        pages.sort()
    if len(pages) > max_pages:
        raise PayloadTooLargeError(f"{len(pages)} pages asked for (the file has {page_count}); at most "
                                   f"{max_pages} per request (MAX_PAGES)")
    return pages
