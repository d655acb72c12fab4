"""One ASGI app for the whole studio: the HTTP API and the Gradio page on one port.

Owns: ``create_app(engine, settings)`` -- a FastAPI app holding the engine, settings, user-data
database, voice store and metrics in ``app.state``, with the API routers, error handlers and
middleware, and the Gradio page mounted at ``/`` (the API routes are registered first, so they win);
installing the voice store as the engine cache's prompt source (a local miss for a stored voice's
clip fills from the database) and importing the old voice folders at start. Its lifespan closes
the engine and the database at shutdown.
Does not own: building the engine or settings, logging setup, running uvicorn (``app.py``).

With an ``api_key``, the page and its named API (``/clone``, ``/edit``, ``/cache_clear``, uploads,
files) ask for a login whose password is the key (any user name; ``gradio_client`` passes
``auth=(name, key)``), unless ``ui_requires_key`` is switched off; ``/v1`` and the API docs need the
key before their body is read (``web.guards.KeyGuard``). Every request must name an allowed host
(``HostGuard``, against DNS rebinding); state-changing requests anywhere (Gradio's included) refuse
other sites' browsers (``OriginGuard``); CORS is added only for ``cors_origins``; engine routes are
admitted by ``web.admission``. docs/security.md has the threat model. Productions (``web.api_productions``,
the Script tab) share the database; their takes are scored and heard by ``app.state.quality_scorer``
(``productions.take_checks``).
"""

from __future__ import annotations

import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from gradio.utils import get_upload_folder

from core.settings import Settings
from productions.take_checks import take_checker
from tts_engine.contract import Engine
from userdata.db import StoreUnavailable, open_database
from userdata.legacy import import_voice_folders
from web import api, api_productions, api_stream_ws, api_voices
from web.admission import Admission, AdmissionGuard
from web.deps import StudioMiddleware, install_error_handlers
from web.guards import BodyLimit, FailureLimiter, HostGuard, KeyGuard, OriginGuard
from web.metrics import Metrics
from web.ui import EXAMPLES_DIR, build_demo
from web.uploads import UploadQuota, keep_example_copies, kept_files
from web.voice_prompts import cached_prompts
from web.voices import VoiceStore

log = logging.getLogger(__name__)


def create_app(engine: Engine, settings: Settings, output_dir: Path | None = None) -> FastAPI:
    """The studio's ASGI app (serve it with uvicorn).

    Raises:
        SchemaTooNew: the user-data database was upgraded by a newer studio.
        StudioError: the database URL is unsupported or its file is damaged.

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
            api_productions.detach(app)
            app.state.ops_executor.shutdown(wait=False, cancel_futures=True)
            engine.close()
            app.state.db.close()

    app = FastAPI(title="Step-Audio-EditX studio API", version="1", lifespan=lifespan,
                  description="OpenAI-compatible speech, stored voices, edits and the prompt cache. See docs/api.md.")
    app.state.engine = engine
    app.state.settings = settings
    app.state.db = open_database(settings)   # SchemaTooNew: a newer studio's database; refuse to start
    app.state.voices = VoiceStore(app.state.db, settings.voice_max_count, settings.voice_max_bytes)
    engine.cache.set_source(app.state.voices)
    try:
        import_voice_folders(app.state.voices, Path(settings.cache_dir) / "voices",
                             lambda audio, digest: cached_prompts(engine, digest))
    except StoreUnavailable:
        log.warning("old voice folders are imported at the next start (the database is unreachable)")
    # A scrape reads the counters without the cache's file lock and writes nothing.
    app.state.metrics = Metrics(engine.cache.snapshot, getattr(engine, "llm_backend", None))
    # Health probes and scrapes run here, never in AnyIO's worker threads that engine routes hold.
    app.state.ops_executor = ThreadPoolExecutor(2, thread_name_prefix="studio-ops")
    app.state.quality_scorer = take_checker(engine, settings)   # scores and hears every production take
    api_productions.attach(app, engine, settings)   # productions live in the user-data database
    install_error_handlers(app)
    api_productions.install_handlers(app)
    app.include_router(api.ops_router)
    app.include_router(api_voices.router)
    app.include_router(api_productions.router)   # before api.router, whose catch-all answers unknown /v1 paths
    app.include_router(api_stream_ws.router)   # WS /v1/audio/speech/stream: checks its own key and Origin
    app.include_router(api.router)
    app.state.admission = Admission(settings.max_engine_requests, settings.busy_retry_after_s)
    # add_middleware wraps: the last added runs first. In request order: request id, Host, Origin
    # (and CORS), the key (before any body byte is read), the body limit, admission of engine work, then the
    # upload folder's quota (after the upload was accepted).
    app.add_middleware(UploadQuota, folder=get_upload_folder(), max_bytes=settings.upload_folder_max_bytes,
                       max_files=settings.upload_folder_max_files, max_age_s=settings.upload_folder_max_age_s,
                       protected=lambda: kept_files(demo))
    app.add_middleware(AdmissionGuard, admission=app.state.admission, deadline_s=settings.request_timeout_s)
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_upload_bytes)
    app.add_middleware(KeyGuard, api_key=settings.api_key,
                       limiter=FailureLimiter(settings.auth_failures_per_minute))
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origin_list), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id", "X-Timings", "X-Seed",
                                                                "X-Cache-Hits", "X-Engine"])
    app.add_middleware(OriginGuard, allowed_origins=settings.cors_origin_list)
    app.add_middleware(HostGuard, allowed_hosts=settings.allowed_host_list)
    app.add_middleware(StudioMiddleware)
    warn_if_exposed(settings)

    demo = build_demo(engine, settings, app.state.metrics, output_dir, productions=app.state.productions)
    keep_example_copies(demo)
    auth = _key_login(settings.api_key) if settings.ui_requires_key and settings.api_key else None
    if settings.api_key and not settings.ui_requires_key:
        log.warning("the API needs a key but the page and its named API are open (--no-ui-requires-key)")
    gr.mount_gradio_app(app, demo, path="/", server_name=settings.host, server_port=settings.port,
                        footer_links=["api"], auth=auth, max_file_size=settings.max_upload_bytes,
                        show_error=True, ssr_mode=False, theme=gr.themes.Soft(),
                        allowed_paths=[str(EXAMPLES_DIR)])
    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def warn_if_exposed(settings: Settings) -> bool:
    """Log a loud warning (and return True) when the studio listens beyond loopback with no API key.

    A warning, not a refusal: the image binds 0.0.0.0 inside its own network namespace, where only
    the published port reaches it, and a private LAN studio without a key is a legitimate choice.
    """
    if settings.api_key or settings.host in LOOPBACK or settings.host.startswith("127."):
        return False
    log.warning("!!! the studio listens on %s with NO API key: anyone who can reach this address can clone "
                "voices, read stored voices and clear the cache. Set STUDIO_API_KEY (docs/security.md) or "
                "bind to 127.0.0.1. Hosts answered: %s (setting allowed_hosts) !!!", settings.host,
                ", ".join(settings.allowed_host_list))
    return True


def _key_login(key: str):
    """Gradio login check: any user name, the API key as password."""

    def check(_user: str, password: str) -> bool:
        return secrets.compare_digest(password.encode(), key.encode())

    return check
