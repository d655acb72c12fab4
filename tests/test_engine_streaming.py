"""StepAudioEngine.clone_stream / edit_stream on CPU with tiny random-weight models, through the
LLMBackend contract (the native Step1 backend with continuous batching), and the pieces of
tts_engine/streaming.py.

Covers: the streamed clone has the non-streamed clone's ids and length (one text chunk and several,
whose seams are cross-faded as ``crossfade_join`` does), chunks arrive as the decoder's schedule
says, ttfa_ms, the prompt state comes from the cache the second time, edit_stream, bad input at
the first ``next()``, cancellation (the LLM request is cancelled, decoding stops, a later request
is served), the incremental id filter against ``filter_audio_ids`` and the seam fader against
``crossfade_join``, and the one-chunk default of the contract.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from core.errors import InputError
from core.settings import Settings
from funasr_cache.store import PromptCache
from llm.longform import crossfade_join
from llm.sampling import filter_audio_ids
from tts_engine.contract import StreamCancelled
from tts_engine.streaming import AudioIdFilter, SeamFader

PROMPT_WAV = str(FIXTURES / "prompt_22k.wav")
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."
LONG = "Hello there, how are you? I am fine thank you. The weather is nice today and we go out."


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from testkit.tiny_models import build_tiny_model_root
    from tts_engine.step_audio import StepAudioEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = build_tiny_model_root(tmp_path_factory.mktemp("root"))
    settings = Settings(model_root=root, cache_dir=root / "cache", llm_max_new_tokens=120, flow_steps=2,
                        llm_max_rows=4, text_chunk_chars=40)
    eng = StepAudioEngine(settings, PromptCache.from_settings(settings))
    yield eng
    eng.close()
    torch.set_num_threads(threads)


def test_streamed_clone_has_the_whole_clones_ids_and_length(engine):
    whole = engine.clone(PROMPT_WAV, PROMPT_TEXT, "Hello there, how are you?", seed=3)
    stream = engine.clone_stream(PROMPT_WAV, PROMPT_TEXT, "Hello there, how are you?", seed=3)
    chunks = [c.samples for c in stream]
    result = stream.result
    assert result.tokens == whole.tokens and len(whole.tokens) == 120           # 24 groups = 72 token frames
    assert result.audio.samples.size == whole.audio.samples.size == 72 * 960
    assert np.array_equal(np.concatenate(chunks), result.audio.samples)
    # Decoder schedule 15 + 24 frames, then the rest; the seam fader holds the last 30 ms to the end.
    assert [c.size for c in chunks[:2]] == [(30 - 8) * 480 - 720, 48 * 480]
    c = result.timings.counters
    assert 0 < c["ttfa_ms"] < result.timings.total_ms and c["stream_chunks"] == 3
    assert {"llm_wait", "token2wav", "decoder_flow", "stream_prompt_state"} <= set(result.timings.stages_ms)


def test_prompt_state_is_computed_once_per_voice(engine):
    engine.clone_stream(PROMPT_WAV, PROMPT_TEXT, "One.", seed=1).__next__()
    stream = engine.clone_stream(PROMPT_WAV, PROMPT_TEXT, "Two.", seed=2)
    list(stream)
    assert "stream_prompt_state" in stream.result.timings.cached


def test_long_text_streams_every_chunk_with_the_same_seams(engine):
    whole = engine.clone(PROMPT_WAV, PROMPT_TEXT, LONG, seed=4)
    stream = engine.clone_stream(PROMPT_WAV, PROMPT_TEXT, LONG, seed=4)
    list(stream)
    assert stream.result.timings.counters["chunks"] == whole.timings.counters["chunks"] >= 2
    assert stream.result.tokens == whole.tokens
    assert stream.result.audio.samples.size == whole.audio.samples.size


def test_edit_stream(engine):
    stream = engine.edit_stream(PROMPT_WAV, PROMPT_TEXT, "emotion", "happy", seed=5)
    first = next(stream)
    rest = list(stream)
    assert first.sample_rate == 24000 and first.samples.size > 0
    assert stream.result.audio.samples.size == first.samples.size + sum(a.samples.size for a in rest)
    assert stream.result.text == PROMPT_TEXT


def test_bad_input_raises_at_the_first_next(engine):
    stream = engine.clone_stream(PROMPT_WAV, PROMPT_TEXT, "   ", seed=1)   # creating it does no work
    with pytest.raises(InputError, match="target text is empty"):
        next(stream)


def test_cancel_stops_the_llm_request_and_the_decoder(engine, monkeypatch):
    submitted, sessions = [], []
    real_submit, real_open = engine.llm_backend.submit, engine.streamer.open
    monkeypatch.setattr(engine.llm_backend, "submit", lambda r: submitted.append(real_submit(r)) or submitted[-1])
    monkeypatch.setattr(engine.streamer, "open", lambda *a, **k: sessions.append(real_open(*a, **k)) or sessions[-1])
    stream = engine.clone_stream(PROMPT_WAV, PROMPT_TEXT, LONG, seed=6)
    first = next(stream)
    stream.cancel()
    with pytest.raises(StreamCancelled):
        next(stream)
    stream.close()
    assert first.samples.size > 0
    assert len(submitted) >= 2 and all(s.cancelled for s in submitted)
    assert sessions and all(s.closed for s in sessions) and sessions[0].chunks == 1
    assert all(s.chunks == 0 for s in sessions[1:])        # the later text chunks were never decoded
    after = engine.clone(PROMPT_WAV, PROMPT_TEXT, "Still working.", seed=7)
    assert after.audio.samples.size > 0
    stats = engine.llm_backend.stats()   # the cancelled rows left the batch: no slot is held, nothing decodes
    assert stats["rows_running"] == 0 and stats["requests_cancelled"] >= 1


def test_id_filter_matches_the_batch_filter():
    rng = np.random.default_rng(0)
    ids = [int(x) for x in rng.integers(65530, 70660, 400)]
    kept = []
    f = AudioIdFilter(eos_ids=(2, 3))
    for t in ids:
        kept += f.push(t)
    assert kept == filter_audio_ids(ids)[0] and f.kept == len(kept) > 0
    g = AudioIdFilter(eos_ids=(2,))
    assert [x for t in kept[:7] + [2] + kept[7:] for x in g.push(t)] == kept[:5]


def test_seam_fader_equals_crossfade_join():
    rng = np.random.default_rng(1)
    pieces = [rng.standard_normal(n).astype(np.float32) for n in (5000, 3000, 200, 4000)]
    fader, out = SeamFader(24000, 30.0), []
    for i, piece in enumerate(pieces):
        for part in np.array_split(piece, 3):
            out.append(fader.push(part))
        if i < len(pieces) - 1:
            out.append(fader.end_piece())
    out.append(fader.finish())
    np.testing.assert_allclose(np.concatenate(out), crossfade_join(pieces, 24000, 30.0), atol=1e-6)


def test_contract_default_is_one_chunk_with_ttfa_equal_to_total(tmp_path):
    from preview.engine import PreviewEngine
    from tts_engine.contract import Engine

    settings = Settings(cache_dir=tmp_path)
    preview = PreviewEngine(settings, PromptCache.from_settings(settings))
    stream = Engine.edit_stream(preview, PROMPT_WAV, PROMPT_TEXT, "speed", "faster", seed=1)
    chunks = list(stream)
    assert len(chunks) == 1 and stream.result.timings.counters["ttfa_ms"] == stream.result.timings.total_ms
