"""decoder/model.py: ``AudioDecoder`` loaded from the fixture folder, end to end.

Covers: the mixed-token reshape (exact, all four padding cases), token validation errors, the
bf16 rounding and nearest alignment of the prompt mel (exact against the fixture), the
end-to-end waveform given the captured flow noise and vocoder draws (README atol 1e-4),
determinism per seed, output length, timing stages, that loading and decoding leave torch's
global RNG alone, and that the loader is strict for ``.safetensors`` and ``.pt`` files alike.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from core.audio_io import Audio, load_audio
from decoder.frontend import PromptFeatures
from decoder.model import AudioDecoder, align_prompt_mel, bf16_round, reshape_mixed_tokens
from core.errors import InputError, ModelError
from core.timings import Timer

DECODER = FIXTURES / "decoder"


@pytest.fixture(scope="module")
def golden(decoder_golden):
    return decoder_golden   # shared: tests/conftest.py


@pytest.fixture(scope="module")
def decoder() -> AudioDecoder:
    return AudioDecoder.from_dir(DECODER)


def _inputs(golden):
    return (golden["gen_mixed_tokens"][0].tolist(), golden["prompt_mixed_tokens"][0].tolist(),
            golden["prompt_mel_24k"][0].numpy(), golden["spk_embedding"][0].numpy())


def _random_mixed(groups: int, extra: int, rng: np.random.Generator) -> list[int]:
    out = []
    for _ in range(groups):
        out += list(rng.integers(0, 1024, 2)) + list(rng.integers(1024, 5120, 3))
    tail = list(rng.integers(0, 1024, 2)) + list(rng.integers(1024, 5120, 3))
    return [int(x) for x in out + tail[:extra]]


# --------------------------------------------------------------------------- tokens

@pytest.mark.parametrize("length", [20, 21, 23, 24])
def test_reshape_matches_the_reference_exactly(golden, length):
    mixed = golden[f"reshape_L{length}_in"].tolist()
    before = list(mixed)
    assert torch.equal(reshape_mixed_tokens(mixed), golden[f"reshape_L{length}_out"])
    assert mixed == before  # the reference mutated its input; we do not


def test_fixture_token_frames(golden):
    assert torch.equal(reshape_mixed_tokens(golden["gen_mixed_tokens"][0].tolist()), golden["flow_in_token"][0])
    assert torch.equal(reshape_mixed_tokens(golden["prompt_mixed_tokens"][0].tolist()),
                       golden["flow_in_prompt_token"][0])


def test_validation_names_the_argument(decoder, golden):
    gen, prompt, mel, emb = _inputs(golden)
    with pytest.raises(InputError, match="prompt_tokens is empty"):
        decoder.token2wav(gen, [], PromptFeatures(mel, emb), seed=0)
    with pytest.raises(InputError, match="prompt_mel must have shape"):
        decoder.token2wav(gen, prompt, PromptFeatures(mel[:, :40], emb), seed=0)
    with pytest.raises(InputError, match="speaker_embedding must have 192"):
        decoder.token2wav(gen, prompt, PromptFeatures(mel, emb[:100]), seed=0)
    with pytest.raises(InputError, match="NaN"):
        decoder.token2wav(gen, prompt, PromptFeatures(np.full_like(mel, np.nan), emb), seed=0)
    with pytest.raises(InputError, match="n_steps"):
        decoder.token2wav(gen, prompt, PromptFeatures(mel, emb), seed=0, n_steps=0)


def test_over_600_seconds_is_refused_before_any_work(decoder, golden):
    _, prompt, mel, emb = _inputs(golden)
    # 5000 groups = 15 000 token frames = 30 000 mel frames = 600 s, plus the prompt's 38 groups.
    too_long = [0, 0, 1024, 1024, 1024] * 5000
    with pytest.raises(InputError, match="at most 600 s"):
        decoder.token2wav(too_long, prompt, PromptFeatures(mel, emb), seed=0)


# --------------------------------------------------------------------------- prompt features

def test_prompt_mel_rounding_and_alignment_match_the_reference(golden):
    rounded = bf16_round(golden["prompt_mel_24k"][0])
    assert torch.equal(rounded, golden["prompt_mel_24k_bf16"][0])
    assert torch.equal(bf16_round(golden["spk_embedding"]), golden["spk_embedding_bf16"])
    aligned = align_prompt_mel(rounded, golden["flow_in_prompt_feat"].shape[1])
    assert torch.equal(aligned, golden["flow_in_prompt_feat"])


def test_prompt_features_come_from_the_frontend(decoder, golden):
    """Delegation only: mel parity is tests/test_decoder_frontend.py's job."""
    features = decoder.prompt_features(load_audio(FIXTURES / "prompt_22k.wav"))
    assert features.mel.shape == tuple(golden["prompt_mel_24k"].shape[1:]) and features.mel.dtype == np.float32
    np.testing.assert_allclose(features.embedding, golden["spk_embedding"][0].numpy(), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- end to end

def test_end_to_end_waveform_given_the_captured_draws(decoder, golden):
    gen, prompt, mel, emb = _inputs(golden)
    draws = {"rand_ini": golden["hift_rand_ini"], "sine_noise": golden["hift_sine_noise"],
             "uv_noise": golden["hift_uv_noise"]}
    out = decoder.token2wav(gen, prompt, PromptFeatures(mel, emb), noise=golden["flow_z"], hift_draws=draws)
    assert isinstance(out, Audio) and out.sample_rate == 24000
    wav = out.samples
    assert wav.dtype == np.float32
    np.testing.assert_allclose(wav, golden["e2e_out_wav"][0].numpy(), atol=1e-4, rtol=0)


def test_same_seed_same_audio_other_seed_other_audio(decoder, golden):
    gen, prompt, mel, emb = _inputs(golden)
    first = decoder.token2wav(gen, prompt, PromptFeatures(mel, emb), seed=1234, n_steps=2).samples
    again = decoder.token2wav(gen, prompt, PromptFeatures(mel, emb), seed=1234, n_steps=2).samples
    other = decoder.token2wav(gen, prompt, PromptFeatures(mel, emb), seed=1235, n_steps=2).samples
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_tensor_and_list_inputs_agree(decoder, golden):
    """The engine may pass the tokenizer's [1, L] tensors and PromptFeatures' numpy arrays."""
    gen, prompt, mel, emb = _inputs(golden)
    a = decoder.token2wav(gen, prompt, PromptFeatures(mel, emb), seed=4, n_steps=1).samples
    features = PromptFeatures(golden["prompt_mel_24k"], golden["spk_embedding"])
    b = decoder.token2wav(golden["gen_mixed_tokens"], golden["prompt_mixed_tokens"], features, seed=4,
                          n_steps=1).samples
    assert np.array_equal(a, b)


def test_concurrent_calls_give_the_sequential_results(decoder, golden, concurrently):
    gen, prompt, mel, emb = _inputs(golden)

    def run(seed):
        return decoder.token2wav(gen, prompt, PromptFeatures(mel, emb), seed=seed, n_steps=1).samples

    expected = [run(seed) for seed in (11, 12, 13)]
    got = concurrently(run, [(11,), (12,), (13,)])
    assert all(np.array_equal(e, g) for e, g in zip(expected, got))


def test_global_rng_is_left_alone(golden):
    state = torch.get_rng_state()
    fresh = AudioDecoder.from_dir(DECODER, n_steps=1)
    gen, prompt, mel, emb = _inputs(golden)
    fresh.token2wav(gen, prompt, PromptFeatures(mel, emb), seed=3)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("groups, extra", [(1, 0), (1, 2), (7, 4), (20, 1)])
def test_output_length_is_480_samples_per_mel_frame(decoder, golden, groups, extra):
    _, prompt, mel, emb = _inputs(golden)
    tokens = _random_mixed(groups, extra, np.random.default_rng(groups))
    frames_25hz = 3 * (groups + (extra > 0))
    timer = Timer()
    wav = decoder.token2wav(tokens, prompt, PromptFeatures(mel, emb), seed=0, n_steps=1, timer=timer).samples
    assert wav.shape == (2 * frames_25hz * 480,)
    assert np.abs(wav).max() <= 0.99 and np.isfinite(wav).all()
    assert set(timer.finish().stages_ms) == {"decoder_encoder", "decoder_flow", "decoder_vocoder"}


# --------------------------------------------------------------------------- loading

def _copy_folder(tmp_path):
    folder = tmp_path / "CosyVoice-300M-25Hz"
    folder.mkdir()
    for name in ("cosyvoice.yaml", "hift.safetensors", "campplus.onnx"):
        shutil.copy(DECODER / name, folder / name)
    return folder


def test_real_layout_with_pt_checkpoints_loads_the_same_weights(tmp_path, decoder, golden):
    folder = _copy_folder(tmp_path)
    torch.save(load_file(str(DECODER / "flow.safetensors")), folder / "flow.pt")
    torch.save(load_file(str(DECODER / "hift.safetensors")), folder / "hift.pt")
    (folder / "hift.safetensors").unlink()
    from_pt = AudioDecoder.from_dir(folder)
    for (name, a), (_, b) in zip(from_pt.flow.state_dict().items(), decoder.flow.state_dict().items()):
        assert torch.equal(a, b), name
    gen, prompt, mel, emb = _inputs(golden)
    a = from_pt.token2wav(gen, prompt, PromptFeatures(mel, emb), seed=9, n_steps=1).samples
    b = decoder.token2wav(gen, prompt, PromptFeatures(mel, emb), seed=9, n_steps=1).samples
    assert np.array_equal(a, b)


def test_flow_checkpoint_with_wrong_keys_is_refused_listing_them(tmp_path):
    folder = _copy_folder(tmp_path)
    state = load_file(str(DECODER / "flow.safetensors"))
    state.pop("decoder.estimator.in_proj.weight")
    state["decoder.estimator.surprise"] = torch.zeros(2)
    torch.save(state, folder / "flow.pt")
    with pytest.raises(ModelError) as info:
        AudioDecoder.from_dir(folder)
    assert "decoder.estimator.in_proj.weight" in str(info.value)
    assert "decoder.estimator.surprise" in str(info.value)


def test_missing_files_are_model_errors(tmp_path):
    folder = _copy_folder(tmp_path)
    with pytest.raises(ModelError, match="neither flow.safetensors nor flow.pt"):
        AudioDecoder.from_dir(folder)
    with pytest.raises(ModelError, match="no cosyvoice.yaml"):
        AudioDecoder.from_dir(tmp_path)


def test_a_flow_checkpoint_that_needs_code_is_refused(tmp_path):
    folder = _copy_folder(tmp_path)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"x": Payload()}, folder / "flow.pt")
    with pytest.raises(ModelError, match="flow.pt"):
        AudioDecoder.from_dir(folder)


# --------------------------------------------------------------------------- GPU (skipped without CUDA)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@needs_cuda
def test_cuda_float32_reproduces_the_reference(golden, no_tf32):
    gpu = AudioDecoder.from_dir(DECODER, device="cuda")
    gen, prompt, mel, emb = _inputs(golden)
    draws = {"rand_ini": golden["hift_rand_ini"], "sine_noise": golden["hift_sine_noise"],
             "uv_noise": golden["hift_uv_noise"]}
    wav = gpu.token2wav(gen, prompt, PromptFeatures(mel, emb), noise=golden["flow_z"], hift_draws=draws).samples
    np.testing.assert_allclose(wav, golden["e2e_out_wav"][0].numpy(), atol=1e-4, rtol=0)
    first = gpu.token2wav(gen, prompt, PromptFeatures(mel, emb), seed=77, n_steps=2).samples
    again = gpu.token2wav(gen, prompt, PromptFeatures(mel, emb), seed=77, n_steps=2).samples
    assert np.array_equal(first, again)


@pytest.mark.gpu
@needs_cuda
def test_cuda_bfloat16_flow_stays_near_the_reference(golden):
    """bf16 flow (vocoder float32). bf16 keeps 8 mantissa bits (0.4 % relative); on an H100 the
    mel's error was max 0.014, mean 0.0026 (2026-11-25); the bounds leave a 4-7x margin."""
    gpu = AudioDecoder.from_dir(DECODER, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        mel = gpu.flow.inference(golden["flow_in_token"].cuda(), golden["flow_in_prompt_token"].cuda(),
                                 golden["flow_in_prompt_feat"].cuda().bfloat16(),
                                 golden["flow_in_embedding"].cuda().bfloat16(), golden["flow_z"].cuda(), n_steps=10)
    err = (mel.float().cpu() - golden["flow_out_mel"]).abs()
    print(f"bf16 flow mel: max |err| {err.max():.4f}, mean |err| {err.mean():.5f}")
    assert mel.dtype == torch.float32 and torch.isfinite(mel).all()
    assert err.mean() < 0.01 and err.max() < 0.1
