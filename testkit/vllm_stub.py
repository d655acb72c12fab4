"""A stand-in for ``vllm serve``, run as its own process on 127.0.0.1, for tests of the vLLM server backend.

Owns: ``GET /health``, ``GET /v1/models`` and a streamed ``POST /v1/completions`` whose SSE lines have the
shape vLLM 0.33 gives them (``CompletionStreamResponse`` serialised with ``exclude_unset``: one chunk per
token with ``token_ids`` as deltas, ``prompt_token_ids`` on the first chunk only when ``return_token_ids``
is set, ``finish_reason``/``stop_reason`` on the last, an optional usage chunk, then ``data: [DONE]``;
errors as ``{"error": {"message", "type", "param", "code"}}``). The shapes were transcribed from vLLM
0.33's ``entrypoints/openai/completion/{protocol,serving}.py``, not captured from a live server
(``bench/vllm_check.py`` saves a live stream for comparison when a GPU is lent).
Also owns test controls: ``POST /stub/config`` (delays, hanging, failing) and ``GET /stub/log`` (the request
bodies received and the streams whose client went away).
Does not own: any model. The answer is a deterministic function of the seed: audio ids in the 2:3 slot
pattern, ``answer_len`` of them (setting), then the first id of ``stop_token_ids``.

Run: ``python -m testkit.vllm_stub --port 8000``. ``testkit.vllm_stub.StubProcess`` starts and stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from core.audio_tokens import AUDIO_ID_OFFSET, VQ02_CODES, VQ06_CODES
MODEL = "step-audio-editx"

_config = {"answer_len": 10, "token_delay_s": 0.0, "first_token_delay_s": 0.0, "hang": False,
           "fail_status": 0, "health_status": 200}
_log: dict[str, list] = {"requests": [], "disconnected": []}
_lock = threading.Lock()


def stub_answer(seed: int, n: int) -> list[int]:
    """The ids the stub answers for ``seed``: ``n`` audio ids, 2 x vq02 then 3 x vq06 per group."""
    out = []
    for i in range(n):
        if i % 5 < 2:
            out.append(AUDIO_ID_OFFSET + (seed * 7 + i) % VQ02_CODES)
        else:
            out.append(AUDIO_ID_OFFSET + VQ02_CODES + (seed * 13 + i) % VQ06_CODES)
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, status: int, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, type_: str = "BadRequestError") -> None:
        self._json(status, {"error": {"message": message, "type": type_, "param": None, "code": status}})

    def do_GET(self) -> None:
        if self.path == "/health":
            self.send_response(_config["health_status"])
            self.send_header("content-length", "0")
            self.end_headers()
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "vllm",
                                                          "max_model_len": 8192}]})
        elif self.path == "/stub/log":
            with _lock:
                self._json(200, _log)
        else:
            self._error(404, f"Not Found: {self.path}", "NotFoundError")

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/stub/config":
            _config.update(body)
            self._json(200, _config)
            return
        if self.path != "/v1/completions":
            self._error(404, f"Not Found: {self.path}", "NotFoundError")
            return
        with _lock:
            _log["requests"].append(body)
        if _config["fail_status"]:
            self._error(_config["fail_status"], "stub failure", "InternalServerError")
            return
        prompt = body.get("prompt")
        if not isinstance(prompt, list) or not prompt:
            self._error(400, "prompt must be a non-empty list of token ids")
            return
        max_tokens = int(body.get("max_tokens", 16))
        if len(prompt) + max_tokens > 8192:
            self._error(400, f"This model's maximum context length is 8192 tokens. However, you requested "
                             f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, {max_tokens} "
                             "in the completion). Please reduce the length of the messages or completion.")
            return
        self._stream(body, prompt, max_tokens)

    def _stream(self, body: dict, prompt: list[int], max_tokens: int) -> None:
        rid = f"cmpl-stub{len(_log['requests'])}"
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        stops = list(body.get("stop_token_ids") or [])
        answer = stub_answer(int(body.get("seed") or 0), min(_config["answer_len"], max_tokens))
        finish = "length"
        if len(answer) < max_tokens and stops:
            answer.append(stops[0])
            finish = "stop"
        want_ids = bool(body.get("return_token_ids"))
        created = int(time.time())
        try:
            if _config["hang"]:
                time.sleep(3600)
            time.sleep(_config["first_token_delay_s"])
            for i, token in enumerate(answer):
                if i:
                    time.sleep(_config["token_delay_s"])
                last = i == len(answer) - 1
                choice = {"index": 0, "text": "", "logprobs": None,
                          "finish_reason": finish if last else None,
                          "stop_reason": (token if finish == "stop" else None) if last else None,
                          "prompt_token_ids": prompt if (want_ids and i == 0) else None,
                          "token_ids": [token] if want_ids else None, "weight_versions": None}
                chunk = {"id": rid, "object": "text_completion", "created": created, "model": MODEL,
                         "choices": [choice], "kv_transfer_params": None}
                self._send_event(json.dumps(chunk))
            if (body.get("stream_options") or {}).get("include_usage"):
                self._send_event(json.dumps({"id": rid, "object": "text_completion", "created": created,
                                             "model": MODEL, "choices": [], "usage": {
                                                 "prompt_tokens": len(prompt), "completion_tokens": len(answer),
                                                 "total_tokens": len(prompt) + len(answer)}}))
            self._send_event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            with _lock:
                _log["disconnected"].append(rid)

    def _send_event(self, data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()


def serve(port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    server.server_close()


class StubProcess:
    """The stub in a child process on ``port``; ``start``/``stop`` may alternate (a server going away)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "StubProcess":
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": str(root)}
        self.process = subprocess.Popen([sys.executable, "-m", "testkit.vllm_stub", "--port", str(self.port)],
                                        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM stub exited: {self.process.stderr.read().decode()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the vLLM stub did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()          # abrupt, like a crashed server
            self.process.wait(timeout=10)
        self.process = None

    def configure(self, **values) -> None:
        request = urllib.request.Request(self.url + "/stub/config", data=json.dumps(values).encode(),
                                         headers={"content-type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()

    def log(self) -> dict:
        with urllib.request.urlopen(self.url + "/stub/log", timeout=5) as response:
            return json.loads(response.read())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    serve(parser.parse_args().port)
