"""web.metrics: the Prometheus registry of one studio app.

Covers: cache gauges read from a real PromptCache at scrape time (totals and per kind), request
counters/latency with error status labels, per-stage histograms labelled hit/miss, RTF, the queue
depth source (and a failing one), and that CPU-only scrapes emit no GPU memory family.
"""

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from prompt_cache.funasr_cache import PromptCache
from core.timings import StageTimings
from web.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def cache(tmp_path):
    cache = PromptCache(tmp_path / "cache")
    yield cache
    cache.close()


def test_cache_gauges_follow_the_cache(cache):
    metrics = Metrics(cache.stats)
    digest = "ab" * 32
    assert cache.get("tokens", "m@1/v1", digest) is None
    cache.put("tokens", "m@1/v1", digest, {"n": 3}, 0.5, {"codes": np.arange(10, dtype=np.int64)})
    assert cache.get("tokens", "m@1/v1", digest) is not None
    stats = cache.stats()
    values = _samples(metrics)
    assert values[("studio_prompt_cache_hits", ())] == stats["hits"] == 1
    assert values[("studio_prompt_cache_misses", ())] == stats["misses"] == 1
    assert values[("studio_prompt_cache_entries", ())] == 1
    assert values[("studio_prompt_cache_bytes", ())] == stats["bytes"] > 0
    assert values[("studio_prompt_cache_kind_hits", (("kind", "tokens"),))] == 1
    # Read at scrape time: a clear shows at once.
    cache.clear()
    assert _samples(metrics)[("studio_prompt_cache_entries", ())] == 0


def test_request_counters_and_stage_histograms():
    metrics = Metrics()
    timings = StageTimings(stages_ms={"tokens": 2.0, "llm": 800.0}, cached=frozenset({"tokens"}),
                           counters={"rtf": 0.4, "audio_s": 2.0}, total_ms=803.0)
    with metrics.track("speech"):
        pass
    metrics.observe_timings("speech", timings)
    with pytest.raises(ValueError):
        with metrics.track("speech"):
            raise ValueError("bad")
    values = _samples(metrics)
    assert values[("studio_requests_total", (("endpoint", "speech"), ("status", "ok")))] == 1
    assert values[("studio_requests_total", (("endpoint", "speech"), ("status", "ValueError")))] == 1
    assert values[("studio_request_seconds_count", (("endpoint", "speech"),))] == 2
    assert values[("studio_stage_seconds_count", (("cached", "hit"), ("endpoint", "speech"), ("stage", "tokens")))] == 1
    llm = (("cached", "miss"), ("endpoint", "speech"), ("stage", "llm"))
    assert values[("studio_stage_seconds_sum", llm)] == pytest.approx(0.8)
    assert values[("studio_stage_seconds_bucket", tuple(sorted(llm + (("le", "0.5"),))))] == 0
    assert values[("studio_stage_seconds_bucket", tuple(sorted(llm + (("le", "1.0"),))))] == 1
    assert values[("studio_rtf_sum", (("endpoint", "speech"),))] == pytest.approx(0.4)
    assert values[("studio_inflight_requests", ())] == 0


def test_queue_depth_and_gpu_families():
    metrics = Metrics()
    metrics.set_queue_depth_source(lambda: 3)
    assert _samples(metrics)[("studio_queue_depth", ())] == 3

    def broken() -> int:
        raise RuntimeError("queue gone")

    metrics.set_queue_depth_source(broken)
    values = _samples(metrics)
    assert values[("studio_queue_depth", ())] == 0  # a scrape never fails
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        assert not any(name.startswith("studio_gpu_memory") for name, _ in values)


def test_registries_are_private():
    a, b = Metrics(), Metrics()
    with a.track("x"):
        pass
    assert ("studio_requests_total", (("endpoint", "x"), ("status", "ok"))) not in _samples(b)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_gpu_memory_family_and_allocation_check():
    import torch

    from core.devices import check_allocation

    assert check_allocation("cuda:0") == (True, "ok")
    assert check_allocation("cpu") == (True, "ok")
    held = torch.empty(64 * 1024**2, dtype=torch.uint8, device="cuda:0")  # 64 MiB, so CUDA is initialised
    values = _samples(Metrics())
    allocated = values[("studio_gpu_memory_bytes", (("device", "cuda:0"), ("kind", "allocated")))]
    reserved = values[("studio_gpu_memory_bytes", (("device", "cuda:0"), ("kind", "reserved")))]
    assert allocated >= held.numel() and reserved >= allocated
    del held
