"""Transcribing a clip with the Paraformer ASR model that the tokenizer folder already holds.

Owns: :class:`Transcriber`, which loads the whole streaming Paraformer of the tokenizer folder
(encoder, CIF predictor and decoder: the tokenizer itself runs only the encoder) lazily on first
use, through funasr's public ``AutoModel`` API, and turns a clip into text and timed words by
running the model's streaming chunk loop over it in one final pass.
Does not own: building/loading the model from the folder (``tokenizer.paraformer_stream``), audio
decoding (``core.audio_io``), deciding when to transcribe (the engines and the edges), the timing
arithmetic (``tokenizer.cif_timing``).

The loop is funasr's own ``generate`` for this model, step for step, through the model's public
chunk methods (``encode_chunk``, ``calc_predictor_chunk``, ``cal_decoder_with_predictor_chunk``) and
funasr's ``sentence_postprocess``: the text is the same (tests compare the two). Running it here adds
what ``generate`` throws away: the predictor's CIF weights, read by a forward hook on its output
layer, which say when each token is heard (``tokenizer.cif_timing``). The number of tokens those
weights fire is checked against the number the model emitted; a mismatch (a funasr whose predictor
differs) gives the text without word timings and a warning, never made-up times.

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
from core.transcript import Transcript, Word
from tokenizer.cif_timing import cif_token_spans

log = logging.getLogger(__name__)

ASR_RATE = 16000
# funasr's streaming settings for this model family: 600 ms chunks, 300 ms look-ahead.
CHUNK_SIZE = (0, 10, 5)
ENCODER_LOOK_BACK = 4
DECODER_LOOK_BACK = 1
CHUNK_STRIDE = CHUNK_SIZE[1] * 960          # samples per chunk (60 ms LFR frames at 16 kHz)
TAIL_SAMPLES = 960                          # a shorter final chunk only flushes the look-ahead
DROPPED_TOKENS = ("<s>", "</s>", "<unk>", "<OOV>")   # what funasr's text step drops


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
                text, words = self._run(auto, samples, self.device)
        timings = timer.finish(audio_seconds=audio.duration)
        if not text:
            raise InputError("no words were heard in the clip; please type what it says")
        end = audio.duration
        timed = tuple(Word(w, min(a, end), min(max(a, b), end)) for w, (a, b) in words) if words else ()
        return Transcript(text=text, timings=timings, model=self.folder.name, words=timed, timed=words is not None)

    @staticmethod
    def _run(auto, samples: np.ndarray, device: torch.device) -> tuple[str, list | None]:
        """``(text, [(word, (start_s, end_s)), ...])``; the words are None when they cannot be timed."""
        from tokenizer.paraformer_stream import _quiet_and_seed_neutral

        try:
            # funasr's helpers may print and touch the global RNGs; keep both out of the process.
            with _quiet_and_seed_neutral(device), torch.inference_mode():
                tokens, spans = _decode(auto, torch.from_numpy(samples), device)
                return _text_and_words(tokens, spans)
        except Exception as exc:  # noqa: BLE001 - funasr raises many kinds; the user needs one
            log.exception("Paraformer ASR failed")
            raise ModelError(f"the ASR model failed: {exc}") from None


def _decode(auto, samples: torch.Tensor, device: torch.device) -> tuple[list[str], list | None]:
    """funasr's streaming ``generate`` over a whole clip (``is_final``), keeping the CIF weights.

    Returns the emitted tokens (blank, sos and eos removed, as funasr does) and one span per token,
    or None for the spans when the weights do not account for the emitted tokens.
    """
    from funasr.utils.load_utils import extract_fbank

    model, kwargs = auto.model, auto.kwargs
    frontend, tokenizer, predictor = kwargs["frontend"], kwargs["tokenizer"], model.predictor
    cache: dict = {}
    model.init_cache(cache, chunk_size=list(CHUNK_SIZE), encoder_chunk_look_back=ENCODER_LOOK_BACK,
                     decoder_chunk_look_back=DECODER_LOOK_BACK, encoder_conf=kwargs["encoder_conf"],
                     frontend_conf=kwargs["frontend_conf"])
    raw: list[torch.Tensor] = []
    hook = predictor.cif_output.register_forward_hook(lambda _m, _i, out: raw.append(out.detach()))
    alphas: list[np.ndarray] = []
    frames: list[np.ndarray] = []
    emitted_ids: list[list[int]] = []           # per chunk: every id the decoder emitted, kept or not
    consumed, in_step = 0, True                 # LFR frames fed so far; whether the weights agree
    try:
        n_chunks = len(samples) // CHUNK_STRIDE + 1
        for i in range(n_chunks):
            final = i == n_chunks - 1
            piece = samples[i * CHUNK_STRIDE:(i + 1) * CHUNK_STRIDE]
            if final and len(piece) < TAIL_SAMPLES:
                cache["encoder"]["tail_chunk"] = True
                speech = cache["encoder"]["feats"]
                lengths, new = torch.tensor([speech.shape[1]], dtype=torch.int64), 0
            else:
                speech, lengths = extract_fbank([piece], data_type="sound", frontend=frontend,
                                                cache=cache["frontend"], is_final=final)
                new = int(speech.shape[1])
            raw.clear()
            enc, enc_lens = model.encode_chunk(speech.to(device), lengths.to(device), cache=cache, is_final=final)
            if isinstance(enc, tuple):
                enc = enc[0]
            embeds, counts, _, _ = model.calc_predictor_chunk(enc, enc_lens, cache=cache, is_final=final)
            count = int(counts.round().long().max())
            chunk_alphas, chunk_frames = _chunk_weights(predictor, raw, enc.shape[1], new, consumed, final)
            consumed += new
            alphas.append(chunk_alphas)
            frames.append(chunk_frames)
            if count < 1:
                emitted_ids.append([])
                continue
            dec, _ = model.cal_decoder_with_predictor_chunk(enc, enc_lens, embeds, counts.round().long(), cache=cache)
            ids = dec[0, :count].argmax(dim=-1).tolist()
            emitted_ids.append(ids)
    finally:
        hook.remove()
    all_alphas, all_frames = np.concatenate(alphas), np.concatenate(frames)
    frame_s = frontend.frame_shift * frontend.lfr_n / 1000
    spans = cif_token_spans(all_alphas, all_frames, predictor.threshold, frame_s, tail=predictor.tail_threshold)
    flat = [t for ids in emitted_ids for t in ids]
    if len(spans) != len(flat):
        in_step = False
        log.warning("the Paraformer's CIF weights fire %d tokens where it emitted %d; words are untimed",
                    len(spans), len(flat))
    skip = {model.blank_id, model.sos, model.eos}
    kept = [(t, s) for t, s in zip(flat, spans if in_step else [None] * len(flat)) if t not in skip]
    tokens = tokenizer.ids2tokens([t for t, _ in kept]) if kept else []
    return list(tokens), [s for _, s in kept] if in_step else None


def _chunk_weights(predictor, raw: list[torch.Tensor], width: int, new: int, consumed: int,
                   final: bool) -> tuple[np.ndarray, np.ndarray]:
    """One chunk's CIF weights as the predictor integrates them, with each weight's frame number.

    The weights are the predictor's (sigmoid, smoothing, noise floor), with the frames it masks off
    left out: a chunk's look-ahead is integrated by the next chunk. The encoder's output for a chunk
    is the carried look-ahead frames followed by the new ones, so its first frame is ``consumed``
    minus the carried count (negative for the zero padding before the first chunk).
    """
    if len(raw) != 1:
        raise RuntimeError(f"expected one predictor pass per chunk, saw {len(raw)}")
    alpha = torch.relu(torch.sigmoid(raw[0]) * predictor.smooth_factor - predictor.noise_threshold)
    alpha = alpha.reshape(-1).float().cpu().numpy()
    left, stride = CHUNK_SIZE[0], CHUNK_SIZE[1]
    keep = slice(left, None) if final else slice(left, left + stride)
    first = consumed - (width - new)
    numbers = np.arange(first, first + width, dtype=np.int64)
    return alpha[keep], numbers[keep]


def _text_and_words(tokens: list[str], spans: list | None) -> tuple[str, list | None]:
    """funasr's text for ``tokens`` and, with spans, its words with their spans (pieces joined)."""
    from funasr.utils.postprocess_utils import sentence_postprocess

    text = " ".join(str(sentence_postprocess(tokens)[0]).split()) if tokens else ""
    if spans is None or not tokens:
        return text, None if spans is None else []
    kept = [(t, s) for t, s in zip(tokens, spans) if t not in DROPPED_TOKENS]
    if not kept:
        return text, []
    _, stamps, words = sentence_postprocess([t for t, _ in kept], [[s.start_s, s.end_s] for _, s in kept])
    if len(stamps) != len(words):   # a token kind funasr joins without a time (e.g. punctuation)
        log.warning("funasr joined %d words from %d timed tokens; words are untimed", len(words), len(stamps))
        return text, None
    return text, [(str(w), (float(a), float(b))) for w, (a, b) in zip(words, stamps)]
