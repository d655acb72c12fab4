"""The CPU preview engine: eSpeak NG speech adapted to the prompt voice with WORLD.

Owns: :class:`PreviewEngine`, the :class:`tts_engine.contract.Engine` that runs without GPU or
downloaded weights. A clone decodes the prompt, fetches (or computes and caches, kind ``preview_voice``)
its :class:`preview.voice.VoiceProfile`, speaks the text with eSpeak NG at the prompt's speaking
rate, and re-synthesises it with WORLD using the prompt's pitch statistics and warped envelope.
Edits are DSP (``preview.effects``); options without an honest DSP counterpart are reported as
unavailable by :meth:`PreviewEngine.capabilities`. Transcription uses the tokenizer folder's
Paraformer (``tokenizer.asr``) when that folder is under ``--model-root``, and otherwise refuses
with a message saying why.
Does not own: the cache mechanics (``funasr_cache.store``) or the cache-first fetch
(``tts_engine.prompt_fetch``), request validation rules (``tts_engine.contract``), audio
decoding (``core.audio_io``).

``clone_stream`` speaks sentence by sentence: each sentence is adapted on its own (the synthetic
voice's profile is measured on the first sentences with enough voiced speech) and leaves as soon
as it is re-synthesised, so its audio differs slightly from ``clone``'s whole-text adaptation.

Stage names match the Step-Audio engine where they mean the same: decode_audio, hash,
cache_lookup, prompt_analysis (``(hit)`` when cached), synthesis (eSpeak), adaptation (WORLD),
effects; plus counters audio_s and rtf.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

import numpy as np

from core.audio_io import Audio, AudioSource, load_audio, resample
from core.edit_options import EDIT_TYPES, EMOTIONS, STYLES
from core.errors import InputError, ModelError
from core.settings import FUNASR_SUBDIR
from core.timings import Timer
from core.transcript import Transcript
from funasr_cache.store import audio_digest, make_namespace
from preview import effects, espeak, voice
from preview import text as text_mod
from tokenizer.asr import Transcriber
from tts_engine.contract import CloneOptions, EditCapability, Engine, EngineInfo, ProgressFn, PromptReport, Result, ResultStream, new_seed, no_progress, validate_edit, validate_text
from tts_engine.prompt_fetch import PromptKind, fetch_prompt

log = logging.getLogger(__name__)

PROFILE_KIND = "preview_voice"
ALGORITHM_VERSION = 1        # bump when the analysis or its stored fields change
ENGINE_NAME = "Preview (eSpeak NG + WORLD)"
SAMPLE_RATE = voice.SAMPLE_RATE
_RATE_LIMITS = (0.75, 1.35)  # how far the prompt's speaking rate may move eSpeak's
_LEVEL_LIMITS_DB = (-32.0, -14.0)
_DETAIL = ("CPU preview: eSpeak NG speech adapted to the prompt's pitch and timbre with WORLD, not voice "
                    "cloning. For Step-Audio-EditX, run scripts/download_models.py (or point --model-root at the "
                    "downloaded models) and restart with --engine auto.")


def _capabilities() -> tuple[EditCapability, ...]:
    caps = {
        "emotion": EditCapability("emotion", EMOTIONS,
                                  unavailable_options=effects.unavailable(EMOTIONS, effects.EMOTION_PRESETS),
                                  note=effects.EMOTION_NOTE),
        "style": EditCapability("style", STYLES, unavailable_options=effects.unavailable(STYLES, effects.STYLE_PRESETS),
                                note=effects.STYLE_NOTE),
        "speed": EditCapability("speed", EDIT_TYPES["speed"],
                                note="preview: pitch-preserving time stretch of the WORLD frames"),
        "paralinguistic": EditCapability("paralinguistic", (), available=False,
                                         note="inserting laughter, breathing or sighs needs Step-Audio-EditX; "
                                              "signal processing cannot produce them honestly"),
        "denoise": EditCapability("denoise", (), note="preview: spectral gating (noisereduce)"),
        "vad": EditCapability("vad", (), note="preview: energy-based silence removal (librosa)"),
    }
    return tuple(caps[name] for name in EDIT_TYPES)


# What the preview can do, in EDIT_TYPES order (the UI greys out the rest).
CAPABILITIES = _capabilities()


def _analyse_prompt(audio: Audio, timer: Timer) -> voice.VoiceProfile:
    with timer.stage("prompt_analysis"):
        return voice.analyse_prompt(audio.samples)


def _fingerprint() -> str:
    """Versions of everything that shapes a cached profile."""
    text = f"espeak-ng {espeak.version()}|pyworld {voice.pyworld.__version__}"  # imported quietly there
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class PreviewEngine(Engine):
    """eSpeak NG + WORLD behind the :class:`tts_engine.contract.Engine` interface. Thread-safe: it keeps no
    per-request state, eSpeak calls are serialised inside ``preview.espeak`` and WORLD is pure."""

    def __init__(self, settings, cache) -> None:
        self._settings = settings
        self._cache = cache
        self._error = ""
        self._transcriber = Transcriber(settings.tokenizer_dir / FUNASR_SUBDIR, "cpu", settings.max_prompt_seconds)
        try:
            self._namespace = make_namespace("preview-espeak-world", _fingerprint(), ALGORITHM_VERSION)
        except ModelError as exc:
            # Keep the app up so /readyz and the banner can say what is wrong.
            self._error = str(exc)
            self._namespace = make_namespace("preview-espeak-world", "unavailable", ALGORITHM_VERSION)
            log.error("preview engine: %s", exc)
        self._profile_kind = PromptKind(PROFILE_KIND, self._namespace, _analyse_prompt, lambda p: p.to_cache(),
                                        lambda entry: voice.VoiceProfile.from_cache(entry.payload, entry.arrays),
                                        hit_stages=("prompt_analysis",))

    # ------------------------------------------------------------------ interface basics

    @property
    def cache(self):
        return self._cache

    @property
    def namespace(self) -> str:
        """The cache namespace of this engine's prompt profiles."""
        return self._namespace

    def prompt_namespaces(self) -> dict[str, str]:
        return {PROFILE_KIND: self._namespace}

    def describe(self) -> EngineInfo:
        return EngineInfo(name=ENGINE_NAME, preview=True, device="cpu", detail=_DETAIL,
                          sample_rate=SAMPLE_RATE)

    def capabilities(self) -> tuple[EditCapability, ...]:
        return CAPABILITIES

    def ready(self) -> tuple[bool, str]:
        return (False, self._error) if self._error else (True, "ok")

    @property
    def transcriber(self):
        """The tokenizer folder's Paraformer (``tokenizer.asr.Transcriber``; ``available`` only when the
        folder is there); the quality checks use it as their recogniser too."""
        return self._transcriber

    def transcribe(self, audio: AudioSource) -> Transcript:
        """Transcribe with the tokenizer folder's Paraformer when that folder is there (it runs on the
        CPU); eSpeak and WORLD cannot recognise speech, so without it this says so.

        Raises:
            InputError: no ASR model under ``--model-root``, bad audio, or nothing heard.
        """
        if not self._transcriber.available:
            raise InputError("the preview engine cannot transcribe: eSpeak NG and WORLD do not recognise speech, "
                             f"and the Paraformer ASR model is not under {self._transcriber.folder}. Please type "
                             "what the clip says, or get the models with scripts/download_models.py")
        return self._transcriber.transcribe(audio)

    def _check(self) -> None:
        if self._error:
            raise ModelError(f"the preview engine is not usable: {self._error}")

    # ------------------------------------------------------------------ prompt work

    def _decode(self, source: AudioSource, timer: Timer, what: str = "the prompt clip") -> tuple[np.ndarray, str]:
        """Decoded clip at 24 kHz ``[N]`` and the digest of the decoded samples (at their own rate)."""
        with timer.stage("decode_audio"):
            audio = load_audio(source, max_seconds=self._settings.max_prompt_seconds, what=what)
        with timer.stage("hash"):
            digest = audio_digest(audio.samples, audio.sample_rate)
        with timer.stage("decode_audio"):
            samples = resample(audio.samples, audio.sample_rate, SAMPLE_RATE)
        return samples, digest

    def _profile(self, samples: np.ndarray, digest: str, timer: Timer) -> tuple[voice.VoiceProfile, bool]:
        """The prompt's voice profile, cache-first (``tts_engine.prompt_fetch``); (profile, hit).

        A damaged entry (or one imported from a foreign bundle) does not break this voice for good:
        the helper recomputes and overwrites it.
        """
        return fetch_prompt(self._cache, self._profile_kind, Audio(samples, SAMPLE_RATE), digest, timer)

    def prepare_prompt(self, prompt_audio: AudioSource) -> PromptReport:
        """Analyse (or fetch from the cache) the voice profile of a clip.

        Raises:
            InputError: undecodable, too long, or without voiced speech.
        """
        self._check()
        timer = Timer()
        samples, digest = self._decode(prompt_audio, timer)
        _, hit = self._profile(samples, digest, timer)
        timings = timer.finish()
        log.debug(timings.log_line("prepare_prompt", secrets.token_hex(4)))
        kinds = frozenset({PROFILE_KIND})
        return PromptReport(digest=digest, hits=kinds if hit else frozenset(), misses=frozenset() if hit else kinds,
                            timings=timings, namespaces={PROFILE_KIND: self._namespace})

    # ------------------------------------------------------------------ clone

    def _speaking_rate(self, prompt_text: str, prompt: voice.VoiceProfile) -> int:
        """eSpeak's rate (words/min) scaled so that it talks about as fast as the prompt speaker:
        the ratio of eSpeak's duration for the prompt transcript to the prompt's speech duration."""
        spoken = text_mod.prepare(prompt_text)
        if not spoken.sentences or prompt.speech_seconds <= 0.2:
            return espeak.DEFAULT_RATE_WPM
        reference = espeak.speak(spoken.text, self._voice(spoken.voice)[0])
        spans = voice.speech_intervals(reference.samples)
        reference_s = float(sum(b - a for a, b in spans)) / reference.sample_rate
        ratio = float(np.clip(reference_s / prompt.speech_seconds, *_RATE_LIMITS))
        return int(round(espeak.DEFAULT_RATE_WPM * ratio))

    @staticmethod
    def _voice(name: str) -> tuple[str, str]:
        """(available eSpeak voice, note) falling back to Mandarin/English when ``name`` is missing."""
        if espeak.has_voice(name):
            return name, ""
        fallback = text_mod.MANDARIN if name in ("yue", text_mod.JAPANESE) else text_mod.ENGLISH
        return fallback, f"eSpeak NG has no {name!r} voice here; using {fallback!r}"

    def clone(self, prompt_audio: AudioSource, prompt_text: str, target_text: str, *, seed: int | None = None,
              options: CloneOptions = CloneOptions(), progress: ProgressFn = no_progress) -> Result:
        """Speak ``target_text`` with eSpeak NG, adapted to the voice of ``prompt_audio``.

        ``options.flow_steps`` has no meaning here and is ignored. The output is a 24 kHz mono
        clip; the same seed gives the same output (the seed drives a slow pitch drift).

        Raises:
            InputError: bad audio, a prompt without voiced speech, empty or over-long text, or a
                text with nothing to pronounce once tags are removed.
            ModelError: eSpeak NG could not be loaded or produced no audio.
        """
        seed = new_seed(seed)
        spoken = self._clone_text(prompt_text, target_text)
        timer = Timer()
        progress(0.0, "analysing the prompt voice")
        samples, digest = self._decode(prompt_audio, timer)
        prompt, _ = self._profile(samples, digest, timer)

        voice_name, fallback_note = self._voice(spoken.voice)
        for note in (spoken.note, fallback_note):
            if note:
                log.info("preview: %s", note)
        with timer.stage("synthesis"):
            rate = self._speaking_rate(prompt_text, prompt)
        timer.set_counter("rate_wpm", rate)
        count = len(spoken.sentences)
        pieces = []
        for index, sentence in enumerate(spoken.sentences):
            progress(0.1 + 0.4 * index / count, f"speaking sentence {index + 1}/{count}")
            with timer.stage("synthesis"):
                speech = espeak.speak(sentence, voice_name, rate_wpm=rate)
                pieces.append(resample(speech.samples, speech.sample_rate, SAMPLE_RATE))
        base = np.concatenate(pieces)
        if voice.loudness_db(base) <= -100.0:
            raise InputError("eSpeak NG found nothing to pronounce in the target text")

        params = []
        for index, piece in enumerate(pieces):
            progress(0.5 + 0.4 * index / count, f"adapting sentence {index + 1}/{count}")
            with timer.stage("adaptation"):
                params.append(voice.analyse(piece))
        with timer.stage("adaptation"):
            joined = voice.WorldParams(np.concatenate([p.f0 for p in params]), np.concatenate([p.sp for p in params]),
                                       np.concatenate([p.ap for p in params]))
            source = voice.profile(base, joined, what="the synthetic speech")
            adapted, alpha = voice.adapt(joined, source, prompt)
        timer.set_counter("warp", alpha)
        progress(0.9, "re-synthesising")
        with timer.stage("effects"):
            adapted = effects.humanise(adapted, seed)
        with timer.stage("adaptation"):
            out = voice.synthesize(adapted)
        with timer.stage("effects"):
            out = effects.set_level(out, float(np.clip(prompt.loudness_db, *_LEVEL_LIMITS_DB)))
        return self._finish("clone", out, spoken.text, timer, seed, digest, progress)

    def clone_stream(self, prompt_audio: AudioSource, prompt_text: str, target_text: str, *,
                     seed: int | None = None, options: CloneOptions = CloneOptions()) -> ResultStream:
        """:meth:`clone`, one sentence at a time (see the module docstring); same errors, raised by
        the first ``next()``. Stages as :meth:`clone`, plus the counter ``ttfa_ms``."""
        seed = new_seed(seed)
        return ResultStream(lambda token: self._clone_sentences(prompt_audio, prompt_text, target_text, seed, token),
                            seed, SAMPLE_RATE)

    def _clone_text(self, prompt_text: str, target_text: str):
        """The checks both clone forms share; the target text prepared for eSpeak (its sentences)."""
        self._check()
        limit = self._settings.max_text_chars
        validate_text(target_text, "target text", limit)
        validate_text(prompt_text, "prompt text", limit)
        spoken = text_mod.prepare(target_text)
        if not spoken.sentences:
            raise InputError(f"target text has nothing to speak once tags are removed ({spoken.note})")
        return spoken

    def _clone_sentences(self, prompt_audio, prompt_text: str, target_text: str, seed: int, token):
        spoken = self._clone_text(prompt_text, target_text)
        timer = Timer()
        samples, digest = self._decode(prompt_audio, timer)
        prompt, _ = self._profile(samples, digest, timer)
        voice_name, _ = self._voice(spoken.voice)
        with timer.stage("synthesis"):
            rate = self._speaking_rate(prompt_text, prompt)
        timer.set_counter("rate_wpm", rate)
        level = float(np.clip(prompt.loudness_db, *_LEVEL_LIMITS_DB))
        source, waiting, out = None, [], []
        for index, sentence in enumerate(spoken.sentences):
            token.check()
            with timer.stage("synthesis"):
                speech = espeak.speak(sentence, voice_name, rate_wpm=rate)
                piece = resample(speech.samples, speech.sample_rate, SAMPLE_RATE)
            with timer.stage("adaptation"):
                waiting.append((index, piece, voice.analyse(piece)))
                if source is None:
                    source = self._sentence_profile(waiting, last=index == len(spoken.sentences) - 1)
            if source is None:
                continue
            for number, piece, params in waiting:
                token.check()
                with timer.stage("adaptation"):
                    adapted, _ = voice.adapt(params, source, prompt)
                with timer.stage("effects"):
                    adapted = effects.humanise(adapted, (seed + number) % 2**31)
                with timer.stage("adaptation"):
                    wav = voice.synthesize(adapted)
                with timer.stage("effects"):
                    wav = effects.set_level(wav, level) if voice.loudness_db(wav) > -100.0 else wav
                if not np.isfinite(wav).all():
                    raise ModelError("the preview engine produced no usable audio for this clone")
                if not out:
                    timer.set_counter("ttfa_ms", timer.elapsed_ms())
                out.append(wav.astype(np.float32))
                yield Audio(out[-1], SAMPLE_RATE)
            waiting = []
        return self._finish("clone", np.concatenate(out), spoken.text, timer, seed, digest, no_progress)

    @staticmethod
    def _sentence_profile(waiting: list, last: bool) -> voice.VoiceProfile | None:
        """The synthetic voice's profile from the sentences waiting so far; None while they have too
        little voiced speech (the last sentence makes that an ``InputError``, as in :meth:`clone`)."""
        base = np.concatenate([piece for _, piece, _ in waiting])
        if voice.loudness_db(base) <= -100.0:
            if last:
                raise InputError("eSpeak NG found nothing to pronounce in the target text")
            return None
        joined = voice.WorldParams(np.concatenate([p.f0 for _, _, p in waiting]),
                                   np.concatenate([p.sp for _, _, p in waiting]),
                                   np.concatenate([p.ap for _, _, p in waiting]))
        try:
            return voice.profile(base, joined, what="the synthetic speech")
        except InputError:
            if last:
                raise
            return None

    def _finish(self, kind: str, samples: np.ndarray, said: str, timer: Timer, seed: int, digest: str,
                progress: ProgressFn) -> Result:
        if len(samples) == 0 or not np.isfinite(samples).all():
            raise ModelError(f"the preview engine produced no usable audio for this {kind}")
        audio = Audio(samples, SAMPLE_RATE)
        timings = timer.finish(audio_seconds=audio.duration)
        log.debug(timings.log_line(kind, secrets.token_hex(4)))
        progress(1.0, "done")
        return Result(audio=audio, text=said, timings=timings, seed=seed, prompt_digest=digest)

    # ------------------------------------------------------------------ edit

    def edit(self, audio: AudioSource, audio_text: str, edit_type: str, edit_info: str | None = None,
             text: str | None = None, *, seed: int | None = None, options: CloneOptions = CloneOptions(),
             progress: ProgressFn = no_progress) -> Result:
        """Apply a DSP version of ``edit_type``/``edit_info`` to ``audio``.

        Edits are deterministic; the seed is only recorded in the result.

        Raises:
            InputError: bad audio, empty or over-long ``audio_text``, an unknown edit, or one the
                preview cannot do (the message says why).
        """
        self._check()
        seed = new_seed(seed)
        edit_info = validate_edit(edit_type, edit_info, self.capabilities())
        validate_text(audio_text, "audio text", self._settings.max_text_chars)
        timer = Timer()
        progress(0.0, f"{edit_type} edit")
        samples, digest = self._decode(audio, timer, what="the audio to edit")
        if edit_type == "denoise":
            with timer.stage("effects"):
                out = effects.denoise(samples, SAMPLE_RATE)
        elif edit_type == "vad":
            with timer.stage("effects"):
                out = effects.remove_silence(samples, SAMPLE_RATE)
        else:
            if edit_type == "speed":
                prosody = effects.Prosody(tempo=effects.SPEED_FACTORS[edit_info])
            else:
                presets = effects.EMOTION_PRESETS if edit_type == "emotion" else effects.STYLE_PRESETS
                prosody = presets[edit_info]
            level = voice.loudness_db(samples)
            with timer.stage("prompt_analysis"):
                # DIO, not Harvest: edit inputs are mostly this engine's clean output, and DIO is ~10x faster.
                params = voice.analyse(samples)
            progress(0.5, "re-synthesising")
            with timer.stage("effects"):
                params = effects.apply_prosody(params, prosody)
            with timer.stage("adaptation"):
                out = voice.synthesize(params)
            with timer.stage("effects"):
                out = effects.set_level(out, level + prosody.gain_db)
        return self._finish("edit", out, audio_text, timer, seed, digest, progress)
