"""``python -m app``: validate settings, then serve with one uvicorn worker (one process per GPU)."""

from __future__ import annotations

import sys

from app.settings import SettingsError, load_settings


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"vlm-inference: cannot start:\n{error}", file=sys.stderr)
        return 2
    from app.http.app import create_app
    from app.http.server import serve
    from app.logs import configure_logging
    from app.service.inference import InferenceService

    configure_logging(settings)
    service = InferenceService(settings)
    serve(service, create_app(service=service))
    return 0


if __name__ == "__main__":
    sys.exit(main())
