"""decoder/config.py, encoder.py, estimator.py, flow.py: the yaml read as data, and the flow decoder.

Covers: parsing the fixture's tiny ``cosyvoice.yaml`` and a shipped-size one written from
pipeline.md §3.1 (parameter and key counts of the real checkpoints), refusing unknown classes
without executing anything, ``!ref`` resolution, and every flow tensor of
``golden_decoder.safetensors`` (speaker projection, token embedding, encoder, mu, first DiT call,
t-schedule, final mel) within the README's tolerances, with the fixture weights strict-loaded.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES
from decoder import encoder as encoder_module
from core.checkpoint import load_state_dict_file, load_strict
from decoder.config import load_decoder_config, parse_decoder_config
from decoder.flow import FlowDecoder, cosine_t_span
from core.errors import ModelError

DECODER = FIXTURES / "decoder"

# Shipped-size yaml (pipeline.md §3.1), kept as a data file that bench/decoder_bench.py reads too.
SHIPPED_YAML = (DECODER / "cosyvoice_shipped.yaml").read_text()


@pytest.fixture(scope="module")
def golden(decoder_golden):
    return decoder_golden   # shared: tests/conftest.py


@pytest.fixture(scope="module")
def flow() -> FlowDecoder:
    cfg = load_decoder_config(DECODER / "cosyvoice.yaml")
    model = FlowDecoder(cfg.flow).eval()
    load_strict(model, load_state_dict_file(DECODER / "flow.safetensors"), "flow")
    return model


# --------------------------------------------------------------------------- config

def test_fixture_yaml_gives_the_tiny_dimensions():
    cfg = load_decoder_config(DECODER / "cosyvoice.yaml")
    enc, est = cfg.flow.encoder, cfg.flow.estimator
    assert (cfg.flow.input_size, cfg.flow.vocab_size, cfg.flow.embedding_size) == (64, 5121, 64)
    assert (enc.output_size, enc.attention_heads, enc.num_blocks, enc.num_up_blocks, enc.linear_units) == (64, 2, 2, 2, 128)
    assert (est.in_channels, est.depth, est.num_heads, est.head_dim, est.hidden_size) == (320, 2, 2, 32, 64)
    assert cfg.flow.inference_cfg_rate == 0.7
    assert (cfg.mel.n_fft, cfg.mel.hop_size, cfg.mel.sampling_rate, cfg.mel.fmax) == (1920, 480, 24000, 8000)
    assert cfg.hift.base_channels == 32 and cfg.hift.upsample_rates == (8, 5, 3)
    assert cfg.hift.f0_predictor.cond_channels == 32


def test_shipped_yaml_describes_the_real_checkpoint_sizes():
    """Counts from pipeline.md §3.4 (measured on the reference): flow 605 keys / 153 754 096
    parameters, HiFT 328 keys / 20 821 295 parameters. Built on the meta device (no memory)."""
    from decoder.vocoder import HiFTGenerator

    cfg = parse_decoder_config(SHIPPED_YAML)
    assert cfg.flow.encoder.attention_heads == 8 and cfg.flow.estimator.depth == 16
    with torch.device("meta"):
        flow = FlowDecoder(cfg.flow)
        hift = HiFTGenerator(cfg.hift)
    assert len(flow.state_dict()) == 605
    assert sum(p.numel() for p in flow.parameters()) == 153_754_096
    assert sum(p.numel() for p in flow.encoder.parameters()) == 37_831_168
    assert sum(p.numel() for p in flow.decoder.estimator.parameters()) == 114_555_472
    assert len(hift.state_dict()) == 328
    assert sum(p.numel() for p in hift.parameters()) == 20_821_295


def _yaml_with(flow_line: str = "", extra: str = "") -> str:
    text = SHIPPED_YAML
    if flow_line:
        text = text.replace("flow: !new:stepvocoder.cosyvoice2.flow.flow.CausalMaskedDiffWithXvec", flow_line)
    return text + extra


def test_unknown_class_is_refused_by_name_and_never_imported(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ModelError, match=r"unknown class 'os\.system' at flow"):
        parse_decoder_config(_yaml_with("flow: !new:os.system"))
    # An '!apply:' that would run code if this were hyperpyyaml: it stays data.
    text = SHIPPED_YAML.replace("            depth: 16", f"            depth: !apply:os.system ['touch {marker}']")
    with pytest.raises(ModelError, match="estimator"):
        parse_decoder_config(text)
    assert not marker.exists()


def test_unrelated_top_level_entries_are_ignored_unevaluated():
    cfg = parse_decoder_config(SHIPPED_YAML + "\nllm: !new:some.evil.Module\n    x: 1\n"
                               "feat_extractor: !name:matcha.utils.audio.mel_spectrogram\n")
    assert cfg.flow.estimator.hidden_size == 512


def test_refs_and_arithmetic_are_resolved():
    text = "width: 256\nheads: 4\n" + SHIPPED_YAML.replace(
        "            hidden_size: 512", "            hidden_size: !ref <width> * 2").replace(
        "        attention_heads: 8", "        attention_heads: !ref <heads> + <heads>")
    cfg = parse_decoder_config(text)
    assert cfg.flow.estimator.hidden_size == 512
    assert cfg.flow.encoder.attention_heads == 8
    with pytest.raises(ModelError, match="points at nothing"):
        parse_decoder_config(SHIPPED_YAML.replace("            depth: 16", "            depth: !ref <nope>"))


@pytest.mark.parametrize("change, message", [
    (("        normalize_before: True", "        normalize_before: True\n        activation_type: 'relu'"),
     "activation_type='relu' is not supported"),
    (("            depth: 16", "            depth: 16\n            magic: 1"), "unsupported arguments: magic"),
    (("            in_channels: 320", "            in_channels: 240"), "estimator in/out channels"),
    (("        input_size: 512\n        output_size: 512", "        input_size: 256\n        output_size: 512"),
     "input_size 256 must equal output_size"),
])
def test_unsupported_values_are_model_errors(change, message):
    old, new = change
    assert old in SHIPPED_YAML
    with pytest.raises(ModelError, match=message):
        parse_decoder_config(SHIPPED_YAML.replace(old, new))


def test_malformed_or_incomplete_yaml_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not valid YAML"):
        parse_decoder_config("flow: [unclosed")
    with pytest.raises(ModelError, match="no hift"):
        parse_decoder_config(SHIPPED_YAML.split("hift:")[0])
    with pytest.raises(ModelError, match="cannot read"):
        load_decoder_config(tmp_path / "missing.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"mel_conf: \xff\xfe\x00 not utf-8")
    with pytest.raises(ModelError, match="cannot read"):
        load_decoder_config(tmp_path / "binary.yaml")


@pytest.mark.parametrize("expression", ["10.0 ** 400", "10 ** 10 ** 10", "1" + "+1" * 3000])
def test_runaway_ref_arithmetic_is_a_model_error(expression):
    with pytest.raises(ModelError, match="depth"):
        parse_decoder_config(SHIPPED_YAML.replace("            depth: 16", f"            depth: !ref {expression}"))


# --------------------------------------------------------------------------- flow parity

def test_fixture_weights_load_strictly(flow):
    assert len(flow.state_dict()) == 155


def test_speaker_projection(flow, golden):
    with torch.inference_mode():
        got = flow.project_speaker(golden["flow_in_embedding"])
    torch.testing.assert_close(got, golden["flow_spk_proj"], atol=1e-4, rtol=0)


def test_token_embedding_encoder_and_mu(flow, golden):
    tokens = torch.cat([golden["flow_in_prompt_token"], golden["flow_in_token"]], dim=1)
    with torch.inference_mode():
        emb = flow.input_embedding(tokens)
        enc = flow.encoder(emb)
        mu = flow.encoder_proj(enc)
    torch.testing.assert_close(emb, golden["flow_token_emb"], atol=1e-4, rtol=0)
    torch.testing.assert_close(enc, golden["flow_encoder_out"], atol=1e-4, rtol=0)
    # The reference's mask is all-true in the non-streaming batch-1 path, which is why we have none.
    assert golden["flow_encoder_out_mask"].all() and golden["flow_encoder_out_mask"].shape[-1] == enc.shape[1]
    torch.testing.assert_close(mu, golden["flow_mu"], atol=1e-4, rtol=0)


def test_blocked_relative_attention_matches_one_block(flow, golden, monkeypatch):
    """Query blocks of 7 rows (294 = 42 blocks) must give the one-block result: the strided
    relative-position window is exact, not an approximation."""
    monkeypatch.setattr(encoder_module, "ATTENTION_BLOCK_ROWS", 7)
    tokens = torch.cat([golden["flow_in_prompt_token"], golden["flow_in_token"]], dim=1)
    with torch.inference_mode():
        enc = flow.encoder(flow.input_embedding(tokens))
    torch.testing.assert_close(enc, golden["flow_encoder_out"], atol=1e-4, rtol=0)


def test_first_estimator_call(flow, golden):
    assert golden["flow_est1_in_mask"].all()  # full attention; the estimator takes no mask
    with torch.inference_mode():
        got = flow.decoder.estimator(golden["flow_est1_in_x"], golden["flow_est1_in_mu"], golden["flow_est1_in_t"],
                                     golden["flow_est1_in_spks"], golden["flow_est1_in_cond"])
    torch.testing.assert_close(got, golden["flow_est1_out"], atol=1e-4, rtol=0)


def test_cosine_time_schedule(golden):
    torch.testing.assert_close(cosine_t_span(10), golden["flow_t_span"], atol=1e-7, rtol=0)


def test_flow_mel_given_the_captured_noise(flow, golden):
    with torch.inference_mode():
        mel = flow.inference(golden["flow_in_token"], golden["flow_in_prompt_token"], golden["flow_in_prompt_feat"],
                             golden["flow_in_embedding"], golden["flow_z"], n_steps=10)
    assert mel.shape == (1, 80, 66)
    torch.testing.assert_close(mel, golden["flow_out_mel"], atol=5e-4, rtol=0)


def test_guidance_uses_the_unconditional_branch(flow, golden):
    """With inference_cfg_rate 0 the result must change: the 0.7 guidance is really applied."""
    args = (golden["flow_in_token"], golden["flow_in_prompt_token"], golden["flow_in_prompt_feat"],
            golden["flow_in_embedding"], golden["flow_z"])
    with torch.inference_mode():
        guided = flow.inference(*args, n_steps=2)
        flow.decoder.inference_cfg_rate = 0.0
        try:
            plain = flow.inference(*args, n_steps=2)
        finally:
            flow.decoder.inference_cfg_rate = 0.7
    assert (guided - plain).abs().max() > 1e-3


def test_checkpoint_with_a_missing_key_is_refused_with_its_name(flow):
    state = dict(load_state_dict_file(DECODER / "flow.safetensors"))
    state.pop("encoder.after_norm.weight")
    state["encoder.extra.weight"] = torch.zeros(1)
    fresh = FlowDecoder(flow.cfg)
    with pytest.raises(ModelError) as info:
        load_strict(fresh, state, "flow")
    assert "encoder.after_norm.weight" in str(info.value) and "encoder.extra.weight" in str(info.value)

