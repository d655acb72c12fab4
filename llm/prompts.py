"""Prompt templates and the token-id layout of Step-Audio-EditX clone and edit prompts.

Owns: the system prompts and edit instructions (as data, byte-exact to what the model was
trained on, odd spacing included), the clone speaker name, and the assembly of prompt ids from
separate ``encode`` calls.
Does not own: the tokenizer itself (any ``encode(str) -> list[int]`` without BOS will do), the
audio-token layout and its ``<audio_N>`` string (``core.audio_tokens``), validation of user
choices against the option lists (``tts_engine.contract.validate_edit``).

Id layout (every ``enc`` is its own encode call, results concatenated)::

    clone: [1][4] enc("system\\n" + CLONE_SYSTEM) [3][4] enc("human\\n") TARGET [3][4] enc("assistant\\n")
    edit:  [1][4] enc("system\\n" + EDIT_SYSTEM)  [3][4] enc("human\\n") enc(instr + "\\n" + audio + "\\n")
           [3][4] enc("assistant\\n")

``TARGET = enc("\\n" + text)[len(enc("\\n")):]``: encoding behind a newline keeps a
SentencePiece tokenizer from prefixing the text with a word-boundary piece.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import numpy as np

from core.errors import InputError

BOS_ID = 1            # <s>
END_OF_TURN_ID = 3    # <|EOT|>
BEGIN_OF_TURN_ID = 4  # <|BOT|>

CLONE_SYSTEM_TEMPLATE = (
    "Generate audio with the following timbre, prosody and speaking style\n\n"
    "[speaker_start]\n"
    "speaker name: {speaker}\n"
    "speaker prompt text: \n"
    "{prompt_text}\n"
    "speaker audio tokens: \n"
    "{prompt_wav_tokens}\n"
    "[speaker_end]\n"
)

EDIT_SYSTEM_PROMPT = (
    "As a highly skilled audio editing and tuning specialist, you excel in interpreting user instructions "
    "and applying precise adjustments to meet their needs. Your expertise spans a wide range of enhancement "
    "capabilities, including but not limited to:\n"
    "# Emotional Enhancement\n"
    "# Speaking Style Transfer\n"
    "# Non-linguistic Adjustments\n"
    "# Audio Tuning & Editing\n"
    "Note: You will receive instructions in natural language and are expected to accurately interpret and "
    "execute the most suitable audio edits and enhancements.\n"
)

# Instruction prefixes. Speed shares the emotion wording, so "more faster" reads "more more faster";
# the model was trained on exactly these strings, so the quirks stay.
_MORE = "Make the following audio more {edit_info}. The text corresponding to the audio is: {audio_text}\n"
_REMOVE_EMOTION = "Remove any emotion in the following audio and the reference text is: {audio_text}\n"
_MORE_STYLE = "Make the following audio more {edit_info} style. The text corresponding to the audio is: {audio_text}\n"
_REMOVE_STYLE = "Remove any speaking styles in the following audio and the reference text is: {audio_text}\n"
_DENOISE = ("Remove any noise from the given audio while preserving the voice content clearly. Ensure that the "
            "speech quality remains intact with minimal distortion, and eliminate all noise from the audio.\n")
_VAD = ("Remove any silent portions from the given audio while preserving the voice content clearly. Ensure "
        "that the speech quality remains intact with minimal distortion, and eliminate all silence from the audio.\n")
_PARALINGUISTIC = ("Add some non-verbal sounds to make the audio more natural, the new text is : {text}\n"
                   "  The text corresponding to the audio is: {audio_text}\n")

EDIT_PROMPT_TYPES = ("emotion", "speed", "style", "denoise", "vad", "paralinguistic")

Encode = Callable[[str], Sequence[int]]


def clone_speaker_id(prompt_text: str, samples: np.ndarray) -> str:
    """The reference's speaker name for a clone prompt: ``clone_`` + 16 hex digits.

    Parameters:
        prompt_text: the transcript, as given.
        samples: the decoded clip as loaded, before any peak limiting (float32; a ``[C, N]``
            array is flattened channel by channel, as the reference does).

    The hash covers the text and the first and last 1000 samples (all of them when there are
    at most 2000).
    """
    flat = np.ascontiguousarray(np.asarray(samples, dtype=np.float32).reshape(-1))
    h = hashlib.sha256(prompt_text.encode("utf-8"))
    if flat.size <= 2000:
        h.update(flat.tobytes())
    else:
        h.update(flat[:1000].tobytes())
        h.update(flat[-1000:].tobytes())
    return "clone_" + h.hexdigest()[:16]


def edit_instruction(edit_type: str, edit_info: str | None, audio_text: str | None, text: str | None = None) -> str:
    """The instruction prefix (ending in a newline) for one edit request.

    Parameters:
        edit_type: one of :data:`EDIT_PROMPT_TYPES`.
        edit_info: the option (emotion, style or speed value); ``"remove"`` selects the removal wording.
        audio_text: what the input audio says; stripped, ``None`` becomes ``""``.
        text: the new text with tags (paralinguistic only).

    Raises:
        InputError: unknown edit type (the message lists the valid ones).
    """
    a = audio_text.strip() if audio_text else ""
    if edit_type in ("emotion", "speed"):
        if edit_info == "remove":
            return _REMOVE_EMOTION.format(audio_text=a)
        return _MORE.format(edit_info=edit_info, audio_text=a)
    if edit_type == "style":
        if edit_info == "remove":
            return _REMOVE_STYLE.format(audio_text=a)
        return _MORE_STYLE.format(edit_info=edit_info, audio_text=a)
    if edit_type == "denoise":
        return _DENOISE
    if edit_type == "vad":
        return _VAD
    if edit_type == "paralinguistic":
        return _PARALINGUISTIC.format(text=text if text is not None else "", audio_text=a)
    raise InputError(f"unsupported edit type {edit_type!r}; choose one of {', '.join(EDIT_PROMPT_TYPES)}")


def _turn(encode: Encode, role: str, body_ids: Sequence[int] = ()) -> list[int]:
    return [BEGIN_OF_TURN_ID, *encode(role + "\n"), *body_ids]


def clone_prompt_ids(encode: Encode, speaker: str, prompt_text: str, prompt_audio_string: str,
                     target_text: str) -> list[int]:
    """Prompt ids for cloning ``target_text`` in the voice of the prompt clip.

    Parameters:
        encode: tokenizer encode without special tokens (no BOS).
        speaker: :func:`clone_speaker_id` of the prompt.
        prompt_text: the prompt's transcript, verbatim.
        prompt_audio_string: ``core.audio_tokens.audio_string`` of the prompt's mixed codes.
        target_text: the text to speak, verbatim (not stripped).
    """
    system = CLONE_SYSTEM_TEMPLATE.format(speaker=speaker, prompt_text=prompt_text,
                                          prompt_wav_tokens=prompt_audio_string)
    target = list(encode("\n" + target_text))[len(encode("\n")):]
    return ([BOS_ID, BEGIN_OF_TURN_ID, *encode("system\n" + system), END_OF_TURN_ID]
            + _turn(encode, "human", target) + [END_OF_TURN_ID]
            + _turn(encode, "assistant"))


def edit_prompt_ids(encode: Encode, instruction: str, audio_string: str) -> list[int]:
    """Prompt ids for an edit: ``instruction`` from :func:`edit_instruction`, the input's audio string."""
    body = encode(f"{instruction}\n{audio_string.strip()}\n")
    return ([BOS_ID, BEGIN_OF_TURN_ID, *encode("system\n" + EDIT_SYSTEM_PROMPT), END_OF_TURN_ID]
            + _turn(encode, "human", body) + [END_OF_TURN_ID]
            + _turn(encode, "assistant"))
