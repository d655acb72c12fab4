"""Choosing the engine: the real Step-Audio-EditX engine when its model folders are complete,
else the CPU preview engine (``--engine auto``), or exactly the one the settings name.

Owns: the lists of required model files and ``create_engine``.
Does not own: the engines themselves.
"""

from __future__ import annotations

import logging

from core.errors import ModelError
from core.settings import DECODER_SUBDIR, FUNASR_SUBDIR
from funasr_cache.store import PromptCache
from preview.engine import PreviewEngine
from tts_engine.contract import Engine
from tts_engine.step_audio import StepAudioEngine

log = logging.getLogger(__name__)

# Files without which the real engine cannot start; "a|b" means either name will do.
REQUIRED_TOKENIZER_FILES = ("linguistic_tokenizer.npy", "speech_tokenizer_v1.onnx")
REQUIRED_FUNASR_FILES = ("config.yaml", "am.mvn", "model.pt|model.safetensors", "tokens.json|tokens.txt")
REQUIRED_EDITX_FILES = ("config.json", "model.safetensors.index.json|model.safetensors", "tokenizer.model|tokenizer.json")
REQUIRED_DECODER_FILES = ("cosyvoice.yaml", "flow.pt|flow.safetensors", "hift.pt|hift.safetensors", "campplus.onnx")


def missing_model_files(settings) -> list[str]:
    """Paths (relative to model_root) that the Step-Audio-EditX engine needs and cannot find."""
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

    ``auto`` loads Step-Audio-EditX when its model folders are complete and load, else the CPU
    preview engine, and logs why. ``step-audio`` fails loudly (ModelError) if the folders are
    incomplete or do not load; ``preview`` never looks at them.
    """
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
        return PreviewEngine(settings, cache)
    missing = missing_model_files(settings)
    if missing:
        raise ModelError(f"engine=step-audio but these model files are missing under {settings.model_root}: "
                         + ", ".join(missing))
    if settings.engine == "auto":
        try:
            return StepAudioEngine(settings, cache)
        except ModelError as exc:
            log.warning("engine=auto: using the CPU preview engine because Step-Audio-EditX does not load: %s", exc)
            return PreviewEngine(settings, cache)
    return StepAudioEngine(settings, cache)
