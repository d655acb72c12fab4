"""Tests of tokenizer.py and paraformer_stream.py: the Step-Audio tokenizer.

Covers golden parity of every stage (tests/fixtures/tokenizer, README §5/§6 tolerances), loading
from model.safetensors and model.pt, missing/mismatched files, the cache-first path (encoder calls
counted on the real model objects), TF32 flags, the ONNX session options actually used, bad input,
and concurrent requests.
"""

import json
import logging
import random
import shutil
import subprocess
import sys
import threading

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch_file

from core.audio_io import Audio, load_audio, resample
from conftest import FIXTURES, ROOT
from core.errors import InputError, ModelError
from prompt_cache.funasr_cache import PromptCache, fingerprint_files, make_namespace
from tokenizer.paraformer_stream import load_state_dict_file
from core.settings import FUNASR_SUBDIR, Settings
from tokenizer import step_audio as tk
TOK_DIR = FIXTURES / "tokenizer" / "Step-Audio-Tokenizer"
FUNASR_DIR = TOK_DIR / FUNASR_SUBDIR
GOLDEN = load_file(str(FIXTURES / "tokenizer" / "golden_tokenizer.safetensors"))
GOLDEN_JSON = json.loads((FIXTURES / "tokenizer" / "golden_tokenizer.json").read_text())
WAV_IN = Audio(GOLDEN["wav_in"][0], 22050)


def golden_tokens() -> tk.Tokens:
    return tk.Tokens(tuple(GOLDEN["vq02"].tolist()), tuple(GOLDEN["vq06"].tolist()))


@pytest.fixture(scope="module", autouse=True)
def process_state():
    """One torch thread (the tiny models' per-chunk matmuls gain nothing from threads, and on a busy
    2-core machine spinning OpenMP workers made each clip ~100x slower); the process-wide TF32
    flags the loads below set are restored afterwards."""
    before = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1:]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    cache = PromptCache(tmp_path_factory.mktemp("cache"))
    return tk.StepAudioTokenizer.load(TOK_DIR, Settings(), cache, device="cpu")


def copy_model(tmp_path):
    target = tmp_path / "Step-Audio-Tokenizer"
    shutil.copytree(TOK_DIR, target)
    return target


class CallCounter:
    """Wraps a real bound method and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


# --------------------------------------------------------------------------- golden parity

def test_preprocess_stages_match_golden(tok):
    wav16k = resample(GOLDEN["wav_in"][0], 22050, 16000)
    np.testing.assert_allclose(wav16k, GOLDEN["wav16k_resampled"][0], atol=1e-6, rtol=0)
    normed = tk.energy_norm(wav16k)
    np.testing.assert_allclose(normed, GOLDEN["wav16k_energy_norm"][0], atol=1e-6, rtol=0)
    trimmed, index = tk.trim_silence(normed)
    assert index == tuple(GOLDEN["librosa_trim_index"].tolist())
    assert trimmed.shape == GOLDEN["wav16k_pre"][0].shape
    np.testing.assert_allclose(trimmed, GOLDEN["wav16k_pre"][0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(tok.preprocess(WAV_IN), GOLDEN["wav16k_pre"][0], atol=1e-6, rtol=0)


def test_trim_pads_left_when_sound_starts_early():
    wav = np.zeros(16000, np.float32)
    wav[100:5000] = 0.5  # sound from the start: the 800-sample left margin must be zero padding
    out, (start, end) = tk.trim_silence(wav)
    assert start <= 100 and len(out) == -(-(end - start) // 240) * 240 + 4320
    assert not out[:800 - start].any() and out[800 - start + 100] == np.float32(0.5)


def test_whisper_log_mel_matches_golden():
    mel = tk.whisper_log_mel(GOLDEN["wav16k_pre"][0])
    assert mel.shape == GOLDEN["whisper_logmel128"].shape and mel.dtype == np.float32
    assert mel.shape[2] == int(GOLDEN["whisper_logmel128_len"][0])
    np.testing.assert_allclose(mel, GOLDEN["whisper_logmel128"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["streaming", "parallel"])
def test_streaming_encoder_matches_golden(tok, mode):
    out = tok.paraformer.encode(GOLDEN["wav16k_pre"][0], keep_inputs=True, mode=mode)
    assert out.chunk_lengths == tuple(GOLDEN["encoder_chunk_lengths"].tolist())
    # The reference captured each chunk's input tensor, which funasr's encoder then scales in place
    # by sqrt(output_size) = 8 (a power of two: exact); chunk_inputs are the frontend's unscaled output.
    scale = tok.paraformer.output_size ** 0.5
    np.testing.assert_allclose(out.chunk_inputs.numpy() * scale, GOLDEN["encoder_chunk_inputs_lfr_cmvn"][0],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.enc_out.numpy(), GOLDEN["enc_out"][0], atol=1e-4, rtol=1e-4)
    assert (tk.kmeans_assign(out.enc_out, tok.codebook) == GOLDEN["vq02"]).all()


def test_parallel_and_streaming_encoders_agree_on_golden(tok):
    wav = GOLDEN["wav16k_pre"][0]
    streaming = tok.paraformer.encode(wav, mode="streaming")
    parallel = tok.paraformer.encode(wav, mode="parallel")
    assert parallel.chunk_lengths == streaming.chunk_lengths
    np.testing.assert_allclose(parallel.enc_out.numpy(), streaming.enc_out.numpy(), atol=1e-4, rtol=0)
    assert tok.paraformer.encoder_mode == Settings().vq02_encoder == "parallel"  # the default path
    with pytest.raises(ValueError, match="mode must be one of parallel, streaming"):
        tok.paraformer.encode(wav, mode="chunked")


def test_streaming_setting_runs_funasr_chunk_loop(tmp_path, monkeypatch):
    streaming = tk.StepAudioTokenizer.load(TOK_DIR, Settings(vq02_encoder="streaming"), PromptCache(tmp_path), "cpu")
    assert streaming.paraformer.encoder_mode == "streaming"
    encode_chunk = CallCounter(streaming.paraformer.model.encode_chunk)
    monkeypatch.setattr(streaming.paraformer.model, "encode_chunk", encode_chunk)
    result = streaming.tokenize(WAV_IN)
    assert result.tokens == golden_tokens() and encode_chunk.calls == len(GOLDEN["encoder_chunk_lengths"])
    # "time saved" on later hits is what this miss cost, streaming encoder included
    cost_s = streaming.cache.get(tk.CACHE_KIND, streaming.namespace, result.digest).cost_s
    assert result.timings.stages_ms["vq02_encode"] / 1000.0 <= cost_s <= result.timings.total_ms / 1000.0


def test_kmeans_assignment_matches_golden(tok):
    np.testing.assert_array_equal(tok.codebook.numpy(), GOLDEN["kms"])
    codes = tk.kmeans_assign(torch.from_numpy(GOLDEN["enc_out"][0]), torch.from_numpy(GOLDEN["kms"]))
    np.testing.assert_array_equal(codes, GOLDEN["vq02"])


def test_tokenize_reproduces_golden_tokens(tok):
    result = tok.tokenize(WAV_IN)
    assert result.tokens == golden_tokens()
    assert result.tokens.llm_ids == tuple(GOLDEN["llm_ids"].tolist()) == tuple(GOLDEN_JSON["llm_ids"])
    assert result.tokens.audio_string == GOLDEN_JSON["prompt_string"]
    assert result.tokens.n_groups == GOLDEN_JSON["n_groups"]
    assert result.tokens.mixed == tuple(i - 65536 for i in GOLDEN_JSON["llm_ids"])


def test_unlimited_clip_gives_the_same_tokens(tok):
    """The 0.6 peak limiter upstream applies first does not change tokens (golden wav_in is limited)."""
    raw = load_audio(FIXTURES / "prompt_22k.wav")
    assert np.abs(raw.samples).max() > 0.7
    assert tok.tokenize(raw).tokens == golden_tokens()


# --------------------------------------------------------------------------- interleave

def test_interleave_groups_and_drops_excess():
    assert tk.interleave((1, 2, 3, 4, 5), (10, 11, 12, 13, 14, 15, 16)) == \
        (1, 2, 1034, 1035, 1036, 3, 4, 1037, 1038, 1039)
    assert tk.interleave((1, 2, 3, 4), (7, 8)) == ()
    tokens = tk.Tokens((0, 1023, 5), (4095, 0, 1, 2))
    assert tokens.n_groups == 1 and tokens.mixed == (0, 1023, 5119, 1024, 1025)
    assert tokens.llm_ids == (65536, 66559, 70655, 66560, 66561)
    assert tokens.audio_string == "<audio_0><audio_1023><audio_5119><audio_1024><audio_1025>"


@pytest.mark.parametrize("vq02, vq06", [((1024,), ()), ((-1,), ()), ((), (4096,))])
def test_tokens_reject_out_of_range_codes(vq02, vq06):
    with pytest.raises(ValueError, match="vq0"):
        tk.Tokens(vq02, vq06)


# --------------------------------------------------------------------------- cache

def test_second_call_hits_cache_without_running_encoders(tok, tmp_path, monkeypatch, caplog):
    tok = tk.StepAudioTokenizer(tok.paraformer, tok.codebook, tok.vq06_session, tok.onnx_options,
                                PromptCache(tmp_path / "cache"), tok.namespace, tok.device)
    encode_chunk = CallCounter(tok.paraformer.encode)  # one call per clip, whichever encoder path
    onnx_run = CallCounter(tok.vq06_session.run)
    monkeypatch.setattr(tok.paraformer, "encode", encode_chunk)
    monkeypatch.setattr(tok.vq06_session, "run", onnx_run)
    with caplog.at_level(logging.INFO, logger="tokenizer.step_audio"):
        first = tok.tokenize(WAV_IN)
        calls = (encode_chunk.calls, onnx_run.calls)
        second = tok.tokenize(WAV_IN, digest=first.digest)
    assert not first.hit and calls == (1, 1)
    assert second.hit and (encode_chunk.calls, onnx_run.calls) == calls
    assert second.tokens == first.tokens == golden_tokens()
    assert {"preprocess", "vq02_encode", "vq06_encode", "merge"} <= set(first.timings.stages_ms)
    assert set(second.timings.stages_ms) == {"hash", "cache_lookup"} and second.timings.cached == {"cache_lookup"}
    messages = [r.getMessage() for r in caplog.records if r.name == "tokenizer.step_audio"]
    assert "FunASR cache MISS" in messages[0] and "FunASR encoding:" in messages[0]
    assert "FunASR cache HIT" in messages[1] and "encoding" not in messages[1]

    other = tk.StepAudioTokenizer(tok.paraformer, tok.codebook, tok.vq06_session, tok.onnx_options,
                                  tok.cache, tok.namespace + "-other", tok.device)
    assert not other.tokenize(WAV_IN).hit and onnx_run.calls == 2


def test_malformed_cache_entry_is_recomputed(tok):
    audio = Audio(GOLDEN["wav_in"][0] * 0.5, 22050)  # scaling by 2^-1 is exact: same tokens, new digest
    digest = "ab" * 32
    tok.cache.put(tk.CACHE_KIND, tok.namespace, digest, {"vq02": [5000], "vq06": []}, 0.1)
    result = tok.tokenize(audio, digest=digest)
    assert not result.hit and result.tokens == golden_tokens()
    assert tok.tokenize(audio, digest=digest).hit
    # In range but without a whole group: a prompt bundle could not be built from it.
    tok.cache.put(tk.CACHE_KIND, tok.namespace, digest, {"vq02": [1], "vq06": [2]}, 0.1)
    result = tok.tokenize(audio, digest=digest)
    assert not result.hit and result.tokens == golden_tokens()


@pytest.mark.parametrize("target", ["vq06", "vq02", "vq02-streaming"])
def test_a_failing_model_is_a_model_error(tok, tmp_path, monkeypatch, target):
    def explode(*args, **kwargs):   # fault injection, like an out-of-memory error on the device
        raise RuntimeError("out of memory")

    tok = tk.StepAudioTokenizer(tok.paraformer, tok.codebook, tok.vq06_session, tok.onnx_options,
                                PromptCache(tmp_path / "cache"), tok.namespace, tok.device)
    if target == "vq02-streaming":
        monkeypatch.setattr(tok.paraformer, "encoder_mode", "streaming")
    owner = {"vq06": tok.vq06_session, "vq02": tok.paraformer.model.encoder.encoders[1].feed_forward,
             "vq02-streaming": tok.paraformer.model}[target]
    monkeypatch.setattr(owner, {"vq06": "run", "vq02": "forward"}.get(target, "encode_chunk"), explode)
    with pytest.raises(ModelError, match="failed on .*out of memory"):
        tok.tokenize(WAV_IN)


# --------------------------------------------------------------------------- loading

def test_namespace_covers_model_files(tok):
    files = [TOK_DIR / "linguistic_tokenizer.npy", TOK_DIR / "speech_tokenizer_v1.onnx",
             *(FUNASR_DIR / n for n in ("config.yaml", "model.safetensors", "am.mvn", "tokens.json"))]
    assert tok.namespace == make_namespace("Step-Audio-Tokenizer", fingerprint_files(files), tk.PREPROCESS_VERSION)


def test_loads_model_pt_with_tf32_off_and_parallel_onnx(tok, tmp_path):
    folder = copy_model(tmp_path)
    sub = folder / FUNASR_SUBDIR
    torch.save(load_torch_file(str(sub / "model.safetensors")), sub / "model.pt")
    (sub / "model.safetensors").unlink()
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    settings = Settings(tf32=False, ort_intra_op_threads=1, ort_inter_op_threads=2, ort_execution_mode="parallel")
    try:
        other = tk.StepAudioTokenizer.load(folder, settings, PromptCache(tmp_path / "c"), "cpu")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # loading (funasr reseeds and initialises weights) must leave the caller's RNGs alone
    assert torch.equal(torch.get_rng_state(), rng[0]) and (np.random.get_state()[1] == rng[1]).all()
    assert random.getstate() == rng[2]
    assert other.paraformer.files.weights.name == "model.pt" and other.namespace != tok.namespace
    options = other.vq06_session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 2)
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert other.tokenize(WAV_IN).tokens == golden_tokens()


def test_default_session_options_and_tf32_on(tok):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    fresh = tk.StepAudioTokenizer.load(TOK_DIR, Settings(tf32=True), tok.cache, "cpu")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    options = fresh.vq06_session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == Settings().ort_intra_op_threads
    assert fresh.vq06_session.get_providers() == ["CPUExecutionProvider"]
    assert fresh.paraformer.frontend.dither == 0.0
    assert fresh.paraformer.model.decoder is None  # only the encoder is kept


@pytest.mark.slow
def test_import_and_load_leave_the_process_alone():
    """Importing tokenizer does not import funasr; loading leaves logging and stdout untouched."""
    code = (
        "import logging, sys, torch\nfrom tokenizer import step_audio as tokenizer\n"
        "assert 'funasr' not in sys.modules\n"
        "from prompt_cache.funasr_cache import PromptCache; from core.settings import Settings; import tempfile\n"
        f"tokenizer.StepAudioTokenizer.load(__import__('pathlib').Path({str(TOK_DIR)!r}), Settings(),"
        " PromptCache(tempfile.mkdtemp()))\n"
        "assert 'funasr' in sys.modules\n"
        "root = logging.getLogger(); assert not root.handlers and root.level == logging.WARNING, root.handlers\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "ok\n"


@pytest.mark.parametrize("missing", ["linguistic_tokenizer.npy", "speech_tokenizer_v1.onnx",
                                     f"{FUNASR_SUBDIR}/am.mvn", f"{FUNASR_SUBDIR}/config.yaml",
                                     f"{FUNASR_SUBDIR}/model.safetensors", FUNASR_SUBDIR])
def test_missing_file_is_named(tmp_path, missing):
    folder = copy_model(tmp_path)
    path = folder / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    name = "model.safetensors or model.pt" if missing.endswith("safetensors") else missing.split("/")[-1]
    with pytest.raises(ModelError, match=name.replace(".", r"\.")):
        tk.StepAudioTokenizer.load(folder, Settings(), PromptCache(tmp_path / "c"))


def test_mismatched_weights_list_keys(tmp_path):
    folder = copy_model(tmp_path)
    sub = folder / FUNASR_SUBDIR
    state = load_torch_file(str(sub / "model.safetensors"))
    state["encoder.extra"] = state.pop("encoder.after_norm.weight")
    torch.save({"state_dict": state}, sub / "model.pt")
    (sub / "model.safetensors").unlink()
    assert set(load_state_dict_file(sub / "model.pt")) == set(state)  # the wrapper is unwrapped
    with pytest.raises(ModelError, match=r"encoder\.after_norm\.weight.*encoder\.extra"):
        tk.StepAudioTokenizer.load(folder, Settings(), PromptCache(tmp_path / "c"))


@pytest.mark.parametrize("name, content", [
    ("config.yaml", b"\xff\xfe not utf-8"),
    ("config.yaml", b"model: X\nencoder_conf: {}\nfrontend_conf: [1]\n"),
    ("configuration.json", b'{"file_path_metas": {"frontend_conf": ["am.mvn"]}}'),
    ("configuration.json", b'{"file_path_metas": {"config": 5}}'),
])
def test_corrupt_config_files_are_model_errors(tmp_path, name, content):
    folder = copy_model(tmp_path)
    (folder / FUNASR_SUBDIR / name).write_bytes(content)
    with pytest.raises(ModelError, match=name):
        tk.StepAudioTokenizer.load(folder, Settings(), PromptCache(tmp_path / "c"))


def test_bad_codebook_shape(tmp_path):
    folder = copy_model(tmp_path)
    np.save(folder / "linguistic_tokenizer.npy", np.zeros((24, 63), np.float32))
    with pytest.raises(ModelError, match=r"\[K <= 1024, 64\]"):
        tk.StepAudioTokenizer.load(folder, Settings(), PromptCache(tmp_path / "c"))
    np.save(folder / "linguistic_tokenizer.npy", np.full((24, 64), np.nan, np.float32))  # every code would be 0
    with pytest.raises(ModelError, match="non-finite"):
        tk.StepAudioTokenizer.load(folder, Settings(), PromptCache(tmp_path / "c"))


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("samples, rate, message", [
    (np.zeros(0, np.float32), 16000, "empty"),
    (np.full(100, np.nan, np.float32), 16000, "NaN"),
    (np.zeros(16000, np.float32), 16000, "silent"),
    (0.5 * np.sin(np.arange(160) * 0.3).astype(np.float32), 16000, "ms of sound"),  # 10 ms
])
def test_bad_clips_raise_input_error(tok, samples, rate, message):
    with pytest.raises(InputError, match=message):
        tok.tokenize(Audio(samples, rate))


def test_non_audio_file_is_rejected(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio")
    with pytest.raises(InputError, match="could not decode"):
        load_audio(path)


def _check_rates(tokens: tk.Tokens, seconds: float) -> None:
    assert abs(len(tokens.vq06) - 25 * seconds) <= 2
    assert abs(len(tokens.vq02) - seconds * 50 / 3) <= 2


def test_stereo_file_is_mixed_to_mono(tok, tmp_path):
    mono = GOLDEN["wav_in"][0]
    sf.write(tmp_path / "stereo.wav", np.stack([mono, np.zeros_like(mono)], axis=1), 22050, subtype="FLOAT")
    audio = load_audio(tmp_path / "stereo.wav")
    assert tok.tokenize(audio).tokens == tok.tokenize(Audio(mono / 2, 22050)).tokens == golden_tokens()


@pytest.mark.parametrize("rate, subtype", [(8000, "PCM_16"), (48000, "PCM_24")])
def test_other_rates_and_depths(tok, tmp_path, rate, subtype):
    path = tmp_path / f"clip_{rate}.wav"
    sf.write(path, resample(GOLDEN["wav_in"][0], 22050, rate), rate, subtype=subtype)
    result = tok.tokenize(load_audio(path))
    _check_rates(result.tokens, len(tok.preprocess(load_audio(path))) / 16000)
    assert result.tokens.n_groups >= GOLDEN_JSON["n_groups"] - 1


def test_clip_over_30_s_uses_several_vq06_chunks(tok):
    wav = np.tile(GOLDEN["wav16k_pre"][0], 8)  # 33.6 s at 16 kHz
    result = tok.tokenize(Audio(wav, 16000))
    pre = tok.preprocess(Audio(wav, 16000))
    assert len(tk.vq06_chunks(pre)) == 2
    _check_rates(result.tokens, len(pre) / 16000)
    assert result.tokens.vq06[:750] == tok.encode_vq06(pre[:tk.VQ06_CHUNK])


# --------------------------------------------------------------------------- concurrency

def test_concurrent_requests_agree(tok):
    clips = [Audio(GOLDEN["wav_in"][0] * scale, 22050) for scale in (0.25, 0.125, 2.0 ** -4)]
    results, errors = [None] * len(clips), []

    def work(i):
        try:
            results[i] = tok.tokenize(clips[i])
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(clips))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert all(not r.hit and r.tokens == golden_tokens() for r in results)
    assert len({r.digest for r in results}) == len(clips)


def test_concurrent_requests_for_one_clip_encode_once(tok, tmp_path, monkeypatch):
    tok = tk.StepAudioTokenizer(tok.paraformer, tok.codebook, tok.vq06_session, tok.onnx_options,
                                PromptCache(tmp_path / "cache"), tok.namespace, tok.device)
    encode_chunk = CallCounter(tok.paraformer.encode)
    monkeypatch.setattr(tok.paraformer, "encode", encode_chunk)
    barrier, results = threading.Barrier(2), []

    def work():
        barrier.wait()
        results.append(tok.tokenize(WAV_IN))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert encode_chunk.calls == 1  # one encoding for both
    assert [r.tokens for r in results] == [golden_tokens()] * 2
    assert sum("vq02_encode" in r.timings.stages_ms for r in results) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_golden_without_tf32(tmp_path):
    try:
        cuda_tok = tk.StepAudioTokenizer.load(TOK_DIR, Settings(tf32=False), PromptCache(tmp_path / "c"), "cuda")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        out = cuda_tok.paraformer.encode(GOLDEN["wav16k_pre"][0])
        assert out.enc_out.device.type == "cuda"
        np.testing.assert_allclose(out.enc_out.cpu().numpy(), GOLDEN["enc_out"][0], atol=1e-4, rtol=1e-4)
        assert cuda_tok.tokenize(WAV_IN).tokens == golden_tokens()
    finally:  # TF32 flags are process-wide: leave them as the other tests expect
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
