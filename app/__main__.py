"""``python -m app``: validate settings, then serve with one uvicorn worker (one process per GPU)."""

from __future__ import annotations

import logging
import sys

from .settings import SettingsError, load_settings


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"vlm-inference: cannot start:\n{error}", file=sys.stderr)
        return 2
    import uvicorn

    from .logs import configure_logging
    from .main import create_app

    configure_logging(settings)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, workers=1, log_config=None,
                timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
