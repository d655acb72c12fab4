"""Whole-prompt bundles: everything the engine derives from a prompt clip, computed at most once.

Owns: the frozen ``PromptBundle`` (tokens + decoder prompt features + digest), fetching it
cache-first (tokens through the tokenizer's own cache kind ``tokens``, features as kind
``prompt_features`` with the mel and embedding in the binary sidecar), single-flight per digest
so that concurrent requests with the same new clip encode it once, and the per-stage timing of
that work.
Does not own: the models (``tokenizer.py``, ``decoder/``), cache mechanics (``funasr_cache``).

Cache namespaces: tokens use the tokenizer's namespace; prompt features use
``CosyVoice-300M-25Hz-frontend@<fingerprint of cosyvoice.yaml + campplus.onnx>/v<FEATURES_VERSION>``
(the fingerprint is over file contents), so editing ``mel_conf`` or swapping CAM++ invalidates them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.audio_io import Audio, peak_limit
from decoder.frontend import PROMPT_PEAK, PromptFeatures
from prompt_cache.funasr_cache import PromptCache, fingerprint_files, make_namespace
from core.timings import Timer
from tokenizer.step_audio import Tokens

log = logging.getLogger(__name__)

FEATURES_KIND = "prompt_features"
TOKENS_KIND = "tokens"
FEATURES_VERSION = 1   # bump when the frontend's output changes for the same files
# Tokenizer stage -> engine stage name. Its lookup adds to ours; its hash is skipped (we pass the
# digest, computed once per request by the engine).
_TOKENIZER_STAGES = {"preprocess": "tokenize_preprocess", "vq02_encode": "tokenize_vq02",
                     "vq06_encode": "tokenize_vq06", "merge": "tokenize_merge", "cache_lookup": "cache_lookup"}


@dataclass(frozen=True)
class PromptBundle:
    """What a prompt clip contributes to a request: its tokens, its decoder features, its digest."""

    tokens: Tokens
    features: PromptFeatures   # mel [T, 80] float32 at 50 Hz, embedding [192] float32
    digest: str

    def __post_init__(self) -> None:
        if self.tokens.n_groups == 0:
            raise ValueError("PromptBundle.tokens has no whole token group")


def features_namespace(decoder_folder: Path, memo_dir: Path | None = None) -> str:
    """Cache namespace of the prompt features computed from ``decoder_folder``'s frontend files
    (content-keyed; ``memo_dir`` is the cache folder holding the file-hash memo). No numerics
    class: the features are continuous values that no decision is taken on, so TF32's rounding
    moves them by far less than the flow decoder's own noise."""
    files = [Path(decoder_folder) / "cosyvoice.yaml", Path(decoder_folder) / "campplus.onnx"]
    return make_namespace(f"{Path(decoder_folder).name}-frontend", fingerprint_files(files, memo_dir),
                          FEATURES_VERSION)


class PromptBundler:
    """Builds :class:`PromptBundle` objects cache-first; thread-safe.

    Parameters:
        tokenizer: a ``tokenizer.StepAudioTokenizer`` (it caches its tokens itself).
        frontend: the decoder's ``PromptFrontend`` (``mel``, ``embedding``).
        cache: the prompt cache for the features.
        namespace: :func:`features_namespace` of the decoder folder.
    """

    def __init__(self, tokenizer, frontend, cache: PromptCache, namespace: str) -> None:
        self.tokenizer = tokenizer
        self.frontend = frontend
        self.cache = cache
        self.namespace = namespace
        self._guard = threading.Lock()
        self._inflight: dict[str, list] = {}   # digest -> [lock, users]

    @property
    def namespaces(self) -> dict[str, str]:
        return {TOKENS_KIND: self.tokenizer.namespace, FEATURES_KIND: self.namespace}

    def bundle(self, audio: Audio, digest: str, timer: Timer) -> tuple[PromptBundle, frozenset[str]]:
        """The bundle of ``audio`` (decoded, any rate) whose digest is ``digest``.

        Stages added to ``timer``: cache_lookup, and on a miss tokenize_* / prompt_mel /
        speaker_embedding / cache_store; stages served from the cache are recorded at 0 ms and
        marked cached. Returns (bundle, the kinds that came from the cache).

        Raises:
            InputError: the clip is unusable (silent, too short). ModelError: a model misbehaved.
        """
        with self._guard:
            slot = self._inflight.setdefault(digest, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:   # single-flight: a second request for this clip waits, then hits the cache
                return self._bundle(audio, digest, timer)
        finally:
            with self._guard:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._inflight[digest]

    def _bundle(self, audio: Audio, digest: str, timer: Timer) -> tuple[PromptBundle, frozenset[str]]:
        result = self.tokenizer.tokenize(audio, digest)
        for name, ms in result.timings.stages_ms.items():
            if name in _TOKENIZER_STAGES:
                timer.record(_TOKENIZER_STAGES[name], ms)
        hits = set()
        if result.hit:
            hits.add(TOKENS_KIND)
            timer.record("tokenize_vq02", 0.0, cached=True)
            timer.record("tokenize_vq06", 0.0, cached=True)
        with timer.stage("cache_lookup"):
            features = _features_from_entry(self.cache.get(FEATURES_KIND, self.namespace, digest))
        if features is not None:
            hits.add(FEATURES_KIND)
            timer.record("prompt_mel", 0.0, cached=True)
            timer.record("speaker_embedding", 0.0, cached=True)
        else:
            features = self._compute_features(audio, digest, timer)
        if hits == {TOKENS_KIND, FEATURES_KIND}:
            timer.mark_cached("cache_lookup")
        return PromptBundle(result.tokens, features, digest), frozenset(hits)

    def _compute_features(self, audio: Audio, digest: str, timer: Timer) -> PromptFeatures:
        start = time.perf_counter()
        samples = peak_limit(audio.samples, PROMPT_PEAK)   # the reference limits the flow prompt to 0.6
        with timer.stage("prompt_mel"):
            mel = np.ascontiguousarray(self.frontend.mel(samples, audio.sample_rate), dtype=np.float32)
        with timer.stage("speaker_embedding"):
            embedding = np.ascontiguousarray(self.frontend.embedding(samples, audio.sample_rate), dtype=np.float32)
        features = PromptFeatures(mel, embedding)
        with timer.stage("cache_store"):
            self.cache.put(FEATURES_KIND, self.namespace, digest, {"frames": int(mel.shape[0])},
                           time.perf_counter() - start, arrays={"mel": mel, "embedding": embedding})
        return features


def _features_from_entry(entry) -> PromptFeatures | None:
    """Features of a cache entry, or None when absent or malformed (then they are recomputed)."""
    if entry is None:
        return None
    try:
        mel = np.asarray(entry.arrays["mel"], dtype=np.float32)
        embedding = np.asarray(entry.arrays["embedding"], dtype=np.float32).reshape(-1)
        if mel.ndim != 2 or mel.shape[0] != int(entry.payload["frames"]) or embedding.size == 0:
            raise ValueError(f"shapes {mel.shape} / {embedding.shape}")
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring a malformed prompt_features cache entry %s: %s", entry.digest[:12], exc)
        return None
    return PromptFeatures(mel, embedding)

