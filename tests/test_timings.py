"""timings: stage accounting, cache marks, RTF and the greppable log line."""

import json
import re
import time

from core.timings import StageTimings, Timer


def test_stages_accumulate_and_freeze():
    t = Timer()
    with t.stage("tokenize"):
        time.sleep(0.01)
    t.record("tokenize", 5.0)
    t.record("prompt_mel", 0.2, cached=True)
    t.count("llm_tokens", 40)
    result = t.finish(audio_seconds=2.0)
    assert isinstance(result, StageTimings)
    assert result.stages_ms["tokenize"] >= 15.0
    assert result.cached == frozenset({"prompt_mel"})
    assert result.counters["llm_tokens"] == 40
    assert result.rtf == result.total_ms / 1000.0 / 2.0
    assert list(result.stages_ms) == ["tokenize", "prompt_mel"]


def test_absorb_prefixes_and_keeps_cache_marks():
    inner = Timer()
    inner.record("vq02", 3.0, cached=True)
    outer = Timer()
    outer.absorb(inner.finish(), prefix="tok_")
    assert outer.finish().cached == frozenset({"tok_vq02"})


def test_log_line_and_header_are_stable():
    t = Timer()
    t.record("hash", 0.5)
    t.record("tokens", 0.3, cached=True)
    timings = t.finish(audio_seconds=1.0)
    line = timings.log_line("clone", "3f2a")
    assert re.match(r"^timing clone req=3f2a total_ms=[\d.]+ .*stages=hash:0\.5,tokens:0\.3\(hit\)$", line)
    header = json.loads(timings.to_header())
    assert header["cached"] == ["tokens"] and header["stages_ms"]["hash"] == 0.5
