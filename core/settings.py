"""One configuration object for the whole studio.

Owns: every tunable (paths, cache limits, devices, ONNX Runtime threads, server, limits) with
its default, and how it is read from command-line flags and ``STUDIO_*`` environment variables.
Does not own: acting on those values (each module receives the ``Settings`` it needs).

Precedence: CLI flag > environment variable > default. Each field ``foo_bar`` is read from
``--foo-bar`` and ``STUDIO_FOO_BAR``. Booleans accept 1/0, true/false, yes/no, on/off.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

ENV_PREFIX = "STUDIO_"
ENGINE_CHOICES = ("auto", "step-audio", "preview")
LLM_BACKENDS = ("native", "vllm")
LLM_QUANTIZATIONS = ("none", "int8", "int4")   # llm/quantize.py owns what they do
EXECUTION_MODES = ("parallel", "sequential")
VQ02_ENCODERS = ("parallel", "streaming")
QUALITY_CHECKS = ("signal", "content", "speaker")   # quality/ owns what they do

# Folder names inside model_root, as the upstream release lays them out.
TOKENIZER_DIRNAME = "Step-Audio-Tokenizer"
EDITX_DIRNAME = "Step-Audio-EditX"
DECODER_SUBDIR = "CosyVoice-300M-25Hz"   # inside Step-Audio-EditX/
FUNASR_SUBDIR = "dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online"


def _default_ort_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class Settings:
    """Every setting of the studio. Build it with :func:`load_settings`."""

    # --- server
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (the Docker image uses 0.0.0.0)"})
    port: int = field(default=7860, metadata={"help": "HTTP port for the UI and the API"})
    api_key: str = field(default="", metadata={"help": "when set, /v1 requires 'Authorization: Bearer <key>'"})
    ui_requires_key: bool = field(default=True, metadata={"help": "with api_key set, the page and its named API need it too (a login; any user name, the key as password); --no-ui-requires-key opens them"})
    cors_origins: str = field(default="", metadata={"help": "comma-separated browser origins (e.g. https://app.example) allowed to call /v1 from other sites (CORS); empty: none, and cross-origin browser requests that change state are refused"})
    bundle_key: str = field(default="", metadata={"help": "secret (16+ characters) that signs exported voice bundles (HMAC-SHA256); an import uses a bundle's cache entries only when its signature verifies with this key, else recomputes them"})
    concurrency_limit: int = field(default=2, metadata={"help": "Gradio jobs that may run at once on the engine"})
    queue_size: int = field(default=32, metadata={"help": "Gradio queue length before requests are refused"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})

    # --- models
    engine: str = field(default="auto", metadata={"help": "auto | step-audio | preview"})
    model_root: Path = field(default=Path("models"), metadata={"help": "folder holding Step-Audio-Tokenizer/ and Step-Audio-EditX/"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16"})
    tf32: bool = field(default=True, metadata={"help": "allow TF32 matmul/cuDNN on CUDA"})
    torch_threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default, one per core)"})
    vq02_encoder: str = field(default="parallel", metadata={"help": "parallel (all 240 ms chunks of a clip per encoder layer at once, same codes) | streaming (funasr's chunk-by-chunk loop, the reference)"})
    flow_steps: int = field(default=10, metadata={"help": "Euler steps of the flow-matching decoder (5 is faster)"})

    # --- ONNX Runtime
    ort_intra_op_threads: int = field(default_factory=_default_ort_threads, metadata={"help": "threads inside one ONNX op (default min(4, cores))"})
    # ORT runs sequentially whenever inter-op threads is 1, whatever the execution mode says.
    ort_inter_op_threads: int = field(default=2, metadata={"help": "threads across independent ONNX ops (parallel mode needs >= 2)"})
    ort_execution_mode: str = field(default="parallel", metadata={"help": "parallel | sequential"})
    ort_tensorrt: bool = field(default=False, metadata={"help": "try the TensorRT execution provider first"})

    # --- prompt cache
    cache_dir: Path = field(default=Path("cache"), metadata={"help": "persistent prompt cache folder"})
    cache_max_entries: int = field(default=20000, metadata={"help": "cache capacity in entries (disk)"})
    cache_max_bytes: int = field(default=2 * 1024**3, metadata={"help": "cache capacity in bytes (disk)"})
    cache_memory_entries: int = field(default=256, metadata={"help": "hot entries kept in RAM"})

    # --- user data (voices; the database of userdata/)
    data_dir: Path = field(default=Path("data"), metadata={"help": "folder for what users make (the default SQLite database); unlike the cache, never safe to delete"})
    database_url: str = field(default="", repr=False, metadata={"help": "SQLAlchemy URL of the user-data database: empty = sqlite:///<data_dir>/studio.db; postgresql://user@host/db for several hosts (password via STUDIO_DATABASE_URL, not argv)"})
    voice_max_count: int = field(default=1000, metadata={"help": "most stored voices (all users together); creating more is refused"})
    voice_max_bytes: int = field(default=1024**3, metadata={"help": "most bytes of stored voice audio and prompt entries together"})

    # --- request limits
    max_text_chars: int = field(default=1000, metadata={"help": "longest target text"})
    max_prompt_seconds: float = field(default=30.0, metadata={"help": "longest prompt clip"})
    max_upload_bytes: int = field(default=20 * 1024**2, metadata={"help": "largest uploaded file"})

    # --- LLM batching (continuous: requests join and leave the running batch between decode steps)
    llm_max_rows: int = field(default=8, metadata={"help": "most requests the LLM decodes together (each holds a KV-cache slot of 8192 positions)"})
    llm_step_token_budget: int = field(default=512, metadata={"help": "most tokens one LLM step runs: one per decoding request, the rest for new prompts (must exceed llm_max_rows)"})

    # --- LLM generation
    llm_max_new_tokens: int = field(default=0, metadata={"help": "cap on LLM tokens per answer (0: proportional to the text, about 42 tokens per second of speech at a generous 0.5 s per character plus 5 s, and for edits twice the clip; always within the model's 8192 prompt+answer limit)"})
    llm_slot_mask: bool = field(default=True, metadata={"help": "let the LLM sample only audio ids that fit the 2:3 vq02/vq06 slot pattern (off: sample freely like the reference, then filter)"})
    text_chunk_chars: int = field(default=300, metadata={"help": "long target text is generated in chunks of about this many characters, split at sentence ends"})

    # --- LLM backend (docs/scaling.md)
    llm_backend: str = field(default="native", metadata={"help": "native (our Step1 in this process) | vllm (llm_url, or vLLM in this process when llm_url is empty)"})
    llm_url: str = field(default="", metadata={"help": "base URL of a shared 'vllm serve' (OpenAI compatible), e.g. http://vllm:8000"})
    llm_api_key: str = field(default="", metadata={"help": "the vLLM server's --api-key, sent as a Bearer token"})
    llm_connect_timeout_s: float = field(default=3.0, metadata={"help": "seconds to open a connection to the vLLM server"})
    llm_read_timeout_s: float = field(default=60.0, metadata={"help": "longest silence (no token) tolerated from the vLLM server, queueing included"})
    llm_request_timeout_s: float = field(default=600.0, metadata={"help": "longest time one LLM answer may take on the vLLM server"})
    llm_retry_after_s: int = field(default=5, metadata={"help": "Retry-After seconds in the 503 answered while the vLLM server is down or slow"})
    llm_health_interval_s: float = field(default=2.0, metadata={"help": "seconds between health probes of the vLLM server (GET /health)"})
    llm_gpu_memory_utilization: float = field(default=0.5, metadata={"help": "in-process vLLM only: share of the GPU's memory vLLM may take (the tokenizer and decoder need the rest)"})
    llm_quantization: str = field(default="none", metadata={"help": "native backend only: none | int8 (weight-only, CPU and CUDA) | int4 (weight-only, CUDA with bfloat16 only); quantizes the Step1 decoder layers with torchao after loading (vLLM ignores it: it has its own --quantization)"})
    # --- streaming
    stream_prompt_cache_mb: int = field(default=1024, metadata={"help": "memory (MB) for the streaming decoder's per-voice prompt state (about 1.3 MB per prompt mel frame in float32; 0: recompute per request)"})
    # --- text-in streaming (WS /v1/audio/speech/stream, web/api_stream_ws.py)
    ws_max_sessions: int = field(default=8, metadata={"help": "most text-streaming WebSocket sessions open at once; one more is closed at once with code 1013 (try again later)"})
    ws_max_session_s: float = field(default=600.0, metadata={"help": "longest a text-streaming session may stay open, in seconds; then it is closed with code 1008"})
    ws_max_session_chars: int = field(default=20000, metadata={"help": "most text characters one text-streaming session may send in all"})
    ws_send_buffer_bytes: int = field(default=8 * 1024**2, metadata={"help": "audio bytes queued for a text-streaming client that does not read; over it, generation stops and the session closes with code 4000"})
    ws_segment_max_wait_ms: int = field(default=1500, metadata={"help": "text-streaming: longest pending text waits for a sentence or clause end before it is spoken anyway (cut at the last word)"})
    ws_clause_min_chars: int = field(default=60, metadata={"help": "text-streaming: a clause end (comma, colon, Chinese comma) cuts a segment only once this many characters wait; sentence ends always cut"})
    # --- web hardening (docs/security.md)
    allowed_hosts: str = field(default="", metadata={"help": "comma-separated host names (no port) this server answers to, against DNS rebinding, e.g. studio.example,10.0.0.5; empty: localhost, 127.0.0.1, ::1 and the --host address; * allows any"})
    max_engine_requests: int = field(default=16, metadata={"help": "engine requests (speech, edits, transcriptions, voice uploads and imports) admitted at once; more are answered 503 with Retry-After at once (default: two per LLM row)"})
    busy_retry_after_s: int = field(default=2, metadata={"help": "Retry-After seconds in the 503 answered when max_engine_requests are running"})
    request_timeout_s: float = field(default=300.0, metadata={"help": "deadline of one engine request (whole files; streams too); past it the work is cancelled and the client gets a 503"})
    auth_failures_per_minute: int = field(default=10, metadata={"help": "wrong API keys (or page logins) one client address may send per minute before it is answered 429 with Retry-After"})
    # --- Gradio's upload folder (GRADIO_TEMP_DIR; web/uploads.py)
    upload_folder_max_bytes: int = field(default=1024**3, metadata={"help": "most bytes kept in Gradio's upload folder (GRADIO_TEMP_DIR): after each page upload the oldest files are deleted down to it (at least max_upload_bytes)"})
    upload_folder_max_files: int = field(default=1000, metadata={"help": "most files kept in Gradio's upload folder (oldest deleted first)"})
    upload_folder_max_age_s: int = field(default=3600, metadata={"help": "seconds an uploaded or generated file of the page is kept (deleted at the next upload and by Gradio's periodic clean-up)"})

    # --- productions (scripts, segments, takes, renders)
    production_max_chars: int = field(default=100_000, metadata={"help": "longest script, text or SRT file a production is made from (characters)"})
    production_max_segments: int = field(default=2000, metadata={"help": "most segments one production may have"})
    production_pause_ms: int = field(default=300, metadata={"help": "silence after a sentence or a speaker's line in a render (ms; each segment can change it)"})
    production_paragraph_pause_ms: int = field(default=800, metadata={"help": "silence after a paragraph or a speaker's turn (ms)"})
    production_crossfade_ms: float = field(default=20.0, metadata={"help": "cross-fade where two segments meet without a pause (ms)"})
    production_loudness_lufs: float = field(default=-16.0, metadata={"help": "integrated loudness (EBU R128 / ITU-R BS.1770 measure, LUFS) a render is normalised to; -16 suits podcasts and the web, -23 is EBU R128 broadcast"})
    max_edit_seconds: float = field(default=300.0, metadata={"help": "longest clip /v1/audio/edits accepts; one longer than max_prompt_seconds (what one model call takes) is split at pauses and edited piece by piece"})
    production_workers: int = field(default=0, metadata={"help": "segments of a production generated at once (0: llm_max_rows, so they share the LLM's continuous batch)"})
    production_word_captions: bool = field(default=True, metadata={"help": "hear every new production take with the engine's speech recogniser (one ASR pass, a few per cent of the generation; the tokenizer folder's whole Paraformer is loaded on the first take, about 0.9 GB) so its render's captions are word-level lines with word timings; off, or without a recogniser that gives timings, captions are one cue per segment"})
    # --- quality checks (docs/quality.md)
    quality_checks: str = field(default="signal", metadata={"help": "checks run on every take whose request names none: comma-separated signal, content, speaker (content and speaker run only where the engine has the models: Step-Audio-EditX, not the preview); empty: none"})

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_CHOICES:
            raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, not {self.engine!r}")
        if self.ort_execution_mode not in EXECUTION_MODES:
            raise ValueError(f"ort_execution_mode must be one of {', '.join(EXECUTION_MODES)}, not {self.ort_execution_mode!r}")
        if self.vq02_encoder not in VQ02_ENCODERS:
            raise ValueError(f"vq02_encoder must be one of {', '.join(VQ02_ENCODERS)}, not {self.vq02_encoder!r}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be 0 (default) or more, not {self.torch_threads!r}")
        for name in ("port", "concurrency_limit", "cache_max_entries", "cache_max_bytes", "max_text_chars",
                     "ort_intra_op_threads", "ort_inter_op_threads", "flow_steps", "llm_max_rows",
                     "text_chunk_chars", "queue_size", "max_upload_bytes", "voice_max_count", "voice_max_bytes",
                     "ws_max_sessions", "ws_max_session_chars", "ws_send_buffer_bytes", "ws_segment_max_wait_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        if self.llm_step_token_budget <= self.llm_max_rows:
            raise ValueError(f"llm_step_token_budget ({self.llm_step_token_budget}) must exceed llm_max_rows "
                             f"({self.llm_max_rows}): each decoding request takes one token of every step")
        if not 0 < self.ws_max_session_s < float("inf") or self.ws_clause_min_chars < 0:
            raise ValueError(f"ws_max_session_s must be a positive number of seconds and ws_clause_min_chars 0 or "
                             f"more, not {self.ws_max_session_s!r} and {self.ws_clause_min_chars!r}")
        # 0 means "off" or "none" for these; a negative value is always a typo.
        for name in ("cache_memory_entries", "llm_max_new_tokens", "stream_prompt_cache_mb"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)!r}")
        unknown_checks = set(self.quality_check_list) - set(QUALITY_CHECKS)
        if unknown_checks:
            raise ValueError(f"quality_checks may name {', '.join(QUALITY_CHECKS)}, not {', '.join(sorted(unknown_checks))}")
        if self.llm_backend not in LLM_BACKENDS:
            raise ValueError(f"llm_backend must be one of {', '.join(LLM_BACKENDS)}, not {self.llm_backend!r}")
        if self.llm_quantization not in LLM_QUANTIZATIONS:
            raise ValueError(f"llm_quantization must be one of {', '.join(LLM_QUANTIZATIONS)}, not {self.llm_quantization!r}")
        if self.llm_quantization == "int4" and self.device == "cpu":
            raise ValueError("llm_quantization int4 needs a CUDA device (its 4-bit kernel is CUDA only), and device "
                             "is cpu: use int8 or none")
        if self.llm_url and not self.llm_url.startswith(("http://", "https://")):
            raise ValueError(f"llm_url must be an http:// or https:// URL, not {self.llm_url!r}")
        for name in ("llm_connect_timeout_s", "llm_read_timeout_s", "llm_request_timeout_s", "llm_health_interval_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, not {getattr(self, name)!r}")
        if self.llm_retry_after_s < 1:
            raise ValueError(f"llm_retry_after_s must be at least 1, not {self.llm_retry_after_s!r}")
        if not 0 < self.llm_gpu_memory_utilization <= 1:
            raise ValueError(f"llm_gpu_memory_utilization must be in (0, 1], not {self.llm_gpu_memory_utilization!r}")
        if self.bundle_key and len(self.bundle_key) < 16:
            raise ValueError("bundle_key must be at least 16 characters (or empty: bundles are then unsigned)")
        for origin in self.cors_origin_list:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"cors_origins entries must be http(s)://host[:port] origins or *, not {origin!r}")
        for name in ("production_max_chars", "production_max_segments"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        for name in ("production_pause_ms", "production_paragraph_pause_ms", "production_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)!r}")
        if not 0 <= self.production_crossfade_ms <= 1000:
            raise ValueError(f"production_crossfade_ms must be between 0 and 1000, not {self.production_crossfade_ms!r}")
        if not self.max_prompt_seconds <= self.max_edit_seconds < float("inf"):
            raise ValueError(f"max_edit_seconds must be at least max_prompt_seconds ({self.max_prompt_seconds:g}), "
                             f"not {self.max_edit_seconds!r}")
        if not -70 <= self.production_loudness_lufs <= 0:   # also refuses NaN
            raise ValueError(f"production_loudness_lufs must be between -70 and 0 LUFS, not {self.production_loudness_lufs!r}")
        if not 0 < self.max_prompt_seconds < float("inf"):  # also refuses NaN
            raise ValueError(f"max_prompt_seconds must be a positive number of seconds, not {self.max_prompt_seconds!r}")
        for name in ("max_engine_requests", "busy_retry_after_s", "auth_failures_per_minute"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        if not 0 < self.request_timeout_s < float("inf"):
            raise ValueError(f"request_timeout_s must be a positive number of seconds, not {self.request_timeout_s!r}")
        for host in self.allowed_host_list:
            # One colon is host:port (an IPv6 address has at least two).
            if "/" in host or host.count(":") == 1 or host.startswith("["):
                raise ValueError(f"allowed_hosts entries are host names or addresses without scheme or port, not {host!r}")
        for name in ("upload_folder_max_bytes", "upload_folder_max_files", "upload_folder_max_age_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        if self.upload_folder_max_bytes < self.max_upload_bytes:
            raise ValueError(f"upload_folder_max_bytes ({self.upload_folder_max_bytes}) must be at least "
                             f"max_upload_bytes ({self.max_upload_bytes}): the folder must hold one upload")

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        """``cors_origins`` split at commas, without trailing slashes."""
        return tuple(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    @property
    def allowed_host_list(self) -> tuple[str, ...]:
        """``allowed_hosts`` split at commas, lower-cased; empty: the loopback names and the bind address."""
        hosts = tuple(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())
        if hosts:
            return hosts
        bound = () if self.host in ("0.0.0.0", "::", "") else (self.host.lower(),)
        return tuple(dict.fromkeys(("localhost", "127.0.0.1", "::1", *bound)))

    @property
    def quality_check_list(self) -> tuple[str, ...]:
        """``quality_checks`` split at commas."""
        return tuple(c.strip() for c in self.quality_checks.split(",") if c.strip())

    @property
    def tokenizer_dir(self) -> Path:
        return self.model_root / TOKENIZER_DIRNAME

    @property
    def editx_dir(self) -> Path:
        return self.model_root / EDITX_DIRNAME

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _field_type(f: dataclasses.Field) -> type:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return type(default)


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(f: dataclasses.Field, text: str) -> Any:
    kind = _field_type(f)
    if kind is bool:
        return _parse_bool(text)
    if issubclass(kind, Path):
        return Path(text)
    return kind(text)


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one flag per :class:`Settings` field (defaults are filled in later)."""
    parser = argparse.ArgumentParser(
        prog="app.py", description="Step-Audio-EditX voice-cloning studio",
        epilog=f"Every flag can also be set with an environment variable {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}CACHE_DIR).")
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if _field_type(f) is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)
    return parser


def load_settings(argv: Sequence[str] | None = (), env: Mapping[str, str] | None = None) -> Settings:
    """Settings from defaults, then ``STUDIO_*`` variables in ``env``, then flags in ``argv``.

    Raises:
        ValueError: a value does not parse or is out of range (the message names the setting).
    """
    env = os.environ if env is None else env
    args = build_parser().parse_args(list(argv or []))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        env_name = ENV_PREFIX + f.name.upper()
        cli_value = getattr(args, f.name)
        try:
            if cli_value is not None:
                values[f.name] = cli_value if isinstance(cli_value, bool) else _convert(f, cli_value)
            elif env_name in env:
                values[f.name] = _convert(f, env[env_name])
        except ValueError as exc:
            raise ValueError(f"bad value for {f.name} ({env_name} / --{f.name.replace('_', '-')}): {exc}") from None
    return Settings(**values)


def settings_table() -> list[tuple[str, str, str, str]]:
    """(flag, env var, default, help) for each setting; the docs' configuration table comes from this."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default if f.default is not dataclasses.MISSING else "min(4, cores)"
        rows.append(("--" + f.name.replace("_", "-"), ENV_PREFIX + f.name.upper(), str(default), f.metadata.get("help", "")))
    return rows


# Settings that hold secrets: given as flags they show in `ps` and /proc/<pid>/cmdline to every user.
SECRET_SETTINGS = ("api_key", "bundle_key", "llm_api_key")


def secret_flags(argv: Sequence[str]) -> list[str]:
    """The secret settings' flags present in ``argv`` (``--api-key x`` or ``--api-key=x``)."""
    flags = {"--" + name.replace("_", "-") for name in SECRET_SETTINGS}
    return sorted({arg.split("=", 1)[0] for arg in argv if arg.split("=", 1)[0] in flags})


def flag_env_name(flag: str) -> str:
    """``--api-key`` -> ``STUDIO_API_KEY``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
