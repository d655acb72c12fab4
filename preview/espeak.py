"""eSpeak NG text-to-speech through ctypes, using the library and data bundled by ``espeakng-loader``.

Owns: loading the shared library, choosing a voice, and turning text into 22050 Hz samples
(float32). The library is not reentrant, so every call holds one process-wide lock.

Why each call loads a fresh copy of the library: eSpeak NG keeps synthesis state in C statics
that no API call resets (e.g. the phase of its pitch "flutter" and of the glottal wave), so the
same text comes out slightly different -- even a few samples longer -- on every call. The
preview engine promises equal output for equal seeds, so :func:`speak` opens a private copy of
the library (copied once into a temporary folder, so that nobody else's handle keeps it
loaded), initialises it, synthesises, and unloads it again. That costs about 1 ms per call.
(Voice variants with breath noise, e.g. ``+f3``, still vary: they draw from the C library's
global ``rand()``. The engine uses the plain language voices, which do not.)
Does not own: language detection, tags, resampling or voice adaptation (``preview.text``,
``preview.voice``).
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ModelError

log = logging.getLogger(__name__)

# espeak_AUDIO_OUTPUT: synthesise in the calling thread and hand samples to the callback.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
# espeak_Initialize option: report errors instead of calling exit() when the data is missing.
_INITIALIZE_DONT_EXIT = 0x8000
# espeak_Synth flags: UTF-8 text (espeakCHARS_UTF8) and a pause after the last clause (espeakENDPAUSE).
_CHARS_UTF8 = 0x1
_ENDPAUSE = 0x1000
_POS_CHARACTER = 1
# espeak_PARAMETER ids.
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_EE_OK = 0

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

DEFAULT_RATE_WPM = 175   # eSpeak's own default speaking rate
DEFAULT_PITCH = 50       # 0..100, eSpeak's default base pitch
DEFAULT_RANGE = 50       # 0..100, eSpeak's default pitch range


@dataclass(frozen=True)
class Speech:
    """One eSpeak rendering: mono float32 samples in [-1, 1] at ``sample_rate`` (22050 Hz)."""

    samples: np.ndarray
    sample_rate: int
    voice: str


_lock = threading.Lock()
_private_copy: Path | None = None
_data_path = b""
_version = ""
_chunks: list[np.ndarray] = []


def _collect(wav, count, events) -> int:
    if count > 0 and wav:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
    return 0  # 0 = continue synthesising


# Module-level so that the C trampoline outlives every library instance that points at it.
_callback = _CALLBACK(_collect)


def _prepare() -> None:
    """Find the bundled library and data, and copy the library to a private file (lock held)."""
    global _private_copy, _data_path
    if _private_copy is not None:
        return
    try:
        import espeakng_loader

        source = Path(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path()
    except (ImportError, OSError, RuntimeError) as exc:
        raise ModelError(f"the preview engine needs eSpeak NG from the 'espeakng-loader' package: {exc}") from exc
    if not source.is_file():
        raise ModelError(f"the eSpeak NG library is missing: {source}")
    try:
        folder = Path(tempfile.mkdtemp(prefix="studio-espeak-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        target = folder / source.name
        shutil.copyfile(source, target)
    except OSError as exc:
        raise ModelError(f"could not copy the eSpeak NG library to a temporary folder: {exc}") from exc
    _data_path, _private_copy = data.encode(), target


class _Session:
    """One loaded, initialised instance of the library; unloaded on exit (lock held throughout)."""

    def __enter__(self) -> tuple[ctypes.CDLL, int]:
        try:
            lib = ctypes.CDLL(str(_private_copy))
        except OSError as exc:
            raise ModelError(f"could not load the eSpeak NG library: {exc}") from exc
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        self.lib = lib
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, _data_path, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            self._unload()
            raise ModelError(f"eSpeak NG failed to initialise with its data folder {_data_path.decode()}")
        lib.espeak_SetSynthCallback(_callback)
        return lib, rate

    def _unload(self) -> None:
        handle = self.lib._handle
        del self.lib
        _ctypes.dlclose(handle)

    def __exit__(self, *exc_info) -> None:
        self.lib.espeak_Terminate()
        self._unload()


def version() -> str:
    """The eSpeak NG version string, e.g. ``"1.52.0"``.

    Raises:
        ModelError: the library could not be loaded.
    """
    global _version
    with _lock:
        if not _version:
            _prepare()
            with _Session() as (lib, rate):
                _version = (lib.espeak_Info(None) or b"unknown").decode(errors="replace")
            log.info("eSpeak NG %s found (%d Hz)", _version, rate)
        return _version


def has_voice(name: str) -> bool:
    """Whether eSpeak NG can select voice ``name`` (e.g. ``"yue"``, ``"en-us+f3"``).

    Raises:
        ModelError: the library could not be loaded.
    """
    with _lock:
        _prepare()
        with _Session() as (lib, _):
            return lib.espeak_SetVoiceByName(name.encode()) == _EE_OK


def _clean(text: str) -> str:
    # Control characters (NUL above all) would end or confuse the C string.
    return "".join(ch if ch.isprintable() or ch in "\n\t" else " " for ch in text).strip()


def speak(text: str, voice: str = "en-us", rate_wpm: int = DEFAULT_RATE_WPM, pitch: int = DEFAULT_PITCH,
          pitch_range: int = DEFAULT_RANGE) -> Speech:
    """Synthesise ``text`` with eSpeak NG; equal arguments always give equal samples.

    Parameters:
        text: plain text (not SSML).
        voice: an eSpeak voice name, optionally with a variant (``"en-us+f3"``).
        rate_wpm: speaking rate in words per minute (clipped to 80..450).
        pitch, pitch_range: eSpeak's 0..100 base pitch and pitch range.

    Returns:
        :class:`Speech` with float32 samples ``[N]`` at 22050 Hz (``N`` may be small for text
        that has nothing to pronounce: eSpeak still adds its final pause).

    Raises:
        ModelError: the library could not be loaded, the voice does not exist, or synthesis failed.
    """
    global _chunks
    encoded = _clean(text).encode("utf-8")
    with _lock:
        _prepare()
        with _Session() as (lib, rate):
            if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise ModelError(f"eSpeak NG has no voice named {voice!r}")
            for parameter, value in ((_RATE, int(np.clip(rate_wpm, 80, 450))), (_PITCH, int(np.clip(pitch, 0, 100))),
                                     (_RANGE, int(np.clip(pitch_range, 0, 100))), (_VOLUME, 100)):
                lib.espeak_SetParameter(parameter, value, 0)
            _chunks = []
            buffer = ctypes.create_string_buffer(encoded)
            status = lib.espeak_Synth(buffer, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE,
                                      None, None)
            lib.espeak_Synchronize()
            chunks, _chunks = _chunks, []
    if status != _EE_OK:
        raise ModelError(f"eSpeak NG synthesis failed (error {status})")
    samples = np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else np.zeros(0, np.float32)
    return Speech(samples, rate, voice)
