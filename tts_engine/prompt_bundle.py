"""Whole-prompt bundles: what the Step-Audio engine derives from a prompt clip, computed at most once.

Owns: the frozen ``PromptBundle`` (tokens + decoder prompt features + digest), the two prompt
kinds ``tokens`` and ``prompt_features`` (what a stored entry holds, their cache namespaces),
and fetching both through the one cache-first helper ``tts_engine.prompt_fetch.fetch_prompt`` (the
preview engine's voice profile goes through it too). Single-flight is the cache's
(``PromptCache.get_or_compute``): N concurrent requests with one new clip compute each kind once.
Does not own: the models (``tokenizer/``, ``decoder/``), the fetch policy and its timing
(``tts_engine.prompt_fetch``), cache mechanics (``funasr_cache``).

Cache namespaces: tokens use ``Step-Audio-Tokenizer@<SHA-256 fingerprint of its model files>/v<tokenizer
PREPROCESS_VERSION>/<numerics class>``; prompt features use
``CosyVoice-300M-25Hz-frontend@<fingerprint of cosyvoice.yaml + campplus.onnx>/v<FEATURES_VERSION>``
(fingerprints are over file contents), so editing ``mel_conf`` or swapping CAM++ invalidates them.

Stages added to the request's timer: ``cache_lookup`` (see ``tts_engine.prompt_fetch``), and when
computed ``tokenize_preprocess/vq02/vq06/merge`` (tokens) and ``prompt_mel``,
``speaker_embedding`` (features); served from the cache, ``tokenize_vq02/vq06`` and
``prompt_mel``/``speaker_embedding`` are recorded at 0 ms and marked cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.audio_io import Audio
from core.timings import Timer
from decoder.frontend import PromptFeatures
from funasr_cache.store import CacheEntry, PromptCache, fingerprint_files, make_namespace
from tokenizer.step_audio import PREPROCESS_VERSION, Tokens
from tts_engine.prompt_fetch import PromptKind, fetch_prompt

FEATURES_KIND = "prompt_features"
TOKENS_KIND = "tokens"
FEATURES_VERSION = 1   # bump when the frontend's output changes for the same files

@dataclass(frozen=True)
class PromptBundle:
    """What a prompt clip contributes to a request: its tokens, its decoder features, its digest."""

    tokens: Tokens
    features: PromptFeatures   # mel [T, 80] float32 at 50 Hz, embedding [192] float32
    digest: str

    def __post_init__(self) -> None:
        if self.tokens.n_groups == 0:
            raise ValueError("PromptBundle.tokens has no whole token group")


def tokens_namespace(tokenizer, memo_dir: Path | None = None, numerics: str = "") -> str:
    """Cache namespace of the tokens of a ``tokenizer.step_audio.StepAudioTokenizer``: content-keyed
    (``memo_dir`` is the cache folder holding the file-hash memo) and, since TF32 can flip vq02 codes,
    tagged with the numerics class (``core.devices.numerics_class``) the tokens were computed under."""
    return make_namespace(tokenizer.folder.name, fingerprint_files(tokenizer.model_files, memo_dir=memo_dir),
                          PREPROCESS_VERSION, numerics)


def features_namespace(decoder_folder: Path, memo_dir: Path | None = None) -> str:
    """Cache namespace of the prompt features computed from ``decoder_folder``'s frontend files
    (content-keyed; ``memo_dir`` is the cache folder holding the file-hash memo). No numerics
    class: the features are continuous values that no decision is taken on, so TF32's rounding
    moves them by far less than the flow decoder's own noise."""
    files = [Path(decoder_folder) / "cosyvoice.yaml", Path(decoder_folder) / "campplus.onnx"]
    return make_namespace(f"{Path(decoder_folder).name}-frontend", fingerprint_files(files, memo_dir),
                          FEATURES_VERSION)


def tokens_kind(tokenizer, namespace: str | None = None) -> PromptKind[Tokens]:
    """The ``tokens`` prompt kind of a tokenizer: ``{"vq02": [...], "vq06": [...]}``, no arrays.
    ``namespace`` defaults to :func:`tokens_namespace` without memo or numerics class."""
    return PromptKind(TOKENS_KIND, namespace or tokens_namespace(tokenizer), lambda audio, timer: tokenizer.tokenize(audio, timer),
                      _tokens_entry, _tokens_from_entry, hit_stages=("tokenize_vq02", "tokenize_vq06"))


def features_kind(frontend, namespace: str) -> PromptKind[PromptFeatures]:
    """The ``prompt_features`` kind of a decoder frontend: ``{"frames": T}`` + arrays ``mel``, ``embedding``."""
    return PromptKind(FEATURES_KIND, namespace, lambda audio, timer: frontend.features(audio, timer),
                      _features_entry, _features_from_entry, hit_stages=("prompt_mel", "speaker_embedding"))


def _tokens_entry(tokens: Tokens):
    return {"vq02": list(tokens.vq02), "vq06": list(tokens.vq06)}, None


def _tokens_from_entry(entry: CacheEntry) -> Tokens:
    tokens = Tokens(tuple(entry.payload["vq02"]), tuple(entry.payload["vq06"]))
    if tokens.n_groups == 0:  # never stored by us; a bundle cannot be built from it
        raise ValueError("no whole token group")
    return tokens


def _features_entry(features: PromptFeatures):
    mel = np.ascontiguousarray(features.mel, dtype=np.float32)
    embedding = np.ascontiguousarray(features.embedding, dtype=np.float32)
    return {"frames": int(mel.shape[0])}, {"mel": mel, "embedding": embedding}


def _features_from_entry(entry: CacheEntry) -> PromptFeatures:
    mel = np.asarray(entry.arrays["mel"], dtype=np.float32)
    embedding = np.asarray(entry.arrays["embedding"], dtype=np.float32).reshape(-1)
    if mel.ndim != 2 or mel.shape[0] != int(entry.payload["frames"]) or embedding.size == 0:
        raise ValueError(f"shapes {mel.shape} / {embedding.shape}")
    return PromptFeatures(mel, embedding)


class PromptBundler:
    """Builds :class:`PromptBundle` objects cache-first; thread-safe.

    Parameters:
        tokenizer: a ``tokenizer.step_audio.StepAudioTokenizer`` (pure: it never sees the cache).
        frontend: the decoder's ``PromptFrontend`` (its ``features`` computes mel + embedding).
        cache: the prompt cache.
        namespace: :func:`features_namespace` of the decoder folder (the tokens' namespace comes
            from the tokenizer's files, :func:`tokens_namespace`).
        numerics: the numerics class the tokenizer runs under (``core.devices.numerics_class``).
    """

    def __init__(self, tokenizer, frontend, cache: PromptCache, namespace: str, numerics: str = "") -> None:
        self.tokenizer = tokenizer
        self.frontend = frontend
        self.cache = cache
        self.namespace = namespace
        self.tokens_kind = tokens_kind(tokenizer, tokens_namespace(tokenizer, getattr(cache, "root", None), numerics))
        self.features_kind = features_kind(frontend, namespace)

    @property
    def namespaces(self) -> dict[str, str]:
        return {TOKENS_KIND: self.tokens_kind.namespace, FEATURES_KIND: self.features_kind.namespace}

    def bundle(self, audio: Audio, digest: str, timer: Timer) -> tuple[PromptBundle, frozenset[str]]:
        """The bundle of ``audio`` (decoded, any rate) whose digest is ``digest``.

        Stages added to ``timer``: see the module docstring; ``cache_lookup`` is marked cached
        when both kinds were hits. Returns (bundle, the kinds that came from the cache).

        Raises:
            InputError: the clip is unusable (silent, too short). ModelError: a model misbehaved.
        """
        tokens, tokens_hit = fetch_prompt(self.cache, self.tokens_kind, audio, digest, timer)
        features, features_hit = fetch_prompt(self.cache, self.features_kind, audio, digest, timer)
        hits = frozenset(k for k, hit in ((TOKENS_KIND, tokens_hit), (FEATURES_KIND, features_hit)) if hit)
        if len(hits) == 2:
            timer.mark_cached("cache_lookup")
        return PromptBundle(tokens, features, digest), hits
