"""The LLM on vLLM: a shared ``vllm serve`` over HTTP, or vLLM's async engine in this process.

Owns: ``VLLMServerBackend`` (prompt ids in, answer ids streamed back over the OpenAI-compatible
``/v1/completions`` endpoint; timeouts, health probing, cancellation by closing the stream, and turning
an unreachable or slow server into ``BackendUnavailable``), ``VLLMInProcessBackend`` (the same requests
through ``vllm.v1.engine.async_llm.AsyncLLM``), and ``create_vllm_backend`` choosing between them.
Does not own: text tokenisation (the ``encode`` callable and end ids come from the caller, so prompts are
built by our own tokenizer exactly as for the native backend), the sampling rules (``SamplingConfig``
gives temperature, top-k/top-p, budget; the repetition ban and slot mask run on the server as the
``llm.vllm_plugin`` logits processor), the answer's meaning (``llm.sampling.audio_answer``).

Request translation (vLLM 0.33, ``CompletionRequest``): ``prompt`` = the id list; ``max_tokens`` =
``request.max_new_tokens`` or ``SamplingConfig.budget(len(prompt))``; ``temperature``, ``top_k`` (0 = all),
``top_p``, ``seed`` per request; ``stop_token_ids`` = our end ids (vLLM also stops at the model's own EOS);
``min_tokens``; ``return_token_ids`` + ``stream`` so each SSE chunk carries its new ids in
``choices[0].token_ids``; ``vllm_xargs`` = ``llm.vllm_plugin.request_xargs``. An end id that vLLM returns
is not part of the answer (as for the native backend).

Seeds: a seed makes a take reproducible on the same backend, but vLLM draws with its own generator, so
the same seed gives different (equally distributed) ids than the native backend; greedy choices agree.

Threads: one event loop thread per backend runs every request and the health probe; ``submit`` may be
called from any thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Coroutine, Sequence

import httpx

from core.errors import BackendUnavailable, InputError, ModelError
from llm.backend import GenerationOutput, GenerationRequest, GenerationStream, LLMBackend
from llm.sampling import SamplingConfig
from llm.vllm_plugin import PLUGIN_FQCN, request_xargs

log = logging.getLogger(__name__)


def _request_id() -> str:
    return f"studio-{secrets.token_hex(8)}"


class _LoopThread:
    """An asyncio loop in a daemon thread; ``submit`` schedules a coroutine from any thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_running():
            try:       # let cancelled tasks (the health probe) unwind, so none is destroyed while pending
                self.submit(_cancel_others()).result(timeout)
            except Exception:  # noqa: BLE001 - stopping is best effort
                log.debug("cancelling the loop's tasks failed", exc_info=True)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _RemoteStream(GenerationStream):
    """A stream whose ``cancel`` also cancels the task feeding it (which closes its HTTP stream)."""

    def __init__(self, request: GenerationRequest) -> None:
        super().__init__(request)
        self.task: Future | None = None

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None:
            self.task.cancel()


class _Answer:
    """Collects one answer's ids as they arrive: stops at the first end id, times the first and last."""

    def __init__(self, stream: GenerationStream, eos_ids: frozenset[int]) -> None:
        self.stream, self.eos_ids = stream, eos_ids
        self.ids: list[int] = []
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.ended = False

    def add(self, token_ids: Sequence[int]) -> None:
        now = time.perf_counter()
        for t in token_ids:
            if self.ended:
                return
            self.first = self.first or now
            self.last = now
            if int(t) in self.eos_ids:
                self.ended = True
                return
            self.ids.append(int(t))
            self.stream.put(int(t))

    def output(self, cancelled: bool = False) -> GenerationOutput:
        first = self.first or time.perf_counter()
        last = self.last or first
        return GenerationOutput(answer=tuple(self.ids), prefill_ms=(first - self.started) * 1000.0,
                                decode_ms=(last - first) * 1000.0, batch_size=1,
                                steps=len(self.ids) + int(self.ended), cancelled=cancelled)


def _max_tokens(request: GenerationRequest, sampling: SamplingConfig) -> int:
    if not request.prompt_ids:
        raise InputError("the LLM prompt is empty")
    budget = request.max_new_tokens or sampling.budget(len(request.prompt_ids))
    if budget < 1:
        raise InputError(f"the prompt has {len(request.prompt_ids)} LLM tokens, which leaves no room for an answer "
                         f"within the model's {sampling.max_length}-token limit; use a shorter clip or text")
    return budget


class VLLMServerBackend(LLMBackend):
    """The LLM behind a shared ``vllm serve`` (started with the ``llm.vllm_plugin`` logits processor).

    Parameters:
        url: the server's base URL (``http://host:8000``).
        encode, eos_ids: our tokenizer's text -> ids (no BOS) and the ids that end an answer.
        sampling: temperature, top-k/top-p, length budget, repetition window, slot mask.
        api_key: the server's ``--api-key`` (empty: none).
        connect_timeout_s, read_timeout_s, request_timeout_s: opening a connection; the longest silence
            between two chunks (queueing on the server included); one whole answer.
        retry_after_s: what ``BackendUnavailable`` tells clients to wait.
        health_interval_s: how often ``GET /health`` is probed (also after a failure, until it passes).

    A request that finds the server down fails at once with ``BackendUnavailable`` (no hung requests);
    the probe notices when the server is back and requests flow again.
    """

    name = "vllm-server"

    def __init__(self, url: str, encode: Callable[[str], list[int]], eos_ids: Sequence[int], sampling: SamplingConfig,
                 *, api_key: str = "", connect_timeout_s: float = 3.0, read_timeout_s: float = 60.0,
                 request_timeout_s: float = 600.0, retry_after_s: float = 5.0, health_interval_s: float = 2.0) -> None:
        if not eos_ids:
            raise ValueError("eos_ids must name at least one id")
        self.url = url.rstrip("/")
        self._encode = encode
        self._eos_ids = tuple(int(t) for t in eos_ids)
        self.sampling = sampling
        self.retry_after_s = retry_after_s
        self.request_timeout_s = request_timeout_s
        self.health_interval_s = health_interval_s
        self._timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=connect_timeout_s,
                                      pool=connect_timeout_s)
        self._probe_timeout = httpx.Timeout(connect_timeout_s, read=connect_timeout_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._loop = _LoopThread("vllm-client")
        self._client: httpx.AsyncClient = self._loop.submit(self._make_client(headers)).result()
        self._lock = threading.Lock()
        self._up, self._reason = False, "not probed yet"
        self._inflight: set[_RemoteStream] = set()
        self._counts = {"requests": 0, "failures": 0, "cancelled": 0}
        self._closed = False
        self._probe_now = asyncio.Event()
        self._loop.submit(self._probe()).result()       # know the server's state before the first request
        self._health_task = self._loop.submit(self._health_loop())

    @staticmethod
    async def _make_client(headers: dict[str, str]) -> httpx.AsyncClient:
        return httpx.AsyncClient(headers=headers, limits=httpx.Limits(max_connections=None,
                                                                     max_keepalive_connections=64))

    # ------------------------------------------------------------------ LLMBackend

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def ready(self) -> tuple[bool, str]:
        with self._lock:
            return self._up, self._reason

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"llm_server_up": float(self._up), "llm_inflight": float(len(self._inflight)),
                    **{f"llm_{k}": float(v) for k, v in self._counts.items()}}

    def submit(self, request: GenerationRequest) -> GenerationStream:
        max_tokens = _max_tokens(request, self.sampling)
        with self._lock:
            if self._closed:
                raise RuntimeError("the vLLM backend is closed")
            if not self._up:
                self._counts["failures"] += 1
                raise self._unavailable(f"the LLM server at {self.url} is not available ({self._reason})")
            stream = _RemoteStream(request)
            self._inflight.add(stream)
            self._counts["requests"] += 1
        stream.task = self._loop.submit(self._generate(stream, self._body(request, max_tokens)))
        return stream

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = list(self._inflight)
        for stream in streams:
            stream.fail(RuntimeError("the vLLM backend was closed"))
            if stream.task is not None:
                stream.task.cancel()
        self._health_task.cancel()
        try:
            self._loop.submit(self._client.aclose()).result(timeout=5)
        except Exception:  # noqa: BLE001 - closing is best effort
            log.debug("closing the vLLM client failed", exc_info=True)
        self._loop.stop()

    # ------------------------------------------------------------------ requests

    def _body(self, request: GenerationRequest, max_tokens: int) -> dict[str, Any]:
        s = self.sampling
        return {"prompt": list(request.prompt_ids), "max_tokens": max_tokens, "temperature": s.temperature,
                "top_k": s.top_k, "top_p": s.top_p, "seed": int(request.seed), "stream": True,
                "return_token_ids": True, "stop_token_ids": list(self._eos_ids), "min_tokens": s.min_new_tokens,
                "vllm_xargs": request_xargs(s.repetition_window, s.slot_mask, self._eos_ids),
                # vLLM uses the id as given; several studio replicas share a server, so it must be unique.
                "request_id": _request_id()}

    def _unavailable(self, message: str) -> BackendUnavailable:
        wait = int(math.ceil(self.retry_after_s))
        return BackendUnavailable(f"{message}; try again in {wait} s", retry_after=wait)

    def _mark_down(self, reason: str) -> None:
        with self._lock:
            was_up, self._up, self._reason = self._up, False, reason
        if was_up:
            log.warning("LLM server %s is down: %s", self.url, reason)
        self._probe_now.set()

    async def _generate(self, stream: _RemoteStream, body: dict[str, Any]) -> None:
        answer = _Answer(stream, frozenset(self._eos_ids))
        try:
            async with asyncio.timeout(self.request_timeout_s):
                async with self._client.stream("POST", self.url + "/v1/completions", json=body,
                                               timeout=self._timeout) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise self._http_error(response)
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        if self._take_chunk(data, answer):
                            break               # an end id: leaving closes the stream (vLLM ends the request)
            stream.finish(answer.output())
        except asyncio.CancelledError:
            stream.finish(answer.output(cancelled=True))
            self._count("cancelled")
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            self._mark_down(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            self._fail(stream, self._unavailable(f"the LLM server at {self.url} cannot be reached"))
        except httpx.ReadTimeout:
            self._fail(stream, self._unavailable(f"the LLM server at {self.url} sent nothing for "
                                                 f"{self._timeout.read:g} s (overloaded or stuck)"))
        except TimeoutError:
            self._fail(stream, self._unavailable(f"the LLM server at {self.url} did not finish the answer within "
                                                 f"{self.request_timeout_s:g} s"))
        except (InputError, ModelError) as exc:
            self._fail(stream, exc)
        except Exception as exc:  # noqa: BLE001 - any other transport failure reaches the caller, never hangs it
            log.exception("vLLM request failed")
            self._fail(stream, ModelError(f"the LLM server request failed: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._inflight.discard(stream)

    def _take_chunk(self, data: str, answer: _Answer) -> bool:
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise ModelError(f"the LLM server sent a malformed stream line: {data[:200]!r}") from None
        if "error" in chunk:
            error = chunk["error"] or {}
            raise ModelError(f"the LLM server failed the request: {error.get('message', error)}")
        for choice in chunk.get("choices") or ():
            answer.add(choice.get("token_ids") or ())
            if choice.get("finish_reason") in ("abort", "error"):
                raise self._unavailable(f"the LLM server ended the answer ({choice['finish_reason']})")
        return answer.ended

    def _http_error(self, response: httpx.Response) -> Exception:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300] or response.reason_phrase
        status = response.status_code
        if status == 400:
            return InputError(f"the LLM server refused the prompt: {message}")
        if status >= 500:
            return self._unavailable(f"the LLM server at {self.url} answered {status} ({message})")
        return ModelError(f"the LLM server at {self.url} answered {status}: {message} "
                          "(check --llm-url and --llm-api-key)")

    def _fail(self, stream: GenerationStream, error: Exception) -> None:
        self._count("failures")
        log.warning("LLM request failed: %s", error)
        stream.fail(error)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    # ------------------------------------------------------------------ health

    async def _probe(self) -> None:
        try:
            response = await self._client.get(self.url + "/health", timeout=self._probe_timeout)
            up, reason = response.status_code == 200, f"GET /health answered {response.status_code}"
        except httpx.HTTPError as exc:
            up, reason = False, f"{type(exc).__name__} on GET /health"
        with self._lock:
            was_up, self._up, self._reason = self._up, up, ("ok" if up else reason)
        if up and not was_up:
            log.info("LLM server %s is available", self.url)
        elif was_up and not up:
            log.warning("LLM server %s is down: %s", self.url, reason)

    async def _health_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._probe_now.wait(), self.health_interval_s)
            except TimeoutError:
                pass
            self._probe_now.clear()
            await self._probe()


class VLLMInProcessBackend(LLMBackend):
    """vLLM's ``AsyncLLM`` in this process, on the model folder, with the plugin loaded.

    Needs vLLM 0.33 installed next to the studio (``pip install vllm==0.33.0``; it pins its own torch and
    transformers, so this is a separate environment from the CPU one) and a GPU. Not exercised by the
    CPU test suite; ``bench/vllm_check.py`` exercises the server path on a GPU. Requests, answers and
    cancellation follow ``VLLMServerBackend``; a cancelled request is aborted in the engine.
    """

    name = "vllm-in-process"

    def __init__(self, folder: Path, encode: Callable[[str], list[int]], eos_ids: Sequence[int],
                 sampling: SamplingConfig, *, gpu_memory_utilization: float = 0.5) -> None:
        try:
            from vllm import AsyncEngineArgs, SamplingParams
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ModelError("llm_backend=vllm without llm_url runs vLLM in this process, and vLLM is not "
                             f"installed here ({exc}); pip install vllm==0.33.0 (its own environment) or point --llm-url at a "
                             "'vllm serve' (docs/scaling.md)") from None
        import tempfile

        from llm.vllm_view import ATTENTION_BACKEND, GENERATION_CONFIG, write_vllm_view

        self._encode, self._eos_ids, self.sampling = encode, tuple(int(t) for t in eos_ids), sampling
        self._SamplingParams, self._delta = SamplingParams, RequestOutputKind.DELTA
        self._view = tempfile.TemporaryDirectory(prefix="studio-vllm-view-")
        view = write_vllm_view(Path(folder), Path(self._view.name))
        args = AsyncEngineArgs(model=str(view), max_model_len=sampling.max_length, skip_tokenizer_init=True,
                               enable_prefix_caching=True, gpu_memory_utilization=gpu_memory_utilization,
                               logits_processors=[PLUGIN_FQCN], attention_backend=ATTENTION_BACKEND,
                               generation_config=GENERATION_CONFIG)
        self._loop = _LoopThread("vllm-engine")

        async def build():
            return AsyncLLM.from_engine_args(args)

        try:
            self._engine = self._loop.submit(build()).result()
        except Exception as exc:  # noqa: BLE001 - vLLM raises many types while loading
            self._loop.stop()
            raise ModelError(f"vLLM could not load {folder}: {exc}") from None

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def submit(self, request: GenerationRequest) -> GenerationStream:
        s = self.sampling
        params = self._SamplingParams(
            n=1, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=int(request.seed),
            max_tokens=_max_tokens(request, s), min_tokens=s.min_new_tokens, stop_token_ids=list(self._eos_ids),
            detokenize=False, output_kind=self._delta,
            extra_args=request_xargs(s.repetition_window, s.slot_mask, self._eos_ids))
        stream = _RemoteStream(request)
        stream.task = self._loop.submit(self._generate(stream, params))
        return stream

    async def _generate(self, stream: _RemoteStream, params) -> None:
        answer = _Answer(stream, frozenset(self._eos_ids))
        try:
            prompt = {"prompt_token_ids": list(stream.request.prompt_ids)}
            async for output in self._engine.generate(prompt, params, _request_id()):
                answer.add(output.outputs[0].token_ids)
                if answer.ended:
                    break
            stream.finish(answer.output())
        except asyncio.CancelledError:       # generate() aborts the request in the engine as it unwinds
            stream.finish(answer.output(cancelled=True))
        except Exception as exc:  # noqa: BLE001
            log.exception("vLLM generation failed")
            stream.fail(ModelError(f"vLLM failed: {exc}"))

    def close(self) -> None:
        try:
            self._engine.shutdown()
        finally:
            self._loop.stop()
            self._view.cleanup()


def create_vllm_backend(settings, folder: Path, encode: Callable[[str], list[int]], eos_ids: Sequence[int],
                        sampling: SamplingConfig) -> LLMBackend:
    """The vLLM backend ``settings`` ask for: the server at ``llm_url``, else vLLM in this process."""
    if settings.llm_url:
        return VLLMServerBackend(settings.llm_url, encode, eos_ids, sampling, api_key=settings.llm_api_key,
                                 connect_timeout_s=settings.llm_connect_timeout_s,
                                 read_timeout_s=settings.llm_read_timeout_s,
                                 request_timeout_s=settings.llm_request_timeout_s,
                                 retry_after_s=settings.llm_retry_after_s,
                                 health_interval_s=settings.llm_health_interval_s)
    return VLLMInProcessBackend(folder, encode, eos_ids, sampling,
                                gpu_memory_utilization=settings.llm_gpu_memory_utilization)
