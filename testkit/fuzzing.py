"""Hypothesis strategies and properties for fuzzing audio decoding and the API's request bodies.

Owns: the input generators (random bytes, valid audio/zip files with random byte mutations, random
JSON values, random multipart forms for every body-taking ``/v1`` route) and the two properties
checked on them: ``load_audio`` returns an ``Audio`` or raises ``InputError`` (nothing else), and
an API request is answered with a status below 500 and a JSON error body for 4xx. Shared by
``tests/test_fuzz.py`` (a short run) and ``bench/fuzz.py`` (a long one).
Does not own: the server (``testkit.studio_server`` / ``web.server``).
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import soundfile as sf
from hypothesis import strategies as st

from core.audio_io import Audio, load_audio
from core.errors import InputError


def _seed_files() -> list[bytes]:
    """Small valid files of each container the studio reads, to mutate."""
    rng = np.random.default_rng(0)
    tone = (0.3 * np.sin(np.arange(4000) / 5.0)).astype(np.float32)
    out = []
    for fmt, subtype, channels in (("WAV", "PCM_16", 1), ("WAV", "FLOAT", 2), ("FLAC", "PCM_16", 2),
                                   ("OGG", "VORBIS", 1), ("MP3", "MPEG_LAYER_III", 1)):
        data = tone if channels == 1 else np.stack([tone, 0.5 * tone[::-1]], axis=1)
        buffer = io.BytesIO()
        sf.write(buffer, data + 0.001 * rng.standard_normal(data.shape).astype(np.float32), 16000,
                 format=fmt, subtype=subtype)
        out.append(buffer.getvalue())
    return out


SEED_FILES = _seed_files()


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed file with random byte flips, truncation, insertion or header damage."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "header"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:  # overwrite a header field (lengths, rates, channel counts live in the first bytes)
            start = draw(st.integers(0, min(64, len(data) - 1)))
            data[start:start + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


audio_bytes = st.one_of(st.binary(max_size=2048), mutated(SEED_FILES))


def check_decoding(data: bytes, max_seconds: float | None = 30.0) -> str:
    """The property: an Audio or an InputError, never anything else. Returns "ok" or "refused"."""
    try:
        audio = load_audio(data, max_seconds=max_seconds)
    except InputError:
        return "refused"
    assert isinstance(audio, Audio) and np.isfinite(audio.samples).all() and len(audio.samples) > 0
    return "ok"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12)

_SPEECH_KEYS = ("model", "input", "voice", "response_format", "speed", "instructions", "stream_format", "seed",
                "flow_steps")


@st.composite
def speech_bodies(draw, voice_id: str) -> bytes:
    """Raw bytes for POST /v1/audio/speech: mostly JSON objects over the real field names."""
    kind = draw(st.sampled_from(["object", "any-json", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=256))
    if kind == "any-json":
        return json.dumps(draw(json_values)).encode()
    body = {}
    for key in draw(st.lists(st.sampled_from(_SPEECH_KEYS), unique=True, max_size=len(_SPEECH_KEYS))):
        body[key] = draw(json_values | st.just(voice_id) | st.just("wav") | st.just("Hello there."))
    return json.dumps(body).encode()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@st.composite
def bundle_bytes(draw, valid_bundle: bytes) -> bytes:
    """A voice bundle: random bytes, a mutated real bundle, or a zip with a random voice.json."""
    kind = draw(st.sampled_from(["raw", "mutated", "json"]))
    if kind == "raw":
        return draw(st.binary(max_size=1024))
    if kind == "mutated":
        return draw(mutated([valid_bundle]))
    source = zipfile.ZipFile(io.BytesIO(valid_bundle))
    members = {n: source.read(n) for n in source.namelist()}
    members["voice.json"] = json.dumps(draw(json_values | st.fixed_dictionaries(
        {"format": st.sampled_from([1, 2, 3]), "transcript": json_values, "entries": json_values}))).encode()
    return _zip(members)


_EDIT_FIELDS = ("edit_type", "edit_info", "audio_text", "text", "voice", "seed", "flow_steps", "response_format")
_FORM_TEXT = st.text(max_size=30) | st.sampled_from(["emotion", "speed", "denoise", "vad", "happy", "faster", "-1",
                                                      "3", "wav", "1e999"])


@st.composite
def form_request(draw, voice_id: str, valid_bundle: bytes) -> tuple[str, dict, dict]:
    """(path, form fields, files) for one of the multipart routes."""
    route = draw(st.sampled_from(["/v1/audio/voices", "/v1/audio/edits", "/v1/audio/voices/import"]))
    fields: dict = {}
    files: dict = {}
    if route == "/v1/audio/voices":
        names = draw(st.lists(st.sampled_from(["transcript", "name"]), unique=True))
        fields = {n: draw(_FORM_TEXT) for n in names}
        if draw(st.booleans()):
            files["file"] = ("clip.wav", draw(audio_bytes), "audio/wav")
    elif route == "/v1/audio/edits":
        names = draw(st.lists(st.sampled_from(_EDIT_FIELDS), unique=True))
        fields = {n: (voice_id if n == "voice" and draw(st.booleans()) else draw(_FORM_TEXT)) for n in names}
        if draw(st.booleans()):
            files["file"] = ("clip.wav", draw(audio_bytes), "audio/wav")
    else:
        if draw(st.booleans()):
            fields["name"] = draw(_FORM_TEXT)
        if draw(st.integers(0, 4)):
            files["file"] = ("v.zip", draw(bundle_bytes(valid_bundle)), "application/zip")
    return route, fields, files


def check_response(response) -> int:
    """The property for any API answer: below 500, and a 4xx carries a JSON error with a message."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
    return response.status_code
