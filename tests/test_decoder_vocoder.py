"""HiFT vocoder (decoder/vocoder.py, decoder/source.py) and the shared checkpoint
rules it loads with (core/checkpoint.py).

Parity with the reference's golden run (tests/fixtures/decoder, golden README §4.2 d): the F0,
the source and the waveform given the captured random draws; a generator seeded like the
reference's global RNG reproduces those draws; strict loading in every weight-norm key style and
from .pt/.safetensors; config from the yaml; input validation.
"""

import pickle

import numpy as np
import pytest
import torch
import yaml

from conftest import FIXTURES
from core.checkpoint import load_state_dict_file
from decoder.vocoder import F0PredictorConfig, HiFTConfig, HiFTGenerator, load_hift_state_dict
from core.errors import InputError, ModelError

DECODER = FIXTURES / "decoder"


class _TagLoader(yaml.SafeLoader):
    """Reads hyperpyyaml's ``!new:`` nodes as plain mappings of their kwargs (no code runs)."""


_TagLoader.add_multi_constructor("!new:", lambda loader, suffix, node: loader.construct_mapping(node, deep=True))


@pytest.fixture(scope="module")
def golden(decoder_golden):
    return decoder_golden   # shared: tests/conftest.py


@pytest.fixture(scope="module")
def yaml_hift():
    return yaml.load((DECODER / "cosyvoice.yaml").read_text(), Loader=_TagLoader)["hift"]


@pytest.fixture(scope="module")
def fixture_state():
    return load_state_dict_file(DECODER / "hift.safetensors")


@pytest.fixture(scope="module")
def hift(yaml_hift, fixture_state):
    model = HiFTGenerator(HiFTConfig.from_yaml_kwargs(yaml_hift)).eval()
    load_hift_state_dict(model, fixture_state)
    return model


def _vocode_with_golden_draws(model, golden):
    return model.inference(golden["hift_in_mel"], rand_ini=golden["hift_rand_ini"],
                           sine_noise=golden["hift_sine_noise"], uv_noise=golden["hift_uv_noise"])


def test_yaml_config_is_the_tiny_fixture_layout_with_shipped_rates(yaml_hift):
    cfg = HiFTConfig.from_yaml_kwargs(yaml_hift)
    assert cfg == HiFTConfig(base_channels=32, f0_predictor=F0PredictorConfig(cond_channels=32))
    assert cfg.upsample_scale == 480


def test_yaml_config_missing_keys_take_the_reference_constructor_defaults(yaml_hift):
    cfg = HiFTConfig.from_yaml_kwargs({"f0_predictor": yaml_hift["f0_predictor"]})
    assert cfg.sampling_rate == 22050 and cfg.upsample_rates == (8, 8)
    assert cfg.source_resblock_kernel_sizes == (7, 11)


@pytest.mark.parametrize("change, words", [
    ({"unknown_arg": 1}, "unknown_arg"),
    ({"istft_params": {"n_fft": 16}}, "istft_params"),
    ({"f0_predictor": None}, "f0_predictor"),
    ({"upsample_rates": "eight"}, "malformed"),
])
def test_yaml_config_errors_are_model_errors(yaml_hift, change, words):
    with pytest.raises(ModelError, match=words):
        HiFTConfig.from_yaml_kwargs({**yaml_hift, **change})


def test_shipped_size_has_the_reference_parameter_and_key_counts():
    # pipeline.md §3.1 [ran]: 20 821 295 parameters, 328 state-dict keys (weight-norm g/v pairs).
    model = HiFTGenerator(HiFTConfig())
    assert sum(p.numel() for p in model.parameters()) == 20_821_295
    assert len(model.state_dict()) == 328


def test_state_dict_keys_equal_the_checkpoints(hift, fixture_state):
    assert set(hift.state_dict()) == set(fixture_state)


def test_f0_matches_reference(hift, golden):
    np.testing.assert_allclose(hift.f0(golden["hift_in_mel"]).numpy(), golden["hift_f0"].numpy(), rtol=1e-4, atol=0)


def test_source_and_waveform_match_reference_given_its_draws(hift, golden):
    wav, source = _vocode_with_golden_draws(hift, golden)
    assert wav.shape == (1, 66 * 480) and wav.dtype == torch.float32
    assert source.shape == (1, 1, 66 * 480)
    np.testing.assert_allclose(source.numpy(), golden["hift_source"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(wav.numpy(), golden["hift_out_wav"].numpy(), atol=1e-4, rtol=0)
    assert wav.abs().max() <= 0.99


def test_generator_seeded_like_the_reference_rng_reproduces_its_draws(hift, golden):
    # The reference call was preceded by torch.manual_seed(99); CPU generators share the algorithm.
    wav, source = hift.inference(golden["hift_in_mel"], generator=torch.Generator().manual_seed(99))
    np.testing.assert_allclose(source.numpy(), golden["hift_source"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(wav.numpy(), golden["hift_out_wav"].numpy(), atol=1e-4, rtol=0)


def test_same_seed_same_audio_other_seed_other_audio(hift, golden):
    mel = golden["hift_in_mel"][:, :, :10]
    first, _ = hift.inference(mel, generator=torch.Generator().manual_seed(5))
    again, _ = hift.inference(mel, generator=torch.Generator().manual_seed(5))
    other, _ = hift.inference(mel, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3


def test_one_frame_gives_480_samples(hift, golden):
    wav, source = hift.inference(golden["hift_in_mel"][:, :, :1], generator=torch.Generator().manual_seed(0))
    assert wav.shape == (1, 480) and source.shape == (1, 1, 480)
    assert torch.isfinite(wav).all()


def _old_style(state):
    renamed = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        renamed[key.replace(".parametrizations.weight.original1", ".weight_v")] = value
    return renamed


def _folded(state):
    folded = {}
    for key, value in state.items():
        if key.endswith(".parametrizations.weight.original1"):
            stem = key[: -len(".parametrizations.weight.original1")]
            g = state[stem + ".parametrizations.weight.original0"].double()
            v = value.double()
            norm = v.pow(2).sum(dim=tuple(range(1, v.dim())), keepdim=True).sqrt()
            folded[stem + ".weight"] = (g * v / norm).float()
        elif not key.endswith(".parametrizations.weight.original0"):
            folded[key] = value
    return folded


@pytest.mark.parametrize("convert", [_old_style, _folded], ids=["weight_g_v", "folded_weight"])
def test_loader_accepts_other_weight_norm_key_styles(yaml_hift, fixture_state, golden, convert):
    converted = convert(fixture_state)
    assert not any("parametrizations" in k for k in converted)
    model = HiFTGenerator(HiFTConfig.from_yaml_kwargs(yaml_hift)).eval()
    load_hift_state_dict(model, converted)
    wav, _ = _vocode_with_golden_draws(model, golden)
    np.testing.assert_allclose(wav.numpy(), golden["hift_out_wav"].numpy(), atol=1e-4, rtol=0)


def test_pt_checkpoint_loads_like_safetensors(tmp_path, fixture_state):
    path = tmp_path / "hift.pt"
    torch.save(_old_style(fixture_state), path)
    loaded = load_state_dict_file(path)
    assert set(loaded) == set(_old_style(fixture_state))
    assert all(torch.equal(loaded[k], v) for k, v in _old_style(fixture_state).items())


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pt_checkpoint_needing_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"w": _Payload()}, handle, protocol=2)
    with pytest.raises(ModelError, match="refused"):
        load_state_dict_file(path)


@pytest.mark.parametrize("name, data, words", [
    ("missing.safetensors", None, "not found"),
    ("weights.npz", b"x", "unknown checkpoint format"),
    ("broken.safetensors", b"not a safetensors file", "could not read"),
])
def test_unreadable_checkpoint_files_are_model_errors(tmp_path, name, data, words):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(ModelError, match=words):
        load_state_dict_file(path)


def test_strict_load_lists_missing_and_unexpected_keys(yaml_hift, fixture_state):
    model = HiFTGenerator(HiFTConfig.from_yaml_kwargs(yaml_hift))
    state = dict(fixture_state)
    del state["conv_pre.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelError, match=r"missing keys: conv_pre\.bias.*unexpected keys: extra\.weight"):
        load_hift_state_dict(model, state)


def test_strict_load_rejects_wrong_shapes_before_touching_the_model(fixture_state):
    model = HiFTGenerator(HiFTConfig(base_channels=64, f0_predictor=F0PredictorConfig(cond_channels=32)))
    before = model.conv_pre.bias.clone()
    with pytest.raises(ModelError, match="wrong shape"):
        load_hift_state_dict(model, fixture_state)
    assert torch.equal(model.conv_pre.bias, before)


@pytest.mark.parametrize("mel, words", [
    (torch.zeros(1, 80, 0), "no frames"),
    (torch.zeros(1, 40, 5), r"\[B, 80, T\]"),
    (torch.zeros(80, 5), r"\[B, 80, T\]"),
    (torch.full((1, 80, 5), float("nan")), "NaN"),
])
def test_bad_mel_is_an_input_error(hift, mel, words):
    with pytest.raises(InputError, match=words):
        hift.inference(mel)


def test_injected_draw_of_wrong_shape_is_an_input_error(hift, golden):
    with pytest.raises(InputError, match="sine_noise"):
        hift.inference(golden["hift_in_mel"], sine_noise=torch.zeros(1, 480, 9))


def test_folding_weight_norm_keeps_the_output(yaml_hift, fixture_state, golden):
    model = HiFTGenerator(HiFTConfig.from_yaml_kwargs(yaml_hift)).eval()
    load_hift_state_dict(model, fixture_state)
    model.fold_weight_norm()
    assert not any("parametrizations" in k for k in model.state_dict())
    wav, _ = _vocode_with_golden_draws(model, golden)
    np.testing.assert_allclose(wav.numpy(), golden["hift_out_wav"].numpy(), atol=1e-4, rtol=0)


def test_generator_on_another_device_type_is_an_input_error(yaml_hift, golden):
    # A module on the meta device stands in for a GPU one: the CPU generator must be refused up front.
    model = HiFTGenerator(HiFTConfig.from_yaml_kwargs(yaml_hift)).to("meta")
    with pytest.raises(InputError, match="generator"):
        model.inference(golden["hift_in_mel"], generator=torch.Generator())
