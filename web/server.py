"""One ASGI app for the whole studio: the HTTP API and the Gradio page on one port.

Owns: ``create_app(engine, settings)`` -- a FastAPI app holding the engine, settings, voice
store and metrics in ``app.state``, with the API routers, error handlers and middleware, and the
Gradio page mounted at ``/`` (the API routes are registered first, so they win). Its lifespan
closes the engine at shutdown.
Does not own: building the engine or settings, logging setup, running uvicorn (``app.py``).

When ``settings.ui_requires_key`` is set, the page asks for a login whose password is
``settings.api_key`` (any user name); otherwise the page is open even when the API needs a key.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from core.settings import Settings
from engine.contract import Engine
from web import api, api_voices
from web.deps import StudioMiddleware, install_error_handlers
from web.metrics import Metrics
from web.ui import EXAMPLES_DIR, build_demo
from web.voices import VoiceStore

log = logging.getLogger(__name__)


def create_app(engine: Engine, settings: Settings, output_dir: Path | None = None) -> FastAPI:
    """The studio's ASGI app (serve it with uvicorn).

    Parameters:
        engine: the loaded engine; closed when the app shuts down.
        settings: limits, API key, queue and cache settings.
        output_dir: where the page writes generated files (a temp folder when None).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        info = engine.describe()
        log.info("studio ready: %s on %s; UI and API on http://%s:%d/", info.name, info.device,
                 settings.host, settings.port)
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="Step-Audio-EditX studio API", version="1", lifespan=lifespan,
                  description="OpenAI-compatible speech, stored voices, edits and the prompt cache. See docs/api.md.")
    app.state.engine = engine
    app.state.settings = settings
    app.state.voices = VoiceStore(Path(settings.cache_dir) / "voices")
    app.state.metrics = Metrics(engine.cache.stats)
    install_error_handlers(app)
    app.include_router(api.ops_router)
    app.include_router(api_voices.router)
    app.include_router(api.router)
    app.add_middleware(StudioMiddleware, max_body_bytes=settings.max_upload_bytes)

    demo = build_demo(engine, settings, app.state.metrics, output_dir)
    auth = _key_login(settings.api_key) if settings.ui_requires_key and settings.api_key else None
    if settings.ui_requires_key and not settings.api_key:
        log.warning("ui_requires_key is set but api_key is empty; the page stays open")
    gr.mount_gradio_app(app, demo, path="/", server_name=settings.host, server_port=settings.port,
                        footer_links=["api"], auth=auth, max_file_size=settings.max_upload_bytes,
                        show_error=True, ssr_mode=False, theme=gr.themes.Soft(),
                        allowed_paths=[str(EXAMPLES_DIR)])
    return app


def _key_login(key: str):
    """Gradio login check: any user name, the API key as password."""

    def check(_user: str, password: str) -> bool:
        return secrets.compare_digest(password.encode(), key.encode())

    return check
