"""settings: defaults, environment variables, CLI flags, validation; ONNX/TF32 configuration helpers."""

import pytest
import torch

from core.devices import configure_tf32, resolve_device, resolve_dtype
from core.onnx_session import OnnxOptions, choose_providers, session_options
from core.settings import Settings, build_parser, load_settings


def test_defaults_need_no_environment():
    s = load_settings([], env={})
    assert s == Settings()
    assert str(s.cache_dir) == "cache" and str(s.model_root) == "models"
    assert s.tokenizer_dir.name == "Step-Audio-Tokenizer" and s.editx_dir.name == "Step-Audio-EditX"


def test_cli_beats_environment_beats_default():
    env = {"STUDIO_PORT": "9001", "STUDIO_CACHE_DIR": "/data/cache", "STUDIO_TF32": "off"}
    s = load_settings(["--port", "9002"], env=env)
    assert s.port == 9002
    assert str(s.cache_dir) == "/data/cache"
    assert s.tf32 is False
    assert load_settings(["--tf32"], env=env).tf32 is True


@pytest.mark.parametrize("argv,env,field", [
    (["--engine", "magic"], {}, "engine"),
    ([], {"STUDIO_PORT": "eighty"}, "port"),
    ([], {"STUDIO_TF32": "maybe"}, "tf32"),
    (["--cache-max-entries", "0"], {}, "cache_max_entries"),
    (["--cache-memory-entries", "-1"], {}, "cache_memory_entries"),
    ([], {"STUDIO_MAX_PROMPT_SECONDS": "0"}, "max_prompt_seconds"),
    ([], {"STUDIO_MAX_PROMPT_SECONDS": "nan"}, "max_prompt_seconds"),
    (["--max-upload-bytes", "0"], {}, "max_upload_bytes"),
    (["--llm-max-rows", "0"], {}, "llm_max_rows"),
    (["--llm-max-rows", "8", "--llm-step-token-budget", "8"], {}, "llm_step_token_budget"),
    (["--llm-backend", "tgi"], {}, "llm_backend"),
    ([], {"STUDIO_LLM_URL": "vllm:8000"}, "llm_url"),
    (["--llm-read-timeout-s", "0"], {}, "llm_read_timeout_s"),
    ([], {"STUDIO_LLM_REQUEST_TIMEOUT_S": "inf"}, "llm_request_timeout_s"),
    (["--llm-retry-after-s", "0"], {}, "llm_retry_after_s"),
    (["--llm-gpu-memory-utilization", "1.5"], {}, "llm_gpu_memory_utilization"),
    (["--llm-quantization", "int3"], {}, "llm_quantization"),
    (["--device", "cpu"], {"STUDIO_LLM_QUANTIZATION": "int4"}, "llm_quantization int4 needs a CUDA device"),
    ([], {"STUDIO_QUALITY_CHECKS": "signal,vibes"}, "quality_checks"),
])
def test_bad_values_name_the_setting(argv, env, field):
    with pytest.raises(ValueError, match=field):
        load_settings(argv, env=env)


def test_llm_quantization_is_read_from_flag_and_environment():
    assert load_settings([], env={}).llm_quantization == "none"
    assert load_settings([], env={"STUDIO_LLM_QUANTIZATION": "int8"}).llm_quantization == "int8"
    # int4 is refused up front only when the device is pinned to cpu; "auto" is checked when the engine loads.
    assert load_settings(["--llm-quantization", "int4", "--device", "cuda"], env={}).llm_quantization == "int4"


def test_every_field_has_a_flag_with_help():
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions}
    for name in Settings.__dataclass_fields__:
        assert name in flags, name
        assert flags[name].help, f"--{name} has no help text"


def test_tf32_flags_follow_configuration():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        configure_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_torch_threads_setting_is_applied_and_validated():
    from core.devices import configure_threads

    before = torch.get_num_threads()
    try:
        configure_threads(1)
        assert torch.get_num_threads() == 1
        configure_threads(0)  # 0 keeps whatever is set
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="torch_threads"):
        load_settings(["--torch-threads", "-1"], env={})


def test_default_onnx_settings_really_run_in_parallel():
    s = Settings()
    assert s.ort_execution_mode == "parallel" and s.ort_inter_op_threads >= 2


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


def test_onnx_options_and_providers():
    so = session_options(OnnxOptions(intra_op_threads=3, inter_op_threads=2, execution_mode="parallel"))
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 2
    import onnxruntime as ort
    assert so.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert choose_providers(OnnxOptions(use_cuda=False)) == ["CPUExecutionProvider"]
    assert choose_providers(OnnxOptions(use_cuda=True))[-1] == "CPUExecutionProvider"


def test_vq02_encoder_setting_is_read_and_validated():
    assert Settings().vq02_encoder == "parallel"
    assert load_settings(["--vq02-encoder", "streaming"], env={}).vq02_encoder == "streaming"
    assert load_settings([], env={"STUDIO_VQ02_ENCODER": "streaming"}).vq02_encoder == "streaming"
    with pytest.raises(ValueError, match="vq02_encoder must be one of parallel, streaming, not 'fast'"):
        load_settings(["--vq02-encoder", "fast"], env={})
