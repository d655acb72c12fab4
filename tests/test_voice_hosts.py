"""Several studios on one voice database, and the database going away (issue 22), on a real
PostgreSQL (skipped when it is not installed).

* Two studio processes (``python app.py``) with different cache folders share one PostgreSQL: a
  voice made on the first is cloned on the second with no prompt work there (its timings show the
  prompt came from the store, and its cache counts one store fill); deleted on the second, it is
  gone on the first.
* The database stops: requests that need it answer 503 with ``Retry-After``, ``/readyz`` says why,
  ``/healthz`` stays up, and when the server is back the same studio serves voices again.
* The voice quota (SQLite): a voice over ``voice_max_count`` is refused with 409 before the engine
  does any work for it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from testkit.studio_server import speech_wav, start_studio, start_studio_process
from tests.conftest import fresh_pg_database

pytestmark = pytest.mark.slow


def _start_hosts(root, url, count=2):
    """``count`` studio processes on one database, started at once (both also race the migration)."""
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(start_studio_process, root / f"host{i + 1}", "--database-url", url)
                   for i in range(count)]
    hosts, errors = [], []
    for future in futures:
        try:
            hosts.append(future.result())
        except Exception as exc:  # noqa: BLE001 - stop the others, then fail with the first error
            errors.append(exc)
    if errors:
        for host in hosts:
            host.stop()
        raise errors[0]
    return hosts


def test_a_voice_made_on_one_host_is_cloned_and_deleted_on_another(postgres, tmp_path):
    first, second = _start_hosts(tmp_path, fresh_pg_database(postgres))
    try:
        made = httpx.post(first.url + "/v1/audio/voices", timeout=120,
                          files={"file": ("v.wav", speech_wav(seconds=2.0), "audio/wav")},
                          data={"transcript": "The harbour woke slowly.", "name": "Shared"})
        assert made.status_code == 201, made.text
        voice = made.json()
        assert voice["prepared"]["misses"]   # the first host did the prompt work

        listed = httpx.get(second.url + "/v1/audio/voices", timeout=30).json()["data"]
        assert [v["id"] for v in listed] == [voice["id"]]
        spoken = httpx.post(second.url + "/v1/audio/speech", timeout=120,
                            json={"input": "Hello from the second host.", "voice": voice["id"],
                                  "response_format": "wav"})
        assert spoken.status_code == 200, spoken.text
        timings = json.loads(spoken.headers["x-timings"])
        assert "prompt_store" in timings["cached"] and timings["counters"]["prompt_store_fills"] == 1
        assert "prompt_analysis" in timings["cached"]      # no prompt work ran on the second host
        stats = httpx.get(second.url + "/v1/cache/stats", timeout=30).json()
        assert stats["store_fills"] == 1 and stats["puts"] == 1
        assert "prompt_store:" in second.log()              # the timing line says so too

        assert httpx.delete(second.url + f"/v1/audio/voices/{voice['id']}", timeout=30).status_code == 200
        gone = httpx.get(first.url + f"/v1/audio/voices/{voice['id']}", timeout=30)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "voice_not_found"
        assert httpx.post(first.url + "/v1/audio/speech", timeout=60,
                          json={"input": "No.", "voice": voice["id"]}).status_code == 404
    finally:
        second.stop()
        first.stop()


def test_the_database_going_away_answers_503_and_recovers(postgres, tmp_path):
    studio = start_studio(tmp_path, None, "--database-url", fresh_pg_database(postgres))
    try:
        with httpx.Client(base_url=studio.url, timeout=60) as http:
            assert http.get("/readyz").json() == {"ready": True, "reason": "ok"}
            kept = http.post("/v1/audio/voices", files={"file": ("v.wav", speech_wav(), "audio/wav")},
                             data={"transcript": "Still here."}).json()
            postgres.stop("immediate")
            try:
                for r in (http.get("/v1/audio/voices"),
                          http.post("/v1/audio/speech", json={"input": "Hi.", "voice": kept["id"]}),
                          http.post("/v1/audio/voices", files={"file": ("v.wav", speech_wav(), "audio/wav")},
                                    data={"transcript": "Not now."})):
                    assert r.status_code == 503, r.text
                    assert int(r.headers["retry-after"]) > 0
                    assert r.json()["error"]["code"] == "store_unavailable"
                    assert "database is unavailable" in r.json()["error"]["message"]
                ready = http.get("/readyz")
                assert ready.status_code == 503 and "database is unavailable" in ready.json()["reason"]
                assert http.get("/healthz").status_code == 200
            finally:
                postgres.start()
            assert http.get("/readyz").json()["ready"] is True     # no restart
            assert [v["id"] for v in http.get("/v1/audio/voices").json()["data"]] == [kept["id"]]
            assert http.post("/v1/audio/speech", json={"input": "Back.", "voice": kept["id"]}).status_code == 200
    finally:
        studio.stop()


def test_the_voice_quota_is_answered_before_any_engine_work(tmp_path):
    studio = start_studio(tmp_path, None, "--voice-max-count", "1")
    try:
        with httpx.Client(base_url=studio.url, timeout=60) as http:
            first = http.post("/v1/audio/voices", files={"file": ("v.wav", speech_wav(), "audio/wav")},
                              data={"transcript": "The only one."})
            assert first.status_code == 201
            misses = studio.engine.cache.stats()["misses"]
            second = http.post("/v1/audio/voices", files={"file": ("w.wav", speech_wav(seed=3), "audio/wav")},
                               data={"transcript": "One too many."})
            assert second.status_code == 409 and second.json()["error"]["code"] == "voice_quota_exceeded"
            assert "voice_max_count" in second.json()["error"]["message"]
            assert studio.engine.cache.stats()["misses"] == misses        # the engine never saw it
            assert http.delete(f"/v1/audio/voices/{first.json()['id']}").status_code == 200
            assert http.post("/v1/audio/voices", files={"file": ("w.wav", speech_wav(seed=3), "audio/wav")},
                             data={"transcript": "Room again."}).status_code == 201
    finally:
        studio.stop()
