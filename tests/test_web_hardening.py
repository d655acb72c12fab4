"""Hardening round two (issue 21, web part): host and origin checks on the whole app, the key before
the body, admission control, deadlines and disconnects, read-only cache stats, the confirmed
``cache_clear``; against real servers on 127.0.0.1 (preview engine).

Covers: a POST to Gradio's own API from another site is refused and no answer reflects a foreign
``Origin``; the login cookie is ``SameSite=Lax``; a DNS-rebinding ``Host`` gets a 400 naming
``allowed_hosts``; malformed JSON without the key is 401, wrong keys are limited to a 429 with
``Retry-After``, the API docs need the key; the overflow of engine work is a 503 with
``Retry-After`` at once; ``/healthz``, ``/readyz`` and ``/metrics`` answer while every worker thread
is held by a stuck engine; a request past its deadline or whose client went away has its engine
work cancelled; cache stats read without the lock and write nothing; ``cache_clear`` needs
``confirm="clear"`` and the key. Fault injection (a stuck engine, a lock that must not be taken)
is done by patching the running engine or cache, as the house rules allow.
"""

from __future__ import annotations

import base64
import logging
import threading
import time

import httpx
import pytest

from core.settings import load_settings
from testkit.studio_server import speech_wav, start_studio
from tts_engine.contract import AUDIO_TOKENS_PER_SECOND, answer_cap, request_cancel_token
from web.admission import Admission, Overloaded, engine_request
from web.guards import FailureLimiter, _same_site_lax
from web.server import warn_if_exposed

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    server = start_studio(tmp_path_factory.mktemp("hardening"), None, "--api-key", KEY, "--no-ui-requires-key",
                          "--allowed-hosts", "localhost,127.0.0.1,studio.test", "--max-engine-requests", "2",
                          "--request-timeout-s", "5", "--auth-failures-per-minute", "5")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def voice(studio):
    r = httpx.post(studio.url + "/v1/audio/voices", headers=AUTH, data={"transcript": "a short hum"},
                   files={"file": ("s.wav", speech_wav(), "audio/wav")}, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _from(address: str) -> httpx.Client:
    """A client whose requests come from another loopback address (the failure limit is per address)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


# ------------------------------------------------------------------------------ 1. cross-site

@pytest.mark.slow
def test_gradio_api_refuses_other_sites_and_never_reflects_their_origin(studio):
    evil = {"Origin": "https://evil.example"}
    r = httpx.post(studio.url + "/gradio_api/run/cache_stats", json={"data": []}, headers=evil)
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin_refused"
    r = httpx.post(studio.url + "/gradio_api/upload", files={"files": ("a.wav", b"RIFF")}, headers=evil)
    assert r.status_code == 403
    # Gradio reflects any Origin (with credentials) when the Host is not localhost: never here.
    r = httpx.get(studio.url + "/gradio_api/info", headers={**evil, "Host": "studio.test"})
    assert r.status_code == 200
    assert not [k for k in r.headers if k.lower().startswith("access-control-allow")]
    # The page's own origin (the host it was sent to) passes.
    r = httpx.post(studio.url + "/gradio_api/run/cache_stats", json={"data": []},
                   headers={"Origin": "http://studio.test", "Host": "studio.test"})
    assert r.status_code == 200, r.text


def test_set_cookie_rewrite_makes_samesite_lax():
    assert _same_site_lax(b"t=1; HttpOnly; Path=/; SameSite=none; Secure") == b"t=1; HttpOnly; Path=/; Secure; SameSite=Lax"
    assert _same_site_lax(b"t=1; HttpOnly") == b"t=1; HttpOnly; SameSite=Lax"
    assert _same_site_lax(b"t=1; SameSite=Strict") == b"t=1; SameSite=Strict"


@pytest.mark.slow
def test_the_login_cookie_is_samesite_lax_and_cache_clear_needs_confirmation(tmp_path):
    from gradio_client import Client

    server = start_studio(tmp_path, None, "--api-key", KEY)   # the page behind a login (the default)
    try:
        r = httpx.post(server.url + "/login", data={"username": "me", "password": KEY})
        assert r.status_code == 200
        cookies = r.headers.get_list("set-cookie")
        assert cookies and all("samesite=lax" in c.lower() and "samesite=none" not in c.lower() for c in cookies)
        client = Client(server.url, auth=("me", KEY), verbose=False)
        with pytest.raises(Exception, match="confirm"):
            client.predict("", api_name="/cache_clear")
        assert client.predict("clear", api_name="/cache_clear")["entries"] == 0
    finally:
        server.stop()


# ------------------------------------------------------------------------------ 2. DNS rebinding

@pytest.mark.slow
def test_a_rebinding_host_is_refused_naming_the_setting(studio):
    port = studio.url.rsplit(":", 1)[1]
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}", **AUTH}
    r = httpx.post(studio.url + "/v1/cache/clear", headers=rebound)
    assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
    assert "allowed_hosts" in r.json()["error"]["message"]
    assert httpx.get(studio.url + "/v1/models", headers={**AUTH, "Host": f"localhost:{port}"}).status_code == 200
    # Probes come by the container's address (a pod IP): they answer whatever the Host.
    assert httpx.get(studio.url + "/healthz", headers={"Host": f"10.1.2.3:{port}"}).status_code == 200


def test_allowed_hosts_default_and_the_exposed_warning(caplog):
    assert load_settings([], env={}).allowed_host_list == ("localhost", "127.0.0.1", "::1")
    assert "10.1.2.3" in load_settings(["--host", "10.1.2.3"], env={}).allowed_host_list
    assert load_settings(["--allowed-hosts", "A.example, b"], env={}).allowed_host_list == ("a.example", "b")
    with pytest.raises(ValueError, match="allowed_hosts"):
        load_settings(["--allowed-hosts", "a.example:7860"], env={})
    with caplog.at_level(logging.WARNING, logger="web.server"):
        assert warn_if_exposed(load_settings(["--host", "0.0.0.0"], env={}))
        assert "NO API key" in caplog.text
        assert not warn_if_exposed(load_settings(["--host", "0.0.0.0", "--api-key", "k"], env={}))
        assert not warn_if_exposed(load_settings([], env={}))


# ------------------------------------------------------------------------------ 3. the key before the body

@pytest.mark.slow
def test_the_key_is_checked_before_the_body_and_failures_are_limited(studio):
    with _from("127.0.0.2") as client:
        r = client.post(studio.url + "/v1/audio/speech", content=b"{not json",
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get(studio.url + "/openapi.json").status_code == 401
        docs = client.get(studio.url + "/docs")
        assert docs.status_code == 401 and docs.headers["www-authenticate"].startswith("Basic")
        basic = "Basic " + base64.b64encode(f"me:{KEY}".encode()).decode()
        assert client.get(studio.url + "/docs", headers={"Authorization": basic}).status_code == 200
        assert client.get(studio.url + "/openapi.json", headers=AUTH).status_code == 200
        for _ in range(2):   # five wrong keys in all
            assert client.get(studio.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = client.get(studio.url + "/v1/models", headers=AUTH)   # even the right key waits now
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    with _from("127.0.0.3") as other:   # another address is not affected
        assert other.get(studio.url + "/v1/models", headers=AUTH).status_code == 200
        assert other.get(studio.url + "/healthz").status_code == 200


def test_failure_limiter_window_and_bounded_memory():
    now = [0.0]
    limiter = FailureLimiter(3, max_clients=2, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("a") == 0
        limiter.fail("a")
    assert limiter.retry_after("a") == 60
    now[0] = 59.5
    assert limiter.retry_after("a") == 1
    now[0] = 60.0
    assert limiter.retry_after("a") == 0
    for name in ("b", "c", "d"):
        limiter.fail(name)
    assert len(limiter._failures) == 2


# ------------------------------------------------------------------------------ 4. admission, deadlines, disconnects

def test_admission_refuses_at_once_over_its_limit():
    import asyncio

    admission = Admission(2, retry_after_s=3)
    with admission.admit_sync("a"), admission.admit_sync("b"):
        with pytest.raises(Overloaded) as busy:
            with admission.admit_sync("c"):
                pass
        assert busy.value.retry_after == 3 and "max_engine_requests" in str(busy.value)

    async def use():
        async with admission.admit("ws"):
            assert admission.running == 1

    asyncio.run(use())
    assert admission.running == 0 and admission.refused == 1
    assert engine_request("POST", "/v1/audio/speech") and engine_request("POST", "/v1/audio/voices/import")
    assert not engine_request("GET", "/v1/audio/voices") and not engine_request("POST", "/v1/audio/speech\n")


@pytest.mark.slow
def test_overflow_is_a_503_with_retry_after_while_health_answers(studio, voice):
    release = threading.Event()

    def slow_body():   # holds its admission slot (taken before the body is read) until released
        yield b"--b\r\nContent-Disposition: form-data; name=\"transcript\"\r\n\r\nx\r\n"
        release.wait(30)
        yield b"--b--\r\n"

    holders = [threading.Thread(target=httpx.post, args=(studio.url + "/v1/audio/voices",), kwargs=dict(
        content=slow_body(), headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"}, timeout=60))
        for _ in range(2)]
    for t in holders:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while studio.app.state.admission.running < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        r = httpx.post(studio.url + "/v1/audio/speech", headers=AUTH, json={"input": "Hi.", "voice": voice})
        assert time.monotonic() - started < 5
        assert r.status_code == 503 and r.json()["error"]["code"] == "busy"
        assert int(r.headers["retry-after"]) == studio.settings.busy_retry_after_s
        for path in ("/healthz", "/readyz", "/metrics", "/v1/cache/stats"):
            assert httpx.get(studio.url + path, headers=AUTH).status_code == 200, path
    finally:
        release.set()
        for t in holders:
            t.join(60)
    for _ in range(200):   # the server frees a slot just after the client has read the response's end
        if studio.app.state.admission.running == 0:
            break
        time.sleep(0.05)
    assert studio.app.state.admission.running == 0


@pytest.mark.slow
def test_health_routes_answer_while_every_worker_thread_is_stuck(studio, voice, monkeypatch):
    """45 requests hold all 40 of AnyIO's worker threads in a stuck engine (fault injected)."""
    engine, release = studio.engine, threading.Event()
    original = engine.describe

    def stuck(*args, **kwargs):
        release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "describe", stuck)   # /v1/models and /v1/engine call it in a worker thread
    callers = [threading.Thread(target=httpx.get, args=(studio.url + "/v1/models",),
                                kwargs=dict(headers=AUTH, timeout=90)) for _ in range(45)]
    for t in callers:
        t.start()
    try:
        time.sleep(2)   # let the requests take every worker thread
        monkeypatch.setattr(engine, "describe", original)   # the probes' own describe() is not stuck
        for path in ("/healthz", "/readyz", "/metrics"):
            started = time.monotonic()
            r = httpx.get(studio.url + path, timeout=10)
            assert r.status_code == 200 and time.monotonic() - started < 2, path
    finally:
        release.set()
        for t in callers:
            t.join(90)


@pytest.mark.slow
def test_deadline_and_disconnect_cancel_whole_file_work(studio, voice, monkeypatch):
    engine = studio.engine
    seen: list[str] = []

    def stuck_clone(*args, **kwargs):   # fault injection: an engine that only stops when cancelled
        token = request_cancel_token()
        assert token is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if token.cancelled:
                seen.append("cancelled")
                token.check()
            time.sleep(0.02)
        seen.append("ran out")
        raise AssertionError("never cancelled")

    monkeypatch.setattr(engine, "clone", stuck_clone)
    started = time.monotonic()
    r = httpx.post(studio.url + "/v1/audio/speech", headers=AUTH, json={"input": "Hi.", "voice": voice}, timeout=20)
    assert r.status_code == 503 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert "request_timeout_s" in r.json()["error"]["message"] and "retry-after" in r.headers
    assert time.monotonic() - started < 10 and seen == ["cancelled"]

    seen.clear()
    with pytest.raises(httpx.ReadTimeout):   # the client gives up after 0.3 s and closes the connection
        httpx.post(studio.url + "/v1/audio/speech", headers=AUTH, json={"input": "Hi.", "voice": voice},
                   timeout=httpx.Timeout(5, read=0.3))
    deadline = time.monotonic() + 3   # well before the 5 s request deadline
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen == ["cancelled"]
    monkeypatch.undo()
    time.sleep(0.2)
    assert studio.app.state.admission.running == 0


def test_llm_answer_cap_is_proportional_to_the_text():
    short, long = answer_cap(0, "Hello there."), answer_cap(0, "x" * 300)
    assert short < 20 * AUDIO_TOKENS_PER_SECOND < long < 8192
    assert answer_cap(0, "", clip_seconds=10) >= 20 * AUDIO_TOKENS_PER_SECOND   # an edit: twice the clip
    assert answer_cap(500, "x" * 300) == 500                                     # the setting wins when set


# ------------------------------------------------------------------------------ 5. cache stats and clear

@pytest.mark.slow
def test_cache_stats_reads_take_no_lock_and_write_nothing(studio, voice, monkeypatch):
    from gradio_client import Client

    cache = studio.engine.cache
    cache.stats()   # flush this process's counts
    stats_file = cache.root / "stats.json"
    before = (stats_file.read_bytes(), stats_file.stat().st_mtime_ns)
    r = httpx.post(studio.url + "/v1/audio/speech", headers=AUTH, json={"input": "Count me.", "voice": voice,
                                                                       "response_format": "wav"}, timeout=60)
    assert r.status_code == 200
    before = (stats_file.read_bytes(), stats_file.stat().st_mtime_ns)

    def no_lock(*args, **kwargs):   # fault injection: any use of the folder lock fails loudly
        raise RuntimeError("a read took the cache lock")

    client = Client(studio.url, verbose=False)   # the page is open (--no-ui-requires-key)
    monkeypatch.setattr(cache, "_locked", no_lock)
    api = httpx.get(studio.url + "/v1/cache/stats", headers=AUTH)
    page = client.predict(api_name="/cache_stats")
    monkeypatch.undo()
    assert api.status_code == 200 and api.json()["hits"] >= 1 and page["hits"] >= 1
    assert (stats_file.read_bytes(), stats_file.stat().st_mtime_ns) == before


@pytest.mark.slow
def test_named_cache_clear_needs_confirmation_and_the_key(studio, voice):
    from gradio_client import Client

    open_page = Client(studio.url, verbose=False)
    with pytest.raises(Exception, match="confirm"):
        open_page.predict("", api_name="/cache_clear")
    with pytest.raises(Exception, match="API key"):
        open_page.predict("clear", api_name="/cache_clear")
    assert studio.engine.cache.snapshot()["entries"] >= 1
    with_key = Client(studio.url, verbose=False, headers=AUTH)
    assert with_key.predict("clear", api_name="/cache_clear")["entries"] == 0


# ------------------------------------------------------------------------------ 4. the engine side (tiny models)

@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    import torch

    from core.settings import Settings
    from funasr_cache.store import PromptCache
    from testkit.tiny_models import build_tiny_model_root
    from tts_engine.step_audio import StepAudioEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = build_tiny_model_root(tmp_path_factory.mktemp("tiny"))
    settings = Settings(model_root=root, cache_dir=root / "cache", flow_steps=2, llm_max_rows=4)
    engine = StepAudioEngine(settings, PromptCache.from_settings(settings))
    yield engine
    engine.close()
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_llm_gets_a_cap_from_the_text_and_stops_when_cancelled(tiny_engine):
    from tests.conftest import FIXTURES
    from tts_engine.contract import CancelToken, StreamCancelled, cancellable

    prompt = str(FIXTURES / "prompt_22k.wav")
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    backend = tiny_engine.llm_backend
    submitted, submit = [], backend.submit

    def recording_submit(request):   # a spy: records what the engine asks for, then does it
        submitted.append(request)
        return submit(request)

    backend.submit = recording_submit
    try:
        result = tiny_engine.clone(prompt, text, "Hi.", seed=3)
        assert [r.max_new_tokens for r in submitted] == [answer_cap(0, "Hi.")]
        assert result.timings.counters["llm_tokens"] <= answer_cap(0, "Hi.")

        token, before = CancelToken(), backend.stats()["requests_cancelled"]
        timer = threading.Timer(0.5, token.cancel)   # the client goes away half a second in
        timer.start()
        started = time.monotonic()
        with pytest.raises(StreamCancelled), cancellable(token):
            tiny_engine.clone(prompt, text, "A longer sentence to speak. " * 30, seed=4)
        assert time.monotonic() - started < 20
        assert backend.stats()["requests_cancelled"] > before
    finally:
        backend.submit = submit


def test_websocket_handshakes_from_other_sites_or_hosts_are_closed():
    """The guards close a WebSocket handshake (the server answers 403) from another site or host;
    checked on the guards themselves, as no WebSocket route exists yet (issue 26 adds one)."""
    import asyncio

    from web.guards import HostGuard, OriginGuard

    async def accept(scope, receive, send):
        await send({"type": "websocket.accept"})

    def handshake(guard, host: bytes, origin: bytes) -> list[dict]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "websocket.connect"}

        scope = {"type": "websocket", "path": "/v1/audio/speech/ws",
                 "headers": [(b"host", host), (b"origin", origin)]}
        asyncio.run(guard(scope, receive, send))
        return sent

    origin_guard = OriginGuard(accept, ())
    assert handshake(origin_guard, b"127.0.0.1:7860", b"https://evil.example") == [
        {"type": "websocket.close", "code": 1008}]
    assert handshake(origin_guard, b"127.0.0.1:7860", b"http://127.0.0.1:7860") == [{"type": "websocket.accept"}]
    host_guard = HostGuard(accept, ("localhost", "127.0.0.1"))
    assert handshake(host_guard, b"evil.example:7860", b"http://evil.example:7860") == [
        {"type": "websocket.close", "code": 1008}]
