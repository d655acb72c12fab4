"""Tests of tokenizer/step_audio.py and tokenizer/paraformer_stream.py: the Step-Audio tokenizer.

Covers golden parity of every stage (tests/fixtures/tokenizer, README §5/§6 tolerances), that the
tokenizer is pure (every call runs the models; caching is tts_engine/prompt_bundle.py's, tested in
tests/test_prompt_fetch.py), loading from model.safetensors and model.pt with the shared checkpoint
rules, missing/mismatched files, the ONNX session options actually used, bad input, and
concurrent requests.
"""

import logging
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import torch
from conftest import FIXTURES, ROOT, TOK_DIR, golden_tokens, load_tokenizer_golden, load_tokenizer_golden_json
from safetensors.torch import load_file as load_torch_file

from core.audio_io import Audio, load_audio, resample
from core.checkpoint import load_state_dict_file
from core.devices import configure_tf32
from core.errors import InputError, ModelError
from core.onnx_session import OnnxOptions
from core.settings import FUNASR_SUBDIR, Settings
from core.timings import Timer
from tokenizer import step_audio as tk

FUNASR_DIR = TOK_DIR / FUNASR_SUBDIR
GOLDEN, GOLDEN_JSON = load_tokenizer_golden(), load_tokenizer_golden_json()
WAV_IN = Audio(GOLDEN["wav_in"][0], 22050)


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
def tok(fixture_tokenizer):
    return fixture_tokenizer


def copy_model(tmp_path):
    target = tmp_path / "Step-Audio-Tokenizer"
    shutil.copytree(TOK_DIR, target)
    return target


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


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
    streaming = tk.StepAudioTokenizer.load(TOK_DIR, device="cpu", vq02_encoder="streaming")
    assert streaming.paraformer.encoder_mode == "streaming"
    encode_chunk = CallCounter(streaming.paraformer.model.encode_chunk)
    monkeypatch.setattr(streaming.paraformer.model, "encode_chunk", encode_chunk)
    assert streaming.tokenize(WAV_IN) == golden_tokens()
    assert encode_chunk.calls == len(GOLDEN["encoder_chunk_lengths"])


def test_kmeans_assignment_matches_golden(tok):
    np.testing.assert_array_equal(tok.codebook.numpy(), GOLDEN["kms"])
    codes = tk.kmeans_assign(torch.from_numpy(GOLDEN["enc_out"][0]), torch.from_numpy(GOLDEN["kms"]))
    np.testing.assert_array_equal(codes, GOLDEN["vq02"])


def test_tokenize_reproduces_golden_tokens(tok):
    tokens = tok.tokenize(WAV_IN)
    assert tokens == golden_tokens()
    assert tokens.llm_ids == tuple(GOLDEN["llm_ids"].tolist()) == tuple(GOLDEN_JSON["llm_ids"])
    assert tokens.audio_string == GOLDEN_JSON["prompt_string"]
    assert tokens.n_groups == GOLDEN_JSON["n_groups"]
    assert tokens.mixed == tuple(i - 65536 for i in GOLDEN_JSON["llm_ids"])


def test_unlimited_clip_gives_the_same_tokens(tok):
    """The 0.6 peak limiter upstream applies first does not change tokens (golden wav_in is limited)."""
    raw = load_audio(FIXTURES / "prompt_22k.wav")
    assert np.abs(raw.samples).max() > 0.7
    assert tok.tokenize(raw) == golden_tokens()


# --------------------------------------------------------------------------- purity

def test_every_call_runs_the_models_and_records_its_stages(tok, monkeypatch, caplog):
    """No cache inside: the same clip twice encodes twice (calls counted on the real models)."""
    encode = CallCounter(tok.paraformer.encode)   # one call per clip, whichever encoder path
    onnx_run = CallCounter(tok.vq06_session.run)
    monkeypatch.setattr(tok.paraformer, "encode", encode)
    monkeypatch.setattr(tok.vq06_session, "run", onnx_run)
    timer = Timer()
    with caplog.at_level(logging.DEBUG, logger="tokenizer.step_audio"):
        first = tok.tokenize(WAV_IN, timer)
        second = tok.tokenize(WAV_IN)
    assert first == second == golden_tokens()
    assert (encode.calls, onnx_run.calls) == (2, 2)
    assert set(timer.finish().stages_ms) == {"tokenize_preprocess", "tokenize_vq02", "tokenize_vq06",
                                             "tokenize_merge"}
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


# --------------------------------------------------------------------------- faults

@pytest.mark.parametrize("target", ["vq06", "vq02", "vq02-streaming"])
def test_a_failing_model_is_a_model_error(tok, tmp_path, monkeypatch, target):
    def explode(*args, **kwargs):   # fault injection, like an out-of-memory error on the device
        raise RuntimeError("out of memory")

    if target == "vq02-streaming":
        monkeypatch.setattr(tok.paraformer, "encoder_mode", "streaming")
    owner = {"vq06": tok.vq06_session, "vq02": tok.paraformer.model.encoder.encoders[1].feed_forward,
             "vq02-streaming": tok.paraformer.model}[target]
    monkeypatch.setattr(owner, {"vq06": "run", "vq02": "forward"}.get(target, "encode_chunk"), explode)
    with pytest.raises(ModelError, match="failed on .*out of memory"):
        tok.tokenize(WAV_IN)


# --------------------------------------------------------------------------- loading

def test_model_files_are_every_file_that_shapes_the_tokens(tok):
    files = [TOK_DIR / "linguistic_tokenizer.npy", TOK_DIR / "speech_tokenizer_v1.onnx",
             *(FUNASR_DIR / n for n in ("config.yaml", "model.safetensors", "am.mvn", "tokens.json"))]
    assert sorted(tok.model_files) == sorted(files) and tok.folder == TOK_DIR


def test_loads_model_pt_with_parallel_onnx_and_leaves_rngs_alone(tok, tmp_path):
    folder = copy_model(tmp_path)
    sub = folder / FUNASR_SUBDIR
    torch.save(load_torch_file(str(sub / "model.safetensors")), sub / "model.pt")
    (sub / "model.safetensors").unlink()
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    options = OnnxOptions(intra_op_threads=1, inter_op_threads=2, execution_mode="parallel")
    other = tk.StepAudioTokenizer.load(folder, options, "cpu")
    # loading (funasr reseeds and initialises weights) must leave the caller's RNGs alone
    assert torch.equal(torch.get_rng_state(), rng[0]) and (np.random.get_state()[1] == rng[1]).all()
    assert random.getstate() == rng[2]
    assert other.paraformer.files.weights.name == "model.pt" and other.paraformer.files.weights in other.model_files
    options = other.vq06_session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 2)
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert other.tokenize(WAV_IN) == golden_tokens()


def test_default_session_options(tok):
    options = tok.vq06_session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == OnnxOptions().intra_op_threads
    assert tok.vq06_session.get_providers() == ["CPUExecutionProvider"]
    assert tok.paraformer.frontend.dither == 0.0
    assert tok.paraformer.model.decoder is None  # only the encoder is kept


def test_safetensors_is_preferred_over_model_pt(tmp_path):
    folder = copy_model(tmp_path)
    sub = folder / FUNASR_SUBDIR
    (sub / "model.pt").write_bytes(b"not even a pickle")   # never opened while model.safetensors exists
    assert tk.StepAudioTokenizer.load(folder).paraformer.files.weights.name == "model.safetensors"


@pytest.mark.slow
def test_import_and_load_leave_the_process_alone():
    """Importing tokenizer does not import funasr; loading leaves logging and stdout untouched."""
    code = (
        "import logging, sys, torch\nfrom tokenizer import step_audio as tokenizer\n"
        "assert 'funasr' not in sys.modules\n"
        f"tokenizer.StepAudioTokenizer.load(__import__('pathlib').Path({str(TOK_DIR)!r}))\n"
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
    name = "model.safetensors nor model.pt" if missing.endswith("safetensors") else missing.split("/")[-1]
    with pytest.raises(ModelError, match=name.replace(".", r"\.")):
        tk.StepAudioTokenizer.load(folder)


def test_mismatched_weights_list_keys(tmp_path):
    folder = copy_model(tmp_path)
    sub = folder / FUNASR_SUBDIR
    state = load_torch_file(str(sub / "model.safetensors"))
    state["encoder.extra"] = state.pop("encoder.after_norm.weight")
    torch.save({"state_dict": state}, sub / "model.pt")
    (sub / "model.safetensors").unlink()
    assert set(load_state_dict_file(sub / "model.pt")) == set(state)  # the wrapper is unwrapped
    with pytest.raises(ModelError, match=r"model\.pt.*missing keys: encoder\.after_norm\.weight.*"
                                         r"unexpected keys: encoder\.extra"):
        tk.StepAudioTokenizer.load(folder)


def test_weights_needing_code_are_refused_naming_the_file(tmp_path):
    """The shared checkpoint rules: torch.load(weights_only=True), so a pickle that runs code is refused."""
    folder = copy_model(tmp_path)
    sub = folder / FUNASR_SUBDIR
    (sub / "model.safetensors").unlink()
    with open(sub / "model.pt", "wb") as handle:
        pickle.dump({"encoder.w": _RunsCode()}, handle, protocol=2)
    with pytest.raises(ModelError, match=r"model\.pt .*refused"):
        tk.StepAudioTokenizer.load(folder)


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
        tk.StepAudioTokenizer.load(folder)


def test_bad_codebook_shape(tmp_path):
    folder = copy_model(tmp_path)
    np.save(folder / "linguistic_tokenizer.npy", np.zeros((24, 63), np.float32))
    with pytest.raises(ModelError, match=r"\[K <= 1024, 64\]"):
        tk.StepAudioTokenizer.load(folder)
    np.save(folder / "linguistic_tokenizer.npy", np.full((24, 64), np.nan, np.float32))  # every code would be 0
    with pytest.raises(ModelError, match="non-finite"):
        tk.StepAudioTokenizer.load(folder)


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
    assert tok.tokenize(audio) == tok.tokenize(Audio(mono / 2, 22050)) == golden_tokens()


@pytest.mark.parametrize("rate, subtype", [(8000, "PCM_16"), (48000, "PCM_24")])
def test_other_rates_and_depths(tok, tmp_path, rate, subtype):
    path = tmp_path / f"clip_{rate}.wav"
    sf.write(path, resample(GOLDEN["wav_in"][0], 22050, rate), rate, subtype=subtype)
    tokens = tok.tokenize(load_audio(path))
    _check_rates(tokens, len(tok.preprocess(load_audio(path))) / 16000)
    assert tokens.n_groups >= GOLDEN_JSON["n_groups"] - 1


def test_clip_over_30_s_uses_several_vq06_chunks(tok):
    wav = np.tile(GOLDEN["wav16k_pre"][0], 8)  # 33.6 s at 16 kHz
    tokens = tok.tokenize(Audio(wav, 16000))
    pre = tok.preprocess(Audio(wav, 16000))
    assert len(tk.vq06_chunks(pre)) == 2
    _check_rates(tokens, len(pre) / 16000)
    assert tokens.vq06[:750] == tok.encode_vq06(pre[:tk.VQ06_CHUNK])


# --------------------------------------------------------------------------- concurrency

def test_concurrent_requests_agree(tok, concurrently):
    clips = [Audio(GOLDEN["wav_in"][0] * scale, 22050) for scale in (0.25, 0.125, 2.0 ** -4)]
    results = concurrently(tok.tokenize, [(clip,) for clip in clips])
    assert results == [golden_tokens()] * len(clips)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_golden_without_tf32(tmp_path):
    try:
        configure_tf32(False)
        cuda_tok = tk.StepAudioTokenizer.load(TOK_DIR, OnnxOptions(use_cuda=True), "cuda")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        out = cuda_tok.paraformer.encode(GOLDEN["wav16k_pre"][0])
        assert out.enc_out.device.type == "cuda"
        np.testing.assert_allclose(out.enc_out.cpu().numpy(), GOLDEN["enc_out"][0], atol=1e-4, rtol=1e-4)
        assert cuda_tok.tokenize(WAV_IN) == golden_tokens()
    finally:  # TF32 flags are process-wide: leave them as the other tests expect
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
