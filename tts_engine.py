"""The engine interface the studio calls, and the choice of engine.

Owns: the ``Engine`` contract (clone, edit, prompt preparation, capabilities, readiness), the
value types that cross it (``Result``, ``CloneOptions``, ``EngineInfo``, ``EditCapability``,
``PromptReport``), shared request validation, and ``create_engine`` (auto / step-audio /
preview). The Step-Audio-EditX implementation lives further down in this module's section
(issue 7); the preview engine lives in ``preview/``.
Does not own: models, audio formats, caching mechanics.
"""

from __future__ import annotations

import abc
import logging
import secrets
from dataclasses import dataclass, field
from typing import Callable, Mapping

from audio_io import Audio, AudioSource
from edit_options import EDIT_TYPES
from errors import InputError
from timings import StageTimings

log = logging.getLogger(__name__)

# progress(fraction in [0, 1], description)
ProgressFn = Callable[[float, str], None]


def no_progress(fraction: float, description: str) -> None:
    """The default progress callback: ignores reports."""


@dataclass(frozen=True)
class EngineInfo:
    """What the banner says about the loaded engine."""

    name: str                 # e.g. "Step-Audio-EditX" or "Preview (eSpeak NG + WORLD)"
    preview: bool             # True for the CPU preview engine
    device: str               # e.g. "cuda:0 (bfloat16)" or "cpu"
    detail: str               # one line: what it is / how to get the real models
    sample_rate: int = 24000


@dataclass(frozen=True)
class EditCapability:
    """One edit type as this engine supports it."""

    edit_type: str
    options: tuple[str, ...]                   # all edit_info values of the type (may be empty)
    available: bool = True                     # False: the engine cannot do this type at all
    unavailable_options: tuple[str, ...] = ()  # options it cannot honour (shown greyed out)
    note: str = ""                             # why, or how it is done


@dataclass(frozen=True)
class CloneOptions:
    """Per-request knobs; None means the engine's configured default."""

    flow_steps: int | None = None

    def __post_init__(self) -> None:
        if self.flow_steps is not None and not 1 <= self.flow_steps <= 50:
            raise InputError(f"flow_steps must be between 1 and 50, not {self.flow_steps}")


@dataclass(frozen=True)
class Result:
    """One generated clip and how it was made."""

    audio: Audio                       # mono float32, 24 kHz
    text: str                          # what the audio says (the next edit's audio_text)
    timings: StageTimings
    seed: int
    tokens: tuple[int, ...] = ()       # LLM audio ids that were decoded (empty for the preview)
    prompt_digest: str = ""            # cache digest of the prompt clip

    @property
    def cache_hits(self) -> frozenset[str]:
        return self.timings.cached


@dataclass(frozen=True)
class PromptReport:
    """What preparing a prompt clip did: its digest, which kinds hit the cache, timings."""

    digest: str
    hits: frozenset[str]
    misses: frozenset[str]
    timings: StageTimings
    namespaces: Mapping[str, str] = field(default_factory=dict)  # kind -> cache namespace


class Engine(abc.ABC):
    """A voice-cloning engine. Implementations must be thread-safe."""

    @abc.abstractmethod
    def describe(self) -> EngineInfo: ...

    @abc.abstractmethod
    def capabilities(self) -> tuple[EditCapability, ...]: ...

    @abc.abstractmethod
    def clone(self, prompt_audio: AudioSource, prompt_text: str, target_text: str, *, seed: int | None = None,
              options: CloneOptions = CloneOptions(), progress: ProgressFn = no_progress) -> Result:
        """Speak ``target_text`` in the voice of ``prompt_audio`` (whose transcript is ``prompt_text``).

        Raises:
            InputError: bad audio, empty or over-long text.
            ModelError: the models failed (e.g. produced no audio).
        """

    @abc.abstractmethod
    def edit(self, audio: AudioSource, audio_text: str, edit_type: str, edit_info: str | None = None,
             text: str | None = None, *, seed: int | None = None, options: CloneOptions = CloneOptions(),
             progress: ProgressFn = no_progress) -> Result:
        """Apply ``edit_type``/``edit_info`` to ``audio`` (which says ``audio_text``).

        ``text`` is the new text for paralinguistic edits (tags such as ``[Laughter]`` inside).
        """

    @abc.abstractmethod
    def prepare_prompt(self, prompt_audio: AudioSource) -> PromptReport:
        """Do (or fetch from the cache) all prompt work for a clip, e.g. when a voice is saved."""

    @property
    @abc.abstractmethod
    def cache(self):
        """The engine's :class:`funasr_cache.PromptCache`."""

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz; engines override to check their device."""
        return True, "ok"

    def close(self) -> None:
        """Release threads and memory."""


# --------------------------------------------------------------------------- validation

def new_seed(seed: int | None) -> int:
    """The request's seed: the caller's, or a fresh random one (reported back in the Result)."""
    if seed is None or seed < 0:
        return secrets.randbelow(2**31)
    return int(seed)


def validate_text(text: str | None, what: str, max_chars: int) -> str:
    """Reject empty or over-long text; returns it unchanged (the model sees it verbatim)."""
    if text is None or not text.strip():
        raise InputError(f"{what} is empty")
    if len(text) > max_chars:
        raise InputError(f"{what} is {len(text)} characters long; the limit is {max_chars}")
    return text


def validate_edit(edit_type: str, edit_info: str | None, capabilities: tuple[EditCapability, ...]) -> str | None:
    """Check an edit request against what the engine can do; returns the normalised edit_info."""
    caps = {c.edit_type: c for c in capabilities}
    if edit_type not in caps:
        raise InputError(f"unsupported edit type {edit_type!r}; choose one of {', '.join(EDIT_TYPES)}")
    cap = caps[edit_type]
    if not cap.available:
        raise InputError(f"edit type {edit_type!r} is not available in this engine: {cap.note}")
    if not cap.options:
        return None
    if not edit_info:
        raise InputError(f"edit type {edit_type!r} needs an option; choose one of {', '.join(cap.options)}")
    if edit_info not in cap.options:
        raise InputError(f"unknown {edit_type} option {edit_info!r}; choose one of {', '.join(cap.options)}")
    if edit_info in cap.unavailable_options:
        raise InputError(f"{edit_type} option {edit_info!r} is not available in this engine: {cap.note}")
    return edit_info


# --------------------------------------------------------------------------- engine choice

# Files without which the real engine cannot start; "a|b" means either name will do.
REQUIRED_TOKENIZER_FILES = ("linguistic_tokenizer.npy", "speech_tokenizer_v1.onnx")
REQUIRED_FUNASR_FILES = ("config.yaml", "am.mvn", "model.pt|model.safetensors")
REQUIRED_EDITX_FILES = ("config.json",)
REQUIRED_DECODER_FILES = ("cosyvoice.yaml", "flow.pt|flow.safetensors", "hift.pt|hift.safetensors", "campplus.onnx")
DECODER_SUBDIR = "CosyVoice-300M-25Hz"


def missing_model_files(settings) -> list[str]:
    """Paths (relative to model_root) that the Step-Audio-EditX engine needs and cannot find."""
    from settings import FUNASR_SUBDIR

    groups = [
        (settings.tokenizer_dir, REQUIRED_TOKENIZER_FILES),
        (settings.tokenizer_dir / FUNASR_SUBDIR, REQUIRED_FUNASR_FILES),
        (settings.editx_dir, REQUIRED_EDITX_FILES),
        (settings.editx_dir / DECODER_SUBDIR, REQUIRED_DECODER_FILES),
    ]
    missing = []
    for folder, names in groups:
        for name in names:
            if not any((folder / option).is_file() for option in name.split("|")):
                missing.append(str((folder / name.split("|")[0]).relative_to(settings.model_root)))
    return missing


def create_engine(settings) -> Engine:
    """The engine the settings ask for.

    ``auto`` loads Step-Audio-EditX when its model folders are complete, else the CPU preview
    engine, and logs why. ``step-audio`` fails loudly (ModelError) if the folders are incomplete;
    ``preview`` never looks at them.
    """
    from errors import ModelError
    from funasr_cache import PromptCache

    cache = PromptCache.from_settings(settings)
    choice = settings.engine
    if choice == "auto":
        missing = missing_model_files(settings)
        if missing:
            log.warning("engine=auto: using the CPU preview engine because %d model file(s) are missing "
                        "under %s (first: %s). Run scripts/download_models.py to get the real models.",
                        len(missing), settings.model_root, missing[0])
            choice = "preview"
        else:
            log.info("engine=auto: model folders under %s are complete, loading Step-Audio-EditX", settings.model_root)
            choice = "step-audio"
    if choice == "preview":
        from preview.engine import PreviewEngine

        return PreviewEngine(settings, cache)
    missing = missing_model_files(settings)
    if missing:
        raise ModelError(f"engine=step-audio but these model files are missing under {settings.model_root}: "
                         + ", ".join(missing))
    return StepAudioEngine(settings, cache)  # noqa: F821  (defined by the Step-Audio section, issue 7)
