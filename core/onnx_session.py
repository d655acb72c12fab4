"""ONNX Runtime sessions, configured one way for the whole studio.

Owns: provider choice and ``SessionOptions`` for every ONNX model we run (the S3 speech
tokenizer, CAM++). Does not own: what the models compute.

Provider choice: TensorRT (only when asked for), then CUDA when the device is CUDA, then CPU.
``onnxruntime-gpu`` lists CUDA as available even on a machine without a GPU, and silently
falls back to CPU, so the providers a session really uses are read back from the session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnnxOptions:
    intra_op_threads: int = 4
    inter_op_threads: int = 1
    execution_mode: str = "parallel"  # parallel | sequential
    use_cuda: bool = False
    use_tensorrt: bool = False

    @classmethod
    def from_settings(cls, settings, use_cuda: bool) -> "OnnxOptions":
        return cls(intra_op_threads=settings.ort_intra_op_threads, inter_op_threads=settings.ort_inter_op_threads,
                   execution_mode=settings.ort_execution_mode, use_cuda=use_cuda, use_tensorrt=settings.ort_tensorrt)


def session_options(options: OnnxOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if options.execution_mode == "parallel"
                         else ort.ExecutionMode.ORT_SEQUENTIAL)
    so.log_severity_level = 3  # keep ORT's own provider-fallback chatter out of our logs
    return so


def choose_providers(options: OnnxOptions) -> list[str]:
    available = set(ort.get_available_providers())
    wanted = []
    if options.use_tensorrt:
        wanted.append("TensorrtExecutionProvider")
    if options.use_cuda or options.use_tensorrt:
        wanted.append("CUDAExecutionProvider")
    wanted.append("CPUExecutionProvider")
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


def _preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu find the CUDA/cuDNN libraries that the pip wheels (torch's) installed.

    Without this, ORT only finds them when torch happened to load them first, and otherwise
    silently runs on CPU.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # a missing library is reported by the provider check below
        log.debug("onnxruntime.preload_dlls failed: %s", exc)


def create_session(path: Path, options: OnnxOptions) -> ort.InferenceSession:
    """A tuned session for the model at ``path``; logs when a requested GPU provider did not load."""
    providers = choose_providers(options)
    if "CUDAExecutionProvider" in providers:
        _preload_cuda_libraries()
    session = ort.InferenceSession(str(path), sess_options=session_options(options), providers=providers)
    used = session.get_providers()
    if providers[0] != "CPUExecutionProvider" and used[0] == "CPUExecutionProvider":
        log.warning("ONNX model %s: %s could not be loaded, running on CPU", Path(path).name, providers[0])
    log.info("ONNX model %s on %s (intra-op %d, inter-op %d, %s)", Path(path).name, ",".join(used),
             options.intra_op_threads, options.inter_op_threads, options.execution_mode)
    return session
