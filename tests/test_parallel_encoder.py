"""Tests of tokenizer/parallel_encoder.py: the streaming Paraformer encoder computed for all chunks at once.

Covers parity with funasr's own chunk-by-chunk loop on the tiny fixture model over many clip lengths
(property test: on a chunk boundary, shorter than one chunk, a final chunk under 30 ms, anything in
between; states within 1e-4, chunk lengths and vq02 codes exact, the same error when nothing can be
encoded), the index plan's look-back window, and refusing encoders it does not reproduce. Golden
parity of both paths is in test_tokenizer.py.
"""

import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from conftest import FIXTURES
from core.errors import ModelError
from core.settings import FUNASR_SUBDIR
from tokenizer import step_audio as tk
from tokenizer.parallel_encoder import check_supported, plan_chunks
from tokenizer.paraformer_stream import CHUNK_STRIDE, MIN_FINAL_CHUNK, ParaformerStream

TOK_DIR = FIXTURES / "tokenizer" / "Step-Audio-Tokenizer"
MAX_CHUNKS = 10  # 2.4 s: enough chunks to fill the 4-chunk look-back several times over


@pytest.fixture(scope="module")
def stream():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; threads only add contention on a small CI machine
    yield ParaformerStream.load(TOK_DIR / FUNASR_SUBDIR, "cpu")
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def codebook():
    return torch.from_numpy(np.load(TOK_DIR / tk.CODEBOOK_FILE))


def clip_lengths():
    on_boundary = st.integers(1, MAX_CHUNKS).map(lambda k: k * CHUNK_STRIDE)
    under_one_chunk = st.integers(1, CHUNK_STRIDE - 1)
    short_final = st.tuples(st.integers(1, MAX_CHUNKS), st.integers(1, MIN_FINAL_CHUNK - 1)).map(
        lambda t: t[0] * CHUNK_STRIDE + t[1])
    anything = st.integers(1, MAX_CHUNKS * CHUNK_STRIDE + CHUNK_STRIDE - 1)
    return st.one_of(on_boundary, under_one_chunk, short_final, anything)


def speech_like(n: int, seed: int) -> np.ndarray:
    """Noise under a slow random envelope with a silent stretch: loud, quiet and silent frames alike."""
    rng = np.random.default_rng(seed)
    envelope = np.interp(np.arange(n), np.linspace(0, n, 8), rng.uniform(0.0, 1.0, 8))
    wav = rng.standard_normal(n) * envelope
    wav[n // 3: n // 3 + n // 8] = 0.0
    return (0.999 * wav / max(np.abs(wav).max(), 1e-3)).astype(np.float32)


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=clip_lengths(), seed=st.integers(0, 2**16))
@example(n=4 * CHUNK_STRIDE, seed=0)                        # ends exactly on a chunk boundary
@example(n=CHUNK_STRIDE - 1, seed=1)                        # shorter than one chunk
@example(n=6 * CHUNK_STRIDE + MIN_FINAL_CHUNK - 1, seed=2)  # final chunk just under 30 ms
@example(n=6 * CHUNK_STRIDE + 1, seed=3)                    # final chunk of one sample
@example(n=300, seed=4)                                     # too short for one fbank frame
def test_parallel_matches_streaming(stream, codebook, n, seed):
    wav = speech_like(n, seed)
    results = {}
    for mode in ("streaming", "parallel"):
        try:
            results[mode] = stream.encode(wav, mode=mode)
        except ModelError as exc:
            results[mode] = str(exc)
    streaming, parallel = results["streaming"], results["parallel"]
    if isinstance(streaming, str) or isinstance(parallel, str):
        assert parallel == streaming  # the same failure, worded the same
        return
    assert parallel.chunk_lengths == streaming.chunk_lengths
    assert parallel.enc_out.shape == streaming.enc_out.shape
    np.testing.assert_allclose(parallel.enc_out.numpy(), streaming.enc_out.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(tk.kmeans_assign(parallel.enc_out, codebook),
                                  tk.kmeans_assign(streaming.enc_out, codebook))


def test_plan_keeps_the_last_look_back_rows_of_earlier_chunks():
    # chunk_size (0, 4, 5): each chunk runs 5 overlap rows + its new rows; its first (rows - 5) rows
    # enter the look-back cache, of which each later chunk sees the last 2 * 4 = 8.
    plan = plan_chunks([4, 4, 4, 2], (0, 4, 5), look_back=2, device=torch.device("cpu"))
    none = plan.n_rows
    assert plan.n_rows == 9 + 9 + 9 + 7
    assert plan.history_index.tolist() == [[none] * 8,
                                          [none] * 4 + [0, 1, 2, 3],
                                          [0, 1, 2, 3, 9, 10, 11, 12],
                                          [9, 10, 11, 12, 18, 19, 20, 21]]
    assert plan.kept.tolist() == [5, 6, 7, 8, 14, 15, 16, 17, 23, 24, 25, 26, 32, 33]
    # the rows of chunk 2 are embedded frames 8..16 of [5 zero frames, then the clip's frames]
    assert plan.window[18:27].tolist() == list(range(8, 17))
    assert plan.keys_valid[3, 0, 0].tolist() == [True] * 8 + [True] * 7 + [False] * 2


def test_plan_keeps_every_row_of_a_chunk_without_new_frames():
    plan = plan_chunks([4, 0], (0, 4, 5), look_back=4, device=torch.device("cpu"))
    assert plan.kept.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13]  # as funasr's enc[0, -0:]


def test_unsupported_encoder_is_refused_with_the_way_out():
    from funasr.models.sanm.encoder import SANMEncoder  # the offline, whole-utterance encoder

    encoder = SANMEncoder(input_size=16, output_size=16, attention_heads=2, linear_units=16, num_blocks=2)
    with pytest.raises(ValueError, match="encoder class SANMEncoder"):
        check_supported(encoder)
    with pytest.raises(ModelError, match="--vq02-encoder streaming"):
        ParaformerStream(types.SimpleNamespace(encoder=encoder), {}, None, torch.device("cpu"), "parallel")
    with pytest.raises(ValueError, match="encoder_mode"):
        ParaformerStream(types.SimpleNamespace(encoder=encoder), {}, None, torch.device("cpu"), "fast")
