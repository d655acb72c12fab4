"""web.metrics: the Prometheus registry of one studio app.

Covers: cache gauges read from a real PromptCache at scrape time (totals and per kind), request
counters/latency with error status labels, per-stage histograms labelled hit/miss, RTF, the queue
depth source (and a failing one), and that CPU-only scrapes emit no GPU memory family.
"""

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.timings import StageTimings
from funasr_cache.store import PromptCache
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


def test_llm_backend_stats_are_gauges_read_at_scrape_time(one_torch_thread):
    """A real native backend on the golden tiny Step1 (tests/fixtures/llm): its counters move as it works."""
    import torch

    from llm.backend import GenerationRequest
    from llm.checkpoint import load_step1
    from llm.native import NativeBackend
    from llm.sampling import SamplingConfig
    from testkit.paths import FIXTURES

    model = load_step1(FIXTURES / "llm", "cpu", torch.float32)
    backend = NativeBackend(model, None, SamplingConfig(slot_mask=False, min_new_tokens=4), eos_ids=(3,),
                            max_rows=2, step_token_budget=64)
    try:
        metrics = Metrics(llm_backend=backend)
        native = (("backend", "native"),)
        before = _samples(metrics)
        assert before[("studio_llm_max_rows", native)] == 2
        assert before[("studio_llm_requests_finished", native)] == 0
        out = backend.submit(GenerationRequest((1, 5, 9), seed=1, max_new_tokens=4)).result(timeout=60)
        after = _samples(metrics)
        assert len(out.answer) == 4
        assert after[("studio_llm_requests_finished", native)] == 1
        assert after[("studio_llm_tokens_generated", native)] >= 4
        assert after[("studio_llm_rows_running", native)] == 0
    finally:
        backend.close()


def test_a_failing_llm_stats_never_fails_the_scrape():
    class Broken:
        name = "broken"

        def stats(self):
            raise RuntimeError("worker gone")

    values = _samples(Metrics(llm_backend=Broken()))
    assert not any(name.startswith("studio_llm_") for name, _ in values)
    assert ("studio_inflight_requests", ()) in values          # the rest of the scrape is there
