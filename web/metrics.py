"""Prometheus metrics of one studio process.

Owns: a private ``CollectorRegistry`` (one per app, so several apps in one process -- as in the
tests -- never clash), request counters and latency histograms per endpoint and per engine
stage, and gauges read at scrape time: the prompt cache's ``stats()``, the Gradio queue depth,
requests running on the engine, and CUDA memory when CUDA is already in use.
Does not own: serving ``/metrics`` (``web.api``) or measuring stages (``core.timings``).

Metric names (all prefixed ``studio_``)::

    studio_requests_total{endpoint,status}          counter
    studio_request_seconds{endpoint}                histogram, wall time of the whole request
    studio_stage_seconds{endpoint,stage,cached}     histogram, one sample per stage of a Result
    studio_rtf{endpoint}                            histogram, real-time factor of generated audio
    studio_ttfa_seconds{endpoint}                   histogram, time to the first audio (= total for whole files)
    studio_inflight_requests                        gauge, engine calls running now
    studio_queue_depth                              gauge, events waiting in the Gradio queue
    studio_prompt_cache_<stat>                      gauge, each numeric top-level cache stat
    studio_prompt_cache_kind_<stat>{kind}           gauge, each numeric per-kind cache stat
    studio_gpu_memory_bytes{device,kind}            gauge, allocated/reserved (only when CUDA is initialised)
    studio_llm_<stat>{backend}                      gauge, each number of the LLM backend's ``stats()``
                                                    (native: rows_running, queue_depth, steps, ...;
                                                    vllm-server: server_up, inflight, requests, failures, ...)
    studio_quality_content_error{endpoint,measure}  histogram, CER/WER of returned takes (quality/)
    studio_quality_speaker_similarity{endpoint}     histogram, cosine to the prompt of returned takes
    studio_quality_loudness_lufs{endpoint}          histogram, integrated loudness of returned takes
    studio_quality_takes{endpoint}                  histogram, takes generated per request (best-of-N, retries)
    studio_quality_flags_total{endpoint,flag}       counter, signal flags of returned takes
    studio_quality_results_total{endpoint,passed}   counter, returned takes that passed the gates or not
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from core.timings import StageTimings

log = logging.getLogger(__name__)

# Engine stages run from well under a millisecond (cache hits) to minutes (long CPU clones).
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0, 120.0, math.inf)
ERROR_BUCKETS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, math.inf)
SIMILARITY_BUCKETS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LUFS_BUCKETS = (-50.0, -40.0, -35.0, -30.0, -27.0, -24.0, -21.0, -18.0, -15.0, -12.0, -9.0, 0.0, math.inf)
TAKES_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, math.inf)
CONTENT_TYPE = CONTENT_TYPE_LATEST
_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


class _CacheCollector:
    """Reads ``cache.stats()`` at scrape time, so the gauges are never stale."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self._stats = stats

    def collect(self):
        try:
            stats = self._stats() or {}
        except Exception:  # a scrape must never fail because the cache is busy or broken
            log.exception("prompt cache stats failed during a /metrics scrape")
            return
        per_kind: dict[str, GaugeMetricFamily] = {}
        for key, value in sorted(stats.items()):
            if _is_number(value):
                name = "studio_prompt_cache_" + _NAME_OK.sub("_", key)
                yield GaugeMetricFamily(name, f"prompt cache stat {key!r}", value=float(value))
            elif isinstance(value, dict) and key in ("per_kind", "kinds", "by_kind"):
                for kind, kind_stats in sorted(value.items()):
                    if not isinstance(kind_stats, dict):
                        continue
                    for stat, stat_value in sorted(kind_stats.items()):
                        if not _is_number(stat_value):
                            continue
                        name = "studio_prompt_cache_kind_" + _NAME_OK.sub("_", stat)
                        family = per_kind.setdefault(name, GaugeMetricFamily(
                            name, f"prompt cache stat {stat!r} per kind", labels=["kind"]))
                        family.add_metric([str(kind)], float(stat_value))
        yield from per_kind.values()


class _LLMCollector:
    """Reads the LLM backend's ``stats()`` at scrape time (a leading ``llm_`` in a key is dropped)."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def collect(self):
        try:
            stats = self._backend.stats() or {}
        except Exception:  # a scrape must never fail because the backend is busy or broken
            log.exception("LLM backend stats failed during a /metrics scrape")
            return
        name = str(getattr(self._backend, "name", "llm"))
        for key, value in sorted(stats.items()):
            if _is_number(value):
                stat = _NAME_OK.sub("_", key.removeprefix("llm_"))
                family = GaugeMetricFamily("studio_llm_" + stat, f"LLM backend stat {key!r}", labels=["backend"])
                family.add_metric([name], float(value))
                yield family


class _GpuCollector:
    """CUDA memory per device; silent unless torch is imported and CUDA already initialised."""

    def collect(self):
        torch = sys.modules.get("torch")
        # Never initialise CUDA from a scrape: only report when the engine has done so.
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        family = GaugeMetricFamily("studio_gpu_memory_bytes", "CUDA memory held by torch",
                                   labels=["device", "kind"])
        for index in range(torch.cuda.device_count()):
            family.add_metric([f"cuda:{index}", "allocated"], float(torch.cuda.memory_allocated(index)))
            family.add_metric([f"cuda:{index}", "reserved"], float(torch.cuda.memory_reserved(index)))
        yield family


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Metrics:
    """All metrics of one app. Thread-safe (prometheus-client metrics are)."""

    def __init__(self, cache_stats: Callable[[], dict] | None = None, llm_backend=None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("studio_requests", "requests handled", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("studio_request_seconds", "wall time of a request", ["endpoint"],
                                 buckets=STAGE_BUCKETS, registry=self.registry)
        self.stages = Histogram("studio_stage_seconds", "engine stage durations", ["endpoint", "stage", "cached"],
                                buckets=STAGE_BUCKETS, registry=self.registry)
        self.rtf = Histogram("studio_rtf", "real-time factor (processing s / audio s)", ["endpoint"],
                             buckets=RTF_BUCKETS, registry=self.registry)
        self.ttfa = Histogram("studio_ttfa_seconds", "time from request to the first audio", ["endpoint"],
                              buckets=STAGE_BUCKETS, registry=self.registry)
        self.inflight = Gauge("studio_inflight_requests", "engine calls running now", registry=self.registry)
        self._queue_depth: Callable[[], int] = lambda: 0
        queue_gauge = Gauge("studio_queue_depth", "events waiting in the Gradio queue", registry=self.registry)
        queue_gauge.set_function(lambda: float(self._safe_queue_depth()))
        if cache_stats is not None:
            self.registry.register(_CacheCollector(cache_stats))
        if llm_backend is not None:          # an ``llm.backend.LLMBackend`` (the preview engine has none)
            self.registry.register(_LLMCollector(llm_backend))
        self.registry.register(_GpuCollector())
        self._init_quality()

    def set_queue_depth_source(self, source: Callable[[], int]) -> None:
        """Where the queue depth comes from (the Gradio queue, once the UI is built)."""
        self._queue_depth = source

    def _safe_queue_depth(self) -> int:
        try:
            return int(self._queue_depth())
        except Exception:
            return 0

    @contextmanager
    def track(self, endpoint: str) -> Iterator[None]:
        """Count and time one request; the status label is ``ok`` or the exception's class name."""
        start = time.perf_counter()
        self.inflight.inc()
        status = "ok"
        try:
            yield
        except BaseException as exc:
            status = type(exc).__name__
            raise
        finally:
            self.inflight.dec()
            self.requests.labels(endpoint, status).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - start)

    def observe_timings(self, endpoint: str, timings: StageTimings) -> None:
        """One histogram sample per stage of a finished request, labelled hit or miss."""
        for stage, ms in timings.stages_ms.items():
            cached = "hit" if stage in timings.cached else "miss"
            self.stages.labels(endpoint, stage, cached).observe(ms / 1000.0)
        if math.isfinite(timings.rtf):
            self.rtf.labels(endpoint).observe(timings.rtf)
        ttfa = timings.counters.get("ttfa_ms")
        if ttfa is not None and math.isfinite(ttfa):
            self.ttfa.labels(endpoint).observe(ttfa / 1000.0)

    def _init_quality(self) -> None:
        r = self.registry
        self.quality_error = Histogram("studio_quality_content_error", "content error (CER/WER) of returned takes",
                                       ["endpoint", "measure"], buckets=ERROR_BUCKETS, registry=r)
        self.quality_similarity = Histogram("studio_quality_speaker_similarity", "speaker similarity to the prompt",
                                            ["endpoint"], buckets=SIMILARITY_BUCKETS, registry=r)
        self.quality_lufs = Histogram("studio_quality_loudness_lufs", "integrated loudness of returned takes",
                                      ["endpoint"], buckets=LUFS_BUCKETS, registry=r)
        self.quality_takes = Histogram("studio_quality_takes", "takes generated per request", ["endpoint"],
                                       buckets=TAKES_BUCKETS, registry=r)
        self.quality_flags = Counter("studio_quality_flags", "signal flags of returned takes", ["endpoint", "flag"],
                                     registry=r)
        self.quality_results = Counter("studio_quality_results", "returned takes by gate outcome",
                                       ["endpoint", "passed"], registry=r)

    def observe_quality(self, endpoint: str, report, takes: int = 1) -> None:
        """Samples of a returned take's ``quality.report.QualityReport`` (scores that were measured only)."""
        if report.error is not None and math.isfinite(report.error):
            self.quality_error.labels(endpoint, report.content.measure).observe(report.error)
        if report.similarity is not None and math.isfinite(report.similarity):
            self.quality_similarity.labels(endpoint).observe(report.similarity)
        if report.signal is not None and report.signal.lufs is not None:
            self.quality_lufs.labels(endpoint).observe(report.signal.lufs)
        for flag in report.flags:
            self.quality_flags.labels(endpoint, flag).inc()
        self.quality_takes.labels(endpoint).observe(takes)
        self.quality_results.labels(endpoint, "yes" if report.passed else "no").inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
