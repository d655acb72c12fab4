"""llm.quantize: int8 weight-only Step1 through torchao on CPU, and the int4 refusals.

Covers: int8 quantizes exactly the decoder layers' Linear weights (embedding, norms and ``lm_head``
stay bit-identical) and shrinks them to about a quarter of float32; on the tiny Step1 with the real
id layout its logits stay within a stated tolerance of the unquantized model and its greedy choice
(argmax with the same history, 8 random sequences x 64 positions) agrees at a stated rate; the
native backend loads it from a folder and generates; the engine loads it from ``--llm-quantization``
and clones end to end; int4 is refused on CPU (and without bfloat16) before any weight is read.

Thresholds (measured on this tiny model: top-1 agreement 0.992, max |logit error| 0.0052, relative
L2 error 0.0095): agreement >= 0.95, max |error| <= 0.02, relative L2 <= 0.03. The tiny model's
random weights give nearly flat logits (max |logit| ~0.7), so near-ties are common; a trained model's
wider margins make a flip rarer, not more frequent.
"""

import pytest
import torch
from conftest import FIXTURES

from core.errors import ModelError
from core.settings import Settings
from llm.backend import GenerationRequest
from llm.checkpoint import load_step1
from llm.native import NativeBackend
from llm.quantize import check_quantization, quantize_step1, weight_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AGREEMENT_MIN = 0.95
MAX_ABS_ERROR = 0.02
MAX_REL_L2 = 0.03
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from testkit.tiny_models import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny") / "llm")


@pytest.fixture(scope="module")
def models(tiny_folder):
    full = load_step1(tiny_folder, "cpu", torch.float32)
    return full, quantize_step1(load_step1(tiny_folder, "cpu", torch.float32), "int8")


def _logits(model, seq):
    cache = model.new_cache(1, len(seq))
    with torch.inference_mode():
        return model(torch.tensor([seq]), torch.arange(len(seq))[None], cache, torch.tensor([0]))[0].float()


def test_int8_replaces_only_the_decoder_linear_weights(models):
    full, q = models
    full_state = dict(full.named_parameters())
    quantized = 0
    for name, param in q.named_parameters():
        if name.startswith("model.layers.") and name.rsplit(".", 1)[0].split(".", 3)[-1] in DECODER_LINEARS:
            quantized += 1
            assert param.qdata.dtype == torch.int8, name            # torchao Int8Tensor storage
            assert tuple(param.shape) == tuple(full_state[name].shape), name
        else:
            assert type(param.data) is torch.Tensor, name
            assert torch.equal(param, full_state[name]), name
    assert quantized == len(DECODER_LINEARS) * full.config.num_hidden_layers
    linear_bytes = sum(weight_bytes(m) for n, m in q.named_modules() if n.endswith(DECODER_LINEARS))
    full_linear = sum(weight_bytes(m) for n, m in full.named_modules() if n.endswith(DECODER_LINEARS))
    # int8 data (1/4 of float32) plus one float scale per output row.
    assert linear_bytes < 0.3 * full_linear


def test_int8_logits_and_greedy_choices_match_the_unquantized_model(models):
    full, q = models
    g = torch.Generator().manual_seed(0)
    agree = total = 0
    worst_abs = worst_rel = 0.0
    for _ in range(8):
        seq = torch.randint(0, full.config.vocab_size, (64,), generator=g).tolist()
        a, b = _logits(full, seq), _logits(q, seq)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(seq)
        worst_abs = max(worst_abs, float((a - b).abs().max()))
        worst_rel = max(worst_rel, float(((a - b).norm(dim=-1) / a.norm(dim=-1)).max()))
    assert worst_abs > 0        # the weights really changed
    assert worst_abs <= MAX_ABS_ERROR and worst_rel <= MAX_REL_L2, (worst_abs, worst_rel)
    assert agree / total >= AGREEMENT_MIN, agree / total


def test_native_backend_loads_int8_from_the_folder_and_generates(tiny_folder):
    backend = NativeBackend.from_folder(tiny_folder, "cpu", torch.float32, max_new_tokens=10, max_rows=2,
                                        step_token_budget=64, quantization="int8")
    try:
        assert backend.model.model.layers[0].mlp.up_proj.weight.qdata.dtype == torch.int8
        assert "int8" in backend.describe()
        out = backend.submit(GenerationRequest(tuple(backend.encode("Hello world.")), seed=1)).result(120)
        assert 1 <= len(out.answer) <= 10
        assert all(0 <= t < backend.model.config.vocab_size for t in out.answer)
    finally:
        backend.close()


def test_the_engine_clones_with_an_int8_llm(tmp_path):
    from funasr_cache.store import PromptCache
    from testkit.tiny_models import build_tiny_model_root
    from tts_engine.step_audio import StepAudioEngine

    root = build_tiny_model_root(tmp_path)
    settings = Settings(model_root=root, cache_dir=root / "cache", llm_max_new_tokens=20, flow_steps=2,
                        llm_max_rows=2, llm_step_token_budget=256, llm_quantization="int8")
    engine = StepAudioEngine(settings, PromptCache.from_settings(settings))
    try:
        assert engine.llm_backend.model.model.layers[1].self_attn.q_proj.weight.qdata.dtype == torch.int8
        assert "int8" in engine.describe().detail
        result = engine.clone(str(FIXTURES / "prompt_22k.wav"), "The quick brown fox jumps over the lazy dog.",
                              "Hello there.", seed=3)
        assert result.tokens and len(result.tokens) % 5 == 0
        assert all(65536 <= t < 70656 for t in result.tokens)
        assert len(result.audio.samples) == len(result.tokens) // 5 * 2880
    finally:
        engine.close()


def test_int4_is_refused_on_cpu_before_loading(tmp_path):
    with pytest.raises(ModelError, match=r"--llm-quantization .*int4 needs a CUDA device"):
        check_quantization("int4", "cpu", torch.bfloat16)
    # The folder does not exist: the refusal comes first, so no time is spent loading weights.
    with pytest.raises(ModelError, match="int4 needs a CUDA device"):
        NativeBackend.from_folder(tmp_path / "absent", "cpu", torch.float32, quantization="int4")


def test_the_engine_refuses_int4_when_auto_resolves_to_cpu(tmp_path):
    from tts_engine.step_audio import _create_llm_backend

    settings = Settings(model_root=tmp_path, device="auto", llm_quantization="int4")
    with pytest.raises(ModelError, match="int4 needs a CUDA device"):
        _create_llm_backend(settings, torch.device("cpu"), torch.float32)


def test_int4_needs_bfloat16_and_unknown_modes_are_refused():
    with pytest.raises(ModelError, match="int4 needs --dtype bfloat16"):
        check_quantization("int4", "cuda", torch.float16)
    with pytest.raises(ModelError, match="none, int8, int4"):
        check_quantization("int3", "cpu", torch.float32)
