"""Real small models for the quality scorers in tests and benches (no mocks, no downloads).

Owns: ``PocketSphinxRecognizer`` (CMU PocketSphinx with the US English acoustic model and
dictionary that ship inside its wheel; optionally a closed vocabulary, see below) and
``ResemblyzerEmbedder`` (Resemblyzer's GE2E speaker encoder, whose weights ship inside its wheel).
Both satisfy ``quality.contract``; the studio itself uses the engine's Paraformer and CAM++.
Does not own: the scorers (``quality``), eSpeak clips (``preview.espeak``).

Why a closed vocabulary: with its general language model PocketSphinx mishears eSpeak NG's
synthetic voice badly (about 70 % WER on short sentences, measured here); a word-loop grammar over a
vocabulary -- any of its words, in any order, any number of times -- keeps the recogniser honest (it
does not know the target sentence) while making its errors small enough to tell a right take from a
wrong one. ``vocabulary=None`` uses the general model.
"""

from __future__ import annotations

import re
import threading

import numpy as np

from core.audio_io import Audio, resample
from core.transcript import Word
from quality.contract import Recognition

ASR_RATE = 16000
FRAME_S = 0.01          # PocketSphinx frames are 10 ms
_FILLER = re.compile(r"^(<s>|</s>|<sil>|\[.*\]|\+\+.*\+\+)$")


class PocketSphinxRecognizer:
    """``Recognizer`` over PocketSphinx (one decoder, serialised by a lock).

    Parameters:
        vocabulary: words (lower case, in the wheel's dictionary) for a word-loop grammar; None: the
            general US English language model.
    """

    timed = True

    def __init__(self, vocabulary: tuple[str, ...] | None = None) -> None:
        from pocketsphinx import Decoder

        self._decoder = Decoder(samprate=ASR_RATE, loglevel="ERROR")
        if vocabulary:
            words = sorted({w.lower() for w in vocabulary})
            grammar = ("#JSGF V1.0;\ngrammar loop;\npublic <s> = ( " + " | ".join(words) + " )+ ;\n")
            self._decoder.add_jsgf_string("loop", grammar)
            self._decoder.activate_search("loop")
        self._lock = threading.Lock()
        self.name = "pocketsphinx-en-us" + ("+grammar" if vocabulary else "")

    def recognize(self, audio: Audio) -> Recognition:
        samples = resample(np.asarray(audio.samples, np.float32), audio.sample_rate, ASR_RATE)
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        with self._lock:
            d = self._decoder
            d.start_utt()
            d.process_raw(pcm, full_utt=True)
            d.end_utt()
            segments = [(seg.word, seg.start_frame, seg.end_frame) for seg in d.seg()]
        words = tuple(Word(re.sub(r"\(\d+\)$", "", w), start * FRAME_S, (end + 1) * FRAME_S)
                      for w, start, end in segments if not _FILLER.match(w))
        return Recognition(" ".join(w.text for w in words), words, True, self.name)


class ResemblyzerEmbedder:
    """``Embedder`` over Resemblyzer's VoiceEncoder (256 values, CPU; serialised by a lock)."""

    def __init__(self) -> None:
        from resemblyzer import VoiceEncoder

        self._encoder = VoiceEncoder(device="cpu", verbose=False)
        self._lock = threading.Lock()
        self.name = "resemblyzer-ge2e"

    def embed(self, audio: Audio) -> np.ndarray:
        from resemblyzer import preprocess_wav

        wav = preprocess_wav(np.asarray(audio.samples, np.float32), source_sr=audio.sample_rate)
        with self._lock:
            return np.asarray(self._encoder.embed_utterance(wav), np.float32)
