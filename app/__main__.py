"""``python -m app``: validate settings, then serve with one uvicorn worker (one process per GPU)."""

from __future__ import annotations

import sys

from .settings import SettingsError, load_settings


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"vlm-inference: cannot start:\n{error}", file=sys.stderr)
        return 2
    from .logs import configure_logging
    from .main import create_app
    from .server import serve
    from .serving import InferenceService

    configure_logging(settings)
    service = InferenceService(settings)
    serve(service, create_app(service=service))
    return 0


if __name__ == "__main__":
    sys.exit(main())
