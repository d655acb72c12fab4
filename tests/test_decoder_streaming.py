"""decoder/streaming.py and the chunk paths under it, on the tiny decoder fixture (random weights).

Covers: the chunked encoder and DiT equal their whole-sequence forms where they must (one chunk;
attention rows at an offset, projecting only the relative positions a chunk reads; attention over
key segments equals one joined past; the DiT's time-only terms computed once per step count change
nothing), the chunk schedule (first audio after 15 + 3 token frames, then 24, 48, 96, 192, 192 ...),
streamed length == non-streamed length, no click at any join, same seed -> same stream, the vocoder
stream against a whole-clip vocoder pass (phase and F0 carried), the streamed decode against the
non-streamed one with the same noise (log-mel distance and waveform correlation within stated
tolerances; the numbers are in docs/performance.md), and the prompt state cache (hit, identical
output, byte budget).
"""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import decoder.encoder as encoder_module
from conftest import FIXTURES
from decoder.frontend import PromptFeatures
from decoder.model import AudioDecoder
from decoder.source import SourceDraws
from decoder.streaming import PROMPT_NOISE_SEED, StreamConfig, StreamingDecoder, VocoderStream

DECODER = FIXTURES / "decoder"
STEPS = 2
SAMPLES_PER_FRAME = 960          # one 25 Hz token frame at 24 kHz


@pytest.fixture(scope="module")
def decoder() -> AudioDecoder:
    return AudioDecoder.from_dir(DECODER)


@pytest.fixture(scope="module")
def prompt():
    g = load_file(str(DECODER / "golden_decoder.safetensors"))
    return g["prompt_mixed_tokens"][0].tolist(), g["prompt_mel_24k"][0].numpy(), g["spk_embedding"][0].numpy()


@pytest.fixture(scope="module")
def streamer(decoder) -> StreamingDecoder:
    return StreamingDecoder(decoder)


@pytest.fixture(scope="module")
def state(streamer, prompt):
    return streamer.prompt_state("fixture", *prompt, n_steps=STEPS)


def mixed(groups: int, seed: int = 0, extra: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for _ in range(groups + 1):
        out += [int(x) for x in rng.integers(0, 1024, 2)] + [int(x) for x in rng.integers(1024, 5120, 3)]
    return out[:groups * 5 + extra]


def zero_draws(samples: int) -> SourceDraws:
    return SourceDraws(torch.zeros(1, 9), torch.zeros(1, samples, 9), torch.zeros(1, samples, 1))


def logmel(x: np.ndarray) -> np.ndarray:
    return np.log(librosa.feature.melspectrogram(y=x, sr=24000, n_fft=1024, hop_length=240, n_mels=80) + 1e-5)


# --------------------------------------------------------------------------- chunk paths

def test_encoder_as_one_chunk_equals_the_whole_pass(decoder):
    xs = torch.randn(1, 20, decoder.flow.cfg.encoder.input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = decoder.flow.encoder(xs)
        chunk, cache = decoder.flow.encoder.forward_chunk(xs, None, last=True)
    assert torch.equal(chunk, whole)
    assert cache.frames == 20 and cache.kv2[0][0].size(2) == 40


@pytest.mark.parametrize("block_rows", [1024, 3])
def test_relative_attention_rows_at_an_offset_equal_the_whole_pass(decoder, monkeypatch, block_rows):
    monkeypatch.setattr(encoder_module, "ATTENTION_BLOCK_ROWS", block_rows)
    att = decoder.flow.encoder.encoders[0].self_attn
    d = att.h * att.d_k
    x = torch.randn(1, 13, d, generator=torch.Generator().manual_seed(1))
    pos = encoder_module._rel_positions(13, d)
    projected = []
    hook = att.linear_pos.register_forward_hook(lambda module, args, out: projected.append(out.size(1)))
    try:
        with torch.inference_mode():
            whole = att(x, pos)
            k = att.linear_k(x).view(1, 13, att.h, att.d_k).transpose(1, 2)
            v = att.linear_v(x).view(1, 13, att.h, att.d_k).transpose(1, 2)
            rows, keys, _ = att.forward_cached(x[:, 5:], pos, k[:, :, :5], v[:, :, :5])
    finally:
        hook.remove()
    torch.testing.assert_close(rows, whole[:, 5:], atol=1e-5, rtol=1e-5)
    assert keys.size(2) == 13
    # The whole pass projects all 2·13-1 relative positions; 8 rows after 5 cached frames only the
    # 8+13-1 they read.
    assert projected == [25, 20]


def test_attention_over_key_segments_equals_one_joined_past(decoder):
    """The streaming path hands the prompt's, the held-back and the recent keys as separate
    segments (no per-chunk join of the shared prompt keys): same result, bit for bit."""
    att = decoder.flow.decoder.estimator.blocks[0].attn
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, att.to_q.in_features, generator=g)
    segments = [(torch.randn(2, att.num_heads, n, att.head_dim, generator=g),
                 torch.randn(2, att.num_heads, n, att.head_dim, generator=g)) for n in (7, 2, 4)]
    joined = (torch.cat([s[0] for s in segments], dim=2), torch.cat([s[1] for s in segments], dim=2))
    with torch.inference_mode():
        a, ka, va = att.forward_cached(x, segments)
        b, kb, vb = att.forward_cached(x, joined)
    assert torch.equal(a, b) and torch.equal(ka, kb) and torch.equal(va, vb) and ka.size(2) == 6


def test_time_conditioning_is_computed_once_per_step_count_and_changes_nothing(decoder):
    """The DiT's t-only terms, computed once per step count and reused for every chunk, give the
    same velocity as computing them inside each call; the cache holds one entry per step count."""
    streamer = StreamingDecoder(decoder)
    first = streamer.time_conditioning(3)
    assert streamer.time_conditioning(3) is first and len(first) == 3
    assert streamer.time_conditioning(2) is not first
    dit = decoder.flow.decoder.estimator
    g = torch.Generator().manual_seed(12)
    x, mu, cond = (torch.randn(2, 80, 9, generator=g) for _ in range(3))
    spks = torch.randn(2, 80, generator=g)
    times, _ = streamer._time_steps(3)
    with torch.inference_mode():
        for t, conditioning in zip(times, first):
            tt = torch.cat([t, t])
            inside, kv1, conv1 = dit.forward_cached(x, mu, tt, spks, cond, None, None)
            given, kv2, conv2 = dit.forward_cached(x, mu, None, spks, cond, None, None, conditioning)
            assert torch.equal(inside, given) and torch.equal(kv1[-1][0], kv2[-1][0])


def test_chunks_double_after_the_first_audio_up_to_192_frames():
    config = StreamConfig()
    assert [config.chunk_size(i) for i in range(7)] == [15, 24, 48, 96, 192, 192, 192]


def test_dit_without_a_past_equals_its_whole_pass(decoder):
    dit = decoder.flow.decoder.estimator
    g = torch.Generator().manual_seed(2)
    x, mu, cond = (torch.randn(2, 80, 17, generator=g) for _ in range(3))
    spks, t = torch.randn(2, 80, generator=g), torch.tensor([0.3, 0.3])
    with torch.inference_mode():
        whole = dit(x, mu, t, spks, cond)
        first, kv, conv = dit.forward_cached(x[:, :, :9], mu[:, :, :9], t, spks, cond[:, :, :9], None, None)
        # With every earlier frame in the past, a chunk's causal convs and attention see what the whole
        # pass's last frames see, except that attention there also reaches forward; so compare the
        # first chunk only against a whole pass over the same frames.
        alone = dit(x[:, :, :9], mu[:, :, :9], t, spks, cond[:, :, :9])
    torch.testing.assert_close(first, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole[:, :, :9], alone, atol=1e-4)   # whole-pass frames see the future
    assert len(kv) == len(dit.blocks) and kv[0][0].size(2) == 9 and conv[0][0].size(2) == 2


# --------------------------------------------------------------------------- streams

def test_first_audio_needs_15_plus_3_frames_and_chunks_grow(streamer, state):
    session = streamer.open(state, seed=1)
    first_at = None
    sizes = []
    tokens = mixed(40)
    for g in range(40):
        session.push(tokens[g * 5:(g + 1) * 5])
        for piece in session.drain():
            sizes.append(piece.size)
            first_at = g + 1 if first_at is None else first_at
    sizes += [p.size for p in session.drain(final=True)]
    assert first_at == 6                                    # 6 groups = 18 token frames
    overlap = streamer.config.overlap_mel * 480
    assert sizes[:3] == [30 * 480 - overlap, 48 * 480, 96 * 480]      # then the 33-frame rest
    assert sum(sizes) == 40 * 3 * SAMPLES_PER_FRAME


@pytest.mark.parametrize("groups, extra", [(2, 0), (7, 0), (31, 3)])
def test_streamed_length_equals_the_non_streamed_length(decoder, streamer, state, prompt, groups, extra):
    tokens = mixed(groups, seed=groups, extra=extra)
    streamed = np.concatenate(list(streamer.stream(tokens, state, seed=3)))
    whole = decoder.token2wav(tokens, prompt[0], PromptFeatures(*prompt[1:]), seed=3, n_steps=STEPS).samples
    assert abs(streamed.size - whole.size) <= SAMPLES_PER_FRAME
    assert streamed.size == whole.size
    assert np.isfinite(streamed).all() and np.abs(streamed).max() <= 0.99


def test_no_click_at_any_join(streamer, state):
    pieces = list(streamer.stream(mixed(50, seed=4), state, seed=5))
    wav = np.concatenate(pieces)
    joins = np.cumsum([p.size for p in pieces])[:-1]
    steps = np.abs(np.diff(wav))
    inside = np.delete(steps, joins - 1)
    limit = np.percentile(inside, 99.9)
    join_steps = steps[joins - 1]
    assert len(joins) >= 3
    assert (join_steps <= limit).all(), (join_steps, limit)


def test_same_seed_same_stream_and_another_seed_another(streamer, state):
    tokens = mixed(25, seed=6)
    a = list(streamer.stream(tokens, state, seed=9))
    b = list(streamer.stream(tokens, state, seed=9, group_batch=4))   # ids arriving in other bursts
    c = np.concatenate(list(streamer.stream(tokens, state, seed=10)))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.allclose(np.concatenate(a), c, atol=1e-4)


def test_vocoder_stream_matches_a_whole_clip_pass(decoder):
    """Phase and F0 carried across chunks: away from the cross-faded joins the streamed waveform is
    the whole-clip waveform (up to float rounding); at the joins it stays close."""
    mel = torch.randn(1, 80, 200, generator=torch.Generator().manual_seed(7)) * 0.5 - 3
    with torch.inference_mode():
        whole, _ = decoder.hift.inference(mel, **zero_draws(200 * 480).__dict__)
    whole = whole[0].numpy()
    stream = VocoderStream(decoder.hift, 8, zero_draws)
    pieces, start = [], 0
    for size in (30, 48, 96, 26):
        pieces.append(stream.push(mel[:, :, start:start + size], last=start + size == 200))
        start += size
    out = np.concatenate(pieces)
    assert out.size == whole.size
    err = np.abs(out - whole).reshape(-1, 480).max(axis=1)             # per mel frame
    near = np.zeros(200, bool)
    for join in (30, 78, 174):                                         # chunk boundaries in frames
        near[join - 8 - 2: join + 2] = True                            # cross-fade region +- receptive edge
    assert err[~near].max() < 1e-3
    assert err[near].max() < 0.1
    assert np.corrcoef(out, whole)[0, 1] > 0.999


def test_streamed_decode_is_close_to_the_non_streamed_one(decoder, streamer, state, prompt):
    """Same tokens, same flow noise, no vocoder noise: the difference left is the flow's chunked
    attention (each chunk sees the prompt, 96 frames back and its 3 look-ahead frames, not the
    whole answer). Tiny random weights: correlation 0.95, mean |log-mel| difference 0.32 measured."""
    tokens = mixed(45, seed=0)
    frames = len(tokens) // 5 * 6
    noise = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(5))
    prompt_noise = torch.randn(state.prompt_mel_frames, 80,
                               generator=torch.Generator().manual_seed(PROMPT_NOISE_SEED)).T.unsqueeze(0)
    streamed = np.concatenate(list(streamer.stream(tokens, state, seed=1, noise=noise, vocoder_draw=zero_draws)))
    n = streamed.size
    whole = decoder.token2wav(tokens, prompt[0], PromptFeatures(*prompt[1:]), n_steps=STEPS,
                              noise=torch.cat([prompt_noise, noise], dim=2),
                              hift_draws={"rand_ini": torch.zeros(1, 9), "sine_noise": torch.zeros(1, n, 9),
                                          "uv_noise": torch.zeros(1, n, 1)}).samples
    corr = np.corrcoef(streamed, whole)[0, 1]
    distance = np.abs(logmel(streamed) - logmel(whole)).mean()
    assert corr > 0.9 and distance < 0.5, (corr, distance)
    # And it is the chunking, not noise: a stream with one chunk for everything is closer still.
    one = StreamingDecoder(decoder, StreamConfig(chunk_frames=(10_000,)))
    single = np.concatenate(list(one.stream(tokens, one.prompt_state("x", *prompt, n_steps=STEPS), seed=1,
                                            noise=noise, vocoder_draw=zero_draws)))
    assert np.corrcoef(single, whole)[0, 1] > corr


def test_prompt_state_is_cached_per_voice_and_steps(decoder, prompt):
    streamer = StreamingDecoder(decoder)
    a = streamer.prompt_state("voice", *prompt, n_steps=2)
    b = streamer.prompt_state("voice", *prompt, n_steps=2)
    c = streamer.prompt_state("voice", *prompt, n_steps=3)
    assert a is b and c is not a
    assert streamer.stats()["hits"] == 1 and streamer.stats()["misses"] == 2
    fresh = streamer.build_prompt_state(*prompt, 2)
    tokens = mixed(12, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(streamer.stream(tokens, a, seed=2),
                                                     streamer.stream(tokens, fresh, seed=2)))
    tight = StreamingDecoder(decoder, prompt_cache_bytes=a.nbytes + 10)
    tight.prompt_state("v1", *prompt, n_steps=2)
    tight.prompt_state("v2", *prompt, n_steps=2)
    assert tight.stats()["states"] == 1 and tight.stats()["bytes"] <= a.nbytes + 10


def test_closed_session_decodes_nothing_more(streamer, state):
    session = streamer.open(state, seed=1)
    session.push(mixed(30))
    first = next(session.drain())
    session.close()
    assert first.size > 0 and list(session.drain(final=True)) == [] and session.chunks == 1


def test_bad_streamed_ids_are_input_errors(streamer, state):
    from core.errors import InputError

    session = streamer.open(state, seed=1)
    with pytest.raises(InputError, match="slot"):
        session.push([1, 2, 3, 1500, 1500])
