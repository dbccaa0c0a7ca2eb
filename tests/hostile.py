"""Decoder stand-ins for the pool tests; kept free of torch so spawned workers start fast."""

from __future__ import annotations


def hostile_decode(data: bytes, geometry, **options):
    """A decoder stand-in for the pool tests: b"SPIN" never returns, b"CRASH" kills its process."""
    import os

    from app.pipeline.imaging import prepare_image

    if data.startswith(b"SPIN"):
        while True:
            pass
    if data.startswith(b"CRASH"):
        os._exit(3)
    return prepare_image(data, geometry, **options)
