"""Transcribing a prompt clip with the Paraformer ASR model that the tokenizer folder already holds.

Owns: :class:`Transcriber`, which loads the whole streaming Paraformer of the tokenizer folder
(encoder, CIF predictor and decoder: the tokenizer itself runs only the encoder) lazily on first
use, through funasr's public ``AutoModel`` API, and turns a clip into text by running funasr's own
streaming inference over it in one final pass.
Does not own: building/loading the model from the folder (``tokenizer.paraformer_stream``), audio
decoding (``core.audio_io``), deciding when to transcribe (the engines and the edges).

Nothing is downloaded: the model is the folder's ``model.safetensors`` / ``model.pt``, its
``tokens.json`` and ``am.mvn``. No VAD or punctuation model is run (the folder has none), so the
text comes without punctuation; clips are at most ``--max-prompt-seconds`` long, so no VAD is needed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

from core.audio_io import AudioSource, load_audio, resample
from core.errors import InputError, ModelError
from core.timings import Timer
from core.transcript import Transcript

log = logging.getLogger(__name__)

ASR_RATE = 16000
# funasr's streaming settings for this model family: 600 ms chunks, 300 ms look-ahead.
CHUNK_SIZE = (0, 10, 5)
ENCODER_LOOK_BACK = 4
DECODER_LOOK_BACK = 1


class Transcriber:
    """The tokenizer folder's Paraformer as an ASR model. Thread-safe: one clip at a time.

    Parameters:
        folder: the FunASR model folder (``<tokenizer>/dengcunqin/...-online``).
        device: where to run it; the first :meth:`transcribe` loads it there (about 0.9 GB for the
            real model, in addition to the tokenizer's encoder-only copy).
        max_seconds: the longest clip accepted.
    """

    def __init__(self, folder: Path, device: str | torch.device = "cpu", max_seconds: float | None = None) -> None:
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.max_seconds = max_seconds
        self._auto = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        """Whether the folder is there (the files are checked when the model is loaded)."""
        return self.folder.is_dir()

    def _model(self):
        if self._auto is None:
            from tokenizer.paraformer_stream import build_auto_model

            self._auto, files = build_auto_model(self.folder, self.device)
            log.info("Paraformer ASR loaded from %s (%s) on %s", files.folder.name, files.weights.name, self.device)
        return self._auto

    def transcribe(self, source: AudioSource) -> Transcript:
        """What ``source`` says.

        Raises:
            InputError: undecodable or too long audio, or no words were heard.
            ModelError: the folder is missing or incomplete, or funasr failed.
        """
        if not self.available:
            raise ModelError(f"the ASR model folder {self.folder} is missing")
        timer = Timer()
        with timer.stage("decode_audio"):
            audio = load_audio(source, max_seconds=self.max_seconds, what="the clip to transcribe")
            samples = np.ascontiguousarray(resample(audio.samples, audio.sample_rate, ASR_RATE), dtype=np.float32)
        with self._lock:
            with timer.stage("asr_load"):
                auto = self._model()
            with timer.stage("asr"):
                text = self._run(auto, samples, self.device)
        timings = timer.finish(audio_seconds=audio.duration)
        if not text:
            raise InputError("no words were heard in the clip; please type what it says")
        return Transcript(text=text, timings=timings, model=self.folder.name)

    @staticmethod
    def _run(auto, samples: np.ndarray, device: torch.device) -> str:
        from tokenizer.paraformer_stream import _quiet_and_seed_neutral

        try:
            # funasr's generate() seeds the global RNGs and prints; keep both out of the process.
            with _quiet_and_seed_neutral(device), torch.inference_mode():
                results = auto.generate(input=samples, cache={}, is_final=True, chunk_size=list(CHUNK_SIZE),
                                        encoder_chunk_look_back=ENCODER_LOOK_BACK,
                                        decoder_chunk_look_back=DECODER_LOOK_BACK, disable_pbar=True)
        except Exception as exc:  # noqa: BLE001 - funasr raises many kinds; the user needs one
            log.exception("Paraformer ASR failed")
            raise ModelError(f"the ASR model failed: {exc}") from None
        if not results or not isinstance(results[0], dict):
            return ""
        return " ".join(str(results[0].get("text", "")).split())
