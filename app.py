"""The studio's entry point: ``python app.py [flags]`` serves the UI and the HTTP API on one port.

Owns: wiring only -- read the settings (flags > ``STUDIO_*`` variables > defaults), configure
logging (the only place that does), create the engine, build the app, run uvicorn.
Importing this module does nothing; ``python app.py --help`` lists every flag.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("app")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn's access log repeats what the timing lines say; keep it at warnings.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the studio until interrupted; returns the process exit code."""
    from core.settings import load_settings

    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"app.py: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    # Gradio phones home for analytics unless told not to; the studio never does.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    import uvicorn

    from core.devices import configure_threads
    from core.errors import StudioError
    from tts_engine.select import create_engine
    from web.server import create_app

    configure_threads(settings.torch_threads)
    try:
        engine = create_engine(settings)
    except StudioError as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        app = create_app(engine, settings)
    except StudioError as exc:   # e.g. a user-data database newer than this code
        log.error("cannot start: %s", exc)
        engine.close()
        return 1
    # Gradio keeps heartbeat streams open; do not wait for them forever on Ctrl+C / SIGTERM.
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
