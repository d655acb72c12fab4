"""The vLLM server backend (``llm/vllm_backend.py``), and the real engine on it through the HTTP API
(``StepAudioEngine`` on tiny models started with ``--llm-backend vllm --llm-url``).

The server is ``testkit/vllm_stub.py`` in its own process on 127.0.0.1, killed and restarted to play a
server that dies and comes back. It is not vLLM: it replays the response shapes of vLLM 0.33's streamed
``/v1/completions`` (transcribed from vLLM's source, see the stub's docstring) with a deterministic answer,
and records the request bodies it received and the streams whose client went away. The translation tested
here is therefore ours against vLLM's documented shapes; the live check against real vLLM is
``bench/vllm_check.py`` (GPU).
"""

from __future__ import annotations

import time

import httpx
import pytest

from core.errors import BackendUnavailable, InputError, ModelError
from llm.backend import GenerationCancelled, GenerationRequest
from llm.sampling import SamplingConfig
from llm.vllm_backend import VLLMServerBackend
from llm.vllm_plugin import parse_xargs, request_xargs
from testkit.studio_server import free_port, speech_wav, start_studio
from testkit.vllm_stub import StubProcess, stub_answer

EOS = (3, 70700)
SAMPLING = SamplingConfig(temperature=0.7, top_k=40, top_p=0.9, max_length=8192)


def _encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def _backend(url: str, **kw) -> VLLMServerBackend:
    options = dict(connect_timeout_s=1.0, read_timeout_s=5.0, request_timeout_s=30.0, retry_after_s=7,
                   health_interval_s=0.1)
    options.update(kw)
    return VLLMServerBackend(url, _encode, EOS, SAMPLING, **options)


def _until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def stub():
    server = StubProcess(free_port()).start()
    yield server
    server.stop()


@pytest.fixture()
def backend(stub):
    b = _backend(stub.url)
    yield b
    b.close()


def test_prompt_ids_in_answer_ids_out_and_the_request_as_vllm_reads_it(stub, backend):
    prompt = tuple(range(100, 160))
    out = backend.submit(GenerationRequest(prompt, seed=11)).result(timeout=30)
    assert out.answer == tuple(stub_answer(11, 10))          # the stub's end id is not part of the answer
    assert out.steps == 11 and not out.cancelled

    body = stub.log()["requests"][-1]
    assert body["prompt"] == list(prompt)
    assert body["max_tokens"] == SAMPLING.budget(len(prompt)) == 8192 - 60
    assert (body["temperature"], body["top_k"], body["top_p"], body["seed"]) == (0.7, 40, 0.9, 11)
    assert body["stop_token_ids"] == list(EOS) and body["stream"] is True and body["return_token_ids"] is True
    assert body["vllm_xargs"] == request_xargs(10, True, EOS)
    assert parse_xargs(body["vllm_xargs"]) == (10, True, EOS)   # what the plugin will read on the server

    capped = backend.submit(GenerationRequest(prompt, seed=11, max_new_tokens=4)).result(timeout=30)
    assert stub.log()["requests"][-1]["max_tokens"] == 4
    ids = [r["request_id"] for r in stub.log()["requests"]]
    assert len(set(ids)) == 2 and all(i.startswith("studio-") for i in ids)   # unique across replicas too
    assert capped.answer == tuple(stub_answer(11, 4))          # finish_reason "length": no end id came


def test_ids_stream_before_the_answer_is_finished(stub, backend):
    stub.configure(token_delay_s=0.15, answer_len=6)
    stream = backend.submit(GenerationRequest((5, 6, 7), seed=2))
    seen = []
    for token in stream:
        seen.append((token, stream.done))
    assert [t for t, _ in seen] == stub_answer(2, 6)
    assert not seen[0][1]                                       # the first id came while the answer was running
    assert stream.result(timeout=5).answer == tuple(stub_answer(2, 6))


def test_cancel_closes_the_http_stream(stub, backend):
    stub.configure(token_delay_s=0.3, answer_len=200)
    stream = backend.submit(GenerationRequest((5, 6, 7), seed=3))
    iterator = iter(stream)
    first_two = [next(iterator), next(iterator)]
    stream.cancel()
    with pytest.raises(GenerationCancelled):
        stream.result(timeout=10)
    assert first_two == stub_answer(3, 2)
    assert _until(lambda: len(stub.log()["disconnected"]) == 1), "the server should see the client go away"
    assert backend.stats()["llm_inflight"] == 0 and backend.stats()["llm_cancelled"] == 1


def test_server_down_fails_fast_and_recovers_when_it_returns():
    stub = StubProcess(free_port())
    backend = _backend(stub.url)
    try:
        ready, reason = backend.ready()
        assert not ready and "ConnectError" in reason
        with pytest.raises(BackendUnavailable) as info:
            backend.submit(GenerationRequest((1, 2, 3), seed=1))
        assert info.value.retry_after == 7 and stub.url in str(info.value)

        stub.start()
        assert _until(lambda: backend.ready()[0]), "the health probe should notice the server"
        assert backend.submit(GenerationRequest((1, 2, 3), seed=1)).result(timeout=30).answer == tuple(stub_answer(1, 10))

        stub.configure(token_delay_s=0.3, answer_len=100)
        running = backend.submit(GenerationRequest((1, 2, 3), seed=1))
        next(iter(running))
        stub.stop()                                             # dies mid-answer
        with pytest.raises(BackendUnavailable, match="cannot be reached"):
            running.result(timeout=20)
        assert not backend.ready()[0]

        stub.start()
        assert _until(lambda: backend.ready()[0])
        assert backend.submit(GenerationRequest((9,), seed=4)).result(timeout=30).answer == tuple(stub_answer(4, 10))
    finally:
        backend.close()
        stub.stop()


def test_a_silent_or_slow_server_times_out_instead_of_hanging(stub):
    silent = _backend(stub.url, read_timeout_s=0.5)
    slow = _backend(stub.url, request_timeout_s=1.0)
    try:
        stub.configure(hang=True)
        with pytest.raises(BackendUnavailable, match="sent nothing for 0.5 s"):
            silent.submit(GenerationRequest((1, 2), seed=1)).result(timeout=20)
        stub.configure(hang=False, token_delay_s=0.2, answer_len=100)
        with pytest.raises(BackendUnavailable, match="did not finish the answer within 1 s"):
            slow.submit(GenerationRequest((1, 2), seed=1)).result(timeout=20)
        assert slow.ready()[0]                                  # slow is not down
    finally:
        silent.close()
        slow.close()


def test_server_errors_are_told_apart(stub, backend):
    with pytest.raises(InputError, match="maximum context length is 8192"):
        backend.submit(GenerationRequest(tuple(range(10)), seed=1, max_new_tokens=9000)).result(timeout=20)
    with pytest.raises(InputError, match="leaves no room"):
        backend.submit(GenerationRequest(tuple(range(8192)), seed=1))
    stub.configure(fail_status=500)
    with pytest.raises(BackendUnavailable, match="answered 500"):
        backend.submit(GenerationRequest((1,), seed=1)).result(timeout=20)
    stub.configure(fail_status=401)
    with pytest.raises(ModelError, match="answered 401") as info:
        backend.submit(GenerationRequest((1,), seed=1)).result(timeout=20)
    assert not isinstance(info.value, BackendUnavailable)


# ------------------------------------------------------------------------------------------ through the API

@pytest.mark.slow
def test_the_real_engine_on_the_vllm_backend_over_http(tmp_path, one_torch_thread):
    """StepAudioEngine (tiny models of the real layout) with ``--llm-backend vllm --llm-url <stub>``: a clone
    decodes the server's ids; the server dying gives 503 + Retry-After and an unready /readyz naming the
    LLM; its return brings the studio back, with no restart."""
    import io

    import soundfile as sf

    from testkit.tiny_models import build_tiny_model_root
    from tts_engine.step_audio import StepAudioEngine

    models = build_tiny_model_root(tmp_path)
    stub = StubProcess(free_port()).start()
    stub.configure(answer_len=10)
    studio = start_studio(tmp_path, StepAudioEngine, "--engine", "step-audio", "--model-root", str(models),
                          "--llm-backend", "vllm", "--llm-url", stub.url, "--llm-retry-after-s", "7",
                          "--llm-health-interval-s", "0.1", "--llm-connect-timeout-s", "1", "--flow-steps", "2")
    try:
        assert studio.engine.llm_backend.name == "vllm-server"
        with httpx.Client(base_url=studio.url, timeout=120) as http:
            voice = http.post("/v1/audio/voices", files={"file": ("s.wav", speech_wav(), "audio/wav")},
                              data={"transcript": "a test clip"}).json()["id"]
            speak = {"input": "Hello there.", "voice": voice, "response_format": "wav", "seed": 5}
            assert http.get("/readyz").status_code == 200

            done = http.post("/v1/audio/speech", json=speak)
            assert done.status_code == 200, done.text
            body = stub.log()["requests"][-1]
            assert body["seed"] == 5 and body["prompt"][0] == 1          # one chunk; our prompt, BOS first
            assert 3 in body["stop_token_ids"]                              # <|EOT|> ends the answer
            samples, rate = sf.read(io.BytesIO(done.content))
            # The stub's 10 audio ids = 2 groups of 5 = 2 x 120 ms at 24 kHz: the answer really was decoded.
            assert rate == 24000 and len(samples) == 2 * 2880

            stub.stop()
            assert _until(lambda: http.get("/readyz").status_code == 503)
            reason = http.get("/readyz").json()["reason"]
            assert reason.startswith("LLM (vllm-server)") and "/health" in reason
            refused = http.post("/v1/audio/speech", json=speak)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "7"
            error = refused.json()["error"]
            assert error["code"] == "llm_unavailable" and stub.url in error["message"]
            assert "Traceback" not in refused.text
            scrape = http.get("/metrics").text                              # the backend's stats() as gauges
            assert 'studio_llm_server_up{backend="vllm-server"} 0.0' in scrape
            assert 'studio_llm_failures{backend="vllm-server"} 1.0' in scrape
            assert 'studio_llm_requests{backend="vllm-server"} 1.0' in scrape

            stub.start()
            assert _until(lambda: http.get("/readyz").status_code == 200)
            again = http.post("/v1/audio/speech", json=speak)
            assert again.status_code == 200 and again.content == done.content   # same seed, same ids, same audio
    finally:
        studio.stop()
        stub.stop()
